"""Talk to a model: `python -m bdiff.chat --model DIR` (a model or run directory, a final.pt or a Hub id).

    python -m bdiff.chat --model logs/chat/model                    # on a terminal: a conversation
    printf 'upper: abc\\nupper: xyz\\n' | python -m bdiff.chat --model logs/chat/model    # scripted: a line each

On a terminal each answer is printed block by block as the sampler finishes it, and the conversation is kept (every
question sees the turns before it). With stdin not a terminal, every line is one question asked on its own and
every answer one line (its newlines written as \\n), so the command can be scripted and tested. The question is
rendered as the model's training conversations were (the tokenizer's chat template, or bdiff's plain one:
bdiff/data/chat.py); an answer ends at the end of its turn or at --max_new_tokens. The sampler's strategies apply
(--strategy, --steps_per_block, --temperature, ...); the default is greedy and one token a step.
"""
from __future__ import annotations

import sys

from bdiff.config import ArgumentParser, SamplingConfig, add_device_flags, add_flags, apply_flags, device_and_dtype
from bdiff.errors import command


def renderer_of(config: dict):
    """The Renderer a model's training data used (its data set's record), or the plain template for a model that
    was not trained on conversations."""
    from bdiff.data import tokenizer_of
    from bdiff.data.chat import Renderer

    data = config.get("dataset") or {}
    block_size = data.get("block_size") or config["model"]["block_size"]
    return Renderer(tokenizer_of(config), data.get("chat") or "plain", block_size,
                    data.get("align_answers", False), data.get("pad_id", -1))


def answer(model, renderer, messages: list[dict], sampling: SamplingConfig, on_block=None) -> str:
    """The model's answer to the conversation `messages` (ending with the user's turn): sampled block by block
    until the end of the turn; `on_block(text so far)` after each finished block."""
    from bdiff.generation.sampling import generate

    prompt = renderer.prompt(messages)
    ended = [False]

    def stop_when(_, new_tokens):
        text, ended[0] = renderer.answer_text(new_tokens)
        if on_block is not None:
            on_block(text)
        return ended[0]

    out = generate(model, [prompt], sampling, stop_when=stop_when)
    return renderer.answer_text(out.tokens[0])[0]


@command
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bdiff.chat", description=__doc__)
    parser.add_argument("--model", required=True, help="a model or run directory, a final.pt or a Hub id (user/name)")
    parser.add_argument("--system", help="a system message that opens the conversation")
    add_flags(parser, SamplingConfig, SamplingConfig(temperature=0.0, strategy="confidence"))
    add_device_flags(parser)
    args = parser.parse_args(argv)
    sampling = SamplingConfig(temperature=0.0, strategy="confidence")
    apply_flags(args, sampling)
    device, dtype = device_and_dtype(args)
    from bdiff.models import from_pretrained

    model = from_pretrained(args.model, device)
    model.set_dtype(dtype)
    renderer = renderer_of(model.run_config)
    if not (model.run_config.get("dataset") or {}).get("chat"):
        print(f"note: {args.model} was not trained on conversations; asking in bdiff's plain template",
              file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if not sys.stdin.isatty():  # scripted: one question a line, one answer a line
        for line in sys.stdin:
            question = line.rstrip("\n")
            reply = answer(model, renderer, system + [{"role": "user", "content": question}], sampling)
            print(reply.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"), flush=True)
        return 0
    history = list(system)
    print(f"chatting with {args.model} (Ctrl-D to end)", file=sys.stderr)
    while True:
        try:
            question = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        shown = [0]

        def on_block(text):  # the answer as it grows, one finished block at a time
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)

        history.append({"role": "user", "content": question})
        reply = answer(model, renderer, history, sampling, on_block)
        print(reply[shown[0]:], flush=True)
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
