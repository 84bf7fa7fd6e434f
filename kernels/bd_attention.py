"""Block-diffusion attention in Triton, forward and backward (the attention rules of docs/design.md §2).

q, k, v are (2L, H, D): rows 0..L-1 the noisy copy x_t, rows L..2L-1 the clean copy x_0. For a position p
with document start s, document end e, block start b0 and block end b1 (blocks restart at each document),
every rule of the mask is one contiguous range of positions:

    noisy query p:  noisy keys [b0, b1)   (its own block)      clean keys [s, b0)   (earlier blocks)
    clean query p:  clean keys [s, b1)    (block-causal)
    noisy key p:    noisy queries [b0, b1)
    clean key p:    noisy queries [b1, e)                     clean queries [b0, e)

So the schedule is a (2L, 6) int32 table of ranges built from `cu_seqlens` and `block_size` alone; no mask
is ever materialized. A tile of BM rows (never straddling the two halves) visits the union of its rows'
ranges in chunks; a chunk that every row of the tile may see wholly is computed without element masks.
The noisy<->noisy "diagonal" range is one block wide, so a BM-row tile would compute BM keys per row to use
block_size of them; it is instead done in SUB-row sub-tiles with a batched (3D) dot, which keeps the work
close to the allowed entries (bench/bench_bd_attention.py measures it with COUNT=True).

Table columns: (lo, hi) pairs of segment 0 (diagonal, other-half rows 0..L-1), segment 1 (other rows
0..L-1), segment 2 (other rows L..2L-1); named DIAGONAL, NOISY and CLEAN below. "Other" rows are keys for a query
tile, queries for a key tile.

Public: `bd_attention(q, k, v, cu_seqlens, block_size, scale, schedule)` (the operator torch.ops.bdiff.bd_attention,
also `from bdiff.ops import bd_attention`), `schedule_bounds` (the table, built once per sequence),
`count_work` / `computed_entries` (work accounting), `kernel_config(s)` and `compile_configs` (what ships).
Map of this file, top-down: the @triton.jit kernels (forward and dQ share `_bd_attn_query_kernel`; dK/dV; delta);
the host side (tile choice and autotuning, the schedule, validation, launchers, the CPU path); the operator with
its fake implementation and autograd; FLOP formulas; `bd_attention`; accounting; `compile_configs`.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils.flop_counter import register_flop_formula

from . import reference
from ._device import TileConfig, on_device, use_triton
from ._device import arch as _arch

LOG2E = 1.4426950408889634
# The schedule table (schedule_bounds, the module docstring): per row, a (lo, hi) pair of columns per segment.
COLUMNS = tl.constexpr(6)
DIAGONAL = tl.constexpr(0)  # segment 0: the other half's rows 0..L-1 of the row's own block
NOISY = tl.constexpr(2)  # segment 1: other rows 0..L-1 (clean keys: the noisy queries of later blocks)
CLEAN = tl.constexpr(4)  # segment 2: other rows L..2L-1
# fp32 operands go through TF32 tensor cores on a GPU (as torch does with allow_tf32): exact fp32 dots spill
# registers in every configuration. bf16/fp16 dots ignore it; the interpreter computes every dot in full fp32.
PRECISION = "tf32"
SUB = 16  # rows of a diagonal sub-tile: the smallest M of a tensor-core dot
SUB_N = 32  # other-side rows per diagonal chunk: one 16-block plus the misalignment of a sub-tile
HEAD_DIMS = (16, 32, 64, 128)  # 64 and 128 are the shipped GPU configurations; 16/32 serve CPU checks
MAX_BLOCK_SIZE = 128


@triton.jit
def _softmax_step(acc, m, l, s, v, PRECISION: tl.constexpr):
    """One online-softmax update; s (..., M, N) in log2 units with -inf where masked, v (..., N, D)."""
    m_new = tl.maximum(m, tl.max(s, axis=-1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at zero
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - tl.expand_dims(m_safe, -1))
    l = l * alpha + tl.sum(p, axis=-1)
    acc = acc * tl.expand_dims(alpha, -1) + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l


@triton.jit
def _dq_step(dq, s, k, vt, do, lse, delta, PRECISION: tl.constexpr):
    """dq += dS K for one chunk; s (..., M, N) log2 scores, vt (..., D, N), lse/delta (..., M)."""
    p = tl.exp2(s - tl.expand_dims(lse, -1))
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - tl.expand_dims(delta, -1))
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dkdv_step(dk, dv, st, v, q, do, dot, lse, delta, PRECISION: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q for one chunk; st (..., M keys, N queries) log2 scores,
    dot = dO^T (..., D, N), lse/delta (..., N)."""
    pt = tl.exp2(st - tl.expand_dims(lse, -2))
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, dot, input_precision=PRECISION)
    dst = pt * (dpt - tl.expand_dims(delta, -2))
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _tile(L, BM: tl.constexpr):
    """This program's tile of BM rows; tiles never straddle the halves. Returns (half, first row, row end)."""
    tiles_per_half = tl.cdiv(L, BM)
    pid = tl.program_id(0)
    half = pid // tiles_per_half
    return half, half * L + (pid % tiles_per_half) * BM, half * L + L


@triton.jit
def _rows(first, end, N: tl.constexpr):
    """N rows from `first`; rows at or past `end` repeat row end-1 (computed, never stored). (rows, valid)"""
    offs = first + tl.arange(0, N)
    return tl.minimum(offs, end - 1), offs < end


