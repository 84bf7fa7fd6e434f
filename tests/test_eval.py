"""Evaluation (bdiff/eval.py): draw 0 of `python -m bdiff.eval` is the run's own final validation loss (one
validation loop and one noise seed for both, bdiff.eval.validation_total and bdiff.noise.noise_seed)."""
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
