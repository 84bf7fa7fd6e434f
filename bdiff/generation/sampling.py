"""Block-by-block generation with an exact KV cache.

Each sequence grows one block at a time. The block starts as MASK tokens (the prompt's last, partial block
keeps its known tokens); each denoising step runs the model on that block only, attending to itself and to
the cached keys/values of the finished clean blocks, and reveals some masked tokens. When no MASK is left,
one more pass runs the block as clean context, which leaves its keys/values in the cache. A noisy block
never affects earlier blocks, so this equals recomputing the whole x_t ⊕ x_0 layout at every step
(tests/test_sampling.py checks the logits of every step).
"""
from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bdiff.config import COMPILE_MODES, ModelConfig, SamplingConfig
from bdiff.data.tokenizer import load_tokenizer
from bdiff.errors import BdiffError
from bdiff.models.objective import BlockDiffusionModel

STRATEGIES = ("confidence", "threshold", "random")


class SamplingError(BdiffError):
    """Bad sampling input or checkpoint; the message names what is wrong."""


class KVCache:
    """Keys and values of every layer for the finished clean blocks of each sequence, preallocated in the
    activations' dtype (no casts): (layers, batch, max_len, key/value heads, head_dim). Denoising steps only read it:
    each call attends to the first `span` slots (slot j of sequence i visible when j < its clean length) and to its
    own block; `write` stores a block's keys/values once the block is clean."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def write(self, rows: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (layers, b, block, H, D) of sequences `rows` (b,), into their slots from `lengths` (b,) on."""
        slots = lengths[:, None] + torch.arange(k.shape[2], device=k.device)  # (b, block)
        self.k[:, rows[:, None], slots] = k
        self.v[:, rows[:, None], slots] = v

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the sequences `rows` (in that order): the batch shrinks when sequences stop."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def cached_call(model: BlockDiffusionModel, tokens, positions, K, V, visible, keep_kv: bool = False):
    """The model on one block per sequence, tokens and positions (b, B), attending to the cached keys/values
    K, V (layers, b, span, Hkv, D) where `visible` (b, span) and to its whole block. float32 logits (b, B, vocab); with
    keep_kv the block's keys and values instead, (layers, b, B, Hkv, D) each, for the cache, and with token shift the
    logits of its last row (b, vocab): the prediction of the next block's first position (else None). Every shape is
    fixed within a block, so `torch.compile` serves a block's steps with one graph (SamplingConfig.compile)."""
    mask = torch.cat([visible, visible.new_ones(tokens.shape)], 1)[:, None, None, :]  # (b, 1, 1, span + B)
    kept = []

    def attend(layer, q, k, v, scale=None):  # q (b, B, H, D), k and v (b, B, Hkv, D)
        if keep_kv:
            kept.append((k, v))
        keys, values = torch.cat([K[layer], k], 1), torch.cat([V[layer], v], 1)  # (b, span + B, Hkv, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask, scale=scale, enable_gqa=k.shape[-2] != q.shape[-2])
        return out.transpose(1, 2)

    hidden = model.run_layers(tokens, positions, attend)
    if keep_kv:
        last = model.logits(hidden[:, -1]) if model.cfg.token_shift else None
        return torch.stack([k for k, _ in kept]), torch.stack([v for _, v in kept]), last
    return model.logits(hidden)


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each prompt (cut at BOS, max_new_tokens or a low-entropy stop)
    model_calls: int  # forward passes of the model (denoising steps + clean passes), each over the whole batch
    sequence_calls: int  # the passes each sequence took part in, summed: per token, what one sequence's text costs
    seconds: float
    cache_bytes: int  # 0 without a cache
    host_reads: int = 0  # values read back from the device: once per block (threshold: also once per step)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (batch, block, vocab) per step, on request
    compile_seconds: float = 0.0  # compiling and capturing the model call, once per shape (part of `seconds`)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def calls_per_token(self) -> float:
        """Model calls per generated token of a sequence, whatever the batch: 1 + 1/block at one token per call."""
        return self.sequence_calls / max(1, self.new_tokens)


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (nucleus sampling), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens entirely beyond the nucleus
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p / sorted_p.sum(-1, keepdim=True))


