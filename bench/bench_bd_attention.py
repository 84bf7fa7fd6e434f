"""Block-diffusion attention: work done (CPU) and speed (GPU).

    python bench/bench_bd_attention.py            # CPU: work ratio of our kernels vs FlexAttention's BlockMask
    python bench/bench_bd_attention.py --configs  # CPU: work ratio of every tile shape; the last wave with LPT or not
    python bench/bench_bd_attention.py --gpu      # GPU: TFLOP/s vs FlexAttention and SDPA, mask build time
    python bench/bench_bd_attention.py --gpu --gqa   # ... Qwen2.5-1.5B's heads (12 on 2 key/value heads), L=8192
    python -m pytest bench/bench_bd_attention.py --benchmark-only   # the suite: vs FlexAttention (GPU) or SDPA (CPU)

Work ratio = entries computed / allowed entries of the mask. Ours is counted by the kernels themselves
(COUNT=True, through the Triton interpreter on CPU); FlexAttention's is the area of its 128x128 tiles that
are not wholly masked (it skips only those). TFLOP/s count allowed entries only: 4·D FLOPs per entry
forward (QKᵀ and PV), 2.5x that for forward+backward.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L, HEADS, HEAD_DIM, BLOCK = 16384, 6, 128, 16  # the record model's attention per micro-step
GQA = dict(n=8192, heads=12, kv_heads=2)  # --gqa: Qwen2.5-1.5B's attention, at the adapt preset's 8,192 tokens


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
    """Work ratio of each tile shape the kernels may run at the record's shape (the default, the one-time autotune's
    space, the committed table's entries and the tuning space of bench/tune_attention.py; warps and stages change
    no work), from the kernels' loop bounds replayed on the host (computed_entries; no kernel runs)."""
    from bdiff.kernels import tiles
    from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens
    from bdiff.kernels.bd_attention import TUNING_SPACE, computed_entries, kernel_configs, schedule_bounds

    rows = []
    for kernel in ("forward", "dq", "dkdv"):
        table = [tiles.strip(e) for entries in tiles.table("bd_attention").values() for key, e in entries.items()
                 if key.startswith(kernel + " ")]
        shapes = []
        for cfg in kernel_configs(kernel, head_dim, dtype, arch) + table + TUNING_SPACE[kernel]:
            shape = {k: cfg[k] for k in ("BM", "BN", "DN", "BMD") if k in cfg}
            if shape not in shapes:
                shapes.append(shape)
        for i, cfg in enumerate(shapes):
            row = dict(kernel=kernel, index=i, tiles=" ".join(f"{k}={v}" for k, v in cfg.items()))
            for mean in means:
                cu = fineweb_like_cu_seqlens(L, mean)
                row[mean] = computed_entries(schedule_bounds(cu, L, BLOCK), kernel, cfg) / allowed_entries(cu, BLOCK)
            rows.append(row)
    return rows


def tail_table(means=(300, 1000), sms=132) -> list[dict]:
    """How far past its work's bound (all heads' entries spread evenly over `sms` SMs: an H100's or H200's 132) each
    kernel of the sm_90 defaults runs, its programs replayed as list scheduling: an SM takes the next program when its
    last one ends, one at a time (the defaults' registers hold one program per SM), a program costs the entries it
    computes (tile_work), each tile's heads side by side. In the tiles' order, and with LPT (most work first,
    tile_order). A model of the scheduler, not a measurement: the GPU's times come with --gpu."""
    import heapq

    from bdiff.kernels.accounting import fineweb_like_cu_seqlens
    from bdiff.kernels.bd_attention import kernel_config, schedule_bounds, tile_order, tile_work

    def makespan(works):
        free = [0] * sms
        for w in works:
            heapq.heappush(free, heapq.heappop(free) + w)
        return max(free)

    rows = []
    for kernel in ("forward", "dq", "dkdv"):
        cfg = kernel_config(kernel, HEAD_DIM, torch.bfloat16, 90)
        row = dict(kernel=kernel, tiles=" ".join(f"{k}={v}" for k, v in cfg.items() if k in ("BM", "BN", "DN", "BMD")))
        for mean in means:
            side = schedule_bounds(fineweb_like_cu_seqlens(L, mean), L, BLOCK)[1 if kernel == "dkdv" else 0]
            work = tile_work(side, kernel, cfg)
            bound = HEADS * int(work.sum()) / sms
            for order in (work, work[tile_order(side, kernel, cfg).long()]):  # each tile's heads side by side
                row.setdefault(mean, []).append(makespan([w for w in order.tolist() for _ in range(HEADS)]) / bound - 1)
        rows.append(row)
    return rows


