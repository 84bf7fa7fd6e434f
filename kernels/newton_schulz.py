"""Newton–Schulz orthogonalization for Muon in Triton (same semantics as `newton_schulz_ref`).

Each iteration on the wide form X (m <= n):  A = X Xᵀ;  B = b·A + c·A·A;  X <- a·X + B·X.
A and A·A = A·Aᵀ are symmetric, so `_ns_sym_kernel` computes only the output tiles on or above the
diagonal, T(T+1)/2 of them for T tiles a side, and writes each one twice (as itself and mirrored): about
half the FLOPs of a dense product (Flash-Muon / modded-nanogpt use the same trick). `_ns_update_kernel`
is a plain tiled product with the a·X term fused into its epilogue.

Tall matrices (m > n) are handled as the transpose view Xᵀ (strides swapped, no copy): every kernel takes
strides, so XᵀX and X·B come from the same code. Operands are bf16 on a GPU with fp32 accumulation; the
interpreter (CPU) runs float32, since it cannot do bf16 dots.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from . import reference
from ._device import TileConfig, on_device, use_triton
from ._device import arch as _arch
from .reference import QUINTIC, _coefficient_schedule


@triton.jit
def _ns_sym_kernel(X, C, OUT, TILES, COUNTS, M, K, alpha, beta,
                   sxb, sxm, sxk, scb, scm, scn, sob, som, son,
                   BM: tl.constexpr, BK: tl.constexpr, HAS_C: tl.constexpr, COUNT: tl.constexpr):
    """OUT = alpha·X Xᵀ (+ beta·C) for X (b, M, K), computing tile (i, j) with i <= j and mirroring it."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    i = tl.load(TILES + 2 * t)
    j = tl.load(TILES + 2 * t + 1)
    rows_i = i * BM + tl.arange(0, BM)
    rows_j = j * BM + tl.arange(0, BM)
    ks = tl.arange(0, BK)
    xb = X + b * sxb
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        xi = tl.load(xb + rows_i[:, None] * sxm + kk[None, :] * sxk,
                     mask=(rows_i[:, None] < M) & (kk[None, :] < K), other=0.0)  # (BM, BK)
        xj = tl.load(xb + rows_j[None, :] * sxm + kk[:, None] * sxk,
                     mask=(rows_j[None, :] < M) & (kk[:, None] < K), other=0.0)  # (BK, BM) = X[j]ᵀ
        acc = tl.dot(xi, xj, acc)
    out = alpha * acc
    if HAS_C:
        c = tl.load(C + b * scb + rows_i[:, None] * scm + rows_j[None, :] * scn,
                    mask=(rows_i[:, None] < M) & (rows_j[None, :] < M), other=0.0)
        out += beta * c.to(tl.float32)
    out = out.to(OUT.dtype.element_ty)
    mask = (rows_i[:, None] < M) & (rows_j[None, :] < M)
    ob = OUT + b * sob
    tl.store(ob + rows_i[:, None] * som + rows_j[None, :] * son, out, mask=mask)
    if i != j:  # the mirrored tile (j, i)
        tl.store(ob + rows_j[None, :] * som + rows_i[:, None] * son, out, mask=mask)
    if COUNT:
        tl.store(COUNTS + b * tl.num_programs(0) + t, 1)


