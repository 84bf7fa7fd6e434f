"""Token shards on disk and the distributed loader (format: docs/design.md §4).

Shard: a header of 256 int32 (magic 20240520, version 1, token count), then the tokens as uint16.
Loader: each step takes the next world_size * seq_len tokens in file order; rank r takes slice r. A shard's
tail too short for a whole step is skipped, so no token is ever used twice.

    python -m bdiff.data finewebedu 10      # FineWeb-Edu val shard + 10 train shards (100M tokens each)
    python -m bdiff.data stdlib             # build the embedded byte-level corpus
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from bdiff.config import ArgumentParser

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
FINEWEB_REPO = "kjj0/finewebedu10B-gpt2"  # Hugging Face dataset of GPT-2-tokenized FineWeb-Edu 10B
BYTE_BOS, BYTE_MASK = 256, 257  # ids of the byte-level vocabulary: 256 bytes, BOS, MASK


@dataclass(frozen=True)
class Vocabulary:
    """What a data set's token ids mean: a model trained on it must share its BOS and fit its ids."""
    tokenizer: str  # "bytes" or "gpt2": how its ids map to text
    num_ids: int  # ids 0..num_ids-1 occur in the data (BOS included)
    bos_id: int  # the document separator


VOCABULARIES = {
    "stdlib": Vocabulary("bytes", 257, BYTE_BOS),  # 256 bytes + BOS
    "finewebedu": Vocabulary("gpt2", 50257, 50256),  # GPT-2 BPE; <|endoftext|> separates documents
}


def check_model_fits_data(data: str, vocab_size: int, bos_id: int, mask_id: int) -> None:
    """Data and model must agree: the model's BOS is the data's, every data id is below vocab_size and the MASK
    id is none of them. Otherwise training would run without document boundaries (or on ids the embedding
    lacks), silently; this says which settings fit instead."""
    v = VOCABULARIES[data]
    problems = []
    if bos_id != v.bos_id:
        problems.append(f"the data marks documents with BOS {v.bos_id}, the model's bos_id is {bos_id}")
    if vocab_size < v.num_ids + 1:
        problems.append(f"the data's ids go up to {v.num_ids - 1}, the model's vocab_size is {vocab_size}")
    if mask_id < v.num_ids:
        problems.append(f"mask_id {mask_id} is one of the data's ids (0..{v.num_ids - 1})")
    if problems:
        fits = ("--preset cpu or tiny, or --vocab_size 258 --bos_id 256 --mask_id 257" if data == "stdlib"
                else "--preset record, or --vocab_size 50258 --bos_id 50256 --mask_id 50257")
        raise DataError(f"data {data!r} does not fit the model: {'; '.join(problems)}. For this data use {fits}")


class DataError(ValueError):
    """Missing, malformed or exhausted data; the message names the file or directory."""


