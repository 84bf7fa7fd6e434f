"""bdiff models in EleutherAI's LM Evaluation Harness, in the same tables as any other model.

    pip install -e ".[eval]"
    python -m bdiff.lm_eval --model bdiff --model_args pretrained=logs/RUN/model,mc_samples=8 --tasks TASKS

This registers the model `bdiff` and hands the command line to lm-eval's own, so every lm-eval flag works
(--include_path for task files of one's own, --batch_size, --limit, --output_path, --log_samples, ...).

A diffusion model has no exact likelihood; lm-eval's three kinds of request are answered as follows.
- loglikelihood(context, continuation): minus the block-diffusion loss of the continuation with the context
  clean. For each block that holds continuation tokens, t ~ U[0, 1], each continuation token masked with
  probability t, the masked ones' cross-entropy weighted 1/t: the negative ELBO, an upper bound on
  -log p(continuation | context), so the reported log-likelihood is a lower bound. It is estimated by Monte Carlo
  over `mc_samples` noise draws; draw k uses bdiff.eval's noise seed of draw k for every request (common random
  numbers: the choices of one question are scored under the same draws). is_greedy: every continuation token is
  the model's argmax with the whole continuation masked.
- loglikelihood_rolling(text) (perplexity tasks): the same over lm-eval's rolling windows of `max_length` tokens.
- generate_until(context, {until, max_gen_toks, ...}): bdiff's sampler (bdiff/generation/sampling.py), which stops a
  sequence after the block where a stop string appears (checked on the host with the block's one read), then the text is
  cut at the first stop string.

Model arguments (--model_args k=v,...): pretrained (a model directory, run directory, final.pt or Hub id),
mc_samples (8), seed (0), max_length (the model's training sequence length), dtype (bfloat16 on a GPU, float32 on
a CPU), strategy, steps_per_block and compile (the sampler's; auto: CUDA graphs on a GPU). --batch_size requests
(auto: 16), each under every draw, are packed into shared model calls of up to 16,384 tokens. One process:
lm-eval's data-parallel launch is not supported.
"""
from __future__ import annotations

import itertools
import json
import sys

import torch

from bdiff.errors import BdiffError, command
from bdiff.models.objective import bounds_layout, loss_weights, noise_blocks, noise_seed

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional extra: main() says how to install it
    LM, register_model = object, None


class EvalHarnessError(BdiffError):
    """lm-eval is missing, or a model argument is out of range; the message names it."""


@torch.no_grad()
def continuation_nelbo(model, requests: list[tuple[list[int], list[int]]], draws: int, seed: int = 0,
                       max_tokens: int = 16384) -> tuple[torch.Tensor, list[bool]]:
    """Each (context ids, continuation ids) as one document, the context clean: the negative ELBO of the
    continuation under `draws` noise draws, (len(requests), draws) float32 on the CPU, and whether the
    continuation is the model's argmax with all of it masked. Entries (a request under one draw) are packed as
    documents of one sequence, up to `max_tokens` tokens per model call."""
    cfg, device = model.cfg, next(model.parameters()).device
    entries = []  # (request, draw or -1 for the greedy check, tokens, x_t, weights, continuation start)
    for r, (context, continuation) in enumerate(requests):
        tokens = torch.tensor(context + continuation, device=device)
        n, start = tokens.numel(), len(context)
        layout = bounds_layout(torch.tensor([0, n], dtype=torch.int32, device=device), n, cfg.block_size)
        clean = torch.arange(n, device=device) < start  # (n,) the context is never noised
        for k in range(draws):  # every request sees the same draws
            gen = torch.Generator(device).manual_seed(noise_seed(seed, validation=True, draw=k))
            x_t, masked, t = noise_blocks(tokens, layout.blocks, cfg.mask_id, 0.0, 1.0, generator=gen,
                                          num_blocks=layout.num_blocks)
            masked &= ~clean
            entries.append((r, k, tokens, torch.where(clean, tokens, x_t), loss_weights(masked, t), start))
        entries.append((r, -1, tokens, torch.where(clean, tokens, cfg.mask_id), None, start))
    nelbo = torch.zeros(len(requests), draws)
    greedy = [True] * len(requests)
    chunk: list = []
    for entry in entries + [None]:
        if entry is not None and (not chunk or sum(e[2].numel() for e in chunk) + entry[2].numel() <= max_tokens):
            chunk.append(entry)
            continue
        _score(model, chunk, nelbo, greedy)
        chunk = [entry]
    return nelbo, greedy


