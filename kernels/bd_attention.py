"""Block-diffusion attention in Triton, forward and backward (the attention rules of docs/design.md §2).

q is (2L, H, D), k and v (2L, Hkv, D) with Hkv dividing H (grouped-query attention, as Llama and Qwen use it: query
head h reads key/value head h // (H / Hkv); Hkv = H is plain multi-head attention). Rows 0..L-1 are the noisy copy
x_t, rows L..2L-1 the clean copy x_0. For a position p
with document start s, document end e, block start b0 and block end b1 (blocks restart at each document),
every rule of the mask is one contiguous range of positions:

    noisy query p:  noisy keys [b0, b1)   (its own block)      clean keys [s, b0)   (earlier blocks)
    clean query p:  clean keys [s, b1)    (block-causal)
    noisy key p:    noisy queries [b0, b1)
    clean key p:    noisy queries [b1, e)                     clean queries [b0, e)

So the schedule is a (2L, 6) int32 table of ranges built from `cu_seqlens` and `block_size` alone; no mask
is ever materialized. A tile of rows (never straddling the two halves) visits the union of its rows' ranges in
chunks, and sorts them into tile classes before it starts: the chunks every row of the tile sees wholly (full:
no element mask is computed, the loop carries no mask code at all) and the chunks at the range's two ends that
some row sees only in part (partial: masked). Chunks no row sees are never visited. The noisy<->noisy "diagonal"
range is one block wide, so it has its own chunk width (DN), and the noisy key tiles of dK/dV their own row
count (BMD): both keep the work near the allowed entries (bench/bench_bd_attention.py counts it, COUNT=True).
A grid of heads x tiles runs each tile's heads side by side, and with LPT (on unless a configuration says
otherwise) the tiles most work first (tile_order), so that no long tile starts last and holds the GPU's last wave.

Kernels: forward and dQ share `_bd_attn_query_kernel` (one tile of query rows, one query head); dK/dV
`_bd_attn_dkdv_kernel` (one tile of key rows, one key/value head, summed over its group's query heads), which
with ATOMIC_DQ also adds each chunk's dQ into an fp32 buffer (FlashAttention-2's one-pass backward: S and dP
computed once per entry instead of twice, at the price of atomic adds and a sum order that varies from run to
run); `_bd_attn_delta_kernel` the rowsum(dO * O) they share.

Table columns: (lo, hi) pairs of segment 0 (diagonal, other-half rows 0..L-1), segment 1 (other rows
0..L-1), segment 2 (other rows L..2L-1); named DIAGONAL, NOISY and CLEAN below. "Other" rows are keys for a query
tile, queries for a key tile.

Public: `bd_attention(q, k, v, cu_seqlens, block_size, scale, schedule)` (the operator torch.ops.bdiff.bd_attention,
also `from bdiff.ops import bd_attention`), `schedule_bounds` (the table, built once per sequence),
`count_work` / `computed_entries` (work accounting), `kernel_config(s)`, `TUNING_SPACE` and `compile_configs`
(what ships, what bench/tune_attention.py sweeps). Map of this file, top-down: the @triton.jit chunk loops and
kernels; the host side (tiles, the schedule, validation, launchers, the CPU path); the operator with its fake
implementation and autograd; FLOP formulas; `bd_attention`; accounting; `compile_configs`.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils.flop_counter import register_flop_formula

from . import reference, tiles
from ._device import TileConfig, on_device, use_triton
from ._device import arch as _arch

LOG2E = 1.4426950408889634
# The schedule table (schedule_bounds, the module docstring): per row, a (lo, hi) pair of columns per segment.
COLUMNS = tl.constexpr(6)
DIAGONAL = tl.constexpr(0)  # segment 0: the other half's rows 0..L-1 of the row's own block
NOISY = tl.constexpr(2)  # segment 1: other rows 0..L-1 (clean keys: the noisy queries of later blocks)
CLEAN = tl.constexpr(4)  # segment 2: other rows L..2L-1
HEAD_DIMS = (16, 32, 64, 128)  # 64 and 128: the record's and the tests' GPU shapes; 32: the demo's; 16: CPU checks
MAX_BLOCK_SIZE = 128


@triton.jit
def _chunk_classes(lo, hi, BN: tl.constexpr):
    """Tile classes of one segment: the union [a, e) of the rows' ranges [lo, hi) cut into chunks of BN from a.
    Chunks in [a, f0) and [f1, e) are partial (some row sees only part of them, or none of them); chunks in
    [f0, f1) are full (every row sees all of them). f0 is the first chunk start past every row's lo, f1 the end of
    the last chunk before every row's hi. A row with an empty range (lo == hi) leaves no full chunk."""
    a = tl.min(lo, axis=0)
    e = tl.max(hi, axis=0)
    f0 = tl.minimum(a + tl.cdiv(tl.max(lo, axis=0) - a, BN) * BN, e)
    f1 = f0 + tl.maximum(tl.min(hi, axis=0) - f0, 0) // BN * BN
    return a, f0, f1, e


@triton.jit
def _key_chunk(K, V, key_row0, c0, c_hi, stride, cols, BN: tl.constexpr, MASKED: tl.constexpr):
    """Positions kp (BN,) of the chunk from c0, and their keys and values (BN, D); in a partial chunk the rows at
    or past c_hi read as zeros (a full chunk lies wholly inside the range: no bounds check)."""
    kp = c0 + tl.arange(0, BN)
    offs = (key_row0 + kp)[:, None] * stride + cols[None, :]
    if MASKED:
        k = tl.load(K + offs, mask=(kp < c_hi)[:, None], other=0.0)
        v = tl.load(V + offs, mask=(kp < c_hi)[:, None], other=0.0)
    else:
        k = tl.load(K + offs)
        v = tl.load(V + offs)
    return kp, k, v


