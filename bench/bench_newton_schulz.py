"""Newton–Schulz for Muon: work done (CPU) and speed (GPU).

    python bench/bench_newton_schulz.py          # CPU: FLOPs of our kernels vs the dense loop (counting mode)
    python bench/bench_newton_schulz.py --gpu    # GPU: ms per call vs torch.matmul (eager and compiled),
                                                 #      and the Muon step of the record model
    python -m pytest bench/bench_newton_schulz.py --benchmark-only   # the suite: vs torch matmuls on any device

FLOPs are counted from the tiles the kernels visit (COUNT=True, one iteration, through the interpreter).
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The record model's hidden matrices as Muon batches them (same shape -> one batched call): 12 layers of
# q, k, v, proj (768x768), MLP in (3072x768, tall) and out (768x3072, wide).
RECORD_SHAPES = [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)]


def flop_table(shapes=((768, 768), (768, 3072), (4096, 4096))):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import importlib

    nsk = importlib.import_module("bdiff.kernels.newton_schulz")
    print("one Newton–Schulz iteration; FLOPs from the tiles the kernels visit (128x128 tiles)")
    print(f"{'shape':>12} {'sym tiles':>9} {'sym / dense':>11} {'update / dense':>14} {'all / dense':>11}")
    for m, n in shapes:
        w = nsk.count_work(torch.randn(m, n), steps=1)
        total = (w["sym_flops"] + w["update_flops"]) / (w["dense_sym_flops"] + w["dense_update_flops"])
        print(f"{f'{m}x{n}':>12} {w['sym_tiles']:9} {w['sym_flops'] / w['dense_sym_flops']:11.3f} "
              f"{w['update_flops'] / w['dense_update_flops']:14.3f} {total:11.3f}")


def gpu_bench():
    import triton.testing

    from bdiff.config import record
    from bdiff.kernels.newton_schulz import newton_schulz
    from bdiff.kernels.reference import newton_schulz_ref
    from bdiff.models.nano import BlockDiffusionLM
    from bdiff.training.muon import Muon

    dev = "cuda"
    compiled_ref = torch.compile(newton_schulz_ref)
    print(f"{torch.cuda.get_device_name()} | 5 quintic steps, bf16")
    print(f"{'shape':>16} {'ours ms':>8} {'matmul ms':>10} {'compiled ms':>12}")
    for shape in RECORD_SHAPES + [(1, 4096, 4096), (1, 8192, 8192)]:
        G = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
        ours = triton.testing.do_bench(lambda: newton_schulz(G))
        eager = triton.testing.do_bench(lambda: newton_schulz_ref(G))
        comp = triton.testing.do_bench(lambda: compiled_ref(G))
        print(f"{'x'.join(map(str, shape)):>16} {ours:8.3f} {eager:10.3f} {comp:12.3f}")
    model = BlockDiffusionLM(record().model).to(dev)
    hidden = model.optimizer_groups()["matrices"]
    opt = Muon(hidden, lr=0.025)
    for p in hidden:
        p.grad = torch.randn_like(p)
    print(f"record model Muon step ({len(hidden)} matrices): {triton.testing.do_bench(opt.step):.3f} ms")


# The suite (bench/conftest.py): one Muon batch against the same iteration in torch matmuls; the record's q/k/v/proj
# batch (48 x 768 x 768, bf16) on a GPU, the demo preset's (16 x 128 x 128) and MLP (4 x 512 x 128) on a CPU.
@pytest.mark.parametrize("candidate", ["torch matmuls", "bdiff"])
@pytest.mark.parametrize("shape", ["square", "tall"])
def test_newton_schulz(measure, candidate, shape):
    from bdiff.kernels.newton_schulz import newton_schulz
    from bdiff.kernels.reference import newton_schulz_ref

    cuda = torch.cuda.is_available()
    dims = {"square": (48, 768, 768) if cuda else (16, 128, 128), "tall": (12, 3072, 768) if cuda else (4, 512, 128)}
    G = torch.randn(*dims[shape], device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    fn = {"torch matmuls": newton_schulz_ref, "bdiff": newton_schulz}[candidate]
    b, m, n = G.shape
    m, n = max(m, n), min(m, n)
    flops = 5 * b * (4 * n * n * m + 2 * n**3)  # dense: XXᵀ, A·A, (bA + cA²)·X per quintic step
    measure(f"newton-schulz {shape}", candidate, lambda: fn(G),
            compare_with="torch matmuls" if candidate == "bdiff" else None, work=flops, unit="FLOP",
            shape=list(G.shape), dtype=str(G.dtype), steps=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    gpu_bench() if args.gpu else flop_table()


if __name__ == "__main__":
    main()