def write_shard(path: str, tokens) -> None:
    """Write tokens (values < 65536) as one shard, atomically: a partial file never has the final name."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: tokens must lie in [0, 65536) to be stored as uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path: str) -> np.ndarray:
    """Memory-mapped uint16 tokens of one shard, after checking its header against its size."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard ({size} bytes, header alone is {HEADER_BYTES})")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise DataError(f"{path}: truncated or oversized shard: header says {count} tokens, "
                        f"file holds {(size - HEADER_BYTES) / 2:g}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


class DistributedLoader:
    """Fixed-order, non-overlapping sequences: step s, rank r reads tokens
    [base + r*seq_len, base + (r+1)*seq_len) of the current shard, base advancing by world*seq_len."""

    def __init__(self, files: list[str], seq_len: int, rank: int = 0, world_size: int = 1):
        if not files:
            raise DataError("no shard files given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.files, self.seq_len, self.rank, self.world_size = list(files), seq_len, rank, world_size
        self.shard, self.offset = 0, 0  # position of the next step's first token
        self.last_step = None  # (shard, start, end): the tokens the last step took across all ranks
        self.tokens = read_shard(self.files[0])

    def state(self) -> dict:
        return {"shard": self.shard, "offset": self.offset, "world_size": self.world_size, "seq_len": self.seq_len}

    def load_state(self, state: dict) -> None:
        """Continue where a loader left off. The position is the next unread token, so any number of ranks can
        continue from it with no token read twice and none skipped; the sequence length must be the same."""
        if state["seq_len"] != self.seq_len:
            raise DataError(f"loader state of {state['seq_len']}-token sequences cannot continue with seq_len "
                            f"{self.seq_len}")
        self.shard, self.offset = state["shard"], state["offset"]
        self.tokens = read_shard(self.files[self.shard])

    def next(self) -> torch.Tensor:
        """This rank's next sequence, int64 (seq_len,)."""
        step = self.world_size * self.seq_len
        while self.offset + step > len(self.tokens):
            if self.shard + 1 == len(self.files):
                raise DataError(f"out of data: {len(self.files)} shard(s) from {os.path.dirname(self.files[0])} "
                                f"are used up; add shards or run fewer steps")
            self.shard, self.offset = self.shard + 1, 0
            self.tokens = read_shard(self.files[self.shard])
        self.last_step = (self.shard, self.offset, self.offset + step)
        start = self.offset + self.rank * self.seq_len
        self.offset += step
        return torch.from_numpy(self.tokens[start:start + self.seq_len].astype(np.int64))


def shard_files(data: str, data_dir: str, split: str) -> list[str]:
    """Sorted shard paths of one split; the embedded corpus is built on first use."""
    if data == "stdlib":
        build_stdlib_corpus(data_dir)
    files = sorted(glob.glob(os.path.join(data_dir, f"{data}_{split}_*.bin")))
    if not files:
        hint = f"python -m bdiff.data {data} 10" if data == "finewebedu" else f"python -m bdiff.data {data}"
        raise DataError(f"no {data} {split} shards in {data_dir!r} (run `{hint}` first, or set --data_dir)")
    return files


def unigram_entropy(files: list[str], vocab_size: int) -> float:
    """Entropy in nats of the token frequencies over the given shards: the loss of a model that ignores context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path in files:
        counts += np.bincount(read_shard(path), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --- the embedded default corpus: the Python standard library's own sources, bytes as tokens ---------

def stdlib_sources() -> list[str]:
    """The standard library's .py files (no site-packages, tests or IDLE), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return paths


def build_stdlib_corpus(data_dir: str, val_every: int = 20) -> None:
    """Write stdlib_train_000000.bin and stdlib_val_000000.bin (every `val_every`-th file is validation)
    unless both exist. Each file is one document: BOS, then its bytes."""
    train_path = os.path.join(data_dir, "stdlib_train_000000.bin")
    val_path = os.path.join(data_dir, "stdlib_val_000000.bin")
    if os.path.exists(train_path) and os.path.exists(val_path):
        return
    os.makedirs(data_dir, exist_ok=True)
    splits = {"train": [], "val": []}
    for i, path in enumerate(stdlib_sources()):
        with open(path, "rb") as f:
            doc = np.frombuffer(f.read(), dtype=np.uint8).astype(np.uint16)
        splits["val" if i % val_every == 0 else "train"] += [np.array([BYTE_BOS], np.uint16), doc]
    write_shard(val_path, np.concatenate(splits["val"]))
    write_shard(train_path, np.concatenate(splits["train"]))


# --- FineWeb-Edu from the Hugging Face hub -----------------------------------------------------------

def download_finewebedu(num_train_shards: int, data_dir: str) -> list[str]:
    """Fetch the val shard and train shards 1..N; files already complete are skipped, partial ones resume."""
    from huggingface_hub import hf_hub_download

    if not 1 <= num_train_shards <= 99:
        raise ValueError(f"num_train_shards must lie in [1, 99], got {num_train_shards}")
    names = ["finewebedu_val_000000.bin"] + [f"finewebedu_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]
    paths = []
    for n, name in enumerate(names, 1):
        print(f"[{n}/{len(names)}] {name}", flush=True)
        try:
            paths.append(hf_hub_download(repo_id=FINEWEB_REPO, filename=name, repo_type="dataset",
                                         local_dir=data_dir))
        except Exception as e:  # noqa: BLE001 (offline, unreachable, refused: all end the same way for the user)
            cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise DataError(f"could not download {name} from the Hugging Face Hub ({FINEWEB_REPO}): no network, or "
                            f"the Hub is unreachable ({type(e).__name__}: {cause}). Files go to {data_dir}/ and those "
                            "already there are reused; for a mirror set HF_ENDPOINT, to use only local files "
                            "HF_HUB_OFFLINE=1") from None
        read_shard(paths[-1])  # a damaged download fails here, naming the file
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bdiff.data", description="Fetch or build token shards.")
    sub = parser.add_subparsers(dest="corpus", required=True)
    fw = sub.add_parser("finewebedu", help="download FineWeb-Edu 10B (GPT-2 tokens) from the Hugging Face hub")
    fw.add_argument("num_train_shards", type=int, nargs="?", default=10, help="train shards of 100M tokens (1-99)")
    fw.add_argument("--dir", default="data/finewebedu10B")
    sd = sub.add_parser("stdlib", help="build the embedded byte-level corpus from Python's standard library")
    sd.add_argument("--dir", default="data/stdlib")
    args = parser.parse_args(argv)
    try:
        if args.corpus == "finewebedu":
            download_finewebedu(args.num_train_shards, args.dir)
        else:
            build_stdlib_corpus(args.dir)
            for split in ("train", "val"):
                (path,) = shard_files("stdlib", args.dir, split)
                print(f"{path}: {len(read_shard(path)):,} tokens")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
