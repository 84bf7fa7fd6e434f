"""The weights' average (bdiff/training/ema.py, TrainConfig.ema): the update is the exponential moving average written
out, kept in float32 under a bf16 model; applying it swaps the weights in and back bit for bit; a run that keeps
one validates and saves the average, checkpoints it, and resumes it exactly."""
import os

import pytest
import torch

import train
from bdiff.config import tiny
from bdiff.models.nano import BlockDiffusionLM
from bdiff.training.checkpoint import checkpoint_dir, safe_load
from bdiff.training.ema import WeightAverage

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references


def test_average_is_the_moving_average_and_swaps_back(gen):
    model = BlockDiffusionLM(tiny().model).set_dtype(torch.bfloat16)  # a bf16 embedding, fp32 matrices
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    ema = WeightAverage(model, 0.9)
    want = dict(start)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
        ema.update(model)
        want = {n: 0.9 * want[n] + 0.1 * p.detach().float() for n, p in model.named_parameters()}
    for name, w in ema.state_dict().items():
        assert w.dtype == torch.float32, f"{name}: the average is kept in float32"
        torch.testing.assert_close(w, want[name], atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.state_dict()[name].to(p.dtype)), f"{name}: the model holds the average here"
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), f"{name}: the trained weights come back bit for bit"
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, 1.0)


def test_a_run_with_an_average_saves_it_and_resumes_it_exactly(stdlib_dir, tmp_path):
    """--ema: final.pt holds the average (the last checkpoint has both), and a run resumed from step 2 ends with
    the same average and weights as the run that went straight through."""
    argv = ["--device", "cpu", "--preset", "tiny", "--steps", "4", "--data_dir", stdlib_dir, "--out_dir",
            str(tmp_path), "--ema", "0.5", "--ckpt_every", "2", "--ckpt_keep", "3"]
    train.main(argv + ["--run_name", "straight"])
    final = BlockDiffusionLM.from_pretrained(str(tmp_path / "straight" / "final.pt")).state_dict()
    shared = safe_load(os.path.join(checkpoint_dir(str(tmp_path / "straight"), 4), "shared.pt"))
    for name, w in shared["ema"].items():
        assert torch.equal(final[name], w.to(final[name].dtype)), f"{name}: final.pt must hold the average"
    assert any(not torch.equal(shared["model"][n], final[n]) for n in final), "and not the trained weights"
    train.main(argv + ["--run_name", "resumed", "--resume", checkpoint_dir(str(tmp_path / "straight"), 2)])
    again = safe_load(os.path.join(checkpoint_dir(str(tmp_path / "resumed"), 4), "shared.pt"))
    for key in ("model", "ema"):
        for name, w in shared[key].items():
            assert torch.equal(again[key][name], w), f"{key} {name}: the resumed run must end where the other did"
