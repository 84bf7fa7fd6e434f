"""Checkpoints that survive crashes: out_dir/RUN/ckpt_NNNNNN/ holds shared.pt (written by rank 0: model,
Adam, step, config, data position, world size) and rank{r}.pt (each rank's Muon shard and RNG streams).
Every file is written to a temporary name, fsynced and renamed; rank 0 writes COMPLETE last, after every
rank has finished, so a checkpoint without COMPLETE (a crash mid-write) is never resumed from.
"""
from __future__ import annotations

import glob
import os
import pickle
import shutil

import torch

COMPLETE = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from here; the message says why."""


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:06d}")


def mark_complete(path: str, keep: int) -> None:
    """Rank 0, after every rank saved: the checkpoint becomes resumable; older ones beyond `keep` go."""
    with open(os.path.join(path, COMPLETE), "w") as f:
        f.flush()
        os.fsync(f.fileno())
    for old in complete_checkpoints(os.path.dirname(path))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: str) -> list[str]:
    """Resumable checkpoints of a run, oldest first."""
    found = sorted(glob.glob(os.path.join(run_dir, "ckpt_*")))
    return [p for p in found if os.path.exists(os.path.join(p, COMPLETE))]


def resolve(resume: str, run_dir: str) -> str:
    """`--resume auto`: the newest complete checkpoint of this run; otherwise the given directory."""
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"--resume auto: no complete checkpoint in {run_dir}")
        return found[-1]
    if not os.path.exists(os.path.join(resume, COMPLETE)):
        raise CheckpointError(f"{resume}: not a complete checkpoint (no {COMPLETE} marker: missing or cut short)")
    return resume


def safe_load(path: str, map_location=None, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint file, loaded with torch.load(weights_only=True): tensors, numbers, strings, lists, tuples
    and dicts only, so that loading never runs code from the file (a pickle can). A file that needs more, is
    not a torch file, or is not a dict with the `required` keys is refused with one line; nothing of it runs."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        culprit = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        if not culprit:  # no forbidden object named: not a pickle at all
            raise CheckpointError(f"{path}: not a torch checkpoint (UnpicklingError)") from None
        raise CheckpointError(f"{path}: refused: it holds more than tensors, numbers, strings, lists and dicts, so "
                              f"loading it could run code; nothing of it was run ({culprit[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # zip and pickle framing errors
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(e).__name__})") from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path}: not a bdiff checkpoint (no {', '.join(missing)})")
    return obj


SHARED_KEYS = ("model", "adam", "step", "config", "data", "world_size")
RANK_KEYS = ("muon", "noise_rng", "cpu_rng", "cuda_rng")


def load(path: str, rank: int, world: int, config: dict) -> tuple[dict, dict]:
    """(shared state, this rank's state), after checking that this run can continue from them exactly."""
    shared = safe_load(os.path.join(path, "shared.pt"), required=SHARED_KEYS)
    if shared["config"]["model"] != config["model"]:
        diff = {k: (v, config["model"][k]) for k, v in shared["config"]["model"].items() if config["model"].get(k) != v}
        raise CheckpointError(f"{path}: the model differs from this run's (checkpoint vs now: {diff})")
    if shared["world_size"] != world:
        raise CheckpointError(f"{path}: written by {shared['world_size']} ranks, resumed with {world}; per-rank noise "
                              f"and Muon shards cannot be split differently: run with {shared['world_size']} ranks")
    return shared, safe_load(os.path.join(path, f"rank{rank}.pt"), required=RANK_KEYS)