def _score(model, chunk: list, nelbo: torch.Tensor, greedy: list[bool]) -> None:
    """One model call over a chunk of entries packed as documents; fills nelbo and greedy in place."""
    from bdiff.ops import masked_linear_cross_entropy

    cfg = model.cfg
    lengths = [e[2].numel() for e in chunk]
    L = sum(lengths)
    tokens = torch.cat([e[2] for e in chunk])  # (L,)
    x_t = torch.cat([e[3] for e in chunk])  # (L,)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    layout = bounds_layout(cu_seqlens.to(tokens.device), L, cfg.block_size)
    # (L, dim): the state predicting each position; with token shift a document's first token has none (no loss)
    hidden, has_source = model.predicting_states(torch.cat([x_t, tokens]), layout.positions, layout.cu_seqlens,
                                                 layout.schedule)
    values = []  # one device scalar per entry, read back together: one transfer per call, not one per entry
    for (r, k, doc, _, weights, start), begin, n in zip(chunk, itertools.accumulate([0] + lengths), lengths):
        rows = slice(begin, begin + n)
        if k >= 0:
            weights = weights if has_source is None else weights * has_source[rows]
            values.append(masked_linear_cross_entropy(hidden[rows], model.head, doc, weights,
                                                      cfg.vocab_size).float())
        else:
            guess = model.logits(hidden[begin + start:begin + n]).argmax(-1)  # (n - start,)
            values.append((guess == doc[start:]).all().float())
    for (r, k, *_), value in zip(chunk, torch.stack(values).tolist()):
        if k >= 0:
            nelbo[r, k] = value
        else:
            greedy[r] = value == 1.0


def _count(name: str, value) -> int | None:
    """A model argument that counts something: an integer >= 1 (or None: its default)."""
    try:
        number = None if value is None else int(value)
    except ValueError:
        number = 0
    if number is not None and (number < 1 or number != float(value)):
        raise EvalHarnessError(f"model argument {name} must be an integer >= 1, got {value!r}")
    return number


def split_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): spaces that end the context move to the continuation, and the pair is
    encoded whole where the tokenizer allows (as lm-eval does for causal models), so the split does not cut a
    token the text would have."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    if whole[:len(head)] == head:
        return head, whole[len(head):]
    return head, encode(continuation)


