"""Runs that survive (bdiff/checkpoint.py, train.py): SIGKILL and resume gives the same losses bit for bit
(one process and 2 gloo ranks), partial checkpoints are never resumed, a NaN stops the run with the last
good checkpoint intact, no token range is consumed twice, and mismatched resumes are refused."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from bdiff import checkpoint
from bdiff.model import BlockDiffusionLM
from bdiff.plot import main as plot_main
from bdiff.plot import read_log, read_run

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(ranks, stdlib_dir, out, run, *extra):
    args = ["train.py", "--preset", "tiny", "--steps", "60", "--ckpt_every", "5", "--data_dir", stdlib_dir,
            "--out_dir", out, "--run_name", run, *extra]
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]


def env():
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}


def run_to_end(cmd):
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def run_and_kill(cmd, at_step):
    """Start a run and SIGKILL it (its whole process group) once it has logged `at_step`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith(f"step {at_step}/"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the run ended before it could be killed"


def losses(out, run):
    train_losses, val = read_log(os.path.join(out, f"{run}.jsonl"))
    return {s: loss for s, (_, loss) in train_losses.items()}, {s: loss for s, (_, loss) in val.items()}


@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_and_resume_is_exact(stdlib_dir, tmp_path, ranks):
    out = str(tmp_path)
    run_to_end(command(ranks, stdlib_dir, out, "straight"))
    run_and_kill(command(ranks, stdlib_dir, out, "killed"), at_step=23)
    before, _ = losses(out, "killed")
    assert 15 < len(before) < 60, "killed mid-run, after a few checkpoints"
    run_to_end(command(ranks, stdlib_dir, out, "killed", "--resume", "auto"))
    want, want_val = losses(out, "straight")
    got, got_val = losses(out, "killed")
    assert sorted(got) == list(range(1, 61))
    assert got == want, "every step after the resume must give the uninterrupted run's loss, bit for bit"
    assert got_val == want_val
    assert len(checkpoint.complete_checkpoints(os.path.join(out, "killed"))) == 3, "keeps the last ckpt_keep=3"


def test_partial_checkpoint_is_never_resumed(tmp_path):
    run_dir = str(tmp_path)
    for step in (5, 10, 15):
        os.makedirs(checkpoint.checkpoint_dir(run_dir, step))
        if step < 15:
            checkpoint.mark_complete(checkpoint.checkpoint_dir(run_dir, step), keep=3)
    # step 15: files but no COMPLETE marker, as after a crash mid-write
    assert checkpoint.resolve("auto", run_dir) == checkpoint.checkpoint_dir(run_dir, 10)
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve(checkpoint.checkpoint_dir(run_dir, 15), run_dir)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(stdlib_dir, tmp_path, monkeypatch):
    forward = BlockDiffusionLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # the 15th micro-step (step 8 of 2 micro-steps) returns NaN
        calls["n"] += 1
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 15 else loss

    monkeypatch.setattr(BlockDiffusionLM, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 8") as error:
        train.main(["--preset", "tiny", "--steps", "20", "--ckpt_every", "3", "--data_dir", stdlib_dir,
                    "--out_dir", str(tmp_path), "--run_name", "nan"])
    run_dir = os.path.join(str(tmp_path), "nan")
    good = checkpoint.complete_checkpoints(run_dir)
    assert good[-1] == checkpoint.checkpoint_dir(run_dir, 6) and good[-1] in str(error.value)
    shared = torch.load(os.path.join(good[-1], "shared.pt"), weights_only=True)
    assert shared["step"] == 6 and all(torch.isfinite(v).all() for v in shared["model"].values())


def test_no_token_range_twice(stdlib_dir, tmp_path):
    """Across ranks (each range covers every rank's slice), resumes (replayed steps keep their last record)
    and gradient accumulation (several ranges a step)."""
    out = str(tmp_path)
    run_to_end(command(1, stdlib_dir, out, "accum", "--micro_steps", "4", "--steps", "12"))
    run_and_kill(command(1, stdlib_dir, out, "resumed", "--steps", "40"), at_step=12)
    run_to_end(command(1, stdlib_dir, out, "resumed", "--steps", "40", "--resume", "auto"))
    for run, per_step in (("accum", 4), ("resumed", 2)):
        steps = {}
        with open(os.path.join(out, f"{run}.jsonl")) as f:
            for entry in map(json.loads, f):
                if "data" in entry:
                    steps[entry["step"]] = entry["data"]
        ranges = [tuple(r) for s in sorted(steps) for r in steps[s]]
        assert all(len(steps[s]) == per_step for s in steps)
        assert len(set(ranges)) == len(ranges), f"{run}: a token range was consumed twice"
        for (shard_a, _, end_a), (shard_b, start_b, _) in zip(ranges, ranges[1:]):
            assert shard_b > shard_a or start_b >= end_a, f"{run}: ranges overlap or go backwards"


def test_mismatched_resume_is_refused(stdlib_dir, tmp_path):
    out = str(tmp_path)
    base = ["--preset", "tiny", "--steps", "4", "--data_dir", stdlib_dir, "--out_dir", out, "--run_name", "r"]
    train.main(base)
    path = checkpoint.resolve("auto", os.path.join(out, "r"))
    for extra, message in ((["--block_size", "8"], "the model differs"), (["--model_dim", "96", "--head_dim", "48"],
                                                                          "the model differs")):
        result = subprocess.run([sys.executable, "train.py", *base, "--resume", path, *extra], cwd=ROOT, env=env(),
                                capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    cfg = train.get_preset("tiny").to_dict()
    with pytest.raises(checkpoint.CheckpointError, match="written by 1 ranks, resumed with 2"):
        checkpoint.load(path, 0, 2, cfg)


def test_plot_one_run_and_a_comparison(stdlib_dir, tmp_path):
    out = str(tmp_path)
    for run, seed in (("p", "0"), ("q", "1")):
        train.main(["--preset", "tiny", "--steps", "6", "--val_every", "3", "--data_dir", stdlib_dir, "--out_dir", out,
                    "--run_name", run, "--seed", seed])
    assert plot_main([os.path.join(out, "p.jsonl")]) == 0
    assert plot_main([os.path.join(out, "p.jsonl"), os.path.join(out, "q.jsonl")]) == 0
    for png in ("p.png", "compare.png", os.path.join("p", "model", "loss.png")):
        png = os.path.join(out, png)
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000, png
    (p_val, q_val) = (read_run(os.path.join(out, f"{r}.jsonl"))["val"] for r in "pq")
    assert sorted(p_val) == sorted(q_val) == [3, 6] and p_val != q_val, "two seeds, the same validation steps"
    assert all(time is not None for _, _, time in p_val.values()), "validation entries carry the training time"


class Payload:
    """Unpickling this creates a file: what a hostile checkpoint could do if it were loaded as a pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hostile_checkpoint_is_refused_and_never_runs(stdlib_dir, tmp_path):
    """Every load uses weights_only=True: a file whose unpickling would run code is refused with one line by
    resume and by sample.py, and the code does not run."""
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "out" / "evil"
    ckpt = run_dir / "ckpt_000002"
    ckpt.mkdir(parents=True)
    for name in ("shared.pt", "rank0.pt"):
        torch.save({"model": Payload(str(marker)), "config": {"model": {}}}, ckpt / name)
    (ckpt / checkpoint.COMPLETE).write_text("")
    torch.save({"model": Payload(str(marker)), "config": {"model": {}}}, run_dir / "final.pt")
    commands = {
        "resume": [sys.executable, "train.py", "--preset", "tiny", "--data_dir", stdlib_dir, "--out_dir",
                   str(tmp_path / "out"), "--run_name", "evil", "--resume", "auto"],
        "sample": [sys.executable, "sample.py", "--ckpt", str(run_dir / "final.pt"), "--prompt", "def"],
    }
    for what, cmd in commands.items():
        result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, f"{what}: exit {result.returncode}, stderr {result.stderr}"
        assert "refused" in lines[0] and ("final.pt" in lines[0] or "shared.pt" in lines[0]), f"{what}: {lines[0]}"
        assert not marker.exists(), f"{what}: the checkpoint's code ran"


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a torch file"):
        checkpoint.safe_load(str(path))
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a bdiff checkpoint"):
        checkpoint.safe_load(str(path), required=checkpoint.SHARED_KEYS)
