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
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bdiff.config import ModelConfig, SamplingConfig
from bdiff.errors import BdiffError
from bdiff.model import BlockDiffusionLM
from bdiff.tokenizer import load_tokenizer

STRATEGIES = ("confidence", "threshold", "random")


class SamplingError(BdiffError):
    """Bad sampling input or checkpoint; the message names what is wrong."""


class KVCache:
    """Keys and values of every layer for the finished clean blocks of each sequence, preallocated:
    (layers, batch, max_len, heads, head_dim). The block being processed is written into the slots right
    after a sequence's clean context; `advance()` keeps it there once it is clean."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_layers, batch, max_len, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # clean tokens cached per sequence
        self.rows = slice(None)  # the sequences of the current model call
        self.span = 0  # keys the current call reads: max over its sequences of lengths + block

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def select(self, rows: slice, block: int) -> None:
        self.rows = rows
        self.span = int(self.lengths[rows].max()) + block

    def advance(self, block: int) -> None:
        self.lengths[self.rows] += block

    def attend(self, layer: int, q, k, v):  # (b, block, H, D) each
        K, V = self.k[layer, self.rows], self.v[layer, self.rows]  # views into the cache
        lengths = self.lengths[self.rows]
        b, block = q.shape[:2]
        slots = lengths[:, None] + torch.arange(block, device=q.device)  # (b, block)
        batch = torch.arange(b, device=q.device)[:, None]
        K[batch, slots] = k  # the cache has the activations' dtype (model.dtype): no casts
        V[batch, slots] = v
        visible = torch.arange(self.span, device=q.device)[None, :] < (lengths[:, None] + block)  # (b, span)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K[:, :self.span].transpose(1, 2),
                                             V[:, :self.span].transpose(1, 2),
                                             attn_mask=visible[:, None, None, :])
        return out.transpose(1, 2)  # (b, block, H, D)


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each prompt (cut at BOS or max_new_tokens)
    model_calls: int  # forward passes of the model (denoising steps + clean passes)
    seconds: float
    cache_bytes: int  # 0 without a cache
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (batch, block, vocab) per step, on request

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


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


@torch.no_grad()
def generate(model: BlockDiffusionLM, prompts: list[list[int]], config: SamplingConfig | None = None, *,
             keep_logits: bool = False, **options) -> Generation:
    """Generate after each prompt (lists of token ids), block by block, as `config` says (SamplingConfig: its
    defaults are sample.py's); keyword `options` override single fields: generate(model, prompts, seed=3).

    "confidence" reveals ceil(masked / steps left) most confident tokens a step, "threshold" every token above
    the threshold (at least one), "random" a random subset of that size. A sequence stops after its first BOS
    (end of text) or at max_new_tokens. keep_logits: every step's logits in the result (for tests).
    """
    c = dataclasses.replace(config or SamplingConfig(), **options)
    max_new_tokens, steps_per_block, temperature, top_p = c.max_new_tokens, c.steps_per_block, c.temperature, c.top_p
    strategy, threshold, seed, use_cache = c.strategy, c.threshold, c.seed, c.cache
    cfg = model.cfg
    B = cfg.block_size
    steps_per_block = B if steps_per_block is None else steps_per_block
    _validate(prompts, cfg, max_new_tokens, steps_per_block, temperature, top_p, strategy, threshold)
    device = next(model.parameters()).device
    bsz = len(prompts)
    gens = [torch.Generator(device).manual_seed(seed) for _ in range(bsz)]
    P = torch.tensor([len(p) for p in prompts])
    total = int(P.max()) + max_new_tokens + 2 * B  # every sequence advances one block per round
    seq = torch.full((bsz, total), cfg.mask_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        seq[i, :len(p)] = torch.tensor(p, device=device)
    start = (P // B * B).to(device)  # first position of each sequence's current block
    arange_b = torch.arange(B, device=device)
    cache = KVCache(cfg, bsz, total, device, model.dtype) if use_cache else None  # the activations' dtype
    calls, step_logits = 0, []
    t0 = time.perf_counter()

    def run(tokens, positions):  # (b, B) -> hidden (b, B, dim), through the cache
        return model.run_layers(tokens, positions, cache.attend)

    def block_logits(block):  # (bsz, B) tokens of the current blocks -> float32 logits (bsz, B, V)
        positions = start[:, None] + arange_b
        if use_cache:
            cache.select(slice(None), B)
            return model.logits(run(block, positions))
        out = []
        for i in range(bsz):  # no cache: the whole x_t ⊕ x_0 layout of this sequence, from scratch
            L = int(start[i]) + B
            clean = torch.cat([seq[i, :start[i]], block[i]])
            cu = torch.tensor([0, L], dtype=torch.int32, device=device)
            h = model.hidden_states(torch.cat([clean, clean]), torch.arange(L, device=device), cu)
            out.append(model.logits(h[L - B:L]))
        return torch.stack(out)

    if use_cache:  # prefill: each prompt's complete blocks, block by block, one sequence at a time
        for i in range(bsz):
            for b0 in range(0, int(start[i]), B):
                cache.select(slice(i, i + 1), B)
                run(seq[i:i + 1, b0:b0 + B], (b0 + arange_b)[None])
                cache.advance(B)
                calls += 1

    new = [[] for _ in range(bsz)]
    done = [False] * bsz
    while not all(done):
        idx = start[:, None] + arange_b  # (bsz, B) positions of the current blocks
        block = seq.gather(1, idx)
        for step in range(steps_per_block):
            masked = block == cfg.mask_id
            if not masked.any():
                break
            logits = block_logits(block)
            calls += 1
            if keep_logits:
                step_logits.append(logits.detach().clone().cpu())
            logits[..., cfg.mask_id] = float("-inf")  # MASK is never a prediction
            sample, reveal = _choose(logits, masked, steps_per_block - step, strategy, threshold, temperature,
                                     top_p, gens)
            block = torch.where(reveal, sample, block)
        seq.scatter_(1, idx, block)
        if use_cache:  # the finished block, once more as clean context: its keys/values stay in the cache
            cache.select(slice(None), B)
            run(block, idx)
            cache.advance(B)
            calls += 1
        for i in range(bsz):
            if done[i]:
                continue
            for pos in range(max(int(start[i]), len(prompts[i])), int(start[i]) + B):
                token = int(seq[i, pos])
                new[i].append(token)
                if token == cfg.bos_id or len(new[i]) == max_new_tokens:
                    done[i] = True
                    break
        start += B
    return Generation(new, calls, time.perf_counter() - t0, cache.nbytes if use_cache else 0, step_logits)


def prompt_ids(text: str, tokenizer: str, cfg: ModelConfig) -> list[int]:
    """A prompt's ids as the model was trained on documents: after a BOS where the separator opens documents,
    from position 0 (no BOS) where it closes them; "" is then the start of a document."""
    ids = load_tokenizer(tokenizer).encode(text)
    return [cfg.bos_id] + ids if cfg.separator == "opens" else ids


def _validate(prompts, cfg, max_new_tokens, steps_per_block, temperature, top_p, strategy, threshold):
    if not prompts:
        raise SamplingError("no prompts given")
    if cfg.separator == "opens" and any(len(p) == 0 for p in prompts):
        raise SamplingError("every prompt needs at least one token (BOS: this model's documents open with it)")
    for p in prompts:
        if any(not 0 <= t < cfg.vocab_size or t == cfg.mask_id for t in p):
            raise SamplingError(f"prompt tokens must lie in [0, {cfg.vocab_size}) and not be MASK ({cfg.mask_id})")
    if max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 1 <= steps_per_block <= cfg.block_size:
        raise SamplingError(f"steps_per_block must lie in [1, block_size={cfg.block_size}], got {steps_per_block}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise SamplingError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if strategy not in STRATEGIES:
        raise SamplingError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not 0 < threshold < 1:
        raise SamplingError(f"threshold must lie in (0, 1), got {threshold}")
