"""Evaluation (bdiff/eval.py): draw 0 of `python -m bdiff.eval` is the run's own final validation loss (one
validation loop and one noise seed for both, bdiff.eval.validation_total and bdiff.models.objective.noise_seed)."""
import json

import pytest

import train
from bdiff.eval import main as eval_main

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references


def test_draw_zero_is_the_runs_own_validation_loss(stdlib_dir, tmp_path, capsys):

    train.main(["--device", "cpu", "--preset", "tiny", "--steps", "3", "--data_dir", stdlib_dir, "--out_dir",
                str(tmp_path),
                "--run_name", "v"])
    with open(tmp_path / "v.jsonl") as f:
        final = [json.loads(line) for line in f][-1]["val_loss"]
    capsys.readouterr()
    assert eval_main(["--model", str(tmp_path / "v"), "--levels", "0.5"]) == 0
    assert f"t ~ U[0, 1]: {final:.4f} (one noise draw" in capsys.readouterr().out


def test_judge_prices_strategies(stdlib_dir, tmp_path, capsys):
    """--judge: a table with the documents' own continuations and one row per strategy, and the plot. One token
    per model call costs (block + 1) / block calls a token; threshold decoding costs no more than that."""
    for name, extra in (("m", []), ("j", ["--block_size", "1"])):
        train.main(["--device", "cpu", "--preset", "tiny", "--steps", "3", "--data_dir", stdlib_dir, "--out_dir",
                    str(tmp_path), "--run_name", name, "--val_every", "0", *extra])
    capsys.readouterr()
    plot = tmp_path / "strategies.png"
    assert eval_main(["--model", str(tmp_path / "m"), "--judge", str(tmp_path / "j"), "--levels", "0.5",
                      "--strategies", "random,threshold:0.5", "--samples", "3", "--prompt_tokens", "8",
                      "--new_tokens", "32", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"strategy", "validation text", "random", "threshold"}, out
    assert rows["random"][0] == "16 steps/block" and rows["threshold"][0] == "threshold 0.5"
    calls = {name: float(rows[name][1]) for name in ("random", "threshold")}
    assert calls["random"] >= 1.0 and calls["threshold"] <= calls["random"] + 1e-9, calls
    assert all(float(rows[name][3]) > 1 for name in rows if name != "strategy"), "a perplexity exceeds 1"
    assert plot.stat().st_size > 0
