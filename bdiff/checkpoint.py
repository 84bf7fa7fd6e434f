"""The files of a run that only bdiff reads: resumable checkpoints and final.pt (the model directory that
other tools read, model/, is bdiff/hub.py's).

A run's directory out_dir/RUN/ holds
- ckpt_NNNNNN/ (resumable, every --ckpt_every steps and at the end, the newest --ckpt_keep kept):
  shared.pt, written by rank 0: {"model", "adam", "step", "config", "data" (loader position), "world_size"};
  rank{r}.pt, one per rank: {"muon" (this rank's shard), "noise_rng", "cpu_rng", "cuda_rng"};
  COMPLETE, written by rank 0 last, after every rank's files are on disk.
- final.pt, the model alone for sampling: {"model", "config", "step", "val_loss"}.
Every file is written to a temporary name, fsynced and renamed, so a crash mid-write leaves no checkpoint
marked COMPLETE that is not; every load uses torch.load(weights_only=True), so loading never runs code.
"""
from __future__ import annotations

import glob
import os
import pickle
import shutil

import torch

from bdiff.config import ModelConfig
from bdiff.model import BlockDiffusionLM

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
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:
        culprit = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        if not culprit:  # no forbidden object named: not a pickle at all
            raise CheckpointError(f"{path}: not a bdiff checkpoint (not a torch file)") from None
        raise CheckpointError(f"{path}: refused: it holds more than tensors, numbers, strings, lists and dicts, so "
                              f"loading it could run code; nothing of it was run ({culprit[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # zip and pickle framing errors
        raise CheckpointError(f"{path}: not a bdiff checkpoint (not a torch file: {type(e).__name__})") from None
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


def save(run_dir: str, step: int, rank: int, keep: int, model, adam, muon, rngs: dict, data_state: dict,
         config: dict, world: int, barrier=None) -> str:
    """Write ckpt_NNNNNN/ for `step`: this rank's file, rank 0's shared file, then (after `barrier`, which
    every rank reaches once its file is on disk) the COMPLETE marker. Returns the directory."""
    path = checkpoint_dir(run_dir, step)
    os.makedirs(path, exist_ok=True)
    atomic_save({"muon": muon.state_dict(), **rngs}, os.path.join(path, f"rank{rank}.pt"))
    if rank == 0:
        atomic_save({"model": model.state_dict(), "adam": adam.state_dict(), "step": step, "config": config,
                     "data": data_state, "world_size": world}, os.path.join(path, "shared.pt"))
    if barrier is not None:
        barrier()
    if rank == 0:
        mark_complete(path, keep)
    return path


def restore(path: str, rank: int, world: int, config: dict, model, adam, muon) -> tuple[int, dict, dict]:
    """Load a complete checkpoint into the model and both optimizers. Returns (step, this rank's RNG states,
    the loader position) for the caller to put back where they live."""
    shared, mine = load(path, rank, world, config)
    model.load_state_dict(shared["model"])
    adam.load_state_dict(shared["adam"])
    muon.load_state_dict(mine["muon"])
    return shared["step"], {k: mine[k] for k in RANK_KEYS if k != "muon"}, shared["data"]


def save_model(path: str, model, config: dict, step: int, val_loss: float) -> None:
    """final.pt: the model and its config, what sampling needs."""
    atomic_save({"model": model.state_dict(), "config": config, "step": step, "val_loss": val_loss}, path)


def load_model(path: str, device="cpu"):
    """The model of a final.pt (or any file with "model" and "config"), in eval mode, and its config dict."""
    ckpt = safe_load(path, map_location=device, required=("model", "config"))
    if not isinstance(ckpt["config"], dict) or "model" not in ckpt["config"]:
        raise CheckpointError(f"{path}: not a bdiff checkpoint (no model config)")
    try:
        model = BlockDiffusionLM(ModelConfig(**ckpt["config"]["model"])).to(device)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.eval(), ckpt["config"]