@triton.jit
def _fwd_chunks(acc, m, l, entries, q, K, V, key_row0, c_lo, c_hi, lo, hi, stride, cols, qk_scale,
                ROWS: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the chunks [c_lo, c_hi) of keys (rows key_row0 + position). State (acc, m, l): the
    unnormalized output (ROWS, D), the running max of the log2-scaled scores, the running denominator."""
    for c0 in range(c_lo, c_hi, BN):
        kp, k, v = _key_chunk(K, V, key_row0, c0, c_hi, stride, cols, BN, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (ROWS, BN), unscaled
        if MASKED:
            s = tl.where((kp[None, :] >= lo[:, None]) & (kp[None, :] < hi[:, None]), s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet stays at zero
            p = tl.exp2(s - m_safe[:, None])
        else:  # every row sees every key: the max is finite, and the scale folds into one FMA (qk_scale > 0)
            m_new = tl.maximum(m, tl.max(s, axis=1) * qk_scale)
            m_safe = m_new
            p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
        entries += ROWS * BN
    return acc, m, l, entries


@triton.jit
def _dq_chunks(dq, entries, q, do, lse, delta, K, V, key_row0, c_lo, c_hi, lo, hi, stride, cols, qk_scale,
               ROWS: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS K over the chunks [c_lo, c_hi) of keys; lse (log2) and delta per query row."""
    for c0 in range(c_lo, c_hi, BN):
        kp, k, v = _key_chunk(K, V, key_row0, c0, c_hi, stride, cols, BN, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])  # (ROWS, BN)
        if MASKED:
            p = tl.where((kp[None, :] >= lo[:, None]) & (kp[None, :] < hi[:, None]), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        entries += ROWS * BN
    return dq, entries


@triton.jit
def _dkdv_chunks(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, query_row0, c_lo, c_hi, lo, hi, stride, cols,
                 lse_offs, qk_scale, ROWS: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr,
                 ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr):
    """dv += Pᵀ dO and dk += dSᵀ Q over the chunks [c_lo, c_hi) of queries (rows query_row0 + position); with
    ATOMIC_DQ also DQ[queries] += dS K, added atomically into the fp32 buffer (unscaled), from the `valid` key rows
    only (a tile's last rows may repeat a row: _rows)."""
    for c0 in range(c_lo, c_hi, BN):
        qp = c0 + tl.arange(0, BN)
        rows = query_row0 + qp
        offs = rows[:, None] * stride + cols[None, :]
        if MASKED:
            q = tl.load(Q + offs, mask=(qp < c_hi)[:, None], other=0.0)  # (BN, D)
            do = tl.load(DO + offs, mask=(qp < c_hi)[:, None], other=0.0)
            lse = tl.load(LSE + lse_offs + rows, mask=qp < c_hi, other=0.0)
            delta = tl.load(DELTA + lse_offs + rows, mask=qp < c_hi, other=0.0)
        else:
            q = tl.load(Q + offs)
            do = tl.load(DO + offs)
            lse = tl.load(LSE + lse_offs + rows)
            delta = tl.load(DELTA + lse_offs + rows)
        pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # (ROWS, BN)
        if MASKED:
            pt = tl.where((qp[None, :] >= lo[:, None]) & (qp[None, :] < hi[:, None]), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dst = tl.where(valid[:, None], dst, 0.0)
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PRECISION)  # (BN, D)
            if MASKED:
                tl.atomic_add(DQ + offs, dq, mask=(qp < c_hi)[:, None], sem="relaxed")
            else:
                tl.atomic_add(DQ + offs, dq, sem="relaxed")
        entries += ROWS * BN
    return dk, dv, entries


@triton.jit
def _rows(first, end, N: tl.constexpr):
    """N rows from `first`; rows at or past `end` repeat row end-1 (computed, never stored). (rows, valid)"""
    offs = first + tl.arange(0, N)
    return tl.minimum(offs, end - 1), offs < end


@triton.jit
def _bounds(BOUNDS, rows, COL: tl.constexpr):
    """The ranges [lo, hi) of `rows` in table columns (COL, COL + 1)."""
    return tl.load(BOUNDS + rows * COLUMNS + COL), tl.load(BOUNDS + rows * COLUMNS + COL + 1)


@triton.jit
def _bd_attn_query_kernel(Q, K, V, O, LSE, DO, DELTA, DQ, BOUNDS, ORDER, COUNTS, L, qk_scale, scale,
                          H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          DN: tl.constexpr, LPT: tl.constexpr, BACKWARD: tl.constexpr, COUNT: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Forward (O, LSE) or, with BACKWARD, dQ for one tile of BM query rows and one head: the clean keys of
    segment 2 in chunks of BN (partial, full, partial), then for noisy tiles their own blocks' noisy keys (the
    diagonal) in partial chunks of DN, all in one online softmax (or one dQ sum) kept in registers. Query head h
    reads key/value head h // (H / HKV) (grouped-query attention; HKV == H without groups)."""
    h = tl.program_id(0)  # the grid's first axis runs fastest: a tile's heads side by side
    tile = tl.program_id(1)
    if LPT:  # the tiles most work first (tile_order)
        tile = tl.load(ORDER + tile)
    tiles_per_half = tl.cdiv(L, BM)
    half = tile // tiles_per_half  # noisy tiles first
    start = half * L + (tile % tiles_per_half) * BM
    rows, valid = _rows(start, half * L + L, BM)
    stride = H * D  # q, o, do, dq: (2L, H, D) contiguous
    cols = h * D + tl.arange(0, D)  # this head's columns
    offs = rows[:, None] * stride + cols[None, :]
    k_stride = HKV * D  # k, v: (2L, HKV, D) contiguous
    k_cols = h // (H // HKV) * D + tl.arange(0, D)  # its group's key/value head
    q = tl.load(Q + offs)  # (BM, D)
    acc = tl.zeros((BM, D), dtype=tl.float32)  # the output accumulator, or dQ
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BM,), dtype=tl.float32)
    entries = tile * 0  # an int32 scalar the chunk loops carry
    lo, hi = _bounds(BOUNDS, rows, CLEAN)
    a, f0, f1, e = _chunk_classes(lo, hi, BN)
    if BACKWARD:
        do = tl.load(DO + offs)
        lse = tl.load(LSE + h * 2 * L + rows)
        delta = tl.load(DELTA + h * 2 * L + rows)
        acc, entries = _dq_chunks(acc, entries, q, do, lse, delta, K, V, L, a, f0, lo, hi, k_stride, k_cols, qk_scale,
                                  BM, BN, True, PRECISION)
        acc, entries = _dq_chunks(acc, entries, q, do, lse, delta, K, V, L, f0, f1, lo, hi, k_stride, k_cols, qk_scale,
                                  BM, BN, False, PRECISION)
        acc, entries = _dq_chunks(acc, entries, q, do, lse, delta, K, V, L, f1, e, lo, hi, k_stride, k_cols, qk_scale,
                                  BM, BN, True, PRECISION)
        if half == 0:
            lo, hi = _bounds(BOUNDS, rows, DIAGONAL)
            acc, entries = _dq_chunks(acc, entries, q, do, lse, delta, K, V, 0, tl.min(lo, axis=0),
                                      tl.max(hi, axis=0), lo, hi, k_stride, k_cols, qk_scale, BM, DN, True,
                                      PRECISION)
        tl.store(DQ + offs, (acc * scale).to(DQ.dtype.element_ty), mask=valid[:, None])
    else:
        acc, m, l, entries = _fwd_chunks(acc, m, l, entries, q, K, V, L, a, f0, lo, hi, k_stride, k_cols, qk_scale,
                                         BM, BN, True, PRECISION)
        acc, m, l, entries = _fwd_chunks(acc, m, l, entries, q, K, V, L, f0, f1, lo, hi, k_stride, k_cols, qk_scale,
                                         BM, BN, False, PRECISION)
        acc, m, l, entries = _fwd_chunks(acc, m, l, entries, q, K, V, L, f1, e, lo, hi, k_stride, k_cols, qk_scale,
                                         BM, BN, True, PRECISION)
        if half == 0:
            lo, hi = _bounds(BOUNDS, rows, DIAGONAL)
            acc, m, l, entries = _fwd_chunks(acc, m, l, entries, q, K, V, 0, tl.min(lo, axis=0), tl.max(hi, axis=0),
                                             lo, hi, k_stride, k_cols, qk_scale, BM, DN, True, PRECISION)
        tl.store(O + offs, (acc / l[:, None]).to(O.dtype.element_ty), mask=valid[:, None])  # l >= 1: a row sees itself
        tl.store(LSE + h * 2 * L + rows, m + tl.log2(l), mask=valid)
    if COUNT:  # entries computed, of which in full chunks
        slot = (h * tl.num_programs(1) + tile) * 2
        tl.store(COUNTS + slot, entries)
        tl.store(COUNTS + slot + 1, (f1 - f0) * BM)


