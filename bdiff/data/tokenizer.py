"""Text to token ids and back, by the tokenizer of the data a model was trained on (recorded in its config's data
set, bdiff/data/__init__.py), never guessed from the vocabulary size: a GPT-2-sized model trained on bytes samples
bytes.

A tokenizer is named by one string (`load_tokenizer`):
- "bytes": UTF-8 bytes as ids 0..255, BOS 256;
- a tiktoken encoding ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base"; `pip install tiktoken`, which
  downloads its vocabulary once): BOS is its end-of-text token;
- a local `tokenizer.json`, a directory holding one (a transformers model's), or a Hugging Face tokenizer or model
  name (`pip install tokenizers`): BOS is its end-of-text or end-of-sequence token where it has one, otherwise a new
  id after its vocabulary; MASK its own mask token where its tokenizer_config.json names one.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np

from bdiff.errors import BdiffError

TIKTOKEN = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")  # BOS candidates, in order


class TokenizerError(BdiffError):
    """The tokenizer cannot run here, or is unknown; the message says what to install or pass."""


class Tokenizer:
    """encode (text -> ids, no BOS), encode_batch, decode (ids -> text; BOS and ids past the text's dropped)."""
    name: str  # the spec it was loaded from
    num_ids: int  # ids the data can hold, BOS included: a model needs vocab_size > num_ids (MASK after them)
    bos_id: int  # the document separator
    text_ids: int  # ids below this map to text
    mask_id: int | None = None  # the tokenizer's own mask token, where it has one (else MASK is num_ids)
    pad_id: int | None = None  # the tokenizer's own pad token, where it has one

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """encode_batch as integer arrays (what bdiff.data.prepare stores)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]


class ByteTokenizer(Tokenizer):
    name, num_ids, bos_id, text_ids = "bytes", 257, 256, 256

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]

    def encode_arrays(self, texts):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids):
        ids = np.asarray(ids, dtype=np.int64)  # vectorised: the sample's judge decodes 8M tokens of corpus
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class TiktokenTokenizer(Tokenizer):
    def __init__(self, name: str):
        try:
            import tiktoken

            self.enc = tiktoken.get_encoding(name)
        except ImportError:
            raise TokenizerError(f"tokenizer {name!r} needs tiktoken: `pip install tiktoken`") from None
        except Exception as e:  # noqa: BLE001 (its vocabulary cannot be downloaded: offline, a proxy, anything)
            raise TokenizerError(f"tokenizer {name!r}: tiktoken could not load its vocabulary; it downloads it once, "
                                 f"with network access ({type(e).__name__})") from None
        self.name, self.bos_id, self.num_ids = name, self.enc.eot_token, self.enc.n_vocab
        self.text_ids = self.enc.eot_token if self.enc.eot_token == self.enc.n_vocab - 1 else self.enc.n_vocab

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids):
        return self.enc.decode([t for t in ids if 0 <= t < self.num_ids and t != self.bos_id])


class HFTokenizer(Tokenizer):
    """The `tokenizers` library's: a tokenizer.json file, a directory holding one (a transformers model's), or a Hub
    name. The tokenizer_config.json beside it, where there is one, names its mask token (`mask_id`)."""

    def __init__(self, spec: str):
        try:
            from tokenizers import Tokenizer as Rust
        except ImportError:
            raise TokenizerError(f"tokenizer {spec!r} needs the tokenizers library: `pip install tokenizers` (or "
                                 "pip install -e \".[data]\")") from None
        path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
        try:
            self.tok = Rust.from_file(path) if os.path.isfile(path) else Rust.from_pretrained(spec)
        except Exception as e:  # noqa: BLE001 (a bad file, an unknown name, no network: one line each way)
            what = "not a readable tokenizer.json" if os.path.isfile(path) else \
                "no tokenizer.json there" if os.path.isdir(spec) else \
                "no such file, and not a tokenizer on the Hugging Face Hub (or the Hub cannot be reached)"
            cause = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise TokenizerError(f"unknown tokenizer {spec!r}: {what} ({cause})"
                                 f"; use bytes, a tiktoken encoding ({', '.join(TIKTOKEN)}), a tokenizer.json or a "
                                 "Hub tokenizer name") from None
        self.name = spec
        size = self.tok.get_vocab_size(with_added_tokens=True)
        ends = [i for i in map(self.tok.token_to_id, END_TOKENS) if i is not None]
        self.bos_id = ends[0] if ends else size
        self.num_ids = max(size, self.bos_id + 1)
        self.text_ids = size
        directory = os.path.dirname(path) if os.path.isfile(path) else None
        self.mask_id, self.pad_id = (self._own(directory, name) for name in ("mask_token", "pad_token"))

    def _own(self, directory: str | None, name: str) -> int | None:
        """The id of the token tokenizer_config.json beside the tokenizer names `name` (mask_token, pad_token)."""
        try:
            with open(os.path.join(directory or "", "tokenizer_config.json")) as f:
                token = json.load(f).get(name)
        except (OSError, ValueError, AttributeError):
            return None
        token = token.get("content") if isinstance(token, dict) else token
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([t for t in ids if 0 <= t < self.text_ids and t != self.bos_id],
                               skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer a spec names (see the module docstring); refused in one line when unknown or not installed."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec in TIKTOKEN:
        return TiktokenTokenizer(spec)
    if spec.endswith(".json") and not os.path.isfile(spec):
        raise TokenizerError(f"unknown tokenizer {spec!r}: no such file")
    return HFTokenizer(spec)


def encode(text: str, tokenizer: str, bos_id: int) -> list[int]:
    """BOS, then the text's tokens."""
    return [bos_id] + load_tokenizer(tokenizer).encode(text)


def decode(tokens: list[int], tokenizer: str) -> str:
    """The text of `tokens`; ids that are no text of the tokenizer (BOS, MASK, ids past its vocabulary) are
    dropped."""
    return load_tokenizer(tokenizer).decode(list(tokens))