def _choose(logits, masked, steps_left, strategy, threshold, temperature, top_p, gens):
    """Sample every position, then pick which masked positions to reveal this step. (b, B) each. Each
    sequence draws from its own generator, so its text does not depend on the rest of the batch."""
    if temperature == 0:
        probs = logits.softmax(-1)
        sample = probs.argmax(-1)
    else:
        probs = _filter_top_p((logits / temperature).softmax(-1), top_p)
        sample = torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, gens)])
    confidence = probs.gather(-1, sample[..., None]).squeeze(-1).masked_fill(~masked, -1.0)  # (b, B)
    if strategy == "threshold":
        reveal = masked & (confidence > threshold)
        best = confidence.argmax(-1, keepdim=True)  # at least one per sequence with a MASK left
        reveal.scatter_(-1, best, masked.gather(-1, best))
        return sample, reveal
    count = (masked.sum(-1, keepdim=True) + steps_left - 1) // steps_left  # ceil: done by the last step
    if strategy == "random":
        confidence = torch.stack([torch.rand(masked.shape[1], generator=g, device=masked.device) for g in gens])
        confidence = confidence.masked_fill(~masked, -1.0)
    rank = confidence.argsort(-1, descending=True).argsort(-1)  # 0 = most confident
    return sample, masked & (rank < count)


def window_entropy(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Entropy in nats of each row's token frequencies, (b, W) -> (b,): low when a text repeats itself."""
    counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device).scatter_add_(
        1, tokens, torch.ones(tokens.shape, device=tokens.device))
    return torch.special.entr(counts / tokens.shape[1]).sum(-1)


SPAN_MULTIPLE = 64  # cache slots, and the slots an eager call reads, rounded up to this: few distinct shapes


def compile_mode(name: str | None, device: torch.device) -> str | None:
    """SamplingConfig.compile as a torch.compile mode (None: eager). "auto": CUDA graphs on a GPU (reduce-overhead:
    the decode step of a small model is launch-bound), eager on a CPU (compiling costs ~25 s there, repaid only after
    ~45,000 tokens at batch 1: bench/bench_sampling.py --compile)."""
    if name == "auto":
        return "reduce-overhead" if device.type == "cuda" else None
    return None if name in (None, "none") else name


@functools.lru_cache(maxsize=None)
def _compiled_call(mode: str):
    """One compiled cached_call per mode, shared by every generate() call, so their graphs are reused."""
    return torch.compile(cached_call, mode=mode, dynamic=False)


_WORKSPACE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its KV cache for compiled calls


def _workspace(model: BlockDiffusionModel, batch: int, total: int, device, dtype) -> KVCache:
    """The KV cache a compiled decode step reads, kept with the model from one generate() call to the next of the same
    batch and length, at fixed addresses (torch._dynamo.mark_static_address): its CUDA graphs replay as captured, and
    the cache is never copied into them. A call of another shape replaces it."""
    key = (batch, total, device, dtype)
    kept = _WORKSPACE.get(model)
    if kept is None or kept[0] != key:
        cache = KVCache(model.cfg, batch, total, device, dtype)
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
        _WORKSPACE[model] = kept = (key, cache)
    return kept[1]


def _overlap_reads(device: torch.device) -> bool:
    """Whether the threshold strategy asks if its block is complete while the next step runs (a GPU works on while
    the host waits) rather than at once (a CPU has nothing to overlap)."""
    return device.type == "cuda"


