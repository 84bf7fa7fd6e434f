"""Evaluate a model on validation data: the loss the record reports, with error bars, and where the model is weak.

    python -m bdiff.eval --model logs/RUN/model --draws 4            # a run's model, its own data and settings
    python -m bdiff.eval --model user/name --data finewebedu --tokens 1048576
    python -m bdiff.eval --model logs/RUN/model --judge logs/JUDGE/model --strategies random,threshold:0.9

The validation loss is the record's: every block's noise level t ~ U[0, 1], the weighted objective per token,
which bounds the negative log-likelihood per token from above (so exp(loss) bounds the perplexity). Draw k uses
the noise seed train.py's validation uses, plus k: draw 0 of a one-process run's model gives that run's own
final validation loss. The data are fixed; the standard error is over the K noise draws. The same loss at fixed
noise levels (every block at t) shows where the model is weak: at t the loss is about the cross-entropy of the
masked tokens (a fraction t of them, each weighted 1/t).

With --judge (an autoregressive model: bdiff/generation/judge.py), the evaluation also prices sampling strategies: it
continues the first tokens of N validation documents under each strategy asked for and prints, per strategy,
model calls per token, tokens/s, the continuations' generative perplexity under the judge and their entropy,
beside the same numbers for the documents' own continuations.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

from bdiff.config import COMPILE_MODES, ArgumentParser, SamplingConfig, add_device_flags, device_and_dtype
from bdiff.errors import command
from bdiff.models.objective import noise_seed

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def validation_sequences(files: list[str], seq_len: int, tokens: int, cfg, packed: int = 0) -> list:
    """(tokens, layout, answer flags or None) of the first tokens // seq_len validation sequences (all of them, where
    the split holds fewer; shorter ones where a shard holds less than one), on the CPU. `packed`: conversations in
    windows of that many tokens (DataSet.packed), each window opening a conversation."""
    from bdiff.data import DistributedLoader
    from bdiff.data.formats import read_shard
    from bdiff.models.objective import document_layout

    loader = DistributedLoader(files, packed or min(seq_len, max(len(read_shard(f)) for f in files)), packed=packed)
    out = []
    for _ in range(min(max(1, tokens // seq_len), loader.steps_per_epoch())):  # a small split: all it holds
        seq, answers = loader.next_with_answers()
        out.append((seq, document_layout(seq, cfg.bos_id, cfg.block_size, 0 if packed else None, cfg.separator),
                    answers))
    return out


def validation_total(model, batches, noise_range, generator, device) -> torch.Tensor:
    """The validation loop, in one place (train.py's periodic validation and this module's evaluation): the sum
    of the model's loss over `batches` of (tokens, layout) or (tokens, layout, answer flags), noise from `generator`;
    a device scalar (no sync)."""
    total = torch.zeros((), device=device)
    for tokens, layout, *answers in batches:
        total += model(tokens, noise_range=noise_range, generator=generator, layout=layout,
                       answers=answers[0] if answers else None).float()
    return total


@torch.no_grad()
def evaluate(model, sequences: list, draws: int = 1, seed: int = 0, levels=LEVELS, device="cpu", log=None) -> dict:
    """{"loss", "stderr" (None for one draw), "ppl_bound", "draws": [loss per draw], "levels": {t: loss}}."""
    device = torch.device(device)
    moved = [(tokens.to(device), layout.to(device), *(a if a is None else a.to(device) for a in answers))
             for tokens, layout, *answers in sequences]

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


STRATEGIES = "random,confidence,threshold:0.5,threshold:0.7,threshold:0.9"  # --strategies' default


def parse_strategies(text: str) -> list[dict]:
    """"random,confidence:4,threshold:0.9" -> the SamplingConfig fields of each: random and confidence take steps
    per block (default: the block size, one token per model call), threshold its threshold (default 0.9)."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, value = item.partition(":")
        try:
            if name in ("random", "confidence"):
                out.append({"strategy": name, "steps_per_block": int(value) if value else None})
            elif name == "threshold":
                out.append({"strategy": name, "threshold": float(value) if value else 0.9})
            else:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected random[:STEPS], confidence[:STEPS] or threshold[:VALUE] "
                                             f"separated by commas, got {item!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("no strategy given")
    return out


