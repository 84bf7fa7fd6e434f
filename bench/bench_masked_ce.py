"""Masked-weighted linear cross-entropy: memory and rows computed (CPU), speed and peak memory (GPU).

    python bench/bench_masked_ce.py          # CPU: extra bytes beyond inputs and gradients, ours vs reference
    python bench/bench_masked_ce.py --traffic   # lm_head-gradient bytes and launches per record micro-step
    python bench/bench_masked_ce.py --gpu    # GPU: ms and peak memory, fwd+bwd, vs eager, compiled, Liger
    python -m pytest bench/bench_masked_ce.py --benchmark-only   # the suite: fwd+bwd vs eager on any device

The record model's case: N=16,384 rows, V=50,304 (vocab 50,258), D=768, 55% of rows weighted.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N, V, VOCAB, D, WEIGHTED = 16384, 50304, 50258, 768, 0.55


def make_inputs(N, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, device=device) * D**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (N,), generator=g, device=device)
    token_weights = torch.rand(N, generator=g, device=device) * (torch.rand(N, generator=g, device=device) < WEIGHTED)
    return hidden, weight, targets, token_weights


def cpu_table():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import importlib

    from bdiff.kernels.accounting import peak_extra_bytes
    from bdiff.kernels.reference import masked_linear_cross_entropy_ref

    mce = importlib.import_module("bdiff.kernels.masked_ce")
    small_d = 16
    print(f"V={V} (vocab {VOCAB}), D={small_d}, float32, {WEIGHTED:.0%} of rows weighted; MiB beyond inputs and "
          "gradients, peak over forward + backward")
    print(f"{'N':>6} {'rows computed':>14} {'ours MiB':>9} {'reference MiB':>14}")
    for n in (1024, 4096):
        args = make_inputs(n, small_d)
        rows = int((args[3] > 0).sum())
        ours = peak_extra_bytes(mce.masked_linear_cross_entropy, *args, VOCAB) / 2**20
        ref = peak_extra_bytes(masked_linear_cross_entropy_ref, *args, VOCAB) / 2**20
        print(f"{n:6} {rows / n:14.1%} {ours:9.1f} {ref:14.1f}")
    # At the record's N and D the same code holds one chunk of logits plus the chunk's hidden rows and their
    # dhidden product; the reference holds N x V logits, their log-softmax and their gradient.
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.empty(0, dtype=dtype).element_size()
        rows = mce.chunk_rows(VOCAB, dtype)
        width = min(V, -(-VOCAB // 16) * 16)
        ours = rows * width * size + 2 * rows * D * size
        note = ""
        if dtype == torch.bfloat16:  # an fp32 lm_head weight is cast to bf16 once, as any bf16 matmul needs
            ours += width * D * size + mce.dweight_slice_rows(width, D, dtype) * D * size
            note = " (incl. the bf16 copy of an fp32 lm_head weight and one dweight slice)"
        ref = 3 * N * VOCAB * 4
        print(f"N={N}, D={D}, {str(dtype)[6:]}: ours ~{ours / 2**20:.0f} MiB{note}; reference ~{ref / 2**20:,.0f} MiB")


def traffic_table():
    """Bytes of the float32 lm_head gradient moved and kernel launches per record micro-step (16,384 rows, t ~ U[0.3,
    0.8]: 55% of them carry loss), replayed from the launcher's own sizing (masked_ce.lm_head_traffic)."""
    from bdiff.kernels import masked_ce as mce

    rows = round(N * WEIGHTED)
    width = min(V, -(-VOCAB // 16) * 16)
    print(f"record micro-step: {rows:,} loss rows, lm_head {width} x {D} (float32 gradient "
          f"{width * D * 4 / 1e6:.0f} MB)")
    print(f"{'case':<52} {'chunks':>6} {'dweight GB':>10} {'launches':>8}")
    # Before (up to 6063a16): every device took 32 MiB chunks of a power-of-two row count (128 rows of fp32
    # logits, 256 of bf16), and under CUDA autocast the final norm left the hidden states in fp32.
    cases = [("before: fp32 hidden (CUDA autocast), 32 MiB chunks", torch.float32, mce.LOGITS_BUDGET, 128),
             ("before: bf16 hidden, 32 MiB chunks", torch.bfloat16, mce.LOGITS_BUDGET, 256)]
    for name, gib in (("24 GB GPU", 24), ("80 GB H100", 80), ("141 GB H200", 141)):
        low, high = mce.GPU_LOGITS_BUDGET
        cases.append((f"now: bf16 hidden, {name}", torch.bfloat16, min(high, max(low, gib * 10**9 // 64)), None))
    for name, dtype, budget, chunk in cases:
        r = mce.lm_head_traffic(rows, width, D, dtype, budget, chunk)
        print(f"{name:<52} {r['chunks']:6} {r['dweight_bytes'] / 1e9:10.2f} {r['launches']:8}")


def candidates(device: str) -> dict:
    """name -> loss function with masked_linear_cross_entropy's signature: bdiff and its baselines (eager
    PyTorch: the reference under autograd, all rows' logits; on a GPU also compiled, and Liger's fused linear
    cross-entropy where installed)."""
    from bdiff.kernels.masked_ce import masked_linear_cross_entropy
    from bdiff.kernels.reference import masked_linear_cross_entropy_ref

    out = {"PyTorch eager": masked_linear_cross_entropy_ref}
    if device == "cuda":
        out["torch.compile"] = torch.compile(masked_linear_cross_entropy_ref)
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            def liger(h, w, t, tw, vocab):  # per-class weights only: unweighted rows are dropped with ignore_index
                t = torch.where(tw > 0, t, torch.full_like(t, -100))
                return liger_fused_linear_cross_entropy(h, w[:vocab], t, reduction="sum")

            out["Liger FLCE"] = liger
        except ImportError:
            pass
    out["bdiff"] = masked_linear_cross_entropy
    return out


def step_of(fn, args):
    """Forward and backward of one loss function: the loss and the gradients of hidden and the weight."""
    def step():
        loss = fn(*args, VOCAB)
        torch.autograd.grad(loss, args[:2])

    return step


def gpu_bench():
    import triton.testing

    args = make_inputs(N, D, torch.bfloat16, "cuda")
    print(f"{torch.cuda.get_device_name()} | N={N}, V={V}, D={D}, bf16, {WEIGHTED:.0%} rows weighted")
    found = candidates("cuda")
    if "Liger FLCE" not in found:
        print("liger-kernel not installed: skipping it")
    for name, fn in found.items():
        step = step_of(fn, args)
        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"{name:>30}: {triton.testing.do_bench(step):8.2f} ms  peak +{peak:,.0f} MiB")


# The suite (bench/conftest.py): forward + backward against eager PyTorch; the record's case on a GPU, on a CPU
# the record's vocabulary with N=1024 rows of D=64 (the CPU path computes every row, as eager does).
@pytest.mark.parametrize("candidate", ["PyTorch eager", "torch.compile", "Liger FLCE", "bdiff"])
def test_masked_ce(measure, candidate):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found = candidates(device)
    if candidate not in found:
        pytest.skip(f"{candidate}: GPU only" + (" and liger-kernel is not installed" if "Liger" in candidate else ""))
    n, d, dtype = (N, D, torch.bfloat16) if device == "cuda" else (1024, 64, torch.float32)
    args = make_inputs(n, d, dtype, device)
    rows = int((args[3] > 0).sum())
    measure("loss forward+backward", candidate, step_of(found[candidate], args),
            compare_with="PyTorch eager" if candidate != "PyTorch eager" else None, work=n, unit="row",
            rows=n, weighted_rows=rows, vocab=VOCAB, dim=d, dtype=str(dtype),
            logit_flops_all_rows=6 * n * VOCAB * d)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--traffic", action="store_true", help="lm_head-gradient traffic per record micro-step")
    args = parser.parse_args()
    gpu_bench() if args.gpu else traffic_table() if args.traffic else cpu_table()


if __name__ == "__main__":
    main()