@torch.no_grad()
def generate(model: BlockDiffusionModel, prompts: list[list[int]], config: SamplingConfig | None = None, *,
             keep_logits: bool = False, stop_when=None, **options) -> Generation:
    """Generate after each prompt (lists of token ids), block by block, as `config` says (SamplingConfig: its
    defaults are sample.py's); keyword `options` override single fields: generate(model, prompts, seed=3).

    "confidence" reveals ceil(masked / steps left) most confident tokens a step, "threshold" every token above
    the threshold (at least one), "random" a random subset of that size. A sequence stops after its first BOS
    (end of text), at max_new_tokens, or (stop_entropy) when its last entropy_window tokens repeat themselves.
    keep_logits: every step's logits in the result (for tests). stop_when(prompt index, its new tokens so far): a
    sequence also stops after the block where this says True (a stop string: bdiff/lm_eval.py); its tokens come back
    with the block's one read.

    Compiled (SamplingConfig.compile; CUDA graphs on a GPU by default), the model call of a step has one shape for
    the whole generation: the batch stays whole (a sequence that stopped is carried along, frozen) and every call
    attends over the whole cache with a mask of each sequence's clean length, so one graph serves every step of every
    block (and one more the clean pass that fills the cache). Eager, sequences that stopped leave the batch and a call
    reads only the cache slots in use: less work on a CPU.

    The loop reads one thing back from the device per block (which sequences are still going) and the tokens at the
    end; positions, how many steps a block takes and the cache's span follow from the prompts' lengths on the host.
    The threshold strategy's blocks end when no MASK is left: on a GPU it asks after each step, while the next step
    already runs (the device never waits; a finished block costs at most one more call), on a CPU at once.
    """
    c = dataclasses.replace(config or SamplingConfig(), **options)
    cfg = model.cfg
    B = cfg.block_size
    steps_per_block = B if c.steps_per_block is None else c.steps_per_block
    _validate(prompts, cfg, c, steps_per_block)
    device = next(model.parameters()).device
    mode = compile_mode(c.compile, device)
    fixed = mode is not None and c.cache  # one shape for every call: the compiled step
    bsz = len(prompts)
    lengths = [len(p) for p in prompts]
    start = [n // B * B for n in lengths]  # first position of each sequence's current block (host)
    total = -(-(max(lengths) + c.max_new_tokens + 2 * B) // SPAN_MULTIPLE) * SPAN_MULTIPLE
    rows = torch.full((bsz, total), cfg.mask_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        rows[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    seq = rows.to(device)  # (b, total): the sequences still in the batch; one transfer
    prompt_len = torch.tensor(lengths, device=device)
    gens = [torch.Generator(device).manual_seed(c.seed) for _ in range(bsz)]
    arange_b = torch.arange(B, device=device)
    cache = None
    if c.cache:
        cache = (_workspace(model, bsz, total, device, model.dtype) if fixed
                 else KVCache(cfg, bsz, total, device, model.dtype))  # the activations' dtype
    cache_bytes = cache.nbytes if c.cache else 0
    call = _compiled_call(mode) if mode else cached_call
    calls, sequence_calls, reads, step_logits, compile_seconds = 0, 0, 0, [], 0.0
    first_calls = {False, True} if mode else set()  # keep_kv: the step and the clean pass each compile once
    t0 = time.perf_counter()

    def model_call(*args, keep_kv=False):  # the compiled call's first run of each kind compiles and captures it
        nonlocal compile_seconds
        t = time.perf_counter()
        out = call(model, *args, keep_kv=keep_kv)
        if keep_kv in first_calls:
            first_calls.discard(keep_kv)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_seconds += time.perf_counter() - t
        return out

    def block_logits(block, positions, K, V, visible):  # the current blocks (b, B) -> float32 logits (b, B, V)
        if c.cache:
            logits = model_call(block, positions, K, V, visible)
            # token shift: a block's first position from the clean pass before it, the others from the row before
            return torch.cat([first[:, None], logits[:, :-1]], 1) if cfg.token_shift else logits
        out = []
        for i in range(len(active)):  # no cache: the whole x_t ⊕ x_0 layout of this sequence, from scratch
            L = start[active[i]] + B
            clean = torch.cat([seq[i, :L - B], block[i]])
            cu = torch.tensor([0, L], dtype=torch.int32, device=device)
            h, _ = model.predicting_states(torch.cat([clean, clean]), torch.arange(L, device=device), cu)
            out.append(model.logits(h[L - B:L]))
        return torch.stack(out)

    # token shift: the prediction of each sequence's current block's first position, from the last row of the clean
    # pass before it (b, vocab)
    first = torch.zeros(bsz, cfg.vocab_size, device=device) if cfg.token_shift and c.cache else None
    if c.cache:  # prefill: each prompt's complete blocks, block by block, one sequence at a time, eagerly
        rows_all, block_starts = torch.arange(bsz, device=device), torch.arange(0, total, B, device=device)
        for i in range(bsz):
            for b0 in range(0, start[i], B):
                visible = torch.ones(1, b0, dtype=torch.bool, device=device)
                k, v, last = cached_call(model, seq[i:i + 1, b0:b0 + B], (b0 + arange_b)[None],
                                         cache.k[:, i:i + 1, :b0], cache.v[:, i:i + 1, :b0], visible, keep_kv=True)
                cache.write(rows_all[i:i + 1], block_starts[b0 // B:b0 // B + 1], k, v)  # slices: no transfers
                if last is not None:
                    first[i] = last[0]
                calls, sequence_calls = calls + 1, sequence_calls + 1

    active = list(range(bsz))  # the prompts still generating (host); eager: also the order of seq's rows
    going = torch.ones(bsz, dtype=torch.bool, device=device)  # (b,) the batch's rows still generating (device)
    finished = {}  # prompt -> its row of seq, once it stopped (eager: its row leaves the batch)
    made = [0] * bsz  # new tokens so far per prompt (host: every block adds what is not prompt)
    new_tokens = [[] for _ in range(bsz)]  # with stop_when: the new tokens so far per prompt (host)
    begin = torch.tensor(start, device=device)  # (b,) start of each sequence's current block, kept on the device
    slots = torch.arange(total, device=device)
    while active:
        idx = begin[:, None] + arange_b  # (b, B) positions of the current blocks
        block = seq.gather(1, idx)
        # Steps this block takes: the most MASKs of any sequence's block (a prompt's partial block has fewer).
        steps = min(steps_per_block, max(start[i] + B - max(start[i], lengths[i]) for i in active))
        span = total if fixed else -(-max(start[i] for i in active) // SPAN_MULTIPLE) * SPAN_MULTIPLE
        visible = slots[None, :span] < begin[:, None]  # (b, span) the clean context
        K, V = (None, None) if not c.cache else (cache.k, cache.v) if fixed else (cache.k[:, :len(begin), :span],
                                                                                    cache.v[:, :len(begin), :span])
        batch_gens = gens if fixed else [gens[i] for i in active]
        complete = None  # threshold: whether the block had no MASK left after the previous step (device)
        for step in range(steps):
            masked = (block == cfg.mask_id) & going[:, None]  # a stopped sequence reveals nothing
            logits = block_logits(block, idx, K, V, visible)
            calls, sequence_calls = calls + 1, sequence_calls + len(active)
            if complete is not None:  # asked while this step's call was queued: the device is busy meanwhile
                reads += 1
                if bool(complete):
                    break
            if keep_logits:
                step_logits.append(logits.detach().clone().cpu())
            logits[..., cfg.mask_id] = float("-inf")  # MASK is never a prediction
            sample, reveal = _choose(logits, masked, steps - step, c.strategy, c.threshold, c.temperature, c.top_p,
                                     batch_gens)
            block = torch.where(reveal, sample, block)
            if c.strategy == "threshold" and step + 1 < steps:  # its steps depend on the data
                complete = ~((block == cfg.mask_id) & going[:, None]).any()
                if not _overlap_reads(device):
                    reads += 1
                    if bool(complete):
                        break
                    complete = None
        seq.scatter_(1, idx, block)
        if c.cache:  # the finished block, once more as clean context: its keys/values go into the cache
            k, v, last = model_call(block, idx, K, V, visible, keep_kv=True)
            cache.write(torch.arange(len(begin), device=device), begin, k, v)
            first = last if last is not None else first
            calls, sequence_calls = calls + 1, sequence_calls + len(active)
        stop = ((block == cfg.bos_id) & (idx >= prompt_len[:, None])).any(-1)  # (b,) ended its text
        for i in active:
            made[i] += start[i] + B - max(start[i], lengths[i])
            start[i] += B
        begin = begin + B * going  # a stopped sequence keeps its place (compiled: it stays in the batch)
        if c.stop_entropy is not None and max(made[i] for i in active) >= c.entropy_window:
            window = begin[:, None] - c.entropy_window + torch.arange(c.entropy_window, device=device)
            enough = begin - prompt_len >= c.entropy_window  # (b,) new tokens so far, from the window's size on
            stop |= enough & (window_entropy(seq.gather(1, window.clamp(min=0)), cfg.vocab_size) < c.stop_entropy)
        going &= ~stop & (begin - prompt_len < c.max_new_tokens)
        reads += 1
        rows_of = {i: (i if fixed else j) for j, i in enumerate(active)}
        if stop_when is None:
            still = going.tolist()  # the one read of a block
        else:  # the block's tokens come back in the same read, for the host's stop rule
            read = torch.cat([going[:, None].long(), block], 1).tolist()
            still = [bool(r[0]) for r in read]
            for i in active:
                row = read[rows_of[i]]
                new_tokens[i] += row[1 + max(0, lengths[i] - (start[i] - B)):]
                if still[rows_of[i]] and stop_when(i, new_tokens[i]):
                    still[rows_of[i]] = False
            going = torch.tensor(still, device=device)
        for i in active:
            if not still[rows_of[i]]:
                finished[i] = seq[rows_of[i]]
        if fixed:
            active = [i for i in active if still[i]]
        elif not all(still):
            keep = [j for j in range(len(active)) if still[j]]
            kept = torch.tensor(keep, device=device, dtype=torch.long)
            seq, begin, prompt_len, going = seq[kept], begin[kept], prompt_len[kept], going[kept]
            active = [active[j] for j in keep]
            if c.cache:
                cache.keep(kept)
            first = first[kept] if first is not None else None
    ids = torch.stack([finished[i] for i in range(bsz)]).tolist()
    return Generation([_cut(ids[i][lengths[i]:], c.max_new_tokens, cfg) for i in range(bsz)], calls,
                      sequence_calls, time.perf_counter() - t0, cache_bytes, reads, step_logits, compile_seconds)


def _cut(new: list[int], max_new_tokens: int, cfg: ModelConfig) -> list[int]:
    """A sequence's generated ids: up to its first BOS (kept), its last generated block, max_new_tokens."""
    new = new[:max_new_tokens]
    if cfg.mask_id in new:
        new = new[:new.index(cfg.mask_id)]
    return new[:new.index(cfg.bos_id) + 1] if cfg.bos_id in new else new


def prompt_ids(text: str, tokenizer: str, cfg: ModelConfig) -> list[int]:
    """A prompt's ids as the model was trained on documents: after a BOS where the separator opens documents,
    from position 0 (no BOS) where it closes them; "" is then the start of a document."""
    ids = load_tokenizer(tokenizer).encode(text)
    return [cfg.bos_id] + ids if cfg.separator == "opens" else ids


def _validate(prompts, cfg, c: SamplingConfig, steps_per_block: int):
    if not prompts:
        raise SamplingError("no prompts given")
    if cfg.separator == "opens" and any(len(p) == 0 for p in prompts):
        raise SamplingError("every prompt needs at least one token (BOS: this model's documents open with it)")
    if cfg.token_shift and any(len(p) == 0 for p in prompts):
        raise SamplingError("every prompt needs at least one token: this model predicts each token from the one "
                            "before it (token shift)")
    for p in prompts:
        if any(not 0 <= t < cfg.vocab_size or t == cfg.mask_id for t in p):
            raise SamplingError(f"prompt tokens must lie in [0, {cfg.vocab_size}) and not be MASK ({cfg.mask_id})")
    if c.max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens must be >= 1, got {c.max_new_tokens}")
    if not 1 <= steps_per_block <= cfg.block_size:
        raise SamplingError(f"steps_per_block must lie in [1, block_size={cfg.block_size}], got {steps_per_block}")
    if c.temperature < 0 or not 0 < c.top_p <= 1:
        raise SamplingError(f"need temperature >= 0 and 0 < top_p <= 1, got {c.temperature}, {c.top_p}")
    if c.strategy not in STRATEGIES:
        raise SamplingError(f"strategy must be one of {', '.join(STRATEGIES)}, got {c.strategy!r}")
    if not 0 < c.threshold < 1:
        raise SamplingError(f"threshold must lie in (0, 1), got {c.threshold}")
    if c.stop_entropy is not None and (c.stop_entropy <= 0 or c.entropy_window < 2):
        raise SamplingError(f"need stop_entropy > 0 and entropy_window >= 2, got {c.stop_entropy}, {c.entropy_window}")
    if c.compile not in (None, *COMPILE_MODES):
        raise SamplingError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {c.compile!r}")
