"""Generate text from a checkpoint written by train.py.

    python sample.py --ckpt logs/RUN/final.pt --prompt "def main():"
    python sample.py --ckpt logs/RUN/final.pt --prompt "The ocean" --max_new_tokens 256 --strategy threshold
"""
import argparse
import sys

import torch

from bdiff.sampling import STRATEGIES, SamplingError, generate, load_checkpoint
from bdiff.tokenizer import TokenizerError, decode, encode, tokenizer_of


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint path (train.py writes logs/RUN/final.pt)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--steps_per_block", type=int, default=None, help="default: block_size (a token a step)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="random")
    parser.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of --strategy threshold")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block_size", type=int, default=None, help="checked against the checkpoint")
    parser.add_argument("--no_cache", action="store_true", help="recompute every step from scratch (slow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model, config = load_checkpoint(args.ckpt, args.device)
    cfg = model.cfg
    if args.block_size is not None and args.block_size != cfg.block_size:
        raise SamplingError(f"--block_size {args.block_size} does not match the checkpoint's block size {cfg.block_size}")
    tokenizer = tokenizer_of(config)  # the data the model was trained on decides, not its vocabulary size
    prompts = [encode(text, tokenizer, cfg.bos_id) for text in args.prompt]
    limit = config.get("train", {}).get("seq_len")
    if limit and max(len(p) for p in prompts) + args.max_new_tokens > limit:
        raise SamplingError(f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({args.max_new_tokens}) "
                            f"exceeds the {limit}-token sequences the model was trained on")
    out = generate(model, prompts, args.max_new_tokens, args.steps_per_block, args.temperature, args.top_p,
                   args.strategy, args.threshold, args.seed, use_cache=not args.no_cache)
    for text, tokens in zip(args.prompt, out.tokens):
        print(f"--- {text!r}\n{text}{decode(tokens, tokenizer)}")
    print(f"--- {out.new_tokens} tokens in {out.seconds:.2f}s ({out.new_tokens / out.seconds:,.0f} tok/s), "
          f"{out.model_calls / out.new_tokens:.2f} model calls per token, KV cache {out.cache_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    try:
        main()
    except (SamplingError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
