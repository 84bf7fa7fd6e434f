"""Muon (bdiff/training/muon.py): sharded over ranks, identical everywhere and equal to one process; bad parameters."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bdiff.training.muon import Muon
from helpers import free_port

# ---- Muon: sharded over ranks, identical everywhere, equal to one process --------------------------

def muon_run(rank, world, port, out):
    """Six Muon steps on fixed per-step gradients of a few matrices; saves the final parameters."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 24), (16, 24), (24, 16), (16, 24), (8, 8)]  # 3 of one shape: uneven shares over 2 ranks
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    opt = Muon(params, lr=0.02, momentum=0.9, weight_decay=0.1, schedule="polar_express")
    for _ in range(6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    torch.save([p.detach() for p in params], os.path.join(out, f"{world}_{rank}.pt"))
    if world > 1:  # leave together: gloo aborts a rank whose peer tears down while its last send is in flight
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.usefixtures("reference_ops")  # the reference path, here and in the spawned ranks: the point is sharding
def test_muon_two_ranks_match_one_process(tmp_path):
    mp.spawn(muon_run, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    muon_run(0, 1, 0, str(tmp_path))
    r0, r1, single = (torch.load(tmp_path / f"{name}.pt") for name in ("2_0", "2_1", "1_0"))
    for a, b, c in zip(r0, r1, single):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg="ranks must hold identical parameters")
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0, msg="2 ranks must equal one process")


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="schedule"):
        Muon([torch.nn.Parameter(torch.ones(3, 3))], schedule="cubic")


def test_step_takes_a_closure_and_treats_missing_gradients_as_zero(gen):
    params = [torch.nn.Parameter(torch.randn(8, 12, generator=gen)) for _ in range(3)]
    opt = Muon(params, lr=0.1, momentum=0.5)
    params[0].grad = torch.randn(8, 12, generator=gen)  # the others have none: zeros, not skipped
    before = [p.detach().clone() for p in params]
    assert opt.step(closure=lambda: torch.tensor(1.5)) == 1.5, "step returns the closure's loss"
    assert not torch.equal(params[0], before[0]), "the matrix with a gradient moves"
    for p, b in zip(params[1:], before[1:]):
        torch.testing.assert_close(p.detach(), b, atol=0, rtol=0, msg="a zero gradient gives a zero update")
    assert all("momentum_buffer" in opt.state[p] for p in params), "every matrix takes part in the step"