def inputs(device: str, mean: int | None, n: int = L, heads: int = HEADS, kv_heads: int | None = None):
    """The suite's and the GPU bench's case: the record's attention (bf16) on a GPU (`n`, `heads`, `kv_heads`: another
    shape, --gqa's); on a CPU a small one (L=4096, 2 heads of 32, float32) with the same kind of documents.
    mean=None: the demo's attention instead (the demo preset: one document filling L=512, 4 heads of 32, float32).
    Returns q (2L, H, D), k, v (2L, Hkv, D), cu_seqlens, the upstream gradient and the entries the mask allows (all
    query heads)."""
    from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens

    dim, dtype = HEAD_DIM, torch.bfloat16
    if device != "cuda":
        n, heads, kv_heads, dim, dtype = 4096, 2, None, 32, torch.float32
    if mean is None:
        n, heads, kv_heads, dim, dtype = 512, 4, None, 32, torch.float32
    cu = fineweb_like_cu_seqlens(n, mean) if mean else torch.tensor([0, n], dtype=torch.int32)
    gen = torch.Generator(device).manual_seed(0)
    q, do = (torch.randn(2 * n, heads, dim, generator=gen, device=device).to(dtype) for _ in range(2))
    k, v = (torch.randn(2 * n, kv_heads or heads, dim, generator=gen, device=device).to(dtype) for _ in range(2))
    return q, k, v, cu.to(device), do, allowed_entries(cu, BLOCK) * heads


