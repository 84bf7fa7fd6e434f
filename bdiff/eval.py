"""Evaluate a model on validation data: the loss the record reports, with error bars, and where the model is weak.

    python -m bdiff.eval --model logs/RUN/model --draws 4            # a run's model, its own data and settings
    python -m bdiff.eval --model user/name --data finewebedu --tokens 1048576

The validation loss is the record's: every block's noise level t ~ U[0, 1], the weighted objective per token,
which bounds the negative log-likelihood per token from above (so exp(loss) bounds the perplexity). Draw k uses
the noise seed train.py's validation uses, plus k: draw 0 of a one-process run's model gives that run's own
final validation loss. The data are fixed; the standard error is over the K noise draws. The same loss at fixed
noise levels (every block at t) shows where the model is weak: at t the loss is about the cross-entropy of the
masked tokens (a fraction t of them, each weighted 1/t).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from bdiff.config import ArgumentParser, add_device_flags, device_and_dtype
from bdiff.errors import command
from bdiff.noise import noise_seed

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def validation_sequences(files: list[str], seq_len: int, tokens: int, cfg) -> list:
    """(tokens, layout) of the first tokens // seq_len validation sequences, on the CPU."""
    from bdiff.data import DistributedLoader
    from bdiff.noise import document_layout

    loader = DistributedLoader(files, seq_len)
    out = []
    for _ in range(max(1, tokens // seq_len)):
        seq = loader.next()
        out.append((seq, document_layout(seq, cfg.bos_id, cfg.block_size, separator=cfg.separator)))
    return out


def validation_total(model, batches, noise_range, generator, device) -> torch.Tensor:
    """The validation loop, in one place (train.py's periodic validation and this module's evaluation): the sum
    of the model's loss over `batches` of (tokens, layout), noise from `generator`; a device scalar (no sync)."""
    total = torch.zeros((), device=device)
    for tokens, layout in batches:
        total += model(tokens, noise_range=noise_range, generator=generator, layout=layout).float()
    return total


@torch.no_grad()
def evaluate(model, sequences: list, draws: int = 1, seed: int = 0, levels=LEVELS, device="cpu", log=None) -> dict:
    """{"loss", "stderr" (None for one draw), "ppl_bound", "draws": [loss per draw], "levels": {t: loss}}."""
    device = torch.device(device)
    moved = [(tokens.to(device), layout.to(device)) for tokens, layout in sequences]

    def mean_loss(noise_range, generator) -> float:
        return validation_total(model, moved, noise_range, generator, device).item() / len(moved)

    model.eval()
    per_draw = []
    for k in range(draws):
        per_draw.append(mean_loss((0.0, 1.0), torch.Generator(device).manual_seed(noise_seed(seed, validation=True,
                                                                                            draw=k))))
        if log:
            log(f"draw {k + 1}/{draws}: {per_draw[-1]:.6f}")
    per_level = {}
    for t in levels:
        per_level[t] = mean_loss((t, t), torch.Generator(device).manual_seed(noise_seed(seed, validation=True)))
        if log:
            log(f"t={t:g}: {per_level[t]:.6f}")
    loss = sum(per_draw) / draws
    stderr = None
    if draws > 1:
        stderr = math.sqrt(sum((x - loss) ** 2 for x in per_draw) / (draws - 1) / draws)
    return dict(loss=loss, stderr=stderr, ppl_bound=math.exp(loss), draws=per_draw, levels=per_level)


def report(result: dict, header: str) -> str:
    draws = len(result["draws"])
    spread = (f" ± {result['stderr']:.4f} (standard error over {draws} noise draws)" if result["stderr"] is not None
              else " (one noise draw: --draws 2 or more for a standard error)")
    lines = [header, f"validation loss, t ~ U[0, 1]: {result['loss']:.4f}{spread}",
             f"perplexity bound exp(loss): {result['ppl_bound']:.3f}"]
    if result["levels"]:
        lines.append("loss at a fixed noise level (every block at t):")
        lines.append("    t    loss")
        lines += [f"  {t:4.2f}  {v:.4f}" for t, v in result["levels"].items()]
    return "\n".join(lines)


def _levels(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}") from None
    if any(not 0 < t <= 1 for t in values):
        raise argparse.ArgumentTypeError(f"noise levels must lie in (0, 1], got {text!r}")
    return values


@command
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bdiff.eval", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="final.pt, a model or run directory, or a Hub id (user/name)")
    parser.add_argument("--data", help="a data set's name (default: the data the model was trained on)")
    parser.add_argument("--data_dir", help="default: the run's data directory (a prepared data set's directory names "
                                           "its data set)")
    parser.add_argument("--tokens", type=int, help="validation tokens (default: the run's val_tokens)")
    parser.add_argument("--seq_len", type=int, help="tokens per sequence (default: the run's val_seq_len)")
    parser.add_argument("--draws", type=int, default=1, help="noise draws to average (>= 2 gives a standard error)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the run's)")
    parser.add_argument("--levels", type=_levels, default=LEVELS, help="fixed noise levels, e.g. 0.1,0.5,0.9")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    for name in ("tokens", "seq_len", "draws"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    from bdiff.data import check_model_fits_data, find_dataset, shard_files
    from bdiff.hub import load

    device, dtype = device_and_dtype(args)
    model, config = load(args.model, device)
    model.set_dtype(dtype)
    train = config["train"]
    name = args.data or train["data"]
    dataset, data_dir = find_dataset(name, args.data_dir or (train["data_dir"] if name == train["data"] else None))
    data = dataset.name
    model_cfg = model.cfg
    check_model_fits_data(dataset, model_cfg.vocab_size, model_cfg.bos_id, model_cfg.mask_id)
    seq_len, tokens = args.seq_len or train["val_seq_len"], args.tokens or train["val_tokens"]
    sequences = validation_sequences(shard_files(data, data_dir, "val"), seq_len, tokens, model_cfg)
    seed = train["seed"] if args.seed is None else args.seed
    header = (f"model {args.model} | {data} validation ({data_dir}) | {len(sequences)} sequences x {seq_len} tokens = "
              f"{len(sequences) * seq_len:,} tokens | {args.draws} draw(s), seed {seed} | {device}, {dtype}")
    print(header, file=sys.stderr, flush=True)
    result = evaluate(model, sequences, args.draws, seed, args.levels, device,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(report(result, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