@triton.jit
def _ns_update_kernel(B, X, OUT, COUNTS, M, N, a,
                      sbb, sbm, sbk, sxb, sxm, sxn, sob, som, son,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, COUNT: tl.constexpr):
    """OUT = a·X + B X for B (b, M, M) and X (b, M, N)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    tiles_n = tl.cdiv(N, BN)
    rows = (pid // tiles_n) * BM + tl.arange(0, BM)
    cols = (pid % tiles_n) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, M, BK):
        kk = k0 + ks
        bt = tl.load(B + b * sbb + rows[:, None] * sbm + kk[None, :] * sbk,
                     mask=(rows[:, None] < M) & (kk[None, :] < M), other=0.0)  # (BM, BK)
        xt = tl.load(X + b * sxb + kk[:, None] * sxm + cols[None, :] * sxn,
                     mask=(kk[:, None] < M) & (cols[None, :] < N), other=0.0)  # (BK, BN)
        acc = tl.dot(bt, xt, acc)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + b * sxb + rows[:, None] * sxm + cols[None, :] * sxn, mask=mask, other=0.0)
    out = a * x.to(tl.float32) + acc
    tl.store(OUT + b * sob + rows[:, None] * som + cols[None, :] * son, out.to(OUT.dtype.element_ty), mask=mask)
    if COUNT:
        tl.store(COUNTS + b * tl.num_programs(0) + pid, 1)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

def kernel_config(kernel: str, arch: int = 90) -> TileConfig:
    """128x128 output tiles with 64-deep k-steps and 8 warps: the classic tensor-core GEMM shape, big enough
    that the mirrored diagonal tiles waste little (T(T+1)/2 of T² tiles). Three pipeline stages fit the
    large shared memory of sm_80/sm_90 (96 KiB); sm_86/89 (99 KiB per block) take two."""
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3 if arch in (80, 90) else 2)


@functools.lru_cache(maxsize=64)
def _upper_tiles(T: int, device: str) -> torch.Tensor:
    return torch.triu_indices(T, T).T.contiguous().to(torch.int32).to(device)  # (T(T+1)/2, 2), i <= j



def _strides(t: torch.Tensor, *names: str) -> dict:
    """A (b, rows, cols) tensor's strides under the kernel's argument names."""
    return dict(zip(names, t.stride()))


def _sym(X, out, alpha, C=None, beta=0.0, counts=None):
    """out = alpha·X Xᵀ + beta·C; X (b, M, K) any strides."""
    bsz, M, K = X.shape
    cfg = kernel_config("sym", _arch(X))
    tiles = _upper_tiles(triton.cdiv(M, cfg["BM"]), str(X.device))
    Cx = out if C is None else C  # a valid pointer; read only with HAS_C
    strides = {**_strides(X, "sxb", "sxm", "sxk"), **_strides(Cx, "scb", "scm", "scn"),
               **_strides(out, "sob", "som", "son")}
    _ns_sym_kernel[(tiles.shape[0], bsz)](
        X=X, C=Cx, OUT=out, TILES=tiles, COUNTS=counts if counts is not None else tiles, M=M, K=K, alpha=alpha,
        beta=beta, **strides, BM=cfg["BM"], BK=cfg["BK"], HAS_C=C is not None, COUNT=counts is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return tiles.shape[0]


def _update(B, X, out, a, counts=None):
    """out = a·X + B X; B (b, M, M), X (b, M, N), any strides."""
    bsz, M, N = X.shape
    cfg = kernel_config("update", _arch(X))
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]), bsz)
    _ns_update_kernel[grid](
        B=B, X=X, OUT=out, COUNTS=counts if counts is not None else out, M=M, N=N, a=a,
        **_strides(B, "sbb", "sbm", "sbk"), **_strides(X, "sxb", "sxm", "sxn"), **_strides(out, "sob", "som", "son"),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], COUNT=counts is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return grid[0]


def _validate(G):
    if not isinstance(G, torch.Tensor):
        raise ValueError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim not in (2, 3):
        raise ValueError(f"G must be 2D (m, n) or batched 3D (b, m, n), got shape {tuple(G.shape)}; "
                         "reshape other layouts (e.g. conv weights) to 2D first")
    if not G.is_floating_point():
        raise ValueError(f"G must be a floating tensor, got {G.dtype}")
    if G.numel() == 0:
        raise ValueError(f"G must not be empty, got shape {tuple(G.shape)}")


def _run(G, steps, coefficients, safety, count=False):
    _validate(G)
    schedule = _coefficient_schedule(steps, coefficients)
    work = torch.bfloat16 if G.is_cuda else torch.float32  # the interpreter cannot do bf16 dots
    X = (G if G.ndim == 3 else G[None]).to(work)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT  # a view: the kernels read it through its strides
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + safety) + 1e-7)  # (b, m, n), m <= n
    bsz, m, n = X.shape
    A = torch.empty((bsz, m, m), device=X.device, dtype=work)
    B = torch.empty_like(A)
    Y = torch.empty_like(X)
    visits = {"sym": 0, "update": 0}
    counters = (lambda n_programs: torch.zeros(n_programs * bsz, dtype=torch.int32, device=X.device)) if count \
        else (lambda n_programs: None)
    T = triton.cdiv(m, kernel_config("sym", _arch(X))["BM"])
    cfg = kernel_config("update", _arch(X))
    update_programs = triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"])
    for a, b, c in schedule:
        for out, src, alpha, C, beta in ((A, X, 1.0, None, 0.0), (B, A, c, A, b)):
            cnt = counters(T * (T + 1) // 2)
            _sym(src, out, alpha, C, beta, cnt)
            visits["sym"] += int(cnt.sum()) if count else 0
        cnt = counters(update_programs)
        _update(B, X, Y, a, cnt)
        visits["update"] += int(cnt.sum()) if count else 0
        X, Y = Y, X
    if tall:
        X = X.mT
    out = X.to(G.dtype)
    return (out if G.ndim == 3 else out[0]), visits


# The operator: torch.ops.bdiff.newton_schulz, CPU and CUDA, with a fake implementation. A custom_op (opaque to
# torch.compile): an optimizer step runs it outside any graph, and the CPU kernel chooses the reference or the
# interpreter at run time. No autograd: it is an optimizer's update, not part of a model.

@torch.library.custom_op("bdiff::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, steps: int = 5, coefficients: list[float] | None = None,
                      safety: float = 0.0) -> torch.Tensor:
    """`coefficients`: one (a, b, c) triple for every step, or steps triples, flattened; None: the quintic."""
    _validate(G)
    triples = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)] if coefficients else QUINTIC
    if len(triples) == 1:
        triples = triples[0]
    if not use_triton(G):
        return reference.newton_schulz_ref(G, steps, triples, safety)
    with on_device(G):
        return _run(G, steps, triples, safety)[0]


@_newton_schulz_op.register_fake
def _(G, steps=5, coefficients=None, safety=0.0):
    _validate(G)
    return torch.empty_like(G)


@register_flop_formula(torch.ops.bdiff.newton_schulz)
def _(G_shape, steps=5, coefficients=None, safety=0.0, *, out_shape=None):
    """FLOPs for torch.utils.flop_counter, as the kernels compute them: per step, two symmetric products over the
    T(T+1)/2 tiles on or above the diagonal (depth n for X·Xᵀ, m for A·A) and the dense update B·X."""
    m, n = sorted(G_shape[-2:])
    bsz = G_shape[0] if len(G_shape) == 3 else 1
    cfg = kernel_config("sym")
    T = -(-m // cfg["BM"])
    sym = T * (T + 1) // 2 * cfg["BM"] ** 2 * 2 * (n + m)
    return bsz * steps * (sym + 2 * m * m * n)


def newton_schulz(G, steps: int = 5, coefficients=QUINTIC, safety: float = 0.0) -> torch.Tensor:
    """Newton–Schulz orthogonalization of a 2D or batched 3D tensor; semantics of `reference.newton_schulz_ref`
    (coefficients: one (a, b, c) triple or one per step). CUDA runs the Triton kernels, CPU the reference (the
    kernels through the interpreter with TRITON_INTERPRET=1)."""
    schedule = _coefficient_schedule(steps, coefficients)  # validates before the op flattens them
    return torch.ops.bdiff.newton_schulz(G, steps, [c for triple in schedule for c in triple], float(safety))


def count_work(G, steps: int = 5, coefficients=QUINTIC, safety: float = 0.0) -> dict:
    """Run with COUNT=True. Returns tiles visited and FLOPs done by the symmetric and update kernels, and the
    FLOPs of the same iterations done densely (torch.matmul: 2m²n + 2m³ + 2m²n per step, m <= n)."""
    with on_device(G):
        _, visits = _run(G, steps, coefficients, safety, count=True)
    m, n = sorted(G.shape[-2:])
    bsz = G.shape[0] if G.ndim == 3 else 1
    cfg = kernel_config("sym")
    steps = len(_coefficient_schedule(steps, coefficients))
    tile = cfg["BM"] * cfg["BM"]
    # Each symmetric step runs twice (A = X Xᵀ with depth n, A·A with depth m): split the visits evenly.
    sym_flops = visits["sym"] // 2 * tile * 2 * (n + m)
    return dict(sym_tiles=visits["sym"], update_tiles=visits["update"], sym_flops=sym_flops,
                dense_sym_flops=bsz * steps * (2 * m * m * n + 2 * m ** 3),
                update_flops=visits["update"] * cfg["BM"] * cfg["BN"] * 2 * m,
                dense_update_flops=bsz * steps * 2 * m * m * n)


def compile_configs(arch: int) -> list[dict]:
    """Every configuration the launchers above pick on a GPU of compute capability `arch`. Triton's launcher
    turns an int argument equal to 1 into a constant, so each memory layout is its own compiled kernel:
    X is contiguous (wide G) or a transposed view (tall G); A, B and their products are contiguous. Sizes and
    strides are multiples of 16 for the shapes this ships for (768, 3072, 4096, 8192); other shapes run the
    same code without vectorized loads."""
    cfg = kernel_config("sym", arch)
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    configs = []
    for layout, x_unit in (("wide", "sxk"), ("tall", "sxm")):
        for step, has_c in (("X·Xᵀ", False), ("b·A+c·A·A", True)):
            unit = ("scn", "son") + ((x_unit,) if step == "X·Xᵀ" else ("sxk",))  # A·A reads contiguous A
            if step != "X·Xᵀ" and layout == "tall":
                continue  # the second product reads only A: one layout
            strides = {n: ("constexpr" if n in unit else "i32") for n in
                       ("sxb", "sxm", "sxk", "scb", "scm", "scn", "sob", "som", "son")}
            configs.append(dict(
                name=" ".join(["newton_schulz sym", step] + ([] if has_c else [layout]) + ["bfloat16"]),
                fn=_ns_sym_kernel, options=options, hgmma=True,
                divisible=["M", "K"] + [n for n, t in strides.items() if t == "i32"],
                pointer="*bf16", types=dict(strides, TILES="*i32", COUNTS="*i32", M="i32", K="i32", alpha="fp32",
                                            beta="fp32"),
                constexprs=dict({n: 1 for n in unit}, BM=cfg["BM"], BK=cfg["BK"], HAS_C=has_c, COUNT=False)))
        x_unit_upd = "sxn" if layout == "wide" else "sxm"
        unit = ("sbk", x_unit_upd, "son" if layout == "wide" else "som")
        strides = {n: ("constexpr" if n in unit else "i32") for n in
                   ("sbb", "sbm", "sbk", "sxb", "sxm", "sxn", "sob", "som", "son")}
        configs.append(dict(
            name=f"newton_schulz update {layout} bfloat16", fn=_ns_update_kernel, options=options, hgmma=True,
            divisible=["M", "N"] + [n for n, t in strides.items() if t == "i32"],
            pointer="*bf16", types=dict(strides, COUNTS="*i32", M="i32", N="i32", a="fp32"),
            constexprs=dict({n: 1 for n in unit}, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], COUNT=False)))
    return configs
