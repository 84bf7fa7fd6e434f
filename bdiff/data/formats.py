"""The on-disk formats of data: token shards and a data set's record (docs/design.md §4). Read by bdiff.data (the
registry and the loader) and written by bdiff.data.prepare.

Shard: a header of 256 int32 (magic 20240520, version, token count, and in version 2 the bytes per token), then
the tokens: uint16 in version 1; uint16 or uint32 in version 2.

Answers (conversations, bdiff.data.chat): beside a shard NAME.bin, NAME.answers holds one bit per token, set where
the token belongs to an assistant's answer (it is noised and carries loss; the others are prompt: always clean, no
loss): a header of 256 int32 (magic 20240521, version 1, token count), then the bits, eight tokens a byte, the first
token in the high bit (numpy's packbits). A shard without one is all answer, as plain text is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from bdiff.errors import BdiffError

MAGIC, HEADER_INTS = 20240520, 256
ANSWERS_MAGIC = 20240521  # the answers file beside a shard
VERSIONS = (1, 2)  # 1: uint16 tokens; 2: the header's 4th int says the bytes per token (2: uint16, 4: uint32)
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "bdiff.json"  # beside a prepared data set's shards: its DataSet record


@dataclass(frozen=True)
class DataSet:
    """What a data set is and what its token ids mean: every module reads this one record (a model trained on it
    must share its BOS and fit its ids; sampling decodes with its tokenizer)."""
    name: str  # shards are NAME_train_*.bin and NAME_val_*.bin
    tokenizer: str  # bdiff.data.tokenizer.load_tokenizer's spec: "bytes", "gpt2", a tokenizer.json, a Hub name
    num_ids: int  # ids 0..num_ids-1 occur in the data (BOS included)
    bos_id: int  # the document separator
    mask_id: int  # a MASK id that fits: the first id past the data's
    default_dir: str  # where its shards live unless --data_dir says otherwise
    description: str  # for model cards and logs
    prompt: str  # the default prompt of samples
    source: str = ""  # a Hugging Face dataset id the data comes from, for model cards ("" if none)
    # Conversations (bdiff/data/chat.py): "plain" (bdiff's template) or "template" (the tokenizer's chat template);
    # "" for plain text
    chat: str = ""
    end_of_turn: str = ""  # conversations: the text that ends an answer (sampling stops there)
    packed: int = 0  # conversations: packed whole into windows of this many tokens, none straddling two; 0: a stream
    block_size: int = 0  # conversations: every answer is padded to end at a multiple of this (the model's block size)
    align_answers: bool = False  # conversations: every answer also starts at a multiple of block_size
    pad_id: int = -1  # conversations: the token that pads answers to their blocks

    @property
    def vocab_size(self) -> int:
        """The model vocabulary that fits: every data id and MASK."""
        return max(self.num_ids, self.mask_id + 1)


class DataError(BdiffError):
    """Missing, malformed or exhausted data; the message names the file or directory."""


def write_shard(path: str, tokens, token_bytes: int | None = None) -> None:
    """Write tokens as one shard, atomically (a partial file never has the final name). `token_bytes` None: version
    1, uint16, as the built-in data sets are stored; 2 or 4: version 2, uint16 or uint32 (vocabularies past
    65,536 ids), the header saying which."""
    tokens = np.asarray(tokens)
    limit = 2 ** (8 * (token_bytes or 2))
    if tokens.size and (tokens.min() < 0 or tokens.max() >= limit):
        raise DataError(f"{path}: tokens must lie in [0, {limit}) to be stored in {token_bytes or 2} bytes")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, 1 if token_bytes is None else 2, tokens.size)
    header[3] = token_bytes or 0
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint32 if token_bytes == 4 else np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path: str) -> np.ndarray:
    """Memory-mapped tokens of one shard (uint16, or uint32 in a version-2 shard that says so), after checking its
    header against its size."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard ({size} bytes, header alone is {HEADER_BYTES})")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] not in VERSIONS:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected one of {VERSIONS})")
    width = 2 if header[1] == 1 else int(header[3])
    if width not in (2, 4):
        raise DataError(f"{path}: version-2 shard with {width} bytes per token (expected 2 or 4)")
    count = int(header[2])
    if size != HEADER_BYTES + width * count:
        raise DataError(f"{path}: truncated or oversized shard: header says {count} tokens, "
                        f"file holds {(size - HEADER_BYTES) / width:g}")
    return np.memmap(path, dtype=np.uint16 if width == 2 else np.uint32, mode="r", offset=HEADER_BYTES,
                     shape=(count,))


def answers_path(shard: str) -> str:
    return shard[:-len(".bin")] + ".answers" if shard.endswith(".bin") else shard + ".answers"


def write_answers(path: str, flags) -> None:
    """One bit per token (`flags`, bool), atomically, in the answers format of the module docstring."""
    flags = np.asarray(flags, dtype=bool)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (ANSWERS_MAGIC, 1, flags.size)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.packbits(flags).tobytes())
    os.replace(tmp, path)


def read_answers(path: str, tokens: int) -> np.ndarray | None:
    """The packed answer bits (uint8, memory-mapped) of the shard whose answers file is `path`, which must hold
    `tokens` tokens; None where there is no such file (every token an answer)."""
    if not os.path.exists(path):
        return None
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    count = int(header[2]) if header.size == HEADER_INTS else -1
    if header.size < 3 or header[0] != ANSWERS_MAGIC or count != tokens or \
            os.path.getsize(path) != HEADER_BYTES + (tokens + 7) // 8:
        raise DataError(f"{path}: not the answers of its shard's {tokens} tokens (a damaged or foreign file)")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=((tokens + 7) // 8,))


def answer_bits(packed: np.ndarray | None, start: int, end: int) -> np.ndarray | None:
    """Tokens [start, end)'s answer flags (bool) from packed bits (None: None, every token an answer)."""
    if packed is None:
        return None
    first = start // 8
    bits = np.unpackbits(packed[first:(end + 7) // 8])
    return bits[start - 8 * first:end - 8 * first].astype(bool)
