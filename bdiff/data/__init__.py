"""Token shards on disk and the distributed loader (format: docs/design.md §4).

Shards and a data set's record: bdiff/data/formats.py.
Loader: each step takes the next world_size * seq_len tokens in file order; rank r takes slice r. A shard's
tail too short for a whole step is skipped, so no token is used twice in an epoch; a run longer than its data
reads it again, each later epoch in an order of its own (DistributedLoader).

    python -m bdiff.data finewebedu 10      # FineWeb-Edu val shard + 10 train shards (100M tokens each)
    python -m bdiff.data stdlib             # build the embedded byte-level corpus
    python -m bdiff.data prepare INPUT --tokenizer T --out DIR     # your own text (bdiff/data/prepare.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sysconfig

import numpy as np
import torch

from bdiff.config import ArgumentParser
from bdiff.data.formats import (
    MANIFEST,
    DataError,
    DataSet,
    answer_bits,
    answers_path,
    read_answers,
    read_shard,
    write_shard,
)
from bdiff.errors import command

FINEWEB_REPO = "kjj0/finewebedu10B-gpt2"  # Hugging Face dataset of GPT-2-tokenized FineWeb-Edu 10B

DATASETS = {  # the built-in data sets; a prepared one carries its record in DIR/bdiff.json instead
    "stdlib": DataSet("stdlib", "bytes", 257, 256, 257, "data/stdlib",
                      "the Python standard library's source, read as bytes (embedded corpus)", "def "),
    "finewebedu": DataSet("finewebedu", "gpt2", 50257, 50256, 50257, "data/finewebedu10B",
                          "FineWeb-Edu (GPT-2 tokens; HuggingFaceFW/fineweb-edu)", "The", "HuggingFaceFW/fineweb-edu"),
}


def read_manifest(data_dir: str) -> DataSet | None:
    """The DataSet record of a prepared data set's directory, or None where there is none. A tokenizer file named
    in it lives beside the shards."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)["dataset"]
        data = DataSet(**record)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a bdiff data set manifest ({type(e).__name__}: {str(e)[:120]})") from None
    if data.tokenizer.endswith(".json"):
        data = dataclasses.replace(data, tokenizer=os.path.join(data_dir, os.path.basename(data.tokenizer)))
    return data


def find_dataset(name: str, data_dir: str | None = None, must_hold_data: bool = False) -> tuple[DataSet, str]:
    """(data set, its directory) for --data NAME and --data_dir DIR: a directory holding a manifest is that prepared
    data set, whatever NAME says; otherwise NAME is a built-in data set (in DIR, or its default directory) or a
    prepared one in data/NAME. `must_hold_data` (a --data_dir the user gave without --data): DIR must hold a
    prepared data set or the built-in one's shards; the embedded corpus is never built into a mistyped path."""
    for directory in ([data_dir] if data_dir else []) + ([] if must_hold_data else [os.path.join("data", name)]):
        found = read_manifest(directory)
        if found is not None:
            return found, directory
    own_dir = name in DATASETS and os.path.normpath(data_dir or "") == os.path.normpath(DATASETS[name].default_dir)
    if must_hold_data and not own_dir and not glob.glob(os.path.join(data_dir, f"{name}_train_*.bin")):
        what = "no such directory" if not os.path.isdir(data_dir) else f"no {MANIFEST} and no {name} shards"
        builtin = "build the embedded corpus there" if name == "stdlib" else f"read {name} shards from there"
        raise DataError(f"--data_dir {data_dir}: {what}; prepare a data set there with `python -m bdiff.data prepare "
                        f"INPUT --tokenizer T --out {data_dir}`, or pass --data {name} to {builtin}")
    if name in DATASETS:
        return DATASETS[name], data_dir or DATASETS[name].default_dir
    raise DataError(f"unknown data set {name!r}: the built-in ones are {', '.join(DATASETS)}; a prepared one is a "
                    f"directory holding {MANIFEST} (python -m bdiff.data prepare INPUT --tokenizer T --out DIR, then "
                    "--data_dir DIR)")


def tokenizer_of(config: dict, directory: str | None = None) -> str:
    """The tokenizer spec of a run's config dict: its data set's (train.py records it); configs written before
    data sets were recorded name a built-in data set. A tokenizer file is looked up in `directory` (a model
    directory holds a copy of it) when it is not where the data set had it."""
    spec = (config.get("dataset") or {}).get("tokenizer") or DATASETS[config["train"]["data"]].tokenizer
    if directory and spec.endswith(".json") and not os.path.isfile(spec):
        spec = os.path.join(directory, os.path.basename(spec))
    return spec


def default_prompt(config: dict) -> str:
    """The data set's default prompt: code for the byte-level corpus, prose for FineWeb-Edu, a prepared set's own."""
    data = config.get("dataset") or {}
    if data.get("prompt") is not None:
        return data["prompt"]
    name = config["train"].get("data")
    return DATASETS[name].prompt if name in DATASETS else ""  # "": a model saved before it saw data


