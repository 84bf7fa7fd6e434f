"""Text to token ids and back, by the tokenizer of the data a model was trained on (recorded in its config as
`train.data`, see bdiff.data.VOCABULARIES): bytes for the embedded corpus, GPT-2 BPE for FineWeb-Edu. The model's
vocabulary size does not decide it: a GPT-2-sized model trained on bytes samples bytes."""
from __future__ import annotations

from bdiff.data import VOCABULARIES


class TokenizerError(ValueError):
    """The tokenizer cannot run here; the message says what to install."""


def tokenizer_of(config: dict) -> str:
    """"bytes" or "gpt2": the tokenizer of the data named by a run's config dict (TrainConfig.data)."""
    return VOCABULARIES[config["train"]["data"]].tokenizer


def default_prompt(tokenizer: str) -> str:
    """A prompt that suits the data: code for the byte-level corpus, prose for FineWeb-Edu."""
    return "def " if tokenizer == "bytes" else "The"


def encode(text: str, tokenizer: str, bos_id: int) -> list[int]:
    """BOS, then the text's tokens."""
    if tokenizer == "bytes":
        return [bos_id] + list(text.encode("utf-8"))
    return [bos_id] + _gpt2().encode(text, allowed_special=set())


def decode(tokens: list[int], tokenizer: str) -> str:
    """The text of `tokens`; ids that are no token of the tokenizer (BOS, MASK, ids past its vocabulary) are
    dropped."""
    num_ids = VOCABULARIES["stdlib" if tokenizer == "bytes" else "finewebedu"].num_ids - 1  # BOS is no text
    tokens = [t for t in tokens if 0 <= t < num_ids]
    if tokenizer == "bytes":
        return bytes(tokens).decode("utf-8", errors="replace")
    return _gpt2().decode(tokens)


def _gpt2():
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # not installed, or its vocabulary cannot be downloaded offline
        raise TokenizerError("GPT-2 text needs tiktoken: `pip install tiktoken`, with network access once to fetch "
                             f"its vocabulary ({type(e).__name__})") from None
