"""How fast `python -m bdiff.data prepare` turns text into shards, in MB of text per second, on every core.

    python bench/bench_prepare.py                 # ~60 MB of the Python standard library's sources, bytes and BPE
    python bench/bench_prepare.py --mb 20 --jobs 1

The text is the standard library's .py files (copied into a temporary folder, up to --mb); the BPE tokenizer is
trained here on a slice of it (`tokenizers`, a byte-level BPE of --vocab ids), so nothing is downloaded. Goals on
2 cores: bytes at least 20 MB/s, BPE at least 4 MB/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdiff.data import stdlib_sources
from bdiff.data.prepare import prepare


def corpus(folder: str, megabytes: float) -> int:
    """Copy standard-library sources into `folder` until `megabytes` of text; returns the bytes copied."""
    total = 0
    for i, path in enumerate(stdlib_sources()):
        if total >= megabytes * 1e6:
            break
        shutil.copyfile(path, os.path.join(folder, f"{i:05d}.py"))
        total += os.path.getsize(path)
    while total < megabytes * 1e6:  # a small standard library: repeat it
        for name in sorted(os.listdir(folder))[:200]:
            copy = os.path.join(folder, f"r{total}_{name}")
            shutil.copyfile(os.path.join(folder, name), copy)
            total += os.path.getsize(copy)
    return total


def bpe(folder: str, path: str, vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))[:300]
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False))
    tok.save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=60, help="megabytes of text")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: every core)")
    parser.add_argument("--vocab", type=int, default=8192, help="ids of the BPE tokenizer trained here")
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    try:
        folder = os.path.join(work, "text")
        os.makedirs(folder)
        size = corpus(folder, args.mb)
        spec = bpe(folder, os.path.join(work, "tokenizer.json"), args.vocab)
        print(f"{size / 1e6:.1f} MB of Python sources, {len(os.listdir(folder))} files; {os.cpu_count()} cores, "
              f"jobs {args.jobs or os.cpu_count()}")
        print(f"{'tokenizer':<22} {'seconds':>8} {'MB/s':>7} {'tokens':>12}")
        for name, tokenizer in (("bytes", "bytes"), (f"BPE ({args.vocab} ids)", spec)):
            out = os.path.join(work, name.split()[0])
            t0 = time.perf_counter()
            lines = []
            prepare(folder, tokenizer, out, name="bench", jobs=args.jobs, progress=False, log=lines.append)
            seconds = time.perf_counter() - t0
            tokens = sum(os.path.getsize(os.path.join(out, f)) - 1024 for f in os.listdir(out) if f.endswith(".bin"))
            print(f"{name:<22} {seconds:8.2f} {size / 1e6 / seconds:7.1f} {tokens // 2:12,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