def check_model_fits_data(data: DataSet, vocab_size: int, bos_id: int, mask_id: int) -> None:
    """Data and model must agree: the model's BOS is the data's, every data id is below vocab_size and the MASK
    id is none of them. Otherwise training would run without document boundaries (or on ids the embedding
    lacks), silently; this says which settings fit instead."""
    v = data
    problems = []
    if bos_id != v.bos_id:
        problems.append(f"the data marks documents with BOS {v.bos_id}, the model's bos_id is {bos_id}")
    if vocab_size < v.num_ids + 1:
        problems.append(f"the data's ids go up to {v.num_ids - 1}, the model's vocab_size is {vocab_size}")
    if mask_id < v.num_ids and mask_id != v.mask_id:  # the tokenizer's own mask token is in no text
        problems.append(f"mask_id {mask_id} is one of the data's ids (0..{v.num_ids - 1})")
    if problems:
        fits = f"--vocab_size {v.vocab_size} --bos_id {v.bos_id} --mask_id {v.mask_id}"
        fits = {"stdlib": "--preset demo or tiny, or ", "finewebedu": "--preset record, or "}.get(v.name, "") + fits
        raise DataError(f"data {v.name!r} does not fit the model: {'; '.join(problems)}. For this data use {fits}")


class DistributedLoader:
    """Non-overlapping sequences of seq_len tokens, the same on every rank, epoch after epoch.

    Epoch 0 reads the shards in file order: step s, rank r reads tokens [base + r*seq_len, base + (r+1)*seq_len) of
    the current shard, base advancing by world*seq_len (a shard's tail too short for a whole step is skipped): the
    seed's order, which the record rules fix; a run that stays within one data set's tokens never leaves it. With
    `epochs`, a data set smaller than the run is read again: epoch e >= 1 cuts the shards into seq_len-token
    sequences at an offset of its own and reads them in an order of its own (both drawn from (seed, e): every rank
    draws the same), each step the next world of them, rank r the r-th. Without `epochs` (validation) the data end
    with epoch 0. The position (`state`) resumes on any number of ranks with nothing read twice in an epoch.

    `packed` (conversations, DataSet.packed): the shards are windows of that many tokens, each holding whole
    conversations; seq_len must be it, and every epoch cuts the shards at the windows. Shards with answers files
    (bdiff.data.formats) give each sequence's answer flags (`next_with_answers`)."""

    def __init__(self, files: list[str], seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epochs: bool = False, packed: int = 0):
        if not files:
            raise DataError("no shard files given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.files, self.seq_len, self.rank, self.world_size = list(files), seq_len, rank, world_size
        self.seed, self.epochs = seed, epochs
        self.epoch, self.shard, self.offset, self.index = 0, 0, 0, 0  # epoch 0: (shard, offset); later: index
        self.last_step = None  # [(epoch, shard, start, end)]: the tokens the last step took across all ranks
        self.shards = [read_shard(f) for f in self.files]  # memory-mapped, each checked against its header
        self.answers = [read_answers(answers_path(f), len(t)) for f, t in zip(self.files, self.shards)]
        self.packed = packed
        if packed and seq_len != packed:
            raise DataError(f"{os.path.dirname(self.files[0]) or '.'}: conversations packed whole into windows of "
                            f"{packed} tokens; sequences of {seq_len} would cut them (--seq_len and --val_seq_len "
                            f"{packed})")
        self._order = None  # epoch >= 1: (shard, start) of its sequences, in its order
        if self.steps_per_epoch() == 0:
            raise DataError(f"{os.path.dirname(self.files[0]) or '.'}: {len(self.files)} shard(s) of at most "
                            f"{max(map(len, self.shards)):,} tokens hold no whole step of world size {world_size} x "
                            f"{seq_len} tokens; use a shorter sequence length (--seq_len, --val_seq_len) or more data")

    def steps_per_epoch(self) -> int:
        """Whole steps of world_size * seq_len tokens in epoch 0 (the file-order epoch)."""
        return sum(len(t) // (self.world_size * self.seq_len) for t in self.shards)

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "index": self.index,
                "world_size": self.world_size, "seq_len": self.seq_len, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        """Continue where a loader left off. The position is the next unread token of epoch 0, or the next unread
        sequence of a later epoch, so any number of ranks can continue from it with no token read twice in an
        epoch and none skipped; the sequence length (and, past epoch 0, the seed) must be the same."""
        if state["seq_len"] != self.seq_len:
            raise DataError(f"loader state of {state['seq_len']}-token sequences cannot continue with seq_len "
                            f"{self.seq_len}")
        self.epoch, self.shard, self.offset = state.get("epoch", 0), state["shard"], state["offset"]
        self.index, self.seed = state.get("index", 0), state.get("seed", self.seed)
        self._order = None

    def order(self) -> list[tuple[int, int]]:
        """(shard, start) of every sequence of the current epoch (>= 1), in its order, drawn from (seed, epoch)."""
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            cut = int(rng.integers(self.seq_len))  # where this epoch's sequences start, past each shard's start
            cut = 0 if self.packed else cut  # windows of whole conversations are cut where they were packed
            found = [(i, start) for i, t in enumerate(self.shards)
                     for start in range(cut, len(t) - self.seq_len + 1, self.seq_len)]
            if len(found) < self.world_size:  # shards of about one step: cut at their starts, as epoch 0 does
                found = [(i, start) for i, t in enumerate(self.shards)
                         for start in range(0, len(t) - self.seq_len + 1, self.seq_len)]
            self._order = [found[j] for j in rng.permutation(len(found))]
        return self._order

    def next(self) -> torch.Tensor:
        """This rank's next sequence, int64 (seq_len,)."""
        return self.next_with_answers()[0]

    def next_with_answers(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's next sequence, int64 (seq_len,), and its answer flags, bool (seq_len,), or None where its
        shard has no answers file (every token an answer)."""
        shard, start = self._advance()
        tokens = torch.from_numpy(self.shards[shard][start:start + self.seq_len].astype(np.int64))
        flags = answer_bits(self.answers[shard], start, start + self.seq_len)
        return tokens, None if flags is None else torch.from_numpy(flags)

    def _advance(self) -> tuple[int, int]:
        """(shard, start) of this rank's next sequence; the position moves past the step."""
        step = self.world_size * self.seq_len
        while self.epoch == 0 and self.offset + step > len(self.shards[self.shard]):
            if self.shard + 1 < len(self.files):
                self.shard, self.offset = self.shard + 1, 0
            elif not self.epochs:
                raise DataError(f"out of data: {len(self.files)} shard(s) from {os.path.dirname(self.files[0])} "
                                f"are used up; add shards or run fewer steps")
            else:
                self.epoch, self.index, self._order = 1, 0, None
        if self.epoch == 0:
            self.last_step = [(0, self.shard, self.offset, self.offset + step)]
            start = self.offset + self.rank * self.seq_len
            self.offset += step
            return self.shard, start
        while self.index + self.world_size > len(self.order()):  # the epoch's last, incomplete step: the next epoch
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        picked = self.order()[self.index:self.index + self.world_size]
        self.last_step = [(self.epoch, shard, start, start + self.seq_len) for shard, start in picked]
        self.index += self.world_size
        return picked[self.rank]


def shard_files(data: str, data_dir: str, split: str) -> list[str]:
    """Sorted shard paths of one split of the data set named `data`; the embedded corpus is built on first use."""
    if data == "stdlib":
        build_stdlib_corpus(data_dir)
    files = sorted(glob.glob(os.path.join(data_dir, f"{data}_{split}_*.bin")))
    if not files:
        hint = {"finewebedu": "python -m bdiff.data finewebedu 10", "stdlib": "python -m bdiff.data stdlib"}.get(
            data, "python -m bdiff.data prepare INPUT --tokenizer T --out DIR")
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
    bos = DATASETS["stdlib"].bos_id
    train_path = os.path.join(data_dir, "stdlib_train_000000.bin")
    val_path = os.path.join(data_dir, "stdlib_val_000000.bin")
    if os.path.exists(train_path) and os.path.exists(val_path):
        return
    os.makedirs(data_dir, exist_ok=True)
    splits = {"train": [], "val": []}
    for i, path in enumerate(stdlib_sources()):
        with open(path, "rb") as f:
            doc = np.frombuffer(f.read(), dtype=np.uint8).astype(np.uint16)
        splits["val" if i % val_every == 0 else "train"] += [np.array([bos], np.uint16), doc]
    write_shard(val_path, np.concatenate(splits["val"]))
    write_shard(train_path, np.concatenate(splits["train"]))


# --- FineWeb-Edu from the Hugging Face hub -----------------------------------------------------------

def download_finewebedu(num_train_shards: int, data_dir: str) -> list[str]:
    """Fetch the val shard and train shards 1..N; files already complete are skipped, partial ones resume."""
    from huggingface_hub import hf_hub_download

    if not 1 <= num_train_shards <= 99:
        raise DataError(f"num_train_shards must lie in [1, 99], got {num_train_shards}")
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


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bdiff.data", description="Fetch or build token shards.")
    sub = parser.add_subparsers(dest="corpus", required=True)
    fw = sub.add_parser("finewebedu", help="download FineWeb-Edu 10B (GPT-2 tokens) from the Hugging Face hub")
    fw.add_argument("num_train_shards", type=int, nargs="?", default=10, help="train shards of 100M tokens (1-99)")
    fw.add_argument("--dir", default="data/finewebedu10B")
    sd = sub.add_parser("stdlib", help="build the embedded byte-level corpus from Python's standard library")
    sd.add_argument("--dir", default="data/stdlib")
    from bdiff.data import prepare

    pp = sub.add_parser("prepare", help="tokenize your own text into a data set (python -m bdiff.data prepare -h)",
                        description=prepare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_arguments(pp)
    args = parser.parse_args(argv)
    if args.corpus == "prepare":
        return prepare.run(args)
    if args.corpus == "finewebedu":
        download_finewebedu(args.num_train_shards, args.dir)
    else:
        build_stdlib_corpus(args.dir)
        for split in ("train", "val"):
            (path,) = shard_files("stdlib", args.dir, split)
            print(f"{path}: {len(read_shard(path)):,} tokens")
    return 0
