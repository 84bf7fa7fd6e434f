"""Runs that survive (bdiff/training/checkpoint.py, train.py): SIGKILL or SIGTERM and resume gives the same losses bit
for bit (one process and 2 gloo ranks), a write error keeps the previous checkpoint, a damaged one is detected by its
checksums and skipped by auto-resume, partial checkpoints are never resumed, a NaN stops the run with the last
good checkpoint intact, no token range is consumed twice, and mismatched resumes are refused."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import train
from bdiff.models.nano import BlockDiffusionLM
from bdiff.plot import read_log
from bdiff.training import checkpoint
from helpers import user_env

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(ranks, stdlib_dir, out, run, *extra):
    args = ["train.py", "--preset", "tiny", "--steps", "60", "--ckpt_every", "5", "--data_dir", stdlib_dir,
            "--out_dir", out, "--run_name", run, "--device", "cpu", *extra]  # gloo ranks, also on a GPU machine
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]


def run_to_end(cmd):
    result = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def run_and_kill(cmd, at_step):
    """Start a run and SIGKILL it (its whole process group) once it has logged `at_step`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith(f"step {at_step}/"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the run ended before it could be killed"


def run_and_signal(cmd, at_step, sig=signal.SIGTERM):
    """Start a run and send `sig` to its first process (python, or torchrun, which passes it on to every rank) once
    it has logged `at_step`, as SLURM or Kubernetes would before preempting; returns (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {at_step}/"):
            proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc.returncode, "".join(lines)


def losses(out, run):
    train_losses, val = read_log(os.path.join(out, f"{run}.jsonl"))
    return {s: loss for s, (_, loss) in train_losses.items()}, {s: loss for s, (_, loss) in val.items()}


def straight_run(stdlib_dir, out, ranks):
    """The uninterrupted run the resumed ones must equal: its (training, validation) losses."""
    run_to_end(command(ranks, stdlib_dir, out, "straight"))
    return losses(out, "straight")


@pytest.fixture(scope="module")
def straight_on_two_ranks(stdlib_dir, tmp_path_factory):
    """One uninterrupted 2-rank run for the kill and SIGTERM tests (checkpoints change no loss)."""
    return straight_run(stdlib_dir, str(tmp_path_factory.mktemp("straight")), 2)


def test_kill_and_resume_is_exact(stdlib_dir, tmp_path, straight_on_two_ranks):
    """Two ranks killed mid-run (kill -9 on torchrun's group) resume bit for bit from their last checkpoint. One
    process's resume is the SIGTERM test's below: the same checkpoint, reached another way."""
    out, ranks = str(tmp_path), 2
    run_and_kill(command(ranks, stdlib_dir, out, "killed"), at_step=23)
    before, _ = losses(out, "killed")
    assert 15 < len(before) < 60, "killed mid-run, after a few checkpoints"
    run_to_end(command(ranks, stdlib_dir, out, "killed", "--resume", "auto"))
    want, want_val = straight_on_two_ranks
    got, got_val = losses(out, "killed")
    assert sorted(got) == list(range(1, 61))
    assert got == want, "every step after the resume must give the uninterrupted run's loss, bit for bit"
    assert got_val == want_val
    assert len(checkpoint.complete_checkpoints(os.path.join(out, "killed"))) == 3, "keeps the last ckpt_keep=3"


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_checkpoints_and_resume_is_exact(stdlib_dir, tmp_path, ranks, request):
    """SIGTERM at a random step: the run finishes that step, checkpoints, says how to resume and exits with its
    own code (75; torchrun reports its workers' failure its own way); the resumed run equals the uninterrupted one
    bit for bit."""
    out = str(tmp_path)
    straight = (request.getfixturevalue("straight_on_two_ranks") if ranks == 2 else
                straight_run(stdlib_dir, out, ranks))
    at = random.randint(8, 50)
    code, output = run_and_signal(command(ranks, stdlib_dir, out, "stopped", "--ckpt_every", "0"), at)
    stop = [line for line in output.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert len(stop) == 1 and "--run_name stopped --resume auto" in stop[0], output[-3000:]
    if ranks == 1:
        assert code == train.PREEMPTED, f"exit code {code}, expected {train.PREEMPTED}"
    else:  # torchrun ends with an error of its own when a worker exits non-zero
        assert code != 0, "a preempted run must not look like a finished one"
    stopped_at = int(stop[0].split("after step ")[1].split("/")[0])
    assert at <= stopped_at <= at + 2, f"signalled after step {at}, stopped after {stopped_at}"
    assert checkpoint.complete_checkpoints(os.path.join(out, "stopped"))[-1].endswith(f"ckpt_{stopped_at:06d}")
    run_to_end(command(ranks, stdlib_dir, out, "stopped", "--ckpt_every", "0", "--resume", "auto"))
    assert losses(out, "stopped") == straight, "the resumed run must equal the uninterrupted one"


def test_a_write_error_keeps_the_previous_checkpoint(stdlib_dir, tmp_path, monkeypatch):
    save = checkpoint.atomic_save

    def full_disk(obj, path):  # the second checkpoint's shared file: the disk is full
        if "ckpt_000010" in path and path.endswith("shared.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", full_disk)
    argv = ["--device", "cpu", "--preset", "tiny", "--steps", "20", "--ckpt_every", "5", "--data_dir", stdlib_dir,
            "--out_dir",
            str(tmp_path), "--run_name", "disk"]
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device") as error:
        train.main(argv)
    run_dir = os.path.join(str(tmp_path), "disk")
    assert "ckpt_000005" in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not os.path.exists(checkpoint.checkpoint_dir(run_dir, 10)), "the partial checkpoint must be removed"
    assert checkpoint.resolve("auto", run_dir) == checkpoint.checkpoint_dir(run_dir, 5)
    monkeypatch.setattr(checkpoint, "atomic_save", save)  # space again: the run continues from step 5
    train.main(argv + ["--resume", "auto"])
    assert checkpoint.complete_checkpoints(run_dir)[-1] == checkpoint.checkpoint_dir(run_dir, 20)


def test_a_damaged_checkpoint_is_reported_and_auto_resume_falls_back(stdlib_dir, tmp_path, capsys):
    argv = ["--device", "cpu", "--preset", "tiny", "--steps", "12", "--ckpt_every", "5", "--data_dir", stdlib_dir,
            "--out_dir",
            str(tmp_path), "--run_name", "flip"]
    train.main(argv)
    run_dir = os.path.join(str(tmp_path), "flip")
    newest = checkpoint.checkpoint_dir(run_dir, 12)
    target = os.path.join(newest, "shared.pt")
    data = bytearray(open(target, "rb").read())
    data[random.randrange(len(data))] ^= 0x01  # one flipped bit
    open(target, "wb").write(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="damaged .shared.pt does not match its checksum"):
        checkpoint.resolve(newest, run_dir)
    capsys.readouterr()
    train.main(argv + ["--resume", "auto"])
    out = capsys.readouterr().out
    assert f"{newest} is damaged (shared.pt does not match its checksum); falling back" in out, out[:2000]
    assert f"resumed from {checkpoint.checkpoint_dir(run_dir, 10)} at step 10" in out
    assert checkpoint.damage(newest) is None, "the resumed run rewrote the newest checkpoint, intact"


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_ends_the_job_in_bounded_time(stdlib_dir, tmp_path, fault):
    """One of two ranks killed: the other's collective fails as the connection drops and torchrun stops the job
    within seconds, naming the dead rank; --resume auto continues from the last complete checkpoint. One rank
    stopped (hung): the other's collective times out after --collective_timeout_s (10 s here), it says so in one
    line and exits, and torchrun begins to close the hung worker (SIGTERM, then SIGKILL after its own 30 s grace,
    which is torch's and not waited for here: the test kills the job once torchrun has said so)."""
    out = str(tmp_path)
    proc = subprocess.Popen(command(2, stdlib_dir, out, "dead", "--collective_timeout_s", "10"), cwd=ROOT,
                            env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed_at, lines, closing, faulted = None, [], None, None
    watchdog = threading.Timer(120, os.killpg, (proc.pid, signal.SIGKILL))  # a job that hangs fails, not the suite
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if killed_at is None and line.startswith("step 12/"):
                workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
                assert len(workers) == 2, f"torchrun's workers: {workers}"
                faulted = int(workers[1])
                os.kill(faulted, getattr(signal, fault))
                killed_at = time.monotonic()
                closing = f"Sending process {workers[1]} closing signal SIGTERM"
            elif fault == "SIGSTOP" and closing is not None and closing in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        watchdog.cancel()
        if faulted is not None:  # torchrun's workers are outside its process group: a stopped one would stay, stopped
            try:
                os.kill(faulted, signal.SIGKILL)
            except ProcessLookupError:
                pass
    waited = time.monotonic() - killed_at
    output = "".join(lines)
    bound = 20 if fault == "SIGKILL" else 10 + 20
    assert proc.returncode != 0 and waited < bound, f"exit {proc.returncode} {waited:.0f} s after the {fault}"
    if fault == "SIGSTOP":
        assert "error: rank 0: a collective with the other ranks failed" in output, output[-3000:]
        assert closing in output, f"torchrun did not begin to close the hung worker: {output[-3000:]}"
        return
    assert "Signal 9 (SIGKILL) received" in output, output[-2000:]
    run_to_end(command(2, stdlib_dir, out, "dead", "--resume", "auto"))
    assert sorted(losses(out, "dead")[0]) == list(range(1, 61))


def tag_for_cuda(path: str, device: str) -> None:
    """Rewrite a checkpoint file as if a GPU had saved it: every storage tagged `device` (what torch.save records
    for a CUDA tensor). Loading it without mapping to the CPU fails on a machine without that device."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    tagger = (0, lambda storage: device, lambda storage, location: None)
    torch.serialization._package_registry.insert(0, tagger)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization._package_registry.remove(tagger)


def test_resume_on_another_number_of_ranks_uses_every_token_once(stdlib_dir, tmp_path):
    """2 ranks, stopped by SIGTERM; 1 rank, stopped again; 2 ranks to the end. Muon's state is re-sharded, the
    data continue at the next unread token, and a line says the run is no longer bit-identical. The 2-rank
    checkpoint's files are tagged as a GPU job's ranks 4 and 5 would write them (cuda:4, cuda:5; shared.pt
    cuda:0): the resume on fewer ranks maps them to the CPU first, on a machine with no such device."""
    out = str(tmp_path)
    run_dir = os.path.join(out, "w")
    code, _ = run_and_signal(command(2, stdlib_dir, out, "w", "--ckpt_every", "0"), random.randint(8, 20))
    assert code != 0
    two = checkpoint.complete_checkpoints(run_dir)[-1]
    for name, device in (("shared.pt", "cuda:0"), ("rank0.pt", "cuda:4"), ("rank1.pt", "cuda:5")):
        tag_for_cuda(os.path.join(two, name), device)
    checkpoint.mark_complete(two, keep=100)  # the checksums of the rewritten files
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(os.path.join(two, "rank1.pt"), weights_only=True)  # the files do ask for a GPU
    shared, merged = checkpoint.load(two, 0, 1, train.get_preset("tiny").to_dict())
    hidden = BlockDiffusionLM(train.get_preset("tiny").model).optimizer_groups()["matrices"]
    assert len(merged["muon"]["state"]) == len(hidden), "the merged Muon state holds every matrix's momentum"
    code, output = run_and_signal(command(1, stdlib_dir, out, "w", "--ckpt_every", "0", "--resume", "auto"),
                                  random.randint(30, 40))
    assert code == train.PREEMPTED, output[-2000:]
    assert "on 1 rank(s), written by 2" in output and "no longer bit-identical" in output, output[:3000]
    run_to_end(command(2, stdlib_dir, out, "w", "--resume", "auto"))
    steps = {}
    with open(os.path.join(out, "w.jsonl")) as f:
        for entry in map(json.loads, f):
            if "data" in entry:
                steps[entry["step"]] = entry["data"]
    assert sorted(steps) == list(range(1, 61))
    ranges = [tuple(r) for s in sorted(steps) for r in steps[s]]
    assert len(set(ranges)) == len(ranges), "a token range was consumed twice"
    assert sum(end - start for _, _, start, end in ranges) == 60 * 2 * 128, "60 steps of 2 micro-steps of 128 tokens"
    assert {epoch for epoch, *_ in ranges} == {0}, "the run stays in the first epoch"
    for (_, shard_a, _, end_a), (_, shard_b, start_b, _) in zip(ranges, ranges[1:]):
        assert (shard_b == shard_a and start_b == end_a) or shard_b > shard_a, \
            f"tokens skipped or read twice between {end_a} and {start_b}"


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
        train.main(["--device", "cpu", "--preset", "tiny", "--steps", "20", "--ckpt_every", "3", "--data_dir",
                    stdlib_dir,
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
        for (_, shard_a, _, end_a), (_, shard_b, start_b, _) in zip(ranges, ranges[1:]):
            assert shard_b > shard_a or start_b >= end_a, f"{run}: ranges overlap or go backwards"


def test_mismatched_resume_is_refused(stdlib_dir, tmp_path):
    out = str(tmp_path)
    base = ["--preset", "tiny", "--steps", "4", "--data_dir", stdlib_dir, "--out_dir", out, "--run_name", "r"]
    train.main(base)
    path = checkpoint.resolve("auto", os.path.join(out, "r"))
    for extra, message in ((["--block_size", "8"], "the model differs"), (["--model_dim", "96", "--head_dim", "48"],
                                                                          "the model differs")):
        result = subprocess.run([sys.executable, "train.py", "--device", "cpu", *base, "--resume", path, *extra],
                                cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines


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
        "resume": [sys.executable, "train.py", "--device", "cpu", "--preset", "tiny", "--data_dir", stdlib_dir,
                   "--out_dir",
                   str(tmp_path / "out"), "--run_name", "evil", "--resume", "auto"],
        "sample": [sys.executable, "sample.py", "--device", "cpu", "--ckpt", str(run_dir / "final.pt"), "--prompt",
                   "def"],
    }
    for what, cmd in commands.items():
        result = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=300)
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
