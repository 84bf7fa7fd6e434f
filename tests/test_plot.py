"""Loss plots (bdiff/plot.py): one run, and several compared, from the JSONL logs train.py writes."""
import os

import pytest

import train
from bdiff.plot import main as plot_main
from bdiff.plot import read_run

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references


def test_plot_one_run_and_a_comparison(stdlib_dir, tmp_path):
    out = str(tmp_path)
    for run, seed in (("p", "0"), ("q", "1")):
        train.main(["--device", "cpu", "--preset", "tiny", "--steps", "6", "--val_every", "3", "--data_dir",
                    stdlib_dir, "--out_dir", out,
                    "--run_name", run, "--seed", seed])
    assert plot_main([os.path.join(out, "p.jsonl")]) == 0
    assert plot_main([os.path.join(out, "p.jsonl"), os.path.join(out, "q.jsonl")]) == 0
    for png in ("p.png", "compare.png", os.path.join("p", "model", "loss.png")):
        png = os.path.join(out, png)
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000, png
    (p_val, q_val) = (read_run(os.path.join(out, f"{r}.jsonl"))["val"] for r in "pq")
    assert sorted(p_val) == sorted(q_val) == [3, 6] and p_val != q_val, "two seeds, the same validation steps"
    assert all(time is not None for _, _, time in p_val.values()), "validation entries carry the training time"
