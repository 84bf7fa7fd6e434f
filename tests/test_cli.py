"""Every command a user types fails in one line: exit code 2 and a single stderr line that names the input, what
was wrong and what to do (train.py, sample.py, python -m bdiff.data, bdiff.plot, bdiff.eval and bdiff.hub)."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# (name, command, words the one stderr line must hold). {tmp} is a fresh directory; {ckpt} a real final.pt,
# {foreign} a file that is no checkpoint, {log} a file that is no JSONL log.
CASES = [
    ("train: unknown preset", [PY, "train.py", "--preset", "nope"], ["unknown preset 'nope'"]),
    ("train: not a number", [PY, "train.py", "--steps", "ten"], ["--steps", "invalid int value", "--help"]),
    ("train: out of range", [PY, "train.py", "--preset", "tiny", "--steps", "0"], ["steps must be >= 1"]),
    ("train: unknown flag", [PY, "train.py", "--stpes", "3"], ["unrecognized arguments: --stpes"]),
    ("train: missing data", [PY, "train.py", "--preset", "tiny", "--data", "finewebedu", "--data_dir", "{tmp}/none",
                             "--vocab_size", "50258", "--bos_id", "50256", "--mask_id", "50257"],
     ["no finewebedu train shards", "{tmp}/none"]),
    ("train: impossible device", [PY, "train.py", "--preset", "tiny", "--device", "cuda:7"], ["--device cuda:7"]),
    ("train: bad dtype", [PY, "train.py", "--preset", "tiny", "--dtype", "float8"], ["--dtype", "invalid choice"]),
    ("train: data and model disagree", [PY, "train.py", "--preset", "tiny", "--bos_id", "0"],
     ["BOS 256", "--preset demo or tiny"]),
    ("sample: missing checkpoint", [PY, "sample.py", "--ckpt", "{tmp}/none.pt", "--prompt", "a"],
     ["none.pt", "no such checkpoint"]),
    ("sample: foreign file", [PY, "sample.py", "--ckpt", "{foreign}", "--prompt", "a"], ["not a bdiff checkpoint"]),
    ("sample: impossible device", [PY, "sample.py", "--ckpt", "{ckpt}", "--prompt", "a", "--device", "cuda:7"],
     ["--device cuda:7"]),
    ("sample: not a device", [PY, "sample.py", "--ckpt", "{ckpt}", "--prompt", "a", "--device", "gpu"],
     ["--device 'gpu'", "not a device name"]),
    ("sample: bad number", [PY, "sample.py", "--ckpt", "{ckpt}", "--prompt", "a", "--temperature", "hot"],
     ["--temperature", "invalid float value"]),
    ("sample: no prompt", [PY, "sample.py", "--ckpt", "{ckpt}"], ["--prompt", "required"]),
    ("data: no network", [PY, "-m", "bdiff.data", "finewebedu", "1", "--dir", "{tmp}/fw"],
     ["could not download", "no network", "{tmp}/fw", "reused", "HF_ENDPOINT", "HF_HUB_OFFLINE"]),
    ("data: bad count", [PY, "-m", "bdiff.data", "finewebedu", "0"], ["num_train_shards", "[1, 99]"]),
    ("data: unknown corpus", [PY, "-m", "bdiff.data", "wikipedia"], ["invalid choice: 'wikipedia'"]),
    ("plot: missing log", [PY, "-m", "bdiff.plot", "{tmp}/none.jsonl"], ["none.jsonl"]),
    ("plot: foreign file", [PY, "-m", "bdiff.plot", "{log}"], ["error:"]),
    ("plot: one of several logs missing", [PY, "-m", "bdiff.plot", "{log}", "{tmp}/none.jsonl"], ["error:"]),
    ("sample: Hub id not cached, offline", [PY, "sample.py", "--ckpt", "someone/absent", "--prompt", "a"],
     ["someone/absent", "not in the local Hugging Face cache"]),
    ("eval: missing model", [PY, "-m", "bdiff.eval", "--model", "{tmp}/none.pt"], ["none.pt", "no such checkpoint"]),
    ("eval: no draws", [PY, "-m", "bdiff.eval", "--model", "{ckpt}", "--draws", "0"], ["--draws must be >= 1"]),
    ("eval: impossible device", [PY, "-m", "bdiff.eval", "--model", "{ckpt}", "--device", "cuda:7"],
     ["--device cuda:7"]),
    ("eval: bad levels", [PY, "-m", "bdiff.eval", "--model", "{ckpt}", "--levels", "0.5,2"],
     ["--levels", "must lie in (0, 1]"]),
    ("eval: bad strategies", [PY, "-m", "bdiff.eval", "--model", "{ckpt}", "--strategies", "greedy"],
     ["--strategies", "random[:STEPS]", "'greedy'"]),
    ("eval: a judge that is not autoregressive", [PY, "-m", "bdiff.eval", "--model", "{ckpt}", "--judge", "{ckpt}"],
     ["block size is 16", "--block_size 1"]),
    ("hub: push a missing run", [PY, "-m", "bdiff.hub", "push", "{tmp}/none", "someone/x"], ["not a model directory"]),
    ("hub: unknown command", [PY, "-m", "bdiff.hub", "pull", "x"], ["invalid choice: 'pull'"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    from bdiff.config import tiny
    from bdiff.models.nano import BlockDiffusionLM

    cfg = tiny()
    torch.save({"model": BlockDiffusionLM(cfg.model).state_dict(), "config": cfg.to_dict()}, tmp / "final.pt")
    (tmp / "foreign.pt").write_bytes(b"not a checkpoint")
    (tmp / "log.jsonl").write_text("this is not json\n")
    return dict(tmp=str(tmp), ckpt=str(tmp / "final.pt"), foreign=str(tmp / "foreign.pt"), log=str(tmp / "log.jsonl"))


@pytest.fixture(scope="module")
def results(files):
    """Every case's command run once, as many at a time as there are cores: each is a fresh Python that imports torch
    (~1.5 s) and stops at once, so together they take half the time one after another would."""
    env = user_env()
    env["HF_HUB_OFFLINE"] = "1"  # no network here anyway; offline mode fails at once instead of after timeouts

    def run(command):
        return subprocess.run([part.format(**files) for part in command], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip([name for name, _, _ in CASES], pool.map(run, [command for _, command, _ in CASES])))


@pytest.mark.parametrize("name,command,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(files, results, name, command, words):
    if "cuda:7" in command and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    result = results[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"{name}: exit code {result.returncode}; stderr: {result.stderr[-800:]}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{name}: stderr is not one error line: {lines}"
    missing = [w.format(**files) for w in words if w.format(**files) not in lines[0]]
    assert not missing, f"{name}: {missing} not in {lines[0]!r}"
