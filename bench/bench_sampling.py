"""Sampling speed: the decode loop eager, compiled (on a GPU: captured as CUDA graphs, the default there) and the loop
before it (bench/sampling_baseline.py), at batch 1, 8 and 32, and the KV cache against recomputing every step.

    python bench/bench_sampling.py --ckpt logs/RUN/model                 # CPU: a trained model, batch 1, 8, 32
    python bench/bench_sampling.py --ckpt logs/RUN/model --compile       # ... and the compiled model call
    python bench/bench_sampling.py --gpu                                 # GPU: the record model (random weights)
    python -m pytest bench/bench_sampling.py --benchmark-only            # the suite

Each loop first makes one untimed warm-up call (which compiles and captures), then the loops take turns, --repeats
generate() calls each (3), and a row gives the median: tokens/s = new tokens / wall time (the slowest and fastest
run beside it: a generation on a CPU lasts a fraction of a second, and a busy machine moves one run by a third),
model calls per token, host reads (values the loop read back from the device), and the one-time compile and capture
seconds of the warm-up. Greedy decoding:
every loop should generate the same tokens, so that they do the same work ("same tokens": a loop that does not is
reported, the others still measured, and the exit code is 1). The batch holds one prompt repeated; every
sequence draws from its own generator.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loops(compile_mode: str | None) -> dict:
    """name -> generate(model, prompts, **options) of each loop timed."""
    from sampling_baseline import generate as generate_before

    from bdiff.generation.sampling import generate

    out = {"before (7d29e14)": generate_before,
           "now, eager": lambda model, prompts, **kw: generate(model, prompts, compile="none", **kw)}
    if compile_mode:
        out[f"now, compiled ({compile_mode})"] = lambda model, prompts, **kw: generate(model, prompts,
                                                                                       compile=compile_mode, **kw)
    return out


def run(model, prompt, new_tokens, steps_per_block, batches, compile_mode, repeats=3):
    print(f"{new_tokens} new tokens per prompt, {steps_per_block} steps per block of {model.cfg.block_size}, greedy; "
          f"the median of {repeats} runs of each loop, taken in turns (min-max beside it)")
    print(f"{'batch':>5}  {'loop':<32} {'tok/s':>9} {'min-max':>15} {'calls/token':>11} {'host reads':>10} "
          f"{'vs before':>9} {'compile s':>9} {'same tokens':>11}")
    failed = False
    kw = dict(max_new_tokens=new_tokens, steps_per_block=steps_per_block, temperature=0)
    for batch in batches:
        timed = loops(compile_mode)
        # warm-up: allocator, caches, compilation and capture
        warm = {name: generate(model, [prompt] * batch, **kw) for name, generate in timed.items()}
        runs = {name: [] for name in timed}
        for _ in range(repeats):  # in turns, so that a slow spell of the machine does not fall on one loop alone
            for name, generate in timed.items():
                runs[name].append(generate(model, [prompt] * batch, **kw))
        base, first = None, None
        for name, outs in runs.items():
            rates = sorted(out.new_tokens / out.seconds for out in outs)
            rate, out = rates[len(rates) // 2], outs[0]
            base = base or rate
            first = first or out.tokens
            same = "yes" if all(o.tokens == first for o in outs) else "NO"  # reported: the other rows still count
            reads = out.host_reads if out.host_reads else "per token"
            spread = f"{rates[0]:,.0f}-{rates[-1]:,.0f}"
            print(f"{batch:>5}  {name:<32} {rate:9,.1f} {spread:>15} {out.calls_per_token:11.3f} {reads:>10} "
                  f"{rate / base:8.2f}x {getattr(warm[name], 'compile_seconds', 0):9.1f} {same:>11}", flush=True)
            failed |= same == "NO"
    return failed


# The suite (bench/conftest.py), on a fresh model (the record model on a GPU, the demo preset on a CPU; its lm_head
# starts at zero, so greedy decoding never ends early on BOS: every call generates all its tokens): the cache
# against recomputing every step, and today's loop against the one before it (bench/sampling_baseline.py).
CASES = [("sampling cache", 1, "recompute", None), ("sampling cache", 1, "KV cache", "recompute"),
         ("sampling batch 1", 1, "before", None), ("sampling batch 1", 1, "now", "before"),
         ("sampling batch 1", 1, "CUDA graphs", "now"),
         ("sampling batch 8", 8, "before", None), ("sampling batch 8", 8, "now", "before"),
         ("sampling batch 8", 8, "CUDA graphs", "now")]


@pytest.mark.parametrize("op,batch,candidate,compare_with", CASES, ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_sampling(measure, op, batch, candidate, compare_with):
    from sampling_baseline import generate as generate_before

    from bdiff.config import PRESETS
    from bdiff.generation.sampling import generate
    from bdiff.models.nano import BlockDiffusionLM

    cuda = torch.cuda.is_available()
    if candidate == "CUDA graphs" and not cuda:
        pytest.skip("CUDA graphs are timed on a GPU only")
    torch.manual_seed(0)
    model = BlockDiffusionLM(PRESETS["record" if cuda else "demo"]().model).to("cuda" if cuda else "cpu").eval()
    model.set_dtype(torch.bfloat16 if cuda else torch.float32)  # each device's default precision
    new_tokens, steps = (1024, 4) if cuda else (256, 4)
    prompts = [[model.cfg.bos_id] + list(range(100, 164))] * batch
    options = {} if candidate == "before" else dict(compile="reduce-overhead" if candidate == "CUDA graphs" else "none")
    sample = generate_before if candidate == "before" else generate
    out = measure(op, candidate,
                  lambda: sample(model, prompts, max_new_tokens=new_tokens, steps_per_block=steps, temperature=0,
                                 cache=candidate != "recompute", **options),
                  compare_with=compare_with, work=new_tokens * batch, unit="token", new_tokens=new_tokens,
                  steps_per_block=steps, block_size=model.cfg.block_size, batch=batch)
    assert all(len(t) == new_tokens for t in out.tokens), "generation ended early"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a model of train.py (CPU run): final.pt or a model directory")
    parser.add_argument("--gpu", action="store_true", help="the record model, random weights, bf16")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--steps_per_block", type=int, help="default: the block size (one token per model call)")
    parser.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (their median is reported)")
    parser.add_argument("--compile", nargs="?", const="default", help="also time the compiled model call (mode: "
                                                                      "default; with --gpu always reduce-overhead)")
    args = parser.parse_args()
    from bdiff.data import default_prompt, tokenizer_of
    from bdiff.generation.sampling import prompt_ids
    from bdiff.models.nano import BlockDiffusionLM

    batches = [int(b) for b in args.batch.split(",") if b.strip().isdigit() and int(b) > 0]
    if len(batches) != len(args.batch.split(",")):
        parser.error(f"--batch: expected positive integers, comma-separated, got {args.batch!r}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    if args.gpu:
        from bdiff.config import record
        from bdiff.models.nano import BlockDiffusionLM

        model = BlockDiffusionLM(record().model).cuda().eval().set_dtype(torch.bfloat16)
        print(f"{torch.cuda.get_device_name()}, bf16, random weights")
        return run(model, [model.cfg.bos_id] + list(range(100, 164)), args.new_tokens, args.steps_per_block or 16,
                   batches, args.compile or "reduce-overhead", args.repeats)
    if not args.ckpt:
        parser.error("--ckpt is needed on CPU (python train.py writes logs/RUN/model)")
    model = BlockDiffusionLM.from_pretrained(args.ckpt)
    config = model.run_config
    print(f"CPU, {torch.get_num_threads()} threads, {args.ckpt}")
    return run(model, prompt_ids(default_prompt(config), tokenizer_of(config), model.cfg), args.new_tokens,
               args.steps_per_block or model.cfg.block_size, batches, args.compile, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