@triton.jit
def _dkdv_segment(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, query_row0, a, f0, f1, e, lo, hi, stride, cols,
                  lse_offs, qk_scale, ROWS: tl.constexpr, BN: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                  PRECISION: tl.constexpr):
    """`_dkdv_chunks` over one segment's chunk classes for one query head: partial [a, f0), full [f0, f1), partial
    [f1, e)."""
    dk, dv, entries = _dkdv_chunks(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, query_row0, a, f0, lo, hi,
                                   stride, cols, lse_offs, qk_scale, ROWS, BN, True, ATOMIC_DQ, PRECISION)
    dk, dv, entries = _dkdv_chunks(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, query_row0, f0, f1, lo, hi,
                                   stride, cols, lse_offs, qk_scale, ROWS, BN, False, ATOMIC_DQ, PRECISION)
    return _dkdv_chunks(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, query_row0, f1, e, lo, hi, stride, cols,
                        lse_offs, qk_scale, ROWS, BN, True, ATOMIC_DQ, PRECISION)


@triton.jit
def _dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, BOUNDS, first, end, hk, L, qk_scale, scale, H: tl.constexpr,
               HKV: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr, NOISY_KEYS: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of ROWS key rows from `first` of key/value head hk, summed over the query heads of its group (H // HKV
    of them: grouped-query attention, the keys never repeated in memory): noisy keys over the noisy queries of their
    own block (the diagonal, partial chunks of BN), clean keys over segment 1 (noisy queries of later blocks) and
    segment 2 (clean queries), each in chunks of BN (partial, full, partial). The ranges are the rows' own, read once
    for the group. Without groups there is no head loop at all: a loop of one head costs the 16-bit 128-row tiles at
    head dim 64 their last registers on sm_90 (they spilled), and an unrolled group spills too. Returns (entries
    computed, of which in full chunks), summed over the group."""
    GROUP: tl.constexpr = H // HKV
    rows, valid = _rows(first, end, ROWS)
    kv_offs = rows[:, None] * (HKV * D) + (hk * D + tl.arange(0, D))[None, :]  # (2L, HKV, D) contiguous
    k = tl.load(K + kv_offs)  # (ROWS, D)
    v = tl.load(V + kv_offs)
    dk = tl.zeros((ROWS, D), dtype=tl.float32)
    dv = tl.zeros((ROWS, D), dtype=tl.float32)
    entries = first * 0  # int32 scalars the chunk loops carry
    full = first * 0
    h0 = hk * GROUP  # the group's first query head; q, do, dq: (2L, H, D); lse, delta: (H, 2L)
    if NOISY_KEYS:
        lo, hi = _bounds(BOUNDS, rows, DIAGONAL)
        c_lo, c_hi = tl.min(lo, axis=0), tl.max(hi, axis=0)
        if GROUP == 1:
            dk, dv, entries = _dkdv_chunks(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, 0, c_lo, c_hi, lo, hi,
                                           H * D, h0 * D + tl.arange(0, D), h0 * 2 * L, qk_scale, ROWS, BN, True,
                                           ATOMIC_DQ, PRECISION)
        else:
            for h in range(h0, h0 + GROUP):
                dk, dv, entries = _dkdv_chunks(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, 0, c_lo, c_hi, lo,
                                               hi, H * D, h * D + tl.arange(0, D), h * 2 * L, qk_scale, ROWS, BN,
                                               True, ATOMIC_DQ, PRECISION)
    else:
        for seg in tl.static_range(2):  # segment 1 (noisy queries), then segment 2 (clean queries)
            lo, hi = _bounds(BOUNDS, rows, NOISY + 2 * seg)
            a, f0, f1, e = _chunk_classes(lo, hi, BN)
            if GROUP == 1:
                dk, dv, entries = _dkdv_segment(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, seg * L, a, f0,
                                                f1, e, lo, hi, H * D, h0 * D + tl.arange(0, D), h0 * 2 * L, qk_scale,
                                                ROWS, BN, ATOMIC_DQ, PRECISION)
            else:
                for h in range(h0, h0 + GROUP):
                    dk, dv, entries = _dkdv_segment(dk, dv, entries, k, v, valid, Q, DO, LSE, DELTA, DQ, seg * L, a,
                                                    f0, f1, e, lo, hi, H * D, h * D + tl.arange(0, D), h * 2 * L,
                                                    qk_scale, ROWS, BN, ATOMIC_DQ, PRECISION)
            full += (f1 - f0) * ROWS * GROUP
    tl.store(DK + kv_offs, (dk * scale).to(DK.dtype.element_ty), mask=valid[:, None])
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=valid[:, None])
    return entries, full


@triton.jit
def _bd_attn_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, BOUNDS, ORDER, COUNTS, L, qk_scale, scale,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BMD: tl.constexpr, DN: tl.constexpr, LPT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                         COUNT: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV for one tile of key rows and one key/value head (`_dkdv_tile`, over its group's query heads): BM-row
    tiles of clean keys first (they carry most of the work), then BMD-row tiles of noisy keys, whose queries are
    their own block's (chunks of DN)."""
    hk = tl.program_id(0)  # the grid's first axis runs fastest: a tile's heads side by side
    tile = tl.program_id(1)
    if LPT:  # the tiles most work first (tile_order)
        tile = tl.load(ORDER + tile)
    clean_tiles = tl.cdiv(L, BM)
    if tile < clean_tiles:
        entries, full = _dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, BOUNDS, L + tile * BM, 2 * L, hk, L,
                                   qk_scale, scale, H, HKV, D, BM, BN, False, ATOMIC_DQ, PRECISION)
    else:
        entries, full = _dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, BOUNDS, (tile - clean_tiles) * BMD, L, hk, L,
                                   qk_scale, scale, H, HKV, D, BMD, DN, True, ATOMIC_DQ, PRECISION)
    if COUNT:  # entries computed, of which in full chunks
        slot = (hk * tl.num_programs(1) + tile) * 2
        tl.store(COUNTS + slot, entries)
        tl.store(COUNTS + slot + 1, full)


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

