"""Generate text from a checkpoint written by train.py.

    python sample.py --ckpt logs/RUN/final.pt --prompt "def main():"
    python sample.py --ckpt logs/RUN/model --prompt "def main():"        # a model directory (or user/name on the Hub)
    python sample.py --ckpt logs/RUN/final.pt --prompt "The ocean" --max_new_tokens 256 --strategy threshold
    python sample.py --ckpt logs/chat/model --chat "What is 2 + 2?"       # one answer, in the model's chat template
"""
import sys

from bdiff.config import (
    ArgumentParser,
    SamplingConfig,
    add_device_flags,
    add_flags,
    apply_flags,
    device_and_dtype,
)
from bdiff.data import tokenizer_of
from bdiff.data.tokenizer import decode, load_tokenizer
from bdiff.errors import command
from bdiff.generation.sampling import SamplingError, generate, prompt_ids
from bdiff.models import from_pretrained


@command
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, help="final.pt, a model or run directory (logs/RUN/model, "
                                                      "logs/RUN) or a Hub id (user/name)")
    asked = parser.add_mutually_exclusive_group(required=True)
    asked.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    asked.add_argument("--chat", help="a question: the model's one answer, asked as its training conversations were "
                                      "(python -m bdiff.chat for a conversation)")
    add_flags(parser, SamplingConfig)
    parser.add_argument("--block_size", type=int, default=None, help="checked against the checkpoint")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    sampling = SamplingConfig()
    apply_flags(args, sampling)
    device, dtype = device_and_dtype(args)  # before any file is read: the real cause first

    model = from_pretrained(args.ckpt, device)
    config = model.run_config
    model.set_dtype(dtype)
    cfg = model.cfg
    if args.block_size is not None and args.block_size != cfg.block_size:
        raise SamplingError(f"--block_size {args.block_size} does not match the checkpoint's block size "
                            f"{cfg.block_size}")
    tokenizer = tokenizer_of(config)  # the data the model was trained on decides, not its vocabulary size
    load_tokenizer(tokenizer)  # a tokenizer that cannot load here fails now, in one line
    if args.chat is not None:
        from bdiff.chat import answer, renderer_of

        print(answer(model, renderer_of(config), [{"role": "user", "content": args.chat}], sampling))
        return 0
    prompts = [prompt_ids(text, tokenizer, cfg) for text in args.prompt]
    limit = config.get("train", {}).get("seq_len")
    if limit and max(len(p) for p in prompts) + sampling.max_new_tokens > limit:
        raise SamplingError(f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens "
                            f"({sampling.max_new_tokens}) exceeds the {limit}-token sequences the model was trained on")
    out = generate(model, prompts, sampling)
    if out.compile_seconds:
        print(f"--- compiling and capturing the model call took {out.compile_seconds:.1f} s of that, once per batch "
              f"and length (--compile none: eager)", file=sys.stderr)
    for text, tokens in zip(args.prompt, out.tokens):
        print(f"--- {text!r}\n{text}{decode(tokens, tokenizer)}")
    print(f"--- {out.new_tokens} tokens in {out.seconds:.2f}s ({out.new_tokens / out.seconds:,.0f} tok/s), "
          f"{out.calls_per_token:.2f} model calls per token, KV cache {out.cache_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
