"""The files of a run that only bdiff reads: resumable checkpoints and final.pt (the model directory that
other tools read, model/, is bdiff/hub.py's).

A run's directory out_dir/RUN/ holds
- ckpt_NNNNNN/ (resumable, every --ckpt_every steps and at the end, the newest --ckpt_keep kept):
  shared.pt, written by rank 0: {"model", "adam", "step", "config", "data" (loader position), "world_size"};
  rank{r}.pt, one per rank: {"muon" (this rank's shard), "noise_rng", "cpu_rng", "cuda_rng"};
  COMPLETE, written by rank 0 last, after every rank's files are on disk: the SHA-256 of each file, which a
  resume verifies (--resume auto falls back to the newest intact checkpoint).
- under FSDP (train.py --fsdp), the model and both optimizers instead in torch.distributed.checkpoint's files
  (.metadata, __R_0.distcp: every rank its shards), shared.pt's "model" and "adam" None and "sharded" True, and
  rank{r}.pt without "muon": any number of FSDP ranks, or one process, or DDP ranks resume it (re-sharded).
- final.pt, the model alone for sampling: {"model", "config", "step", "val_loss"}.
Every file is written to a temporary name, fsynced and renamed, so a crash mid-write leaves no checkpoint
marked COMPLETE that is not; every load uses torch.load(weights_only=True), so loading never runs code, and maps
every tensor to the CPU first (a file records the device that saved each tensor: without the mapping a file
written by rank 7 of an 8-GPU run asks for cuda:7, which a 4-GPU resume or a CPU machine does not have); the
state then moves to where the model and the optimizers live.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass

import torch

from bdiff.config import ModelConfig
from bdiff.data import DistributedLoader
from bdiff.errors import BdiffError
from bdiff.models.objective import noise_seed
from bdiff.training import fsdp
from bdiff.training.ema import WeightAverage

COMPLETE = "COMPLETE"


@dataclass
class TrainState:
    """What a checkpoint holds and a resume puts back, passed whole: the model (not its DDP wrapper), both
    optimizers, the loader (its position) and this rank's noise stream, at `step` optimizer steps done."""
    model: torch.nn.Module  # bdiff.models.nano.BlockDiffusionLM
    adam: torch.optim.Optimizer
    muon: torch.optim.Optimizer
    loader: DistributedLoader
    noise: torch.Generator
    step: int = 0
    ema: WeightAverage | None = None  # the weights' average (TrainConfig.ema), when the run keeps one

    def rng_states(self) -> dict:
        cuda = self.noise.device.type == "cuda"
        return {"noise_rng": self.noise.get_state(), "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None}


class CheckpointError(BdiffError):
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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mark_complete(path: str, keep: int) -> None:
    """Rank 0, after every rank saved: COMPLETE, holding the SHA-256 of every file, makes the checkpoint resumable;
    older ones beyond `keep` go."""
    sums = {name: _sha256(os.path.join(path, name)) for name in sorted(os.listdir(path)) if name != COMPLETE}
    marker = os.path.join(path, COMPLETE)
    with open(marker + ".tmp", "w") as f:
        json.dump({"sha256": sums}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)
    for old in complete_checkpoints(os.path.dirname(path))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def damage(path: str) -> str | None:
    """What is wrong with a complete checkpoint's files (a file missing, or its checksum not the one COMPLETE
    recorded), or None when they are intact. An empty marker (written before checksums were recorded) is taken as
    is."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            text = f.read()
    except OSError as e:
        return f"{COMPLETE} unreadable ({e.strerror})"
    if not text.strip():
        return None
    try:
        sums = json.loads(text)["sha256"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE} is damaged"
    for name, expected in sums.items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            return f"{name} is missing"
        if _sha256(file) != expected:
            return f"{name} does not match its checksum"
    return None


def complete_checkpoints(run_dir: str) -> list[str]:
    """Resumable checkpoints of a run, oldest first."""
    found = sorted(glob.glob(os.path.join(run_dir, "ckpt_*")))
    return [p for p in found if os.path.exists(os.path.join(p, COMPLETE))]


def resolve(resume: str, run_dir: str, log=print) -> str:
    """`--resume auto`: the newest complete checkpoint of this run whose files match their checksums (a damaged
    one is reported through `log` and skipped); otherwise the given directory, which must be complete and intact."""
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"--resume auto: no complete checkpoint in {run_dir}")
        for path in reversed(found):
            problem = damage(path)
            if problem is None:
                return path
            log(f"warning: {path} is damaged ({problem}); falling back to the checkpoint before it")
        raise CheckpointError(f"--resume auto: every complete checkpoint in {run_dir} is damaged")
    if not os.path.exists(os.path.join(resume, COMPLETE)):
        raise CheckpointError(f"{resume}: not a complete checkpoint (no {COMPLETE} marker: missing or cut short)")
    problem = damage(resume)
    if problem:
        raise CheckpointError(f"{resume}: damaged ({problem}); resume from an intact checkpoint (--resume auto "
                              "finds the newest)")
    return resume


def safe_load(path: str, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint file, loaded with torch.load(weights_only=True) onto the CPU: tensors, numbers, strings,
    lists, tuples and dicts only, so that loading never runs code from the file (a pickle can). A file that needs
    more, is not a torch file, or is not a dict with the `required` keys is refused with one line; nothing of it
    runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    """(shared state, this rank's state), after checking that this run can continue from them. On the number of
    ranks that wrote it, this rank's file. On another number, every old rank's Muon shard merged (the caller
    keeps its new share) and no RNG states: per-rank noise streams cannot be split differently, so the run
    continues with fresh ones."""
    shared = safe_load(os.path.join(path, "shared.pt"), required=SHARED_KEYS)
    written = dataclasses.asdict(ModelConfig(**shared["config"]["model"]))  # fields added since: their defaults
    if written != config["model"]:
        diff = {k: (v, config["model"].get(k)) for k, v in written.items() if config["model"].get(k) != v}
        raise CheckpointError(f"{path}: the model differs from this run's (checkpoint vs now: {diff})")
    if shared["world_size"] == world:
        return shared, safe_load(os.path.join(path, f"rank{rank}.pt"), required=RANK_KEYS)
    if shared.get("sharded"):  # Muon's state is in the sharded files
        return shared, {"muon": None, "noise_rng": None, "cpu_rng": None, "cuda_rng": None}
    shards = [safe_load(os.path.join(path, f"rank{r}.pt"), required=RANK_KEYS)["muon"]
              for r in range(shared["world_size"])]
    merged = {"state": {k: v for shard in shards for k, v in shard["state"].items()},
              "param_groups": shards[0]["param_groups"]}
    return shared, {"muon": merged, "noise_rng": None, "cpu_rng": None, "cuda_rng": None}


def save(run_dir: str, state: TrainState, rank: int, world: int, keep: int, config: dict,
         all_ok=lambda ok: ok) -> str:
    """Write ckpt_NNNNNN/ for `state.step`: this rank's file, rank 0's shared file, then (once `all_ok(ok)`, which
    every rank reaches when its files are written, says every rank succeeded) the COMPLETE marker. Returns the
    directory. A write error on any rank (a full disk, EIO, permissions) removes the partial checkpoint, so the
    previous complete one stays the newest, and raises CheckpointError on every rank."""
    step = state.step
    path = checkpoint_dir(run_dir, step)
    error = None
    sharded = fsdp.is_sharded(state.model)
    try:
        os.makedirs(path, exist_ok=True)
        if sharded:  # every rank writes its shards (a collective)
            fsdp.save_state(path, state.model, (state.adam, state.muon))
        atomic_save({"muon": None if sharded else state.muon.state_dict(), **state.rng_states()},
                    os.path.join(path, f"rank{rank}.pt"))
        if rank == 0:
            atomic_save({"model": None if sharded else state.model.state_dict(),
                         "adam": None if sharded else state.adam.state_dict(), "sharded": sharded, "step": step,
                         "config": config, "data": state.loader.state(), "world_size": world,
                         "ema": state.ema.state_dict() if state.ema is not None else None},
                        os.path.join(path, "shared.pt"))
    except OSError as e:
        error = e
    ok = all_ok(error is None)
    if ok:
        if rank == 0:
            try:
                mark_complete(path, keep)
            except OSError as e:
                error = e
        ok = all_ok(error is None)  # every rank learns whether the marker was written
    if not ok:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        previous = complete_checkpoints(run_dir)
        cause = f"{error.strerror or error} ({error.filename})" if error else "another rank could not write its part"
        raise CheckpointError(f"could not write checkpoint {path}: {cause}; removed it. The newest complete "
                              f"checkpoint is {previous[-1] if previous else 'none'}")
    return path


def restore(path: str, state: TrainState, rank: int, world: int, config: dict) -> int:
    """Put a complete checkpoint back into `state`: the model, both optimizers, the loader's position, the step,
    and this rank's noise and RNG streams. Returns the number of ranks that wrote it: on another number than
    `world`, Muon's state is re-sharded and the noise streams start fresh (one per rank and step,
    bdiff.models.objective.noise_seed), so the run no longer continues bit for bit."""
    shared, mine = load(path, rank, world, config)
    if shared.get("sharded"):  # torch.distributed.checkpoint re-shards for this run: FSDP, or whole
        fsdp.load_state(path, state.model, (state.adam, state.muon))
    elif fsdp.is_sharded(state.model):
        raise CheckpointError(f"{path}: written without --fsdp; resume it without --fsdp (the model and its "
                              "optimizers whole on every rank)")
    else:
        state.model.load_state_dict(shared["model"])
        state.adam.load_state_dict(shared["adam"])
        state.muon.load_state_dict(mine["muon"])
    state.loader.load_state(shared["data"])
    state.step = shared["step"]
    if state.ema is not None:  # a checkpoint written without an average starts one from its weights
        state.ema.load_state_dict(shared.get("ema") or {k: v.float() for k, v in state.model.named_parameters()})
    if shared["world_size"] != world or shared.get("sharded"):
        if not fsdp.is_sharded(state.model):  # DDP: each rank keeps the momentum of the matrices it owns
            state.muon.keep_own_state(rank, world)
    if shared["world_size"] != world:
        state.noise.manual_seed(noise_seed(config["train"]["seed"], rank, step=state.step))
        return shared["world_size"]
    state.noise.set_state(mine["noise_rng"])
    torch.set_rng_state(mine["cpu_rng"])
    if mine["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    return world


def save_model(path: str, model, config: dict, step: int, val_loss: float) -> None:
    """final.pt: the model and its config, what sampling needs."""
    atomic_save({"model": model.state_dict(), "config": config, "step": step, "val_loss": val_loss}, path)


def read_final(path: str) -> tuple[dict, dict]:
    """The weights (a state dict, on the CPU) and the config dict of a final.pt (or any file with "model" and
    "config"): what bdiff.models.from_pretrained, the loader of every command, builds the model from."""
    ckpt = safe_load(path, required=("model", "config"))
    if not isinstance(ckpt["config"], dict) or "model" not in ckpt["config"]:
        raise CheckpointError(f"{path}: not a bdiff checkpoint (no model config)")
    return ckpt["model"], ckpt["config"]