def precision(dtype: torch.dtype) -> str:
    """The dots' input precision for fp32 operands, as PyTorch's own matmuls are told
    (`torch.backends.cuda.matmul.allow_tf32`, or `torch.set_float32_matmul_precision("high")`): TF32 tensor cores
    only where the user allowed them, IEEE fp32 otherwise. 16-bit operands ignore it; the interpreter computes
    every dot in full fp32."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def kernel_config(kernel: str, D: int, dtype: torch.dtype, arch: int = 90, precision: str = "tf32", group: int = 1
                  ) -> TileConfig:
    """The heuristic default of one kernel ("forward", "dq" or "dkdv"): what runs where the committed table
    (kernels/bd_attention_tiles.json) has no entry, and the first configuration a one-time autotune tries. Every
    target (sm_80/86/89/90) compiles it without register spills (kernels/compile_check.py checks each).

    16-bit operands take FlashAttention's shapes: 128 query rows by 64 keys in the forward (FlexAttention's H100
    tiles at head dim 128), 128 rows by 32 keys for dQ and 128 keys by 32 queries for dK/dV (the Triton tutorial's
    backward), whose two fp32 (128, D) accumulators leave no room for wider chunks. Diagonal chunks of 32 rows and
    noisy key tiles of 32 rows keep the one-block-wide range from costing a full tile's width
    (bench/bench_bd_attention.py --configs). 128-row tiles take 8 warps (one Hopper warpgroup per 64 rows) where
    4 would spill: at head dim 128, and at 64 before Hopper; there, at head dim 128, the forward keeps 32-key chunks
    and dK/dV 64-key tiles, the shapes that fit without spilling. Pipelines are 3 stages deep on Hopper, 2 on the
    others, whose shared memory is smaller (100 KiB on sm_86/89).
    fp32 operands are twice the bytes: 16-key chunks; TF32 dots keep 64-row tiles (dK/dV at head dim 128: 32 rows and
    a 2-stage pipeline, the one shape found without spills on sm_90), IEEE fp32 dots run on the CUDA cores with their
    operands in registers and take 32-row tiles (16 for dQ at head dim 128).
    `group` (query heads per key/value head): a dK/dV program loops over its group's heads, which costs registers:
    16-bit 128-row tiles take 8 warps at every head dim (at 64 on sm_90, 4 spilled).
    """
    wide = D >= 128
    if dtype == torch.float32:
        cfg = dict(BM=64, BN=16, BMD=16, DN=16, num_warps=8 if wide else 4, num_stages=1)
        if precision == "ieee":
            cfg.update(BM=16 if wide and kernel == "dq" else 32, num_warps=8 if wide and kernel != "dq" else 4)
        elif wide and kernel == "dkdv":
            cfg.update(BM=32, num_stages=2)
    else:
        hopper = arch >= 90
        cfg = dict(BM=128, BN=64 if kernel == "forward" else 32, BMD=32, DN=32,
                   num_warps=8 if wide or not hopper else 4, num_stages=3 if hopper else 2)
        if wide and not hopper:  # what fits 255 registers a thread without spilling there
            cfg.update({"forward": dict(BN=32), "dq": {}, "dkdv": dict(BM=64)}[kernel])
        if kernel == "dkdv" and group > 1:
            cfg.update(num_warps=8)
    if kernel != "dkdv":
        del cfg["BMD"]
    return cfg


# What bench/tune_attention.py sweeps on a GPU for 16-bit operands (each kernel on its own: forward, dQ, dK/dV
# with dQ apart, dK/dV with an atomic dQ): FlashAttention's and FlexAttention's tile shapes and their neighbours.
# None spills on sm_90 (compile_check --space); on other GPUs, one that spills or does not fit the shared memory
# is measured as such and never wins.
TUNING_SPACE = {
    "forward": [dict(BM=bm, BN=bn, DN=dn, num_warps=bm // 16, num_stages=s)  # one warpgroup per 64 rows
                for bm, bn, dn, s in itertools.product((64, 128), (32, 64, 128), (16, 32), (2, 3, 4))
                if not (bm == bn == 128 and s == 4)  # 4 stages of 128x128 exceed Hopper's shared memory
                and not (bm == 64 and bn == 128)],  # a 64x128 fp32 score tile spills one warpgroup's registers
    "dq": [dict(BM=bm, BN=bn, DN=dn, num_warps=bm // 16, num_stages=s)
           for bm, bn, dn, s in itertools.product((64, 128), (16, 32, 64), (16, 32), (2, 3))],
    "dkdv": [dict(BM=bm, BN=bn, BMD=bmd, DN=32, num_warps=w, num_stages=s, ATOMIC_DQ=atomic)
             for bm, bn, bmd, w, s, atomic in itertools.product((64, 128), (16, 32, 64), (16, 32), (4, 8), (2, 3),
                                                                (False, True))
             if not (bm == 128 and w == 4)  # two fp32 (128, D) accumulators need 8 warps' registers
             and not (bn == 64 and (bm == 128 or w == 4 or (s == 3 and atomic)))  # these spill on sm_90
             and not (bn == 32 and w == 4 and atomic)],  # (python -m bdiff.kernels.compile_check --space)
}
# What a one-time autotune times on a GPU the table lacks (tiles.choose), after the default: a few shapes that
# compile everywhere, so that first run costs seconds, not the sweep's minutes.
RUNTIME_SPACE = {
    "forward": [dict(BM=64, BN=64, DN=32, num_warps=4), dict(BM=128, BN=32, DN=32, num_warps=8)],
    "dq": [dict(BM=64, BN=32, DN=32, num_warps=4), dict(BM=64, BN=64, DN=32, num_warps=8)],
    "dkdv": [dict(BM=64, BN=32, BMD=32, DN=32, num_warps=8), dict(BM=64, BN=16, BMD=16, DN=16, num_warps=8)],
}


def kernel_configs(kernel: str, D: int, dtype: torch.dtype, arch: int = 90, precision: str = "tf32", group: int = 1
                   ) -> list[TileConfig]:
    """A one-time autotune's space for one kernel on one GPU: the default first, then RUNTIME_SPACE (16-bit only:
    fp32 keeps its one configuration)."""
    default = kernel_config(kernel, D, dtype, arch, precision, group)
    if dtype == torch.float32:
        return [default]
    extra = [dict(cfg, num_stages=default["num_stages"]) for cfg in RUNTIME_SPACE[kernel]]
    return [default] + [cfg for cfg in extra if cfg != default]


def dtype_class(dtype: torch.dtype, precision: str, kernel: str = "", group: int = 1) -> str:
    """The dtype part of a shape class: fp32 configurations differ by the dots' precision, and dK/dV's by the query
    heads each key/value head serves (its programs loop over them)."""
    name = str(dtype).removeprefix("torch.")
    name = f"{name}-{precision}" if dtype == torch.float32 else name
    return f"{name}-g{group}" if kernel == "dkdv" and group > 1 else name


def _pick(kernel: str, q: torch.Tensor, k: torch.Tensor, precision: str, launch) -> TileConfig:
    """The configuration for this call (kernels/tiles.py: the committed table, the tile cache, or a one-time
    autotune that times each configuration of `kernel_configs` on the real inputs; the kernels write their outputs
    without accumulating, so trial runs leave no trace). The interpreter always takes the default."""
    D, L, group = q.shape[-1], q.shape[0] // 2, q.shape[1] // k.shape[1]
    space = kernel_configs(kernel, D, q.dtype, _arch(q), precision, group)
    if not q.is_cuda:
        return space[0]
    import triton.testing

    key = tiles.shape_class(kernel, dtype_class(q.dtype, precision, kernel, group), D, L)
    return tiles.choose("bd_attention", _arch(q), key, space,
                        lambda cfg: triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20))


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


def tile_work(side: torch.Tensor, kernel: str, cfg: dict) -> torch.Tensor:
    """Entries (query, key pairs) each tile of `kernel` computes for one head under `cfg`, tiles in the grid's order:
    (tiles,) int64 on `side`'s device, from the kernels' loop bounds replayed with torch ops (no kernel run, no
    host sync). `side`: the schedule's query side (forward, dQ) or key side (dK/dV), (2L, 6)."""
    L = side.shape[0] // 2
    table = side.long()

    def visited(half, n, col, chunk):  # (tiles,): the tiles of n rows of one half over the ranges in (col, col + 1)
        first = half * L + torch.arange(-(-L // n), device=side.device)[:, None] * n
        rows = (first + torch.arange(n, device=side.device)).clamp_max(half * L + L - 1)  # as _rows clamps them
        span = (table[rows, col + 1].amax(-1) - table[rows, col].amin(-1)).clamp_min(0)
        return (span + chunk - 1) // chunk * (n * chunk)

    diag, noisy, clean = DIAGONAL.value, NOISY.value, CLEAN.value
    if kernel == "dkdv":  # clean key tiles (segments 1 and 2), then noisy key tiles (the diagonal)
        return torch.cat([visited(1, cfg["BM"], noisy, cfg["BN"]) + visited(1, cfg["BM"], clean, cfg["BN"]),
                          visited(0, cfg["BMD"], diag, cfg["DN"])])
    # query tiles: noisy ones (segment 2, then the diagonal), then clean ones (segment 2)
    return torch.cat([visited(0, cfg["BM"], clean, cfg["BN"]) + visited(0, cfg["BM"], diag, cfg["DN"]),
                      visited(1, cfg["BM"], clean, cfg["BN"])])


# schedule tensor -> {tile shape: tile_order}: every layer of a step passes the same schedule, so the programs are
# sorted once per sequence, not once per call
_ORDERS = torch.utils.weak.WeakIdKeyDictionary()


def orders_of(schedule: torch.Tensor | None) -> dict:
    """The tile orders kept with `schedule` (a fresh dict where there is none to keep them with)."""
    return {} if schedule is None else _ORDERS.setdefault(schedule, {})


def tile_order(side: torch.Tensor, kernel: str, cfg: dict, orders: dict | None = None) -> torch.Tensor:
    """The tiles of `kernel`, most work first (tile_work, descending): (tiles,) int32 on `side`'s device. With LPT,
    the grid's programs (0..H-1, i) compute tile order[i] for the H heads, so the longest tiles start in the first
    wave and the last wave holds the shortest (longest-processing-time-first list scheduling). In the tiles' own
    order, the tiles that end long documents can start last and keep a few SMs busy while the rest wait: replaying
    the record's layouts on 132 SMs, one program each at a time (bench/bench_bd_attention.py --configs), the sm_90
    defaults end 5-12% after their work's bound, and 28-35% (dK/dV) when each head's tiles ran after the previous
    head's; with LPT 0-1%. Any permutation gives the same outputs: the order moves time only."""
    shape = ("dkdv" if kernel == "dkdv" else "query",) + tuple(cfg.get(k) for k in ("BM", "BN", "BMD", "DN"))
    if orders is not None and shape in orders:
        return orders[shape]
    order = torch.argsort(tile_work(side, kernel, cfg), descending=True, stable=True).to(torch.int32)
    if orders is not None:
        orders[shape] = order
    return order


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it with NaN to catch unwritten rows)."""
    return torch.empty(shape, dtype=dtype, device=device)


def validate_cu_seqlens(cu_seqlens: torch.Tensor, L: int) -> None:
    """Boundaries must increase strictly from cu_seqlens[0] <= 0 (minus the first document's offset: how many
    of its tokens precede the sequence) to L, with cu_seqlens[1] > 0. Reads the values: on a GPU tensor that is
    a host sync, so the op checks them only for CPU tensors; the training path checks its host-side copy once
    per sequence (bdiff/models/objective.py)."""
    c = cu_seqlens
    if not (int(c[0]) <= 0 < int(c[1]) and int(c[-1]) == L and bool((c[1:] > c[:-1]).all())):
        raise ValueError(f"cu_seqlens must increase strictly from a value <= 0 (minus the first document's offset) "
                         f"to L={L}, with cu_seqlens[1] > 0, got {c.tolist()[:8]}...")


def _validate(q, k, v, cu_seqlens, block_size, schedule, values=True, scale=None):
    """Shapes, dtypes and devices; with `values`, also cu_seqlens' boundaries, on every path alike (the reference,
    the interpreter, the GPU) whenever no `schedule` is given, and for CPU tensors always. On a GPU, reading them
    is a host sync: a caller that passes the schedule (the model does, built and checked on the host from the
    loader's tokens, bdiff/models/objective.py) vouches for the boundaries it was built from."""
    if q.ndim != 3:
        raise ValueError(f"q must be (2L, H, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.ndim != 3 or t.shape[0] != q.shape[0] or t.shape[2] != q.shape[2] or t.shape != k.shape:
            raise ValueError(f"{name} must be (2L, Hkv, D) with q's 2L={q.shape[0]} and D={q.shape[2]} (and k and v "
                             f"alike), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k and v have {k.shape[1]} heads, which must divide q's {q.shape[1]} (grouped-query "
                         f"attention: query head h reads key/value head h // (H / Hkv))")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number (the scores' factor, head_dim ** -0.5 by default), "
                         f"got {scale!r}")
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


# What one launch addresses: a grid's second axis holds at most 65,535 tiles, and with the smallest tiles (16 rows)
# 2L rows make 2·cdiv(L, 16); the kernels' offsets (row * H * D + column) are int32.
MAX_ROWS = 65_534 * 16


def _check_launch(q: torch.Tensor) -> None:
    R, H, D = q.shape
    if R > MAX_ROWS or R * H * D >= 2**31:
        raise ValueError(f"q has too many rows for the GPU kernels: 2L = {R} with {H} heads of {D} (at most "
                         f"{MAX_ROWS:,} rows and 2L·H·D < 2^31); split the sequence into several")


def _with_defaults(kernel: str, cfg: dict) -> dict:
    """A configuration with the flags it may leave out: LPT on, and for dK/dV no atomic dQ."""
    return dict(cfg, LPT=cfg.get("LPT", True), **({"ATOMIC_DQ": cfg.get("ATOMIC_DQ", False)} if kernel == "dkdv"
                                                   else {}))


def _query_kernel(q, k, v, bounds, scale, cfg, prec, o, lse, do=None, delta=None, dq=None, count=None, orders=None):
    """One launch of `_bd_attn_query_kernel`: the forward into (o, lse), or, given dq, dQ from (lse, do, delta).
    cfg["LPT"] (on unless False): the tiles most work first, sorted once per `orders` (orders_of). Returns Triton's
    compiled kernel (registers, spills: bench/tune_attention.py reads them)."""
    R, H, D = q.shape
    cfg = _with_defaults("forward", cfg)
    return _bd_attn_query_kernel[(H, 2 * triton.cdiv(R // 2, cfg["BM"]))](  # unused pointers: any valid one serves
        Q=q, K=k, V=v, O=o, LSE=lse, DO=q if do is None else do, DELTA=lse if delta is None else delta,
        DQ=o if dq is None else dq, BOUNDS=bounds, ORDER=tile_order(bounds, "forward", cfg, orders) if cfg["LPT"]
        else bounds, COUNTS=lse if count is None else count, L=R // 2, qk_scale=scale * LOG2E, scale=scale, H=H,
        HKV=k.shape[1], D=D, BACKWARD=dq is not None, COUNT=count is not None, PRECISION=prec, **cfg)


def _dkdv_kernel(q, k, v, do, lse, delta, dk, dv, dq, bounds, scale, cfg, prec, count=None, orders=None):
    """One launch of `_bd_attn_dkdv_kernel`. With cfg["ATOMIC_DQ"], dq is the fp32 buffer its dQ adds into (zeroed
    by the caller, unscaled); otherwise it is not touched. cfg["LPT"]: as in `_query_kernel`. Returns Triton's
    compiled kernel."""
    R, H, D = q.shape
    L = R // 2
    cfg = _with_defaults("dkdv", cfg)
    return _bd_attn_dkdv_kernel[(k.shape[1], triton.cdiv(L, cfg["BM"]) + triton.cdiv(L, cfg["BMD"]))](
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DK=dk, DV=dv, DQ=dq, BOUNDS=bounds,
        ORDER=tile_order(bounds, "dkdv", cfg, orders) if cfg["LPT"] else bounds,
        COUNTS=lse if count is None else count, L=L, qk_scale=scale * LOG2E, scale=scale, H=H, HKV=k.shape[1], D=D,
        COUNT=count is not None, PRECISION=prec, **cfg)


def _delta_kernel(o, do):
    """rowsum(dO * O) per row and head, (H, 2L) fp32."""
    R, H, D = o.shape
    delta = _empty((H, R), torch.float32, o.device)
    _bd_attn_delta_kernel[(triton.cdiv(R, 64), H)](O=o, DO=do, DELTA=delta, L=R // 2, H=H, D=D, BM=64)
    return delta


def _launch_forward(q, k, v, bounds, scale, count=None, cfg=None, orders=None):
    """O and LSE (log2 units). `cfg`: a configuration to run (None: `_pick`'s). `orders`: orders_of(the schedule)."""
    _check_launch(q)
    H = q.shape[1]
    o = _empty(q.shape, q.dtype, q.device)
    lse = _empty((H, q.shape[0]), torch.float32, q.device)
    prec = precision(q.dtype)

    def launch(cfg):
        return _query_kernel(q, k, v, bounds, scale, cfg, prec, o, lse, count=count, orders=orders)

    launch(cfg or _pick("forward", q, k, prec, launch))
    return o, lse


def _launch_backward(q, k, v, o, lse, do, q_bounds, k_bounds, scale, count=None, cfgs=None, orders=None):
    """dQ, dK, dV. `cfgs`: (dQ configuration, dK/dV configuration) to run, or None to pick them (`_pick`). A dK/dV
    configuration with ATOMIC_DQ computes dQ too (the dQ kernel does not run), unless PyTorch is asked for
    deterministic algorithms (`torch.use_deterministic_algorithms`): atomic adds sum in a varying order."""
    _check_launch(q)
    prec = precision(q.dtype)
    delta = _delta_kernel(o, do)
    dq, dk, dv = (_empty(x.shape, x.dtype, x.device) for x in (q, k, v))
    dq_count, dkdv_count = (None, None) if count is None else count

    def launch_dq(cfg):
        return _query_kernel(q, k, v, q_bounds, scale, cfg, prec, o, lse, do, delta, dq, count=dq_count,
                             orders=orders)

    def launch_dkdv(cfg):
        return _dkdv_kernel(q, k, v, do, lse, delta, dk, dv, dq, k_bounds, scale, cfg, prec, count=dkdv_count,
                            orders=orders)

    dq_cfg, dkdv_cfg = cfgs or (None, None)
    dkdv_cfg = dkdv_cfg or _pick("dkdv", q, k, prec, launch_dkdv)
    if dkdv_cfg.get("ATOMIC_DQ") and torch.are_deterministic_algorithms_enabled():
        dkdv_cfg = dict(dkdv_cfg, ATOMIC_DQ=False)
    if dkdv_cfg.get("ATOMIC_DQ"):
        dq_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _dkdv_kernel(q, k, v, do, lse, delta, dk, dv, dq_sum, k_bounds, scale, dkdv_cfg, prec, count=dkdv_count,
                     orders=orders)
        dq.copy_(dq_sum * scale)
    else:
        launch_dq(dq_cfg or _pick("dq", q, k, prec, launch_dq))
        launch_dkdv(dkdv_cfg)
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


def _kv_heads_first(x, rows, group):  # (R, Hkv, D) rows -> (1, H, n, D): a chunk's keys repeated for each query head
    return _heads_first(x, rows).repeat_interleave(group, 1)


def _cpu_forward(q, k, v, cu_seqlens, block_size, scale):
    """The CPU path: the kernels SDPA itself runs on CPU (flash attention with a mask) one chunk at a time, which
    also return each row's log-sum-exp for the backward. Grouped keys and values are repeated per query head one
    chunk at a time (the CPU's SDPA kernels take equal head counts)."""
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    for q_rows, k_rows, bias in _cpu_attention_calls(q, cu_seqlens, block_size):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q, q_rows), _kv_heads_first(k, k_rows, group), _kv_heads_first(v, k_rows, group),
            attn_mask=bias, scale=scale)
        for rows, piece in _per_rows(o, q_rows):
            out[rows] = piece.transpose(0, 1)
        for rows, piece in _per_rows(l, q_rows):
            lse[:, rows] = piece.float() * LOG2E  # the kernels' unit: log2
    return out, lse


def _cpu_backward(do, q, k, v, o, lse, cu_seqlens, block_size, scale):
    dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))  # a key's dK/dV sums over the chunks that see it
    group = q.shape[1] // k.shape[1]
    for q_rows, k_rows, bias in _cpu_attention_calls(q, cu_seqlens, block_size):
        lse_rows = torch.cat([lse[:, rows] for rows in q_rows], 1) / LOG2E  # (H, 2n)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(do, q_rows), _heads_first(q, q_rows), _kv_heads_first(k, k_rows, group),
            _kv_heads_first(v, k_rows, group), _heads_first(o, q_rows), lse_rows[None], 0.0, False, attn_mask=bias,
            scale=scale)
        gk, gv = (g.unflatten(1, (k.shape[1], group)).sum(2) for g in (gk, gv))  # each group's heads summed
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
    _validate(q, k, v, cu_seqlens, block_size, schedule, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton(q):
        return _cpu_forward(q, k, v, cu_seqlens, block_size, scale)
    with on_device(q):
        orders = orders_of(schedule)
        if schedule is None:
            schedule = schedule_bounds(cu_seqlens, q.shape[0] // 2, block_size)
        return _launch_forward(q.contiguous(), k.contiguous(), v.contiguous(), schedule[0], scale, orders=orders)


@_bd_attention_op.register_fake
def _(q, k, v, cu_seqlens, block_size, scale=None, schedule=None):
    _validate(q, k, v, cu_seqlens, block_size, schedule, values=False, scale=scale)
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
        orders = orders_of(schedule)
        if schedule is None:
            schedule = schedule_bounds(cu_seqlens, q.shape[0] // 2, block_size)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return _launch_backward(q, k, v, o.contiguous(), lse.contiguous(), do.contiguous(), schedule[0],
                                schedule[1], scale, orders=orders)


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
# forms dP and dS·K (6D); dK/dV recomputes Sᵀ and forms Pᵀ·dO, V·dOᵀ and dSᵀ·Q (8D), and dS·K with an atomic dQ
# (10D, and no dQ kernel).
FLOPS_PER_ENTRY = {"forward": 4, "dq": 6, "dkdv": 8, "dkdv+dq": 10}  # times the head dim


def configured(kernel: str, D: int, dtype: torch.dtype, arch: int, L: int, group: int = 1) -> TileConfig:
    """The configuration a call would run, without timing anything: the committed table's or the tile cache's,
    else the default."""
    prec = precision(dtype)
    found = tiles.lookup("bd_attention", arch, tiles.shape_class(kernel, dtype_class(dtype, prec, kernel, group), D, L))
    return (found and found[0]) or kernel_config(kernel, D, dtype, arch, prec, group)


def _flops(q, k, kernels, cu_seqlens, block_size, schedule):
    R, H, D = q.shape
    with unset_fake_temporarily():  # the counter may run under a fake-tensor mode; the layout must be real
        if isinstance(schedule if schedule is not None else cu_seqlens, FakeTensor):
            raise ValueError("counting bd_attention FLOPs needs the real layout: pass real cu_seqlens/schedule "
                             "tensors (the FLOPs depend on the documents)")
        schedule = schedule_bounds(cu_seqlens.cpu(), R // 2, block_size) if schedule is None else schedule
        cfgs = {kn: configured(kn, D, q.dtype, _arch(q), R // 2, H // k.shape[1]) for kn in ("forward", "dq", "dkdv")}
        atomic = cfgs["dkdv"].get("ATOMIC_DQ") and not torch.are_deterministic_algorithms_enabled()
        if atomic and "dq" in kernels:
            kernels = ("dkdv+dq",)
        return sum(FLOPS_PER_ENTRY[kn] * D * H * computed_entries(schedule, kn.split("+")[0],
                                                                  cfgs[kn.split("+")[0]]) for kn in kernels)


@register_flop_formula(torch.ops.bdiff.bd_attention, get_raw=True)
def _(q, k, v, cu_seqlens, block_size, scale=None, schedule=None, *, out_val=None):
    return _flops(q, k, ("forward",), cu_seqlens, block_size, schedule)


@register_flop_formula(torch.ops.bdiff.bd_attention_backward, get_raw=True)
def _(do, q, k, v, o, lse, cu_seqlens, block_size, scale=None, schedule=None, *, out_val=None):
    return _flops(q, k, ("dq", "dkdv"), cu_seqlens, block_size, schedule)


def bd_attention(q, k, v, cu_seqlens, block_size, scale=None, schedule=None):
    """Block-diffusion attention, q (2L, H, D), k and v (2L, Hkv, D) -> (2L, H, D), Hkv dividing H (query head h
    reads key/value head h // (H / Hkv): grouped-query attention); semantics of `reference.bd_attention_ref`.
    CUDA runs the Triton kernels, CPU the reference (the kernels through the interpreter with
    TRITON_INTERPRET=1). `schedule`: `schedule_bounds(...)`, built once and shared by every layer."""
    return torch.ops.bdiff.bd_attention(q, k, v, cu_seqlens, block_size, scale, schedule)[0]


def count_work(q, k, v, cu_seqlens, block_size, scale=None, backward=False, configs=None):
    """Run the kernels in counting mode. Returns {kernel: (entries computed, entries computed in full chunks)}
    for forward, and with backward=True for the dQ and dK/dV kernels too. `configs`: {kernel: configuration}
    to count other tiles than the defaults (a dK/dV configuration with ATOMIC_DQ counts dQ's entries in its own)."""
    _validate(q, k, v, cu_seqlens, block_size, None, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    R, H, D = q.shape
    q_bounds, k_bounds = schedule_bounds(cu_seqlens, R // 2, block_size)
    cfg = {kernel: (configs or {}).get(kernel) or kernel_config(kernel, D, q.dtype, _arch(q), precision(q.dtype),
                                                                H // k.shape[1])
           for kernel in ("forward", "dq", "dkdv")}

    def counters(programs, heads=H):  # two int32 per program: entries computed, of which in full chunks
        return torch.zeros(2 * programs * heads, dtype=torch.int32, device=q.device)

    L = R // 2
    fwd = counters(2 * triton.cdiv(L, cfg["forward"]["BM"]))
    with on_device(q):
        o, lse = _launch_forward(q, k, v, q_bounds, scale, count=fwd, cfg=cfg["forward"])
    result = {"forward": tuple(fwd.view(-1, 2).long().sum(0).tolist())}
    if backward:
        dq_c = counters(2 * triton.cdiv(L, cfg["dq"]["BM"]))
        dkv_c = counters(triton.cdiv(L, cfg["dkdv"]["BM"]) + triton.cdiv(L, cfg["dkdv"]["BMD"]), k.shape[1])
        with on_device(q):
            _launch_backward(q, k, v, o, lse, torch.randn_like(o), q_bounds, k_bounds, scale, count=(dq_c, dkv_c),
                             cfgs=(cfg["dq"], cfg["dkdv"]))
        if not cfg["dkdv"].get("ATOMIC_DQ"):
            result["dq"] = tuple(dq_c.view(-1, 2).long().sum(0).tolist())
        result["dkdv"] = tuple(dkv_c.view(-1, 2).long().sum(0).tolist())
    return result


def computed_entries(schedule: torch.Tensor, kernel: str, cfg: dict) -> int:
    """Entries (query, key pairs) one head of `kernel` computes under configuration `cfg`, from the schedule
    alone: tile_work summed on the host, no kernel run (tests check it against count_work). It gives the FLOP counts
    (torch.utils.flop_counter) and the work ratio of every configuration."""
    with unset_fake_temporarily():  # flop counters call this while a fake-tensor mode may be active
        return int(tile_work(schedule[1 if kernel == "dkdv" else 0].cpu(), kernel, cfg).sum())


def compile_configs(arch: int, space: bool = False) -> list[dict]:
    """Every configuration the launchers may run on a GPU of compute capability `arch` (80, 86, 89, 90), for
    kernels/compile_check.py: per dtype (fp32 with both dot precisions) and head dim, the default, the one-time
    autotune's space and the committed table's entries for `arch`; with `space`, TUNING_SPACE too, where
    bench/tune_attention.py sweeps it (bf16, head dim 128)."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    table = tiles.table("bd_attention").get(f"sm_{arch}", {})
    configs = []
    for dtype, prec in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                        (torch.float32, "ieee")):
        t, name = ptr[dtype], dtype_class(dtype, prec)
        for D in (32, 64, 128):
            types = dict(LSE="*fp32", DELTA="*fp32", BOUNDS="*i32", ORDER="*i32", COUNTS="*i32", L="i32",
                         qk_scale="fp32", scale="fp32")  # other pointers: the operands' dtype
            for kernel in ("forward", "dq", "dkdv"):
                found = [(f" (autotune {i})" if i else "", cfg)
                         for i, cfg in enumerate(kernel_configs(kernel, D, dtype, arch, prec))]
                found += [(f" (table {key.rsplit(' ', 1)[1]})", tiles.strip(entry)) for key, entry in table.items()
                          if key.startswith(f"{kernel} {name} D={D} ")]  # named apart even where one is the default
                if space and dtype == torch.bfloat16 and D == 128:
                    found += [(f" (space {i})", cfg) for i, cfg in enumerate(TUNING_SPACE[kernel])]
                seen = []
                for label, cfg in found:
                    cfg = _with_defaults(kernel, cfg)  # what the launchers run
                    if cfg in seen and "table" not in label:
                        continue
                    seen.append(cfg)
                    # the record's 6 heads; the bf16 defaults at Llama's and Qwen's head dims also with Qwen2.5-1.5B's
                    # grouping (12 query heads on 2 key/value heads), whose dK/dV loops over each group's heads
                    grouped = label == "" and dtype == torch.bfloat16 and D >= 64
                    for heads, kv_heads in [(6, 6)] + [(12, 2)] * grouped:
                        if heads != kv_heads:  # the default for groups of 6
                            cfg = _with_defaults(kernel, kernel_config(kernel, D, dtype, arch, prec, heads // kv_heads))
                        constexprs = dict(H=heads, HKV=kv_heads, D=D, COUNT=False, PRECISION=prec,
                                          **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
                        if kernel != "dkdv":
                            constexprs["BACKWARD"] = kernel == "dq"
                        group = f" GQA {heads}/{kv_heads}" if heads != kv_heads else ""
                        configs.append(dict(
                            name=f"bd_attention {kernel} {name} D={D}{label}{group}",
                            fn=_bd_attn_dkdv_kernel if kernel == "dkdv" else _bd_attn_query_kernel, pointer=t,
                            types=dict(types, DQ="*fp32") if cfg.get("ATOMIC_DQ") else types, constexprs=constexprs,
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                            hgmma=dtype != torch.float32))
            if prec == "tf32":  # delta has no dot: one configuration per dtype
                configs.append(dict(
                    name=f"bd_attention delta {name} D={D}", fn=_bd_attn_delta_kernel, pointer=t, types=types,
                    constexprs=dict(H=6, D=D, BM=64), options=dict(num_warps=4, num_stages=1), hgmma=False))
    return configs
