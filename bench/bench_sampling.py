"""Sampling speed with and without the KV cache.

    python bench/bench_sampling.py --ckpt logs/RUN/final.pt     # CPU: the demo model, 1024 new tokens
    python bench/bench_sampling.py --gpu                        # GPU: the record model (random weights)
    python -m pytest bench/bench_sampling.py --benchmark-only   # the suite: cache vs recompute on any device

Without the cache every denoising step recomputes the whole x_t ⊕ x_0 layout of the sequence so far.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(model, prompt, new_tokens, steps_per_block):
    from bdiff.sampling import generate

    print(f"{new_tokens} new tokens, {steps_per_block} steps per block of {model.cfg.block_size}")
    for use_cache in (True, False):
        out = generate(model, [prompt], max_new_tokens=new_tokens, steps_per_block=steps_per_block, cache=use_cache)
        print(f"{'with' if use_cache else 'without':>8} cache: {out.new_tokens / out.seconds:9,.1f} tok/s, "
              f"{out.model_calls / out.new_tokens:.2f} model calls/token, cache {out.cache_bytes / 2**20:.1f} MiB")


# The suite (bench/conftest.py): the KV cache against recomputing the sequence, on a fresh model (the record
# model on a GPU, the cpu preset on a CPU; its lm_head starts at zero, so greedy decoding never ends early on BOS:
# every call generates all its tokens). The cache is exact: both produce the same tokens.
@pytest.mark.parametrize("candidate", ["recompute", "KV cache"])
def test_sampling(measure, candidate):
    from bdiff.config import PRESETS
    from bdiff.model import BlockDiffusionLM
    from bdiff.sampling import generate

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model = BlockDiffusionLM(PRESETS["record" if cuda else "cpu"]().model).to("cuda" if cuda else "cpu").eval()
    model.set_dtype(torch.bfloat16 if cuda else torch.float32)  # each device's default precision
    new_tokens, steps = (1024, 4) if cuda else (256, 4)
    prompt = [model.cfg.bos_id] + list(range(100, 164))
    out = measure("sampling", candidate,
                  lambda: generate(model, [prompt], max_new_tokens=new_tokens, steps_per_block=steps, temperature=0,
                                   cache=candidate == "KV cache"),
                  compare_with="recompute" if candidate == "KV cache" else None, work=new_tokens, unit="token",
                  new_tokens=new_tokens, steps_per_block=steps, block_size=model.cfg.block_size)
    assert len(out.tokens[0]) == new_tokens, f"generation ended after {len(out.tokens[0])} of {new_tokens} tokens"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a checkpoint of train.py (CPU run)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--new_tokens", type=int, default=1024)
    parser.add_argument("--steps_per_block", type=int, default=4)
    args = parser.parse_args()
    from bdiff.data import tokenizer_of
    from bdiff.hub import load
    from bdiff.sampling import prompt_ids

    if args.gpu:
        from bdiff.config import record
        from bdiff.model import BlockDiffusionLM

        model = BlockDiffusionLM(record().model).cuda().eval().set_dtype(torch.bfloat16)
        print(f"{torch.cuda.get_device_name()}, bf16")
        run(model, [model.cfg.bos_id] + list(range(100, 164)), args.new_tokens, args.steps_per_block)
        return
    if not args.ckpt:
        parser.error("--ckpt is needed on CPU (python train.py writes logs/RUN/final.pt)")
    model, config = load(args.ckpt)
    print(f"CPU, {torch.get_num_threads()} threads")
    run(model, prompt_ids("def ", tokenizer_of(config), model.cfg), args.new_tokens, args.steps_per_block)


if __name__ == "__main__":
    main()