def validation_prompts(files: list[str], count: int, prompt_tokens: int, new_tokens: int, bos_id: int):
    """(prompts, continuations): the first prompt_tokens and the next new_tokens ids of the first `count` validation
    documents that hold as many (documents are the runs between separators; no separator in either)."""
    import numpy as np

    from bdiff.data.formats import read_shard

    tokens = np.concatenate([read_shard(f) for f in files]).astype(np.int64)
    cuts = np.flatnonzero(tokens == bos_id)
    prompts, continuations = [], []
    for doc in np.split(tokens, cuts):
        doc = doc[1:] if len(doc) and doc[0] == bos_id else doc
        if len(doc) >= prompt_tokens + new_tokens:
            prompts.append(doc[:prompt_tokens].tolist())
            continuations.append(doc[prompt_tokens:prompt_tokens + new_tokens].tolist())
            if len(prompts) == count:
                break
    return prompts, continuations


def price_strategies(model, judge, prompts, continuations, strategies: list[dict], sampling: SamplingConfig,
                     log=None) -> list[dict]:
    """One row per strategy (and one for the documents' own continuations): calls per token, tokens/s, Gen PPL
    under `judge`, mean entropy of the texts. All prompts are sampled as one batch."""
    from bdiff.generation.judge import gen_ppl, token_entropy
    from bdiff.generation.sampling import generate

    def judged(texts):
        return dict(gen_ppl=gen_ppl(judge, prompts, texts),
                    entropy=sum(token_entropy(t) for t in texts if t) / max(1, sum(1 for t in texts if t)))

    rows = [dict(strategy="validation text", setting="the documents' own", calls_per_token=None, tokens_per_s=None,
                 **judged(continuations))]
    start = [[model.cfg.bos_id] + p if model.cfg.separator == "opens" else p for p in prompts]
    for overrides in strategies:
        config = dataclasses.replace(sampling, **overrides)
        out = generate(model, start, config)
        if log and out.compile_seconds:
            log(f"compiling and capturing the model call: {out.compile_seconds:.1f} s (once per batch and length)")
        if config.strategy == "threshold":
            setting = f"threshold {config.threshold:g}"
        else:
            setting = f"{config.steps_per_block or model.cfg.block_size} steps/block"
        rows.append(dict(strategy=config.strategy, setting=setting, calls_per_token=out.calls_per_token,
                         tokens_per_s=out.new_tokens / out.seconds, new_tokens=out.new_tokens, **judged(out.tokens)))
        if log:
            log(f"{config.strategy} ({setting}): {rows[-1]['gen_ppl']:.2f} Gen PPL, {out.new_tokens} tokens")
    return rows


def strategy_table(rows: list[dict]) -> str:
    lines = ["| strategy | setting | model calls/token | tokens/s | Gen PPL | entropy |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        calls = "" if r["calls_per_token"] is None else f"{r['calls_per_token']:.2f}"
        speed = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['strategy']} | {r['setting']} | {calls} | {speed} | {r['gen_ppl']:.2f} | "
                     f"{r['entropy']:.2f} |")
    return "\n".join(lines)


