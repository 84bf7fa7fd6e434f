"""Experiment tracking (bdiff/training/tracking.py) through train.py, offline: a W&B run directory and a TensorBoard
event file hold the JSONL's scalars, a resumed run continues both, a failing tracker costs a warning, a missing package
fails before training."""
import glob
import json
import os

import pytest

import train
from bdiff.training import tracking

pytestmark = pytest.mark.usefixtures("reference_ops")

wandb = pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


@pytest.fixture
def offline(monkeypatch):
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_CONSOLE", "off"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)


def run(stdlib_dir, out, *flags):
    return train.main(["--device", "cpu", "--preset", "tiny", "--steps", "6", "--val_every", "3", "--ckpt_every",
                       "3", "--data_dir", stdlib_dir, "--out_dir", out, "--run_name", "r", *flags])


def jsonl_scalars(out, attempts: int | None = None) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the run's JSONL log (its first `attempts` attempts; a header line starts each),
    through the mapping the trackers use; a later record of a step replaces an earlier one."""
    tags: dict[str, dict[int, float]] = {}
    with open(os.path.join(out, "r.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    headers = [i for i, entry in enumerate(entries) if "config" in entry] + [len(entries)]
    for entry in entries[:headers[attempts] if attempts else None]:
        for tag, value in tracking.scalars(entry).items():
            tags.setdefault(tag, {})[entry["step"]] = value
    return tags


def wandb_history(path: str) -> tuple[str, list[dict]]:
    """(run id, history rows) of an offline W&B run file: a LevelDB-style log of protobuf records (32 KiB blocks,
    7-byte record headers: checksum, length, kind; kinds 1 whole, 2-4 first/middle/last piece) after a 7-byte
    file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, run_id, rows, pending = 7, None, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})  # "train/loss" is stored as a nested key
    return run_id, rows


def test_wandb_writes_where_wandb_dir_says(stdlib_dir, tmp_path, offline, monkeypatch):
    """WANDB_DIR, the variable W&B documents for where its files go, wins over the run directory."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    run(stdlib_dir, str(tmp_path / "out"), "--wandb", "bdiff-test")
    assert glob.glob(str(tmp_path / "elsewhere" / "wandb" / "offline-run-*" / "run-*.wandb")), "not under WANDB_DIR"
    assert not os.path.exists(tmp_path / "out" / "r" / "wandb"), "and nothing in the run directory"


def test_wandb_offline_holds_the_jsonl_scalars_and_a_resume_continues_the_run(stdlib_dir, tmp_path, offline):
    out = str(tmp_path)
    run(stdlib_dir, out, "--wandb", "bdiff-test")
    run(stdlib_dir, out, "--wandb", "bdiff-test", "--resume", os.path.join(out, "r", "ckpt_000003"))
    files = sorted(glob.glob(os.path.join(out, "r", "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2, f"one offline run directory per attempt, found {files}"
    (first_id, first), (second_id, second) = (wandb_history(f) for f in files)
    assert first_id == second_id, "the resumed attempt must continue the same W&B run"
    assert min(row["_step"] for row in second) == 3, "the resumed attempt logs from the checkpoint's step"
    for attempts, rows in ((1, first), (2, second)):
        expected = jsonl_scalars(out, attempts)  # the resumed attempt re-sends the last step before its checkpoint
        for row in rows:
            for tag, value in row.items():
                if not tag.startswith("_"):
                    assert value == pytest.approx(expected[tag][row["_step"]], rel=1e-6), f"{tag} at {row['_step']}"
    logged = {tag for row in first for tag in row if not tag.startswith("_")}
    assert logged == set(jsonl_scalars(out)), f"W&B got {sorted(logged)}, the JSONL holds {sorted(expected)}"


def test_tensorboard_holds_the_jsonl_scalars_and_a_resume_replaces_the_steps_after_its_checkpoint(
        stdlib_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = str(tmp_path), str(tmp_path / "tb")
    run(stdlib_dir, out, "--tensorboard", tb)
    run(stdlib_dir, out, "--tensorboard", tb, "--resume", os.path.join(out, "r", "ckpt_000003"))
    events = EventAccumulator(os.path.join(tb, "r"))
    events.Reload()
    expected = jsonl_scalars(out)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in logged] == sorted(values), f"{tag}: each step once (the resume purged the rest)"
        for step, value in logged:
            assert value == pytest.approx(values[step], rel=1e-6), f"{tag} at step {step}"


def test_a_failing_tracker_costs_a_warning_not_the_run(stdlib_dir, tmp_path, offline, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def down(*args, **kwargs):
        raise ConnectionError("service unavailable")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", down)
    monkeypatch.setattr(SummaryWriter, "add_scalar", down)
    out = str(tmp_path)
    run(stdlib_dir, out, "--wandb", "bdiff-test", "--tensorboard", str(tmp_path / "tb"))
    printed = capsys.readouterr().out
    for what in ("W&B", "TensorBoard"):
        assert printed.count(f"warning: {what} logging failed (ConnectionError: service unavailable)") == 1, printed
    assert max(jsonl_scalars(out)["train/loss"]) == 6, "the run finished, and its JSONL has every step"
    assert os.path.isfile(os.path.join(out, "r", "final.pt"))


@pytest.mark.parametrize("flag, module", [("--wandb", "wandb"), ("--tensorboard", "tensorboard")])
def test_a_tracker_without_its_package_fails_before_training(stdlib_dir, tmp_path, monkeypatch, flag, module):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == module else real(name))
    with pytest.raises(tracking.TrackingError, match=rf'^{flag} needs the {module} package: pip install -e '
                                                     rf'"\.\[{module}\]"$'):
        run(stdlib_dir, str(tmp_path), flag, "x")
    assert not os.listdir(tmp_path), "nothing was written"