class BdiffLM(LM):
    """The lm-eval model `bdiff` (see the module's docstring)."""

    def __init__(self, pretrained: str, mc_samples: int = 8, seed: int = 0, max_length: int | None = None,
                 dtype: str | None = None, strategy: str = "random", steps_per_block: int | None = None,
                 batch_size: int | str = 16, max_batch_size: int | None = None, device: str | None = None,
                 compile: str = "auto"):
        super().__init__()
        from bdiff.config import default_dtype, parse_device
        from bdiff.data import tokenizer_of
        from bdiff.data.tokenizer import load_tokenizer
        from bdiff.models import from_pretrained

        mc_samples, max_length = _count("mc_samples", mc_samples), _count("max_length", max_length)
        batch_size = 16 if batch_size == "auto" else _count("batch_size", batch_size)  # lm-eval passes a string
        self._device = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = from_pretrained(str(pretrained), self._device)
        config = self.model.run_config
        self.model.set_dtype(dtype or default_dtype(self._device))
        self.tokenizer = load_tokenizer(tokenizer_of(config))
        self.cfg = self.model.cfg
        self.mc_samples, self.seed = mc_samples, seed
        self.max_length = max_length or config["train"]["seq_len"]
        self.batch_size = batch_size
        self.sampling = dict(strategy=strategy, steps_per_block=steps_per_block, seed=seed, compile=compile)

    @property
    def device(self):
        return self._device

    # ---- likelihoods ----------------------------------------------------------------------------------------

    def _document(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The pair as the model reads a document: after a BOS where its documents open with one; a context longer
        than max_length allows loses its start."""
        if len(continuation) > self.max_length:
            raise EvalHarnessError(f"a continuation of {len(continuation)} tokens exceeds max_length="
                                   f"{self.max_length}; raise it in --model_args")
        context = [t for t in context[:1] if t != self.cfg.bos_id] + context[1:]  # lm-eval's prefix token
        context = context[max(0, len(context) + len(continuation) - self.max_length):]
        if self.cfg.separator == "opens":
            context = [self.cfg.bos_id] + context
        return context, continuation

    def _loglikelihoods(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False
                        ) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        out = []
        for i in tqdm(range(0, len(pairs), self.batch_size), desc=f"bdiff log-likelihoods ({self.mc_samples} draws)",
                      unit="batch", disable=disable_tqdm):
            batch = [self._document(c, x) for c, x in pairs[i:i + self.batch_size]]
            nelbo, greedy = continuation_nelbo(self.model, batch, self.mc_samples, self.seed)
            out += [(-float(v), g) for v, g in zip(nelbo.mean(1), greedy)]
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encode = self.tokenizer.encode
        return self._loglikelihoods([split_pair(encode, *req.args) for req in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0])
            for window in get_rolling_token_windows(ids, self.cfg.bos_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self._loglikelihoods(windows, disable_tqdm)):
            totals[r] += ll
        return totals

    # ---- generation -----------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        from bdiff.config import SamplingConfig
        from bdiff.generation.sampling import generate

        out = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings share batches
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, members in groups.items():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", 256))
            temperature = kwargs.get("temperature")
            sample = kwargs.get("do_sample") or (temperature or 0) > 0  # greedy unless the task samples
            config = SamplingConfig(max_new_tokens=new, temperature=float(1.0 if temperature is None else temperature)
                                    if sample else 0.0, top_p=float(kwargs.get("top_p") or 1.0), **self.sampling)
            for start in tqdm(range(0, len(members), self.batch_size), desc="bdiff generation", unit="batch",
                              disable=disable_tqdm):
                batch = members[start:start + self.batch_size]
                prompts = []
                for i in batch:
                    context = self.tokenizer.encode(requests[i].args[0])[-max(1, self.max_length - new):]
                    prompts.append(([self.cfg.bos_id] if self.cfg.separator == "opens" else []) + context)
                stops = [s for s in until if s]  # checked once per block, with the sampler's one read of it
                result = generate(self.model, prompts, config, stop_when=lambda i, ids: any(
                    s in self.tokenizer.decode([t for t in ids if t != self.cfg.bos_id]) for s in stops) if stops
                    else None)
                if result.compile_seconds > 1:
                    print(f"bdiff: compiling and capturing the model call took {result.compile_seconds:.1f} s "
                          f"(once per batch and length; model_args compile=none: eager)", file=sys.stderr)
                for i, ids in zip(batch, result.tokens):
                    out[i] = cut_at_stops(self.tokenizer.decode([t for t in ids if t != self.cfg.bos_id]), until)
        return out


def cut_at_stops(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    return text[:min([text.index(s) for s in until if s and s in text], default=len(text))]


if register_model is not None:
    BdiffLM = register_model("bdiff")(BdiffLM)


@command
def main(argv=None) -> int:
    if register_model is None:
        raise EvalHarnessError('python -m bdiff.lm_eval needs lm-eval: pip install -e ".[eval]"')
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
