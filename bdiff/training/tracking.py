"""Experiment tracking: the trainer's log records, mirrored to Weights & Biases and TensorBoard.

    python train.py --wandb PROJECT             # pip install -e ".[wandb]"; WANDB_MODE=offline works without login
    python train.py --tensorboard runs          # pip install -e ".[tensorboard]"; tensorboard --logdir runs

The run's JSONL log stays the source of truth: every record written to it (a training step, a validation) is
sent to each tracker as the same scalars, keyed by the optimizer step, from rank 0 only. A tracker that fails
during the run is dropped with a warning and the run goes on; asking for one whose package is missing, or that
cannot start, fails before training. A resumed run continues the same W&B run (its id is kept in the run
directory) and the same TensorBoard steps (the steps after the checkpoint are purged from the old event file).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import uuid

from bdiff.errors import BdiffError

WANDB_ID = "wandb_id"  # file in the run directory holding the run's W&B id, read on --resume


class TrackingError(BdiffError):
    """A tracker was asked for and cannot run: its package is missing or it could not start."""


def scalars(entry: dict) -> dict[str, float]:
    """The tracked scalars of one JSONL record: a training step's or a validation's ({} for other records)."""
    if "val_loss" in entry:
        return {"val/loss": entry["val_loss"], "val/train_time_s": entry["train_time_s"]}
    if "train_loss" in entry:
        return {"train/loss": entry["train_loss"], "train/grad_norm": entry["grad_norm"],
                "train/lr_mult": entry["lr_mult"], "train/step_ms": entry["step_ms"],
                "train/tokens_per_s": entry["tokens_per_s"], "train/tokens": entry["tokens"]}
    return {}


def last_step_record(log_path: str, step: int) -> dict:
    """The JSONL log's last training record of `step` ({} if it has none)."""
    found = {}
    if os.path.isfile(log_path):
        with open(log_path) as f:
            for line in f:
                entry = json.loads(line)
                found = entry if entry.get("step") == step and "train_loss" in entry else found
    return found


def require(wandb_project: str | None, tensorboard_dir: str | None) -> None:
    """Fail in one line, before anything else runs, when a tracker is asked for and its package is missing."""
    for flag, given, module, extra in (("--wandb", wandb_project, "wandb", "wandb"),
                                       ("--tensorboard", tensorboard_dir, "tensorboard", "tensorboard")):
        if given is not None and importlib.util.find_spec(module) is None:
            raise TrackingError(f"{flag} needs the {module} package: pip install -e \".[{extra}]\"")


class Trackers:
    """The trackers a run asked for; `log(entry)` sends a JSONL record's scalars to each, `close()` ends them."""

    def __init__(self, wandb_project: str | None, tensorboard_dir: str | None, run_dir: str, config: dict,
                 resumed_at: int | None, log_path: str, log=print):
        require(wandb_project, tensorboard_dir)
        self.log_line, self.wandb, self.writer = log, None, None
        name = os.path.basename(run_dir)
        if wandb_project is not None:
            self.wandb = self._start_wandb(wandb_project, name, run_dir, config, resumed_at)
            # Steps an earlier attempt of a resumed run already sent: W&B refuses steps below its current one.
            self.wandb_from = self.wandb.step
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run's events replace the old ones from the checkpoint's step on (its own records
            # start there: the validation at that step, then the next step's).
            self.writer = SummaryWriter(os.path.join(tensorboard_dir, name), purge_step=resumed_at, flush_secs=10)
        log("tracking: " + "; ".join(
            ([f"W&B project {wandb_project}, run {self.wandb.id} ({self.wandb.settings.mode})"] if self.wandb else [])
            + ([f"TensorBoard {self.writer.log_dir}"] if self.writer else [])))
        atexit.register(self.close)  # a run that stops on an exception still flushes what it logged
        if resumed_at:  # the step that ended at the checkpoint was logged before; the purge took it: send it again
            self.log(last_step_record(log_path, resumed_at))

    @staticmethod
    def _start_wandb(project: str, name: str, run_dir: str, config: dict, resumed_at: int | None):
        import wandb

        id_path = os.path.join(run_dir, WANDB_ID)
        run_id = None
        if resumed_at is not None and os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        run_id = run_id or uuid.uuid4().hex[:12]
        try:
            run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config,
                             dir=os.environ.get("WANDB_DIR") or run_dir,  # W&B's own variable first, as it documents
                             notes=f"commit {(config.get('code') or {}).get('commit', 'unknown')}")
        except Exception as e:  # noqa: BLE001 (no login, no network: nothing has trained yet, so say so and stop)
            raise TrackingError(f"--wandb {project}: W&B could not start ({str(e).splitlines()[0]}); run "
                                f"`wandb login`, or set WANDB_MODE=offline to log locally") from None
        with open(id_path, "w") as f:
            f.write(run_id)
        return run

    def log(self, entry: dict) -> None:
        values, step = scalars(entry), entry.get("step")
        if not values:
            return
        if self.wandb is not None and step >= self.wandb_from:
            try:
                self.wandb.log(values, step=step)
            except Exception as e:  # noqa: BLE001 (network, quota, a dead service: the run matters more)
                self.wandb = self._dropped("W&B", e)
        if self.writer is not None:
            try:
                for key, value in values.items():
                    self.writer.add_scalar(key, value, step)
            except Exception as e:  # noqa: BLE001 (a full disk, a gone directory: the run matters more)
                self.writer = self._dropped("TensorBoard", e)

    def _dropped(self, what: str, error: Exception) -> None:
        """Warn that `what` failed; returns the tracker's new value, None (off)."""
        detail = str(error).splitlines()[0] if str(error) else ""
        self.log_line(f"warning: {what} logging failed ({type(error).__name__}: {detail}); it is off for the rest of "
                  f"the run, which goes on (the JSONL log has every record)")

    def close(self) -> None:
        """Flush and end each tracker (idempotent; a failure here is a warning too)."""
        for what, attr, end in (("TensorBoard", "writer", "close"), ("W&B", "wandb", "finish")):
            tracker = getattr(self, attr)
            setattr(self, attr, None)
            if tracker is not None:
                try:
                    getattr(tracker, end)()
                except Exception as e:  # noqa: BLE001 (the last upload failing loses no training)
                    self._dropped(what, e)
