"""Tile configurations chosen once per GPU, never at every run start.

A kernel's configuration (tiles, warps, stages) for one shape class comes from:
1. on a GPU architecture the committed table `kernels/<op>_tiles.json` knows (sm_90 for H100/H200, sm_80 for A100):
   its entry, the winner `bench/tune_<op>.py` measured (with the GPU, versions and times it was measured with), or
   the op's heuristic default where it has none; nothing is timed at run start;
2. on any other GPU: the disk cache (`cache_path()`: $BDIFF_CACHE_DIR, else $XDG_CACHE_HOME/bdiff, else
   ~/.cache/bdiff), where a one-time autotune left its answer, so a second run starts at once;
3. that autotune: each configuration of a small space timed on the real inputs, the fastest remembered on disk.
   BDIFF_AUTOTUNE=0 turns it off (the heuristic default runs and nothing is written).
A table entry for another size class of the same kernel serves when its own is missing (the nearest in log2 L):
tiles depend on the documents far more than on L.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile

TABLE_DIR = os.path.dirname(os.path.abspath(__file__))
ENTRY_KEYS = ("measured",)  # what a table entry holds beside the configuration itself: never passed to a kernel


def shape_class(kernel: str, dtype: str, D: int, L: int) -> str:
    """The key of a shape class: 'forward bfloat16 D=128 L<=16384' (L rounded up to a power of two)."""
    return f"{kernel} {dtype} D={D} L<={1 << max(L - 1, 1).bit_length()}"


def _size(key: str) -> int:
    return int(key.rsplit("L<=", 1)[1])


@functools.lru_cache(maxsize=None)
def table(op: str) -> dict:
    """The committed table of `op`: {"sm_90": {shape class: configuration with its "measured" record}}."""
    path = os.path.join(TABLE_DIR, f"{op}_tiles.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["archs"]


def cache_path() -> str:
    base = (os.environ.get("BDIFF_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                              or os.path.expanduser("~/.cache"), "bdiff"))
    return os.path.join(base, "tiles.json")


def _read_cache() -> dict:
    try:
        with open(cache_path()) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged cache costs one autotune, never the run
        print(f"bdiff: ignoring the tile cache {cache_path()} ({e})", file=sys.stderr)
        return {}


def remember(op: str, arch: int, key: str, cfg: dict) -> None:
    """Write one configuration into the disk cache (atomically: ranks tuning at once each leave a whole file)."""
    cache = _read_cache()
    cache.setdefault(op, {}).setdefault(f"sm_{arch}", {})[key] = cfg
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _nearest(entries: dict, key: str) -> dict | None:
    if key in entries:
        return entries[key]
    stem = key.rsplit(" L<=", 1)[0]
    same = [k for k in entries if k.rsplit(" L<=", 1)[0] == stem]
    if not same:
        return None
    return entries[min(same, key=lambda k: abs(math.log2(_size(k)) - math.log2(_size(key))))]


def strip(entry: dict) -> dict:
    """A table or cache entry as a kernel configuration."""
    return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}


def lookup(op: str, arch: int, key: str) -> tuple[dict | None, str] | None:
    """(configuration, where it came from): the committed table's entry on an architecture it knows (None as the
    configuration where it has no entry for `key`: the default), else the disk cache's, else None."""
    known = table(op).get(f"sm_{arch}")
    if known is not None:
        entry = _nearest(known, key)
        if entry is None:
            return None, f"the heuristic default (the committed table has no entry for sm_{arch})"
        return strip(entry), f"the committed table (measured on {entry['measured']['gpu']})"
    entry = _read_cache().get(op, {}).get(f"sm_{arch}", {}).get(key)
    return (strip(entry), f"the tile cache {cache_path()}") if entry is not None else None


_CHOSEN: dict[tuple, dict] = {}  # (op, arch, key) -> configuration, for this process


def choose(op: str, arch: int, key: str, space: list[dict], time_ms) -> dict:
    """The configuration for `key` on this GPU: the table's, the cache's, or (the first time on a GPU neither
    knows) the fastest of `space` by `time_ms(cfg)`, remembered on disk. space[0] is the heuristic default:
    with BDIFF_AUTOTUNE=0, or when no configuration of the space runs, it is the answer."""
    memo = (op, arch, key)
    if memo in _CHOSEN:
        return _CHOSEN[memo]
    found = lookup(op, arch, key)
    if found is not None:
        cfg = found[0] or space[0]
    elif len(space) == 1 or os.environ.get("BDIFF_AUTOTUNE", "1") == "0":
        cfg = space[0]
    else:
        print(f"bdiff: {op} {key}: no tuned tiles for sm_{arch}; timing {len(space)} configurations once "
              f"(kept in {cache_path()})", file=sys.stderr, flush=True)
        times = []
        for c in space:
            try:
                times.append(time_ms(c))
            except Exception as e:  # noqa: BLE001  a configuration this GPU cannot run (shared memory, registers)
                print(f"bdiff: {op} {c} does not run here ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
                times.append(math.inf)
        cfg = space[min(range(len(space)), key=times.__getitem__)]
        if math.isfinite(min(times)):
            remember(op, arch, key, cfg)
    _CHOSEN[memo] = cfg
    return cfg