@triton.jit
def _ranges(BOUNDS, rows, COL: tl.constexpr):
    """The ranges [lo, hi) in table columns (COL, COL + 1) of `rows`, and their union's bounds (min lo, max hi)."""
    lo = tl.load(BOUNDS + rows * COLUMNS + COL)
    hi = tl.load(BOUNDS + rows * COLUMNS + COL + 1)
    return lo, hi, tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _bd_attn_query_kernel(Q, K, V, O, LSE, DO, DELTA, DQ, SCRATCH, BOUNDS, COUNTS, L, qk_scale, scale,
                          H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          SUB: tl.constexpr, SUB_N: tl.constexpr, BACKWARD: tl.constexpr,
                          COUNT: tl.constexpr, PRECISION: tl.constexpr):
    """Forward (O, LSE) or, with BACKWARD, dQ for one tile of BM query rows and one head.

    Phase 1 covers segment 2 (clean keys) with BM-row tiles. Noisy tiles then hand their state to phase 2,
    the diagonal (noisy keys of the query's own block), done in SUB-row sub-tiles through an fp32 scratch:
    the forward state as (o, lse), which is (acc, m, l) = (o, lse, 1); dQ as its partial sum.
    """
    h = tl.program_id(1)
    half, start, end = _tile(L, BM)
    d = tl.arange(0, D)
    stride = H * D  # (2L, H, D) contiguous
    rows, valid = _rows(start, end, BM)
    q = tl.load(Q + rows[:, None] * stride + h * D + d[None, :])  # (BM, D)
    acc = tl.zeros((BM, D), dtype=tl.float32)  # output accumulator, or dQ
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BM,), dtype=tl.float32)
    if BACKWARD:
        do = tl.load(DO + rows[:, None] * stride + h * D + d[None, :])
        lse = tl.load(LSE + h * 2 * L + rows)
        delta = tl.load(DELTA + h * 2 * L + rows)
    entries = 0
    full_entries = 0

    lo = tl.load(BOUNDS + rows * COLUMNS + CLEAN)
    hi = tl.load(BOUNDS + rows * COLUMNS + CLEAN + 1)
    lo_max, hi_min, hi_max = tl.max(lo, axis=0), tl.min(hi, axis=0), tl.max(hi, axis=0)
    for c0 in range(tl.min(lo, axis=0), hi_max, BN):
        kp = c0 + tl.arange(0, BN)
        kv_offs = (L + kp)[:, None] * stride + h * D + d[None, :]
        k = tl.load(K + kv_offs, mask=(kp < hi_max)[:, None], other=0.0)  # (BN, D)
        v = tl.load(V + kv_offs, mask=(kp < hi_max)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN)
        if (c0 < lo_max) | (c0 + BN > hi_min):  # some row may not see some key of this chunk
            s = tl.where((kp[None, :] >= lo[:, None]) & (kp[None, :] < hi[:, None]), s, float("-inf"))
        else:
            full_entries += BM * BN
        if BACKWARD:
            acc = _dq_step(acc, s, k, tl.trans(v), do, lse, delta, PRECISION)
        else:
            acc, m, l = _softmax_step(acc, m, l, s, v, PRECISION)
        entries += BM * BN

    offs = rows[:, None] * stride + h * D + d[None, :]
    if BACKWARD:
        out = acc
    else:
        out = acc / tl.maximum(l, 1e-30)[:, None]  # l >= 1 once a row saw a key; 0 for a noisy first-block row
        m = m + tl.log2(tl.maximum(l, 1e-30))  # -inf for a row with no key yet: m is -inf there
    if half == 1:
        if BACKWARD:
            tl.store(DQ + offs, (out * scale).to(DQ.dtype.element_ty), mask=valid[:, None])
        else:
            tl.store(O + offs, out.to(O.dtype.element_ty), mask=valid[:, None])
            tl.store(LSE + h * 2 * L + rows, m, mask=valid)
    else:
        tl.store(SCRATCH + offs, out, mask=valid[:, None])
        if not BACKWARD:
            tl.store(LSE + h * 2 * L + rows, m, mask=valid)
        tl.debug_barrier()  # phase 2 reads rows that other threads of this program wrote
        for i in tl.static_range(BM // SUB):
            sub, sub_valid = _rows(start + i * SUB, end, SUB)
            sub_offs = sub[:, None] * stride + h * D + d[None, :]
            q_i = tl.load(Q + sub_offs)  # (SUB, D)
            acc_i = tl.load(SCRATCH + sub_offs)
            m_i = tl.load(LSE + h * 2 * L + sub)  # forward: the lse of phase 1; backward: the final lse
            l_i = tl.full((SUB,), 1.0, dtype=tl.float32)
            if BACKWARD:
                do_i = tl.load(DO + sub_offs)
                delta_i = tl.load(DELTA + h * 2 * L + sub)
            lo_i, hi_i, sub_lo, sub_hi = _ranges(BOUNDS, sub, DIAGONAL)
            for c0 in range(sub_lo, sub_hi, SUB_N):
                kp_i = c0 + tl.arange(0, SUB_N)
                kv_offs_i = kp_i[:, None] * stride + h * D + d[None, :]
                k_i = tl.load(K + kv_offs_i, mask=(kp_i < sub_hi)[:, None], other=0.0)  # (SUB_N, D)
                v_i = tl.load(V + kv_offs_i, mask=(kp_i < sub_hi)[:, None], other=0.0)
                s_i = tl.dot(q_i, tl.trans(k_i), input_precision=PRECISION) * qk_scale  # (SUB, SUB_N)
                s_i = tl.where((kp_i[None, :] >= lo_i[:, None]) & (kp_i[None, :] < hi_i[:, None]), s_i, float("-inf"))
                if BACKWARD:
                    acc_i = _dq_step(acc_i, s_i, k_i, tl.trans(v_i), do_i, m_i, delta_i, PRECISION)
                else:
                    acc_i, m_i, l_i = _softmax_step(acc_i, m_i, l_i, s_i, v_i, PRECISION)
                entries += SUB * SUB_N
            if BACKWARD:
                tl.store(DQ + sub_offs, (acc_i * scale).to(DQ.dtype.element_ty), mask=sub_valid[:, None])
            else:
                tl.store(O + sub_offs, (acc_i / l_i[:, None]).to(O.dtype.element_ty), mask=sub_valid[:, None])
                tl.store(LSE + h * 2 * L + sub, m_i + tl.log2(l_i), mask=sub_valid)
    if COUNT:
        slot = (h * tl.num_programs(0) + tl.program_id(0)) * 2
        tl.store(COUNTS + slot, entries)
        tl.store(COUNTS + slot + 1, full_entries)


@triton.jit
def _bd_attn_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, BOUNDS, COUNTS, L, qk_scale, scale,
                         H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         SUB: tl.constexpr, SUB_N: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV for one tile of BM key rows and one head, visiting the queries that see those keys.
    Noisy keys are seen only by the noisy queries of their own block (the diagonal, in SUB-row sub-tiles);
    clean keys by noisy queries of later blocks (segment 1) and clean queries (segment 2)."""
    h = tl.program_id(1)
    half, start, end = _tile(L, BM)
    d = tl.arange(0, D)
    stride = H * D
    entries = 0
    full_entries = 0
    if half == 0:
        for i in tl.static_range(BM // SUB):
            sub, sub_valid = _rows(start + i * SUB, end, SUB)
            sub_offs = sub[:, None] * stride + h * D + d[None, :]
            k_i = tl.load(K + sub_offs)  # (SUB, D)
            v_i = tl.load(V + sub_offs)
            dk_i = tl.zeros((SUB, D), dtype=tl.float32)
            dv_i = tl.zeros((SUB, D), dtype=tl.float32)
            lo_i, hi_i, sub_lo, sub_hi = _ranges(BOUNDS, sub, DIAGONAL)
            for c0 in range(sub_lo, sub_hi, SUB_N):
                qp_i = c0 + tl.arange(0, SUB_N)
                qmask_i = qp_i < sub_hi
                offs_i = qp_i[:, None] * stride + h * D + d[None, :]
                q_i = tl.load(Q + offs_i, mask=qmask_i[:, None], other=0.0)  # (SUB_N, D)
                do_i = tl.load(DO + offs_i, mask=qmask_i[:, None], other=0.0)
                lse_i = tl.load(LSE + h * 2 * L + qp_i, mask=qmask_i, other=0.0)
                delta_i = tl.load(DELTA + h * 2 * L + qp_i, mask=qmask_i, other=0.0)
                st_i = tl.dot(k_i, tl.trans(q_i), input_precision=PRECISION) * qk_scale  # (SUB, SUB_N)
                st_i = tl.where((qp_i[None, :] >= lo_i[:, None]) & (qp_i[None, :] < hi_i[:, None]), st_i, float("-inf"))
                dk_i, dv_i = _dkdv_step(dk_i, dv_i, st_i, v_i, q_i, do_i, tl.trans(do_i), lse_i, delta_i, PRECISION)
                entries += SUB * SUB_N
            tl.store(DK + sub_offs, (dk_i * scale).to(DK.dtype.element_ty), mask=sub_valid[:, None])
            tl.store(DV + sub_offs, dv_i.to(DV.dtype.element_ty), mask=sub_valid[:, None])
    else:
        rows, valid = _rows(start, end, BM)
        offs_kv = rows[:, None] * stride + h * D + d[None, :]
        k = tl.load(K + offs_kv)  # (BM, D)
        v = tl.load(V + offs_kv)
        dk = tl.zeros((BM, D), dtype=tl.float32)
        dv = tl.zeros((BM, D), dtype=tl.float32)
        for seg in tl.static_range(1, 3):
            base = (seg - 1) * L  # segment 1: noisy queries, segment 2: clean queries
            lo = tl.load(BOUNDS + rows * COLUMNS + NOISY + 2 * (seg - 1))  # segment 1, then 2 (CLEAN)
            hi = tl.load(BOUNDS + rows * COLUMNS + NOISY + 2 * (seg - 1) + 1)
            lo_max, hi_min, hi_max = tl.max(lo, axis=0), tl.min(hi, axis=0), tl.max(hi, axis=0)
            for c0 in range(tl.min(lo, axis=0), hi_max, BN):
                qp = c0 + tl.arange(0, BN)
                qmask = qp < hi_max
                offs = (base + qp)[:, None] * stride + h * D + d[None, :]
                q = tl.load(Q + offs, mask=qmask[:, None], other=0.0)  # (BN, D)
                do = tl.load(DO + offs, mask=qmask[:, None], other=0.0)
                lse = tl.load(LSE + h * 2 * L + base + qp, mask=qmask, other=0.0)
                delta = tl.load(DELTA + h * 2 * L + base + qp, mask=qmask, other=0.0)
                st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BM, BN)
                if (c0 < lo_max) | (c0 + BN > hi_min):
                    st = tl.where((qp[None, :] >= lo[:, None]) & (qp[None, :] < hi[:, None]), st, float("-inf"))
                else:
                    full_entries += BM * BN
                dk, dv = _dkdv_step(dk, dv, st, v, q, do, tl.trans(do), lse, delta, PRECISION)
                entries += BM * BN
        tl.store(DK + offs_kv, (dk * scale).to(DK.dtype.element_ty), mask=valid[:, None])
        tl.store(DV + offs_kv, dv.to(DV.dtype.element_ty), mask=valid[:, None])
    if COUNT:
        slot = (h * tl.num_programs(0) + tl.program_id(0)) * 2
        tl.store(COUNTS + slot, entries)
        tl.store(COUNTS + slot + 1, full_entries)


@triton.jit
def _bd_attn_delta_kernel(O, DO, DELTA, L, H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, (H, 2L): the softmax-backward term shared by dQ and dK."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    mask = (rows < 2 * L)[:, None]
    offs = rows[:, None] * H * D + h * D + d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * 2 * L + rows, tl.sum(o * do, axis=1), mask=rows < 2 * L)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

def kernel_config(kernel: str, D: int, dtype: torch.dtype, arch: int = 90) -> TileConfig:
    """Tiles, warps and pipeline stages of one kernel ("forward", "dq" or "dkdv"), chosen so that every
    target (sm_80/86/89/90) compiles without register spills (kernels/compile_check.py checks each).

    Query tiles are 64 rows: the M of one Hopper warpgroup MMA, and small enough to keep the work ratio
    low (bigger tiles compute more masked entries at document and block edges); 32-key chunks likewise.
    The forward fits one warpgroup (4 warps) at both head dims; dQ at D=128 takes 8. dK/dV holds two (BM, D) fp32
    accumulators plus K and V: at D=64 it keeps 64 key rows with 16-query chunks; at D=128 Hopper keeps 64 rows (the
    warpgroup MMA needs them) and the others drop to 32 rows, whose registers would spill at 64.
    fp32 operands are twice the bytes: 8 warps, one pipeline stage and 16-row chunks.
    """
    wide = D >= 128
    fp32 = dtype == torch.float32
    if kernel == "dkdv":
        if wide and fp32:
            cfg = dict(BM=32, BN=16, num_warps=8)
        elif wide:
            cfg = dict(BM=64, BN=16, num_warps=8) if arch >= 90 else dict(BM=32, BN=32, num_warps=8)
        else:
            cfg = dict(BM=64, BN=16, num_warps=4)
    elif kernel == "dq":
        cfg = dict(BM=64, BN=16 if fp32 else 32, num_warps=8 if wide or fp32 else 4)
    else:  # forward: one warpgroup per 64-row tile, FlashAttention-3 style
        cfg = dict(BM=64, BN=16 if fp32 else 32, num_warps=8 if fp32 else 4)
    cfg["num_stages"] = 1 if fp32 else 2
    return cfg


# Larger tiles than the defaults, tried by the autotuner on a GPU for bf16 (what training runs; fp16 and fp32 keep
# their one configuration): 128-row tiles and 64-key chunks are FlexAttention's and the Triton tutorial's shapes,
# better tensor-core use per instruction at the price of more masked work at document and block edges. Each
# entry names the GPUs on which it compiles without register spills (kernels/compile_check.py compiles every
# one of them; 128x32 tiles spill on sm_80/86/89, the 64x32 dK/dV at D=64 on sm_80).
# bench/bench_bd_attention.py --configs reports each one's work ratio.
ALL_ARCHS = (80, 86, 89, 90)
AUTOTUNE_EXTRA = {  # kernel: [(configuration, archs)]
    "forward": [(dict(BM=128, BN=32, num_warps=8), (90,)), (dict(BM=64, BN=64, num_warps=4), ALL_ARCHS),
                (dict(BM=128, BN=64, num_warps=8), ALL_ARCHS)],
    "dq": [(dict(BM=128, BN=32, num_warps=8), (90,)), (dict(BM=64, BN=64, num_warps=8), ALL_ARCHS)],
    "dkdv": [(dict(BM=64, BN=32, num_warps=8), (86, 89, 90))],
}


def kernel_configs(kernel: str, D: int, dtype: torch.dtype, arch: int = 90) -> list[TileConfig]:
    """The autotune space of one kernel on one GPU: the default configuration first, then the larger tiles."""
    default = kernel_config(kernel, D, dtype, arch)
    if dtype != torch.bfloat16:
        return [default]
    extra = [dict(cfg, num_stages=default["num_stages"]) for cfg, archs in AUTOTUNE_EXTRA[kernel] if arch in archs]
    return [default] + [cfg for cfg in extra if cfg != default]


_TUNED: dict[tuple, dict] = {}  # (kernel, D, dtype, arch, log2 L) -> the fastest configuration measured


def _pick(kernel: str, q: torch.Tensor, launch) -> TileConfig:
    """The configuration for this call. On a GPU the first call of each (kernel, head dim, dtype, GPU, size
    class) times every configuration of the space on the real inputs (triton.testing.do_bench) and keeps the
    fastest; the kernels write their outputs without accumulating, so the trial runs leave no trace. The
    interpreter always takes the default."""
    D, L = q.shape[-1], q.shape[0] // 2
    space = kernel_configs(kernel, D, q.dtype, _arch(q))
    if not q.is_cuda or len(space) == 1:
        return space[0]
    key = (kernel, D, q.dtype, _arch(q), L.bit_length())
    if key not in _TUNED:
        import triton.testing

        times = [triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20) for cfg in space]
        _TUNED[key] = space[min(range(len(space)), key=times.__getitem__)]
    return _TUNED[key]


def schedule_bounds(cu_seqlens: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """The range tables of the module docstring, (2, 2L, 6) int32: [0] the query side (forward and dQ),
    [1] the key side (dK/dV). On cu_seqlens' device, no host sync. A model builds them once per sequence and
    passes them to every layer (`schedule=`); without them each call builds its own.

    cu_seqlens[0] <= 0: a sequence that starts -cu_seqlens[0] tokens into its first document. That document's
    blocks follow its own grid (positions counted from its real start) and are clipped at position 0."""
    cu = cu_seqlens.long()
    doc, pos_in_doc = reference.document_positions(cu, L)  # (L,) each
    s, e = cu[doc], cu[doc + 1]
    b0 = s + pos_in_doc // block_size * block_size
    b1 = torch.minimum(b0 + block_size, e)
    s, b0 = s.clamp_min(0), b0.clamp_min(0)  # the first document's grid, clipped at the sequence start
    z = torch.zeros_like(doc)
    queries = torch.cat([torch.stack([b0, b1, z, z, s, b0], 1),  # noisy rows
                         torch.stack([z, z, z, z, s, b1], 1)])  # clean rows
    keys = torch.cat([torch.stack([b0, b1, z, z, z, z], 1),  # noisy keys
                      torch.stack([z, z, b1, e, b0, e], 1)])  # clean keys
    return torch.stack([queries, keys]).to(torch.int32).contiguous()


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it with NaN to catch unwritten rows)."""
    return torch.empty(shape, dtype=dtype, device=device)


def validate_cu_seqlens(cu_seqlens: torch.Tensor, L: int) -> None:
    """Boundaries must increase strictly from cu_seqlens[0] <= 0 (minus the first document's offset: how many
    of its tokens precede the sequence) to L, with cu_seqlens[1] > 0. Reads the values: on a GPU tensor that is
    a host sync, so the op checks them only for CPU tensors; the training path checks its host-side copy once
    per sequence (bdiff/noise.py)."""
    c = cu_seqlens
    if not (int(c[0]) <= 0 < int(c[1]) and int(c[-1]) == L and bool((c[1:] > c[:-1]).all())):
        raise ValueError(f"cu_seqlens must increase strictly from a value <= 0 (minus the first document's offset) "
                         f"to L={L}, with cu_seqlens[1] > 0, got {c.tolist()[:8]}...")


def _validate(q, k, v, cu_seqlens, block_size, schedule, values=True):
    """Shapes, dtypes and devices; with `values`, also cu_seqlens' boundaries, on every path alike (the reference,
    the interpreter, the GPU) whenever no `schedule` is given, and for CPU tensors always. On a GPU, reading them
    is a host sync: a caller that passes the schedule (the model does, built and checked on the host from the
    loader's tokens, bdiff/noise.py) vouches for the boundaries it was built from."""
    if q.ndim != 3:
        raise ValueError(f"q must be (2L, H, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    R, _, D = q.shape
    if R == 0 or R % 2:
        raise ValueError(f"q must have an even, positive number of rows (2L), got {R}")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim (q.shape[-1]) must be one of {HEAD_DIMS}, got {D}")
    if not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1D int32 tensor [-offset, ..., L], got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    if schedule is not None and (schedule.shape != (2, R, 6) or schedule.dtype != torch.int32
                                 or schedule.device != q.device):
        raise ValueError(f"schedule must be schedule_bounds(cu_seqlens, L, block_size): (2, {R}, 6) int32 on "
                         f"{q.device}, got {schedule.dtype} of shape {tuple(schedule.shape)} on {schedule.device}")
    if values and (schedule is None or cu_seqlens.device.type == "cpu"):
        validate_cu_seqlens(cu_seqlens, R // 2)


def _launch_forward(q, k, v, bounds, scale, count=None, cfg=None):
    """O and LSE (log2 units). `cfg`: one configuration of the autotune space (None: picked by `_pick`)."""
    R, H, D = q.shape
    L = R // 2
    o = _empty(q.shape, q.dtype, q.device)
    lse = _empty((H, R), torch.float32, q.device)
    counts = count if count is not None else lse  # a valid pointer; written only with COUNT
    scratch = _empty((L, H, D), torch.float32, q.device)  # noisy rows' phase-1 state

    def launch(cfg):  # DO, DELTA and DQ are read only with BACKWARD: any valid pointer serves
        _bd_attn_query_kernel[(2 * triton.cdiv(L, cfg["BM"]), H)](
            Q=q, K=k, V=v, O=o, LSE=lse, DO=q, DELTA=lse, DQ=o, SCRATCH=scratch, BOUNDS=bounds, COUNTS=counts, L=L,
            qk_scale=scale * LOG2E, scale=scale, H=H, D=D, SUB=SUB, SUB_N=SUB_N, BACKWARD=False,
            COUNT=count is not None, PRECISION=PRECISION, **cfg)

    launch(cfg or _pick("forward", q, launch))
    return o, lse


def _launch_backward(q, k, v, o, lse, do, q_bounds, k_bounds, scale, count=None, cfgs=None):
    """dQ, dK, dV. `cfgs`: (dQ configuration, dK/dV configuration), or None to pick them (`_pick`)."""
    R, H, D = q.shape
    L = R // 2
    delta = _empty(lse.shape, torch.float32, q.device)
    _bd_attn_delta_kernel[(triton.cdiv(R, 64), H)](O=o, DO=do, DELTA=delta, L=L, H=H, D=D, BM=64)
    dq, dk, dv = (_empty(q.shape, q.dtype, q.device) for _ in range(3))
    dq_count, dkdv_count = (lse, lse) if count is None else count  # valid pointers; written only with COUNT
    common = dict(H=H, D=D, SUB=SUB, SUB_N=SUB_N, COUNT=count is not None, PRECISION=PRECISION)
    scratch = _empty((L, H, D), torch.float32, q.device)  # noisy rows' partial dQ

    def launch_dq(cfg):  # O is not read with BACKWARD
        _bd_attn_query_kernel[(2 * triton.cdiv(L, cfg["BM"]), H)](
            Q=q, K=k, V=v, O=o, LSE=lse, DO=do, DELTA=delta, DQ=dq, SCRATCH=scratch, BOUNDS=q_bounds,
            COUNTS=dq_count, L=L, qk_scale=scale * LOG2E, scale=scale, BACKWARD=True, **common, **cfg)

    def launch_dkdv(cfg):
        _bd_attn_dkdv_kernel[(2 * triton.cdiv(L, cfg["BM"]), H)](
            Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DK=dk, DV=dv, BOUNDS=k_bounds, COUNTS=dkdv_count, L=L,
            qk_scale=scale * LOG2E, scale=scale, **common, **cfg)

    dq_cfg, dkdv_cfg = cfgs or (None, None)
    launch_dq(dq_cfg or _pick("dq", q, launch_dq))
    launch_dkdv(dkdv_cfg or _pick("dkdv", q, launch_dkdv))
    return dq, dk, dv


# The CPU path cuts each document into chunks of about CPU_CHUNK positions, cut at block starts, and runs one
# SDPA call per chunk on only the keys its rows may see: the chunk's noisy and clean queries against the clean keys
# up to the chunk's end and the chunk's own noisy keys. A dense call per document computes (2n)^2 entries where
# fewer than half are allowed; chunks of 64 compute 1.4 n^2 for n = 512 (2.9x less), and fewer chunks cost a call
# each on top (bench/bench_bd_attention.py cpu measures it).
CPU_CHUNK = 64


@functools.lru_cache(maxsize=16)  # a chunk's own mask: every interior chunk of every document shares one
def _chunk_bias(phase: int, m: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive (2m, 2m) mask of m positions, the first `phase` positions into its block, over themselves:
    queries noisy then clean, keys clean then noisy (the reference's mask, its key halves swapped)."""
    allowed = reference.bd_attention_mask(torch.tensor([-phase, m]), block_size)  # (2m, 2m), noisy rows first
    allowed = torch.cat([allowed[:, m:], allowed[:, :m]], 1)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))


@functools.lru_cache(maxsize=16)  # one entry per document shape: each layer's forward and backward reuse it
def _cpu_chunks(offset: int, n: int, block_size: int, chunk: int, dtype: torch.dtype):
    """[(a, b, bias)] for a document of n positions whose first sits `offset` positions after its start: the
    chunk [a, b) of its positions and the additive (1, 1, 2(b-a), b + b-a) mask of the chunk's queries (noisy
    then clean) over its keys (clean [0, b), then noisy [a, b)). Chunks start at block starts, so every clean key
    before a chunk is in an earlier block than all its queries, and both halves see it."""
    chunk = max(block_size, chunk // block_size * block_size)
    cuts = [0, *range(chunk - offset % chunk if offset % chunk else chunk, n, chunk), n]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        own = _chunk_bias((offset + a) % block_size, b - a, block_size, dtype)  # (2(b-a), 2(b-a))
        bias = torch.cat([own.new_zeros(own.shape[0], a), own], 1)
        out.append((a, b, bias[None, None]))
    return out


def _cpu_attention_calls(q, cu_seqlens, block_size):
    """Per chunk of every document: the chunk's query rows and key rows in the 2L layout, and its mask."""
    L = q.shape[0] // 2
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        first = max(start, 0)
        for a, b, bias in _cpu_chunks(first - start, end - first, block_size, CPU_CHUNK, q.dtype):  # CPU tensors only
            noisy, clean = slice(first + a, first + b), slice(L + first + a, L + first + b)
            yield (noisy, clean), (slice(L + first, L + first + b), noisy), bias


def _heads_first(x, rows):  # (R, H, D) rows -> (1, H, n, D)
    return torch.cat([x[r] for r in rows]).transpose(0, 1)[None]


def _per_rows(x, rows):  # (1, H, n, ...) -> one (H, rows, ...) piece per slice of `rows`: _heads_first undone
    at = 0
    for r in rows:
        yield r, x[0, :, at:at + r.stop - r.start]
        at += r.stop - r.start


def _cpu_forward(q, k, v, cu_seqlens, block_size, scale):
    """The CPU path: the kernels SDPA itself runs on CPU (flash attention with a mask) one chunk at a time, which
    also return each row's log-sum-exp for the backward."""
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    for q_rows, k_rows, bias in _cpu_attention_calls(q, cu_seqlens, block_size):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q, q_rows), _heads_first(k, k_rows), _heads_first(v, k_rows), attn_mask=bias, scale=scale)
        for rows, piece in _per_rows(o, q_rows):
            out[rows] = piece.transpose(0, 1)
        for rows, piece in _per_rows(l, q_rows):
            lse[:, rows] = piece.float() * LOG2E  # the kernels' unit: log2
    return out, lse


def _cpu_backward(do, q, k, v, o, lse, cu_seqlens, block_size, scale):
    dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))  # a key's dK/dV sums over the chunks that see it
    for q_rows, k_rows, bias in _cpu_attention_calls(q, cu_seqlens, block_size):
        lse_rows = torch.cat([lse[:, rows] for rows in q_rows], 1) / LOG2E  # (H, 2n)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(do, q_rows), _heads_first(q, q_rows), _heads_first(k, k_rows), _heads_first(v, k_rows),
            _heads_first(o, q_rows), lse_rows[None], 0.0, False, attn_mask=bias, scale=scale)
        for g, grad, rows in ((dq, gq, q_rows), (dk, gk, k_rows), (dv, gv, k_rows)):
            for r, piece in _per_rows(grad, rows):
                g[r] += piece.transpose(0, 1)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# The operator: torch.ops.bdiff.bd_attention (and its backward), CPU and CUDA, fake and autograd
