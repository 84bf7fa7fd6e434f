"""Block-diffusion attention: work done (CPU) and speed (GPU).

    python bench/bench_bd_attention.py            # CPU: work ratio of our kernels vs FlexAttention's BlockMask
    python bench/bench_bd_attention.py --gpu      # GPU: TFLOP/s vs FlexAttention and SDPA, mask build time

Work ratio = entries computed / allowed entries of the mask. Ours is counted by the kernels themselves
(COUNT=True, through the Triton interpreter on CPU); FlexAttention's is the area of its 128x128 tiles that
are not wholly masked (it skips only those). TFLOP/s count allowed entries only: 4·D FLOPs per entry
forward (QKᵀ and PV), 2.5x that for forward+backward.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L, HEADS, HEAD_DIM, BLOCK = 16384, 6, 128, 16  # the record model's attention per micro-step


def work_table(means=(300, 1000), head_dim=16, backward=False) -> list[dict]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: the kernels count on CPU
    from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens, flex_block_mask_entries
    from bdiff.kernels.bd_attention import count_work

    rows = []
    for mean in means:
        cu = fineweb_like_cu_seqlens(L, mean)
        q, k, v = (torch.randn(2 * L, 1, head_dim) for _ in range(3))
        allowed = allowed_entries(cu, BLOCK)
        counts = count_work(q, k, v, cu, BLOCK, backward=backward)
        row = dict(mean=mean, docs=len(cu) - 1, allowed=allowed, flex=flex_block_mask_entries(cu, BLOCK) / allowed)
        for kernel, (entries, unmasked) in counts.items():
            row[kernel] = entries / allowed
            row[f"{kernel}_unmasked"] = unmasked / entries
        rows.append(row)
    return rows


def config_table(means=(300, 1000), head_dim=128, dtype=torch.bfloat16, arch=90) -> list[dict]:
    """Work ratio of every configuration of the autotune space (bdiff.kernels.bd_attention.kernel_configs) at the
    record's shape, from the kernels' loop bounds replayed on the host (computed_entries; no kernel runs)."""
    from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens
    from bdiff.kernels.bd_attention import computed_entries, kernel_configs, schedule_bounds

    rows = []
    for kernel in ("forward", "dq", "dkdv"):
        for i, cfg in enumerate(kernel_configs(kernel, head_dim, dtype, arch)):
            row = dict(kernel=kernel, index=i, tiles=f"{cfg['BM']}x{cfg['BN']} w{cfg['num_warps']} s{cfg['num_stages']}")
            for mean in means:
                cu = fineweb_like_cu_seqlens(L, mean)
                row[mean] = computed_entries(schedule_bounds(cu, L, BLOCK), kernel, cfg) / allowed_entries(cu, BLOCK)
            rows.append(row)
    return rows


def gpu_bench():
    from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens
    import time

    import triton.testing
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from bdiff.kernels.bd_attention import bd_attention
    from bdiff.kernels.reference import bd_attention_mask, bd_mask_mod

    dev = "cuda"
    flex = torch.compile(flex_attention, dynamic=False)
    print(f"{torch.cuda.get_device_name()} | L={L} (2L={2 * L} rows), {HEADS} heads of {HEAD_DIM}, block {BLOCK}, bf16")
    print(f"{'docs mean':>9} {'kernel':>22} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9}")
    for mean in (300, 1000):
        cu = fineweb_like_cu_seqlens(L, mean).to(dev)
        allowed = allowed_entries(cu.cpu(), BLOCK) * HEADS
        q, k, v = (torch.randn(2 * L, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        mask_mod = bd_mask_mod(cu, BLOCK)

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, 2 * L, 2 * L, device=dev)
        torch.cuda.synchronize()
        mask_ms = 1000 * (time.perf_counter() - t0)
        dense = bd_attention_mask(cu, BLOCK)  # (2L, 2L) bool: 1 GiB, only for the SDPA baseline
        qh, kh, vh = (x.detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v))  # (1, H, 2L, D)
        candidates = {
            "bdiff (Triton)": lambda: bd_attention(q, k, v, cu, BLOCK),
            "FlexAttention": lambda: flex(qh, kh, vh, block_mask=block_mask),
            "SDPA dense mask": lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense),
        }
        for name, fn in candidates.items():
            fwd = triton.testing.do_bench(fn)
            out = fn()
            grad = do if out.shape == do.shape else do.transpose(0, 1)[None]
            both = triton.testing.do_bench(lambda: fn().backward(grad))
            flops = 4 * HEAD_DIM * allowed
            print(f"{mean:9} {name:>22} {fwd:8.3f} {flops / fwd / 1e9:9.1f} {both:8.3f} {2.5 * flops / both / 1e9:9.1f}")
        print(f"{mean:9} {'create_block_mask':>22} {mask_ms:8.3f} ms (first call, includes compilation)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="time the kernels on a CUDA GPU")
    parser.add_argument("--backward", action="store_true", help="CPU: count the backward kernels too (slower)")
    parser.add_argument("--configs", action="store_true", help="work ratio of every autotune configuration")
    args = parser.parse_args()
    if args.gpu:
        gpu_bench()
        return
    if args.configs:
        print(f"L={L}, block {BLOCK}, head dim {HEAD_DIM}, bf16, sm_90 space; work ratio = entries computed / allowed")
        print(f"{'kernel':>8} {'#':>2} {'tiles':>14} {'mean 300':>9} {'mean 1000':>10}")
        for r in config_table():
            print(f"{r['kernel']:>8} {r['index']:>2} {r['tiles']:>14} {r[300]:9.3f} {r[1000]:10.3f}")
        return
    print(f"L={L}, block {BLOCK}, documents log-normal (sigma 1), seed 0; work ratio = entries computed / allowed")
    print(f"{'mean':>5} {'docs':>5} {'allowed':>11} {'FlexAttention 128x128':>22} {'ours fwd':>9} {'unmasked':>9}"
          + (f" {'ours dq':>8} {'ours dkdv':>10}" if args.backward else ""))
    for r in work_table(backward=args.backward):
        print(f"{r['mean']:5} {r['docs']:5} {r['allowed']:11,} {r['flex']:22.3f} {r['forward']:9.3f} "
              f"{r['forward_unmasked']:9.1%}" + (f" {r['dq']:8.3f} {r['dkdv']:10.3f}" if args.backward else ""))


if __name__ == "__main__":
    main()
