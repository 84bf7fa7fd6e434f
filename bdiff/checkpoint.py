"""Checkpoints that survive crashes: out_dir/RUN/ckpt_NNNNNN/ holds shared.pt (written by rank 0: model,
Adam, step, config, data position, world size) and rank{r}.pt (each rank's Muon shard and RNG streams).
Every file is written to a temporary name, fsynced and renamed; rank 0 writes COMPLETE last, after every
rank has finished, so a checkpoint without COMPLETE (a crash mid-write) is never resumed from.
"""
from __future__ import annotations

import glob
import os
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


def load(path: str, rank: int, world: int, config: dict) -> tuple[dict, dict]:
    """(shared state, this rank's state), after checking that this run can continue from them exactly."""
    shared = torch.load(os.path.join(path, "shared.pt"), weights_only=False)
    if shared["config"]["model"] != config["model"]:
        diff = {k: (v, config["model"][k]) for k, v in shared["config"]["model"].items() if config["model"].get(k) != v}
        raise CheckpointError(f"{path}: the model differs from this run's (checkpoint vs now: {diff})")
    if shared["world_size"] != world:
        raise CheckpointError(f"{path}: written by {shared['world_size']} ranks, resumed with {world}; per-rank noise "
                              f"and Muon shards cannot be split differently: run with {shared['world_size']} ranks")
    return shared, torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=False)