# ---------------------------------------------------------------------------------------------------
# A custom_op, not a triton_op: the op is opaque to torch.compile, so a compiled model keeps one graph
# around it, and the CPU kernel can run the PyTorch reference (or the interpreter), which a traced
# triton_op body cannot choose at run time.

@torch.library.custom_op("bdiff::bd_attention", mutates_args=())
def _bd_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int,
                     scale: float | None = None, schedule: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (2L, H, D) in q's dtype, lse (H, 2L) float32: log2 of each row's softmax denominator over
    the scaled scores, saved for the backward; not differentiable)."""
    _validate(q, k, v, cu_seqlens, block_size, schedule)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton(q):
        return _cpu_forward(q, k, v, cu_seqlens, block_size, scale)
    with on_device(q):
        if schedule is None:
            schedule = schedule_bounds(cu_seqlens, q.shape[0] // 2, block_size)
        return _launch_forward(q.contiguous(), k.contiguous(), v.contiguous(), schedule[0], scale)


@_bd_attention_op.register_fake
def _(q, k, v, cu_seqlens, block_size, scale=None, schedule=None):
    _validate(q, k, v, cu_seqlens, block_size, schedule, values=False)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("bdiff::bd_attention_backward", mutates_args=())
def _bd_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              o: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int,
                              scale: float | None = None, schedule: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `bd_attention` for the output gradient `do`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton(q):
        return _cpu_backward(do, q, k, v, o, lse, cu_seqlens, block_size, scale)
    with on_device(q):
        if schedule is None:
            schedule = schedule_bounds(cu_seqlens, q.shape[0] // 2, block_size)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return _launch_backward(q, k, v, o.contiguous(), lse.contiguous(), do.contiguous(), schedule[0],
                                schedule[1], scale)


@_bd_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, block_size, scale=None, schedule=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, block_size, scale, schedule = (list(inputs) + [None, None])[:7]
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, schedule)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens, schedule = ctx.saved_tensors
    dq, dk, dv = torch.ops.bdiff.bd_attention_backward(do, q, k, v, o, lse, cu_seqlens, ctx.block_size, ctx.scale,
                                                       schedule)
    return dq, dk, dv, None, None, None, None


_bd_attention_op.register_autograd(_backward, setup_context=_setup_context)


# FLOPs for torch.utils.flop_counter: entries the kernels compute (computed_entries, from the schedule's values, so
# the counter must see real index tensors) times 2·D per dot: forward QKᵀ and PV (4D); dQ recomputes S and
# forms dP and dS·K (6D); dK/dV recomputes Sᵀ and forms Pᵀ·dO, V·dOᵀ and dSᵀ·Q (8D).
FLOPS_PER_ENTRY = {"forward": 4, "dq": 6, "dkdv": 8}  # times the head dim


def _flops(q, kernels, cu_seqlens, block_size, schedule):
    R, H, D = q.shape
    with unset_fake_temporarily():  # the counter may run under a fake-tensor mode; the layout must be real
        if isinstance(schedule if schedule is not None else cu_seqlens, FakeTensor):
            raise ValueError("counting bd_attention FLOPs needs the real layout: pass real cu_seqlens/schedule "
                             "tensors (the FLOPs depend on the documents)")
        schedule = schedule_bounds(cu_seqlens.cpu(), R // 2, block_size) if schedule is None else schedule
        return sum(FLOPS_PER_ENTRY[kn] * D * H * computed_entries(schedule, kn, kernel_config(kn, D, q.dtype, _arch(q)))
                   for kn in kernels)


@register_flop_formula(torch.ops.bdiff.bd_attention, get_raw=True)
def _(q, k, v, cu_seqlens, block_size, scale=None, schedule=None, *, out_val=None):
    return _flops(q, ("forward",), cu_seqlens, block_size, schedule)


@register_flop_formula(torch.ops.bdiff.bd_attention_backward, get_raw=True)
def _(do, q, k, v, o, lse, cu_seqlens, block_size, scale=None, schedule=None, *, out_val=None):
    return _flops(q, ("dq", "dkdv"), cu_seqlens, block_size, schedule)


def bd_attention(q, k, v, cu_seqlens, block_size, scale=None, schedule=None):
    """Block-diffusion attention, q/k/v (2L, H, D) -> (2L, H, D); semantics of `reference.bd_attention_ref`.
    CUDA runs the Triton kernels, CPU the reference (the kernels through the interpreter with
    TRITON_INTERPRET=1). `schedule`: `schedule_bounds(...)`, built once and shared by every layer."""
    return torch.ops.bdiff.bd_attention(q, k, v, cu_seqlens, block_size, scale, schedule)[0]


def count_work(q, k, v, cu_seqlens, block_size, scale=None, backward=False, configs=None):
    """Run the kernels in counting mode. Returns {kernel: (entries computed, entries computed unmasked)}
    for forward, and with backward=True for the dQ and dK/dV kernels too. `configs`: {kernel: configuration}
    to count other tiles than the defaults."""
    _validate(q, k, v, cu_seqlens, block_size, None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    R, H, D = q.shape
    q_bounds, k_bounds = schedule_bounds(cu_seqlens, R // 2, block_size)
    cfg = {kernel: (configs or {}).get(kernel) or kernel_config(kernel, D, q.dtype, _arch(q))
           for kernel in ("forward", "dq", "dkdv")}

    def counters(kernel):  # two int32 per program: entries computed, of which unmasked
        tiles = 2 * triton.cdiv(R // 2, cfg[kernel]["BM"])
        return torch.zeros(2 * tiles * H, dtype=torch.int32, device=q.device)

    fwd = counters("forward")
    with on_device(q):
        o, lse = _launch_forward(q, k, v, q_bounds, scale, count=fwd, cfg=cfg["forward"])
    result = {"forward": tuple(fwd.view(-1, 2).long().sum(0).tolist())}
    if backward:
        dq_c, dkv_c = counters("dq"), counters("dkdv")
        with on_device(q):
            _launch_backward(q, k, v, o, lse, torch.randn_like(o), q_bounds, k_bounds, scale, count=(dq_c, dkv_c),
                             cfgs=(cfg["dq"], cfg["dkdv"]))
        result["dq"] = tuple(dq_c.view(-1, 2).long().sum(0).tolist())
        result["dkdv"] = tuple(dkv_c.view(-1, 2).long().sum(0).tolist())
    return result


def computed_entries(schedule: torch.Tensor, kernel: str, cfg: dict) -> int:
    """Entries (query, key pairs) one head of `kernel` computes under configuration `cfg`, from the schedule
    alone: the kernels' loop bounds replayed on the host, no kernel run (tests check it against count_work).
    It gives the FLOP counts (torch.utils.flop_counter) and the work ratio of every autotune configuration."""
    L = schedule.shape[1] // 2
    # numpy, not torch: flop counters call this while a fake-tensor mode may be active
    table = schedule[1 if kernel == "dkdv" else 0].cpu().numpy().astype(np.int64)  # (2L, 6)
    BM, BN = cfg["BM"], cfg["BN"]
    T = -(-L // BM)

    def rows(half, offset, n):  # (T, n): each tile's rows from `offset`, clamped like _rows in the kernels
        first = half * L + np.arange(T)[:, None] * BM + offset
        return np.minimum(first + np.arange(n), half * L + L - 1)

    def chunks(r, col, n):  # chunks of n visited by each tile for the range in columns (col, col + 1)
        span = table[r, col + 1].max(-1) - table[r, col].min(-1)
        return int(((np.maximum(span, 0) + n - 1) // n).sum())

    diag, noisy, clean = DIAGONAL.value, NOISY.value, CLEAN.value
    diagonal = sum(chunks(rows(0, i * SUB, SUB), diag, SUB_N) for i in range(BM // SUB)) * SUB * SUB_N
    if kernel == "dkdv":  # noisy keys: the diagonal; clean keys: segments 1 and 2
        return diagonal + (chunks(rows(1, 0, BM), noisy, BN) + chunks(rows(1, 0, BM), clean, BN)) * BM * BN
    # queries: segment 2 for both halves, then the diagonal for noisy tiles
    return diagonal + (chunks(rows(0, 0, BM), clean, BN) + chunks(rows(1, 0, BM), clean, BN)) * BM * BN


def compile_configs(arch: int) -> list[dict]:
    """Every configuration the launchers above may pick on a GPU of compute capability `arch` (80, 86, 89, 90),
    the whole autotune space included, for kernels/compile_check.py."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    configs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t, name = ptr[dtype], str(dtype).removeprefix("torch.")
        for D in (64, 128):
            common = dict(H=6, D=D, SUB=SUB, SUB_N=SUB_N, COUNT=False, PRECISION=PRECISION)
            types = dict(LSE="*fp32", DELTA="*fp32", SCRATCH="*fp32", BOUNDS="*i32", COUNTS="*i32", L="i32",
                         qk_scale="fp32", scale="fp32")  # other pointers: the operands' dtype
            for kernel in ("forward", "dq", "dkdv"):
                for i, cfg in enumerate(kernel_configs(kernel, D, dtype, arch)):
                    constexprs = dict(common, BM=cfg["BM"], BN=cfg["BN"])
                    if kernel != "dkdv":
                        constexprs["BACKWARD"] = kernel == "dq"
                    configs.append(dict(
                        name=f"bd_attention {kernel} {name} D={D}" + (f" (autotune {i})" if i else ""),
                        fn=_bd_attn_dkdv_kernel if kernel == "dkdv" else _bd_attn_query_kernel,
                        pointer=t, types=types, constexprs=constexprs,
                        options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                        hgmma=dtype != torch.float32))
            configs.append(dict(
                name=f"bd_attention delta {name} D={D}", fn=_bd_attn_delta_kernel,
                pointer=t, types=types, constexprs=dict(H=6, D=D, BM=64), options=dict(num_warps=4, num_stages=1),
                hgmma=False))
    return configs