def candidates(q, k, v, cu, block=BLOCK) -> dict:
    """name -> fn() that returns the attention output (requires grad), for bdiff and its baselines:
    FlexAttention with the BlockMask of the mask rules (built here, once; GPU only: no backward on CPU) and SDPA
    with the dense (2L, 2L) mask (1 GiB at the record's L). Each gets its own leaf copies of q, k, v. bdiff gets its
    schedule built here once, as the model builds it once a step for all its layers and FlexAttention its BlockMask
    (without it, every call would build its own and check cu_seqlens on the host)."""
    import torch.nn.functional as F

    from bdiff.kernels.bd_attention import bd_attention, schedule_bounds
    from bdiff.kernels.reference import bd_attention_mask, bd_mask_mod

    R = q.shape[0]
    gqa = k.shape[1] != q.shape[1]  # grouped-query heads: every baseline told so, none repeats the keys
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    heads = [x.detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v)]  # (1, H or Hkv, 2L, D)
    dense = bd_attention_mask(cu, block).to(q.device)  # (2L, 2L) bool
    out = {"SDPA dense mask": lambda: F.scaled_dot_product_attention(*heads, attn_mask=dense, enable_gqa=gqa)}
    if q.is_cuda:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(bd_mask_mod(cu, block), None, None, R, R, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        out["FlexAttention"] = lambda: flex(*heads, block_mask=block_mask, enable_gqa=gqa)
    schedule = schedule_bounds(cu, R // 2, block)
    out["bdiff"] = lambda: bd_attention(q, k, v, cu, block, None, schedule)
    return out


def forward_backward(fn, do):
    """fn() and its backward with the upstream gradient do (2L, H, D), in the output's layout."""
    out = fn()
    out.backward(do if out.shape == do.shape else do.transpose(0, 1)[None])


def gpu_bench(n: int = L, heads: int = HEADS, kv_heads: int | None = None):
    import time

    import triton.testing
    from torch.nn.attention.flex_attention import create_block_mask

    from bdiff.kernels.bd_attention import kernel_config, orders_of, schedule_bounds, tile_order
    from bdiff.kernels.reference import bd_mask_mod

    on = f" on {kv_heads} key/value heads" if kv_heads else ""
    print(f"{torch.cuda.get_device_name()} | L={n} (2L={2 * n} rows), {heads} heads{on} of {HEAD_DIM}, block {BLOCK}, "
          "bf16")
    print(f"{'docs mean':>9} {'kernel':>22} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9}")
    for mean in (300, 1000):
        q, k, v, cu, do, allowed = inputs("cuda", mean, n, heads, kv_heads)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        create_block_mask(bd_mask_mod(cu, BLOCK), None, None, 2 * n, 2 * n, device="cuda")
        torch.cuda.synchronize()
        mask_ms = 1000 * (time.perf_counter() - t0)
        for name, fn in candidates(q, k, v, cu).items():
            fwd = triton.testing.do_bench(fn)
            both = triton.testing.do_bench(lambda: forward_backward(fn, do))
            flops = 4 * HEAD_DIM * allowed
            print(f"{mean:9} {name:>22} {fwd:8.3f} {flops / fwd / 1e9:9.1f} {both:8.3f} "
                  f"{2.5 * flops / both / 1e9:9.1f}")
        print(f"{mean:9} {'create_block_mask':>22} {mask_ms:8.3f} ms (first call, includes compilation)")

        def schedule_and_orders():  # what bdiff builds once a step: the schedule, and the tile orders at first use
            schedule = schedule_bounds(cu, n, BLOCK)
            for side, kernel in ((schedule[0], "forward"), (schedule[1], "dkdv")):
                tile_order(side, kernel, kernel_config(kernel, HEAD_DIM, torch.bfloat16, 90), orders_of(schedule))

        print(f"{mean:9} {'schedule + tile orders':>22} {triton.testing.do_bench(schedule_and_orders):8.3f} ms "
              f"(once a step, shared by every layer)")


# The suite (bench/conftest.py): bdiff against FlexAttention on a GPU, against SDPA with the dense mask on a CPU
# (where FlexAttention has no backward), documents of ~300 tokens (where skipping masked work matters most); on a
# CPU also the demo's attention, one document as long as the sequence (where only the chunks of the CPU path skip
# masked work).
BASELINE = "FlexAttention" if torch.cuda.is_available() else "SDPA dense mask"


@pytest.mark.parametrize("case", ["docs300", "demo"])
@pytest.mark.parametrize("candidate", ["SDPA dense mask", "FlexAttention", "bdiff"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_bd_attention(measure, candidate, backward, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if case == "demo" and device == "cuda":
        pytest.skip("the demo's attention is timed on a CPU only")
    q, k, v, cu, do, allowed = inputs(device, mean=300 if case == "docs300" else None)
    fns = candidates(q, k, v, cu)
    if candidate not in fns:
        pytest.skip(f"{candidate} is timed on a GPU only")
    fn = fns[candidate]
    flops = (10 if backward else 4) * q.shape[-1] * allowed  # allowed entries only: 4·D forward, 2.5x with backward
    measure(("attention forward+backward" if backward else "attention forward") + (", demo" if case == "demo" else ""),
            candidate,
            (lambda: forward_backward(fn, do)) if backward else fn,
            compare_with=BASELINE if candidate != BASELINE else None, work=flops, unit="FLOP",
            shape=list(q.shape), documents=cu.numel() - 1, allowed_entries=allowed, dtype=str(q.dtype))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="time the kernels on a CUDA GPU")
    parser.add_argument("--gqa", action="store_true", help="with --gpu: grouped-query heads (Qwen2.5-1.5B's, L=8192)")
    parser.add_argument("--backward", action="store_true", help="CPU: count the backward kernels too (slower)")
    parser.add_argument("--configs", action="store_true", help="work ratio of every tile shape, and the defaults' "
                        "last wave in launch order and with LPT (no kernel runs)")
    args = parser.parse_args()
    if args.gpu:
        gpu_bench(**GQA) if args.gqa else gpu_bench()
        return
    if args.configs:
        print(f"L={L}, block {BLOCK}, head dim {HEAD_DIM}, bf16; work ratio = entries computed / allowed (#0: the "
              f"sm_90 default)")
        print(f"{'kernel':>8} {'#':>2} {'tiles':>26} {'mean 300':>9} {'mean 1000':>10}")
        for r in config_table():
            print(f"{r['kernel']:>8} {r['index']:>2} {r['tiles']:>26} {r[300]:9.3f} {r[1000]:10.3f}")
        print("\nThe last wave (sm_90 defaults, 132 SMs, list scheduling replayed): time past the work's bound")
        print(f"{'kernel':>8} {'tiles':>26} {'300 tile order':>15} {'300 LPT':>8} {'1000 tile order':>16} "
              f"{'1000 LPT':>9}")
        for r in tail_table():
            print(f"{r['kernel']:>8} {r['tiles']:>26} {r[300][0]:15.1%} {r[300][1]:8.1%} {r[1000][0]:16.1%} "
                  f"{r[1000][1]:9.1%}")
        return
    print(f"L={L}, block {BLOCK}, documents log-normal (sigma 1), seed 0; work ratio = entries computed / allowed")
    print(f"{'mean':>5} {'docs':>5} {'allowed':>11} {'FlexAttention 128x128':>22} {'ours fwd':>9} {'unmasked':>9}"
          + (f" {'ours dq':>8} {'ours dkdv':>10}" if args.backward else ""))
    for r in work_table(backward=args.backward):
        print(f"{r['mean']:5} {r['docs']:5} {r['allowed']:11,} {r['flex']:22.3f} {r['forward']:9.3f} "
              f"{r['forward_unmasked']:9.1%}" + (f" {r['dq']:8.3f} {r['dkdv']:10.3f}" if args.backward else ""))


if __name__ == "__main__":
    main()