def plot_strategies(rows: list[dict], path: str, title: str) -> None:
    """Gen PPL against model calls per token, one point per strategy; the documents' own Gen PPL as a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        if r["calls_per_token"] is None:
            ax.axhline(r["gen_ppl"], color="gray", linestyle="--", label=f"{r['strategy']} ({r['gen_ppl']:.1f})")
        else:
            ax.plot(r["calls_per_token"], r["gen_ppl"], "o", label=f"{r['strategy']}, {r['setting']}")
    ax.set_xlabel("model calls per generated token")
    ax.set_ylabel("Gen PPL under the judge (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    judging = parser.add_argument_group("pricing sampling strategies (with --judge)")
    judging.add_argument("--judge", help="an autoregressive judge: a bdiff model trained with --block_size 1 on the "
                                         "same data, or hf:NAME (a Hugging Face causal LM, e.g. hf:gpt2-large)")
    judging.add_argument("--strategies", type=parse_strategies, default=parse_strategies(STRATEGIES),
                         help=f"comma-separated, e.g. {STRATEGIES}")
    judging.add_argument("--samples", type=int, default=16, help="validation documents to continue")
    judging.add_argument("--prompt_tokens", type=int, default=32, help="each document's first tokens as the prompt")
    judging.add_argument("--new_tokens", type=int, default=128, help="tokens to generate after each prompt")
    judging.add_argument("--temperature", type=float, default=1.0, help="1.0 with top_p 0.9: BD3-LM's nucleus sampling")
    judging.add_argument("--top_p", type=float, default=0.9)
    judging.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                         help="the model call of each step: auto (default: CUDA graphs on a GPU, eager on a CPU), none "
                              "(eager) or a torch.compile mode")
    judging.add_argument("--plot", help="also draw Gen PPL against calls per token into this .png")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    for name in ("tokens", "seq_len", "draws", "samples", "prompt_tokens", "new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    from bdiff.data import check_model_fits_data, find_dataset, shard_files
    from bdiff.models import from_pretrained

    device, dtype = device_and_dtype(args)
    model = from_pretrained(args.model, device)
    config = model.run_config
    model.set_dtype(dtype)
    judge = None
    if args.judge:  # a judge that cannot judge this model fails before the long work
        from bdiff.data import tokenizer_of
        from bdiff.generation.judge import JudgeError, load_judge

        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise JudgeError('--plot needs matplotlib: pip install -e ".[plot]"') from None
        judge = load_judge(args.judge, device, tokenizer_of(config), dtype)
    train = config["train"]
    name = args.data or train["data"]
    dataset, data_dir = find_dataset(name, args.data_dir or (train["data_dir"] if name == train["data"] else None))
    data = dataset.name
    model_cfg = model.cfg
    check_model_fits_data(dataset, model_cfg.vocab_size, model_cfg.bos_id, model_cfg.mask_id)
    seq_len, tokens = args.seq_len or train["val_seq_len"], args.tokens or train["val_tokens"]
    sequences = validation_sequences(shard_files(data, data_dir, "val"), seq_len, tokens, model_cfg, dataset.packed)
    seq_len = sequences[0][0].numel()  # a split smaller than one sequence is read whole
    seed = train["seed"] if args.seed is None else args.seed
    if judge is not None:
        prompts, continuations = validation_prompts(shard_files(data, data_dir, "val"), args.samples,
                                                    args.prompt_tokens, args.new_tokens, model_cfg.bos_id)
        if not prompts:
            raise JudgeError(f"no validation document holds --prompt_tokens + --new_tokens = "
                             f"{args.prompt_tokens + args.new_tokens} tokens")
    header = (f"model {args.model} | {data} validation ({data_dir}) | {len(sequences)} sequences x {seq_len} tokens = "
              f"{len(sequences) * seq_len:,} tokens | {args.draws} draw(s), seed {seed} | {device}, {dtype}")
    print(header, file=sys.stderr, flush=True)
    result = evaluate(model, sequences, args.draws, seed, args.levels, device,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(report(result, header))
    if judge is not None:
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=seed, compile=args.compile)
        rows = price_strategies(model, judge, prompts, continuations, args.strategies, sampling,
                                log=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(f"\nsampling strategies: {len(prompts)} validation documents, {args.prompt_tokens} prompt tokens, up to "
              f"{args.new_tokens} new, temperature {args.temperature:g}, top_p {args.top_p:g}; judge {args.judge}")
        print(strategy_table(rows))
        if args.plot:
            plot_strategies(rows, args.plot, f"{args.model} judged by {args.judge}")
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
