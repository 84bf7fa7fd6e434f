"""Plain PyTorch references for the three heavy ops: the truth the Triton kernels are tested against,
and the CPU path. Short and obviously correct, computed in float32 (float64 when given float64).

Layout of the attention (SPEC.md §1): q, k, v have 2L rows; rows 0..L-1 are the noisy copy x_t,
rows L..2L-1 the clean copy x_0 of the same L positions. `cu_seqlens` (int32, [0, ..., L]) marks the
document boundaries over the L positions; positions, and so blocks, restart at each document.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

QUINTIC = (3.4445, -4.7750, 2.0315)  # Newton–Schulz quintic of Muon (Jordan et al. 2024)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bd_attention_mask(cu_seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean (2L, 2L) mask, True where query row i may attend to key row j."""
    bounds = cu_seqlens.long().cpu()
    L = int(bounds[-1])
    pos = torch.arange(L)
    doc = torch.searchsorted(bounds[1:], pos, right=True)  # (L,) document of each position
    block = (pos - bounds[doc]) // block_size  # (L,) block index inside its document
    same_doc = doc[:, None] == doc[None, :]
    same_block = same_doc & (block[:, None] == block[None, :])
    earlier = same_doc & (block[None, :] < block[:, None])  # key block strictly before query block
    noisy_noisy = same_block
    noisy_clean = earlier
    clean_clean = same_block | earlier
    clean_noisy = torch.zeros_like(same_doc)
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)  # noisy queries
    bottom = torch.cat([clean_noisy, clean_clean], dim=1)  # clean queries
    return torch.cat([top, bottom], dim=0).to(cu_seqlens.device)


def bd_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     block_size: int, scale: float | None = None) -> torch.Tensor:
    """Softmax attention under `bd_attention_mask`, q/k/v (2L, H, D) -> (2L, H, D) in q's dtype.

    Documents never see each other, so each one is computed on its own (2n x 2n) mask: the memory is
    the sum of squared document lengths rather than (2L)^2.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    L = q.shape[0] // 2
    cdt = _compute_dtype(q)
    out = torch.empty(q.shape, dtype=cdt, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        rows = torch.cat([torch.arange(start, end), torch.arange(L + start, L + end)]).to(q.device)
        mask = bd_attention_mask(torch.tensor([0, end - start]), block_size).to(q.device)  # (2n, 2n)
        qd, kd, vd = (x[rows].to(cdt).transpose(0, 1) for x in (q, k, v))  # (H, 2n, D)
        out[rows] = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale).transpose(0, 1)
    return out.to(q.dtype)


def masked_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                    token_weights: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """sum_i token_weights[i] * CE(hidden[i] @ weight[:vocab_size].T, targets[i]); a float32 scalar.

    hidden (N, D), weight (V_padded, D), targets (N,) int, token_weights (N,) float. Rows of the weight
    beyond `vocab_size` are padding: they take no part in the softmax and get no gradient.
    """
    cdt = _compute_dtype(hidden)
    logits = hidden.to(cdt) @ weight[:vocab_size].to(cdt).T  # (N, vocab_size)
    ce = torch.nn.functional.cross_entropy(logits, targets.long(), reduction="none")  # (N,)
    return (ce * token_weights.to(cdt)).sum()


def _coefficient_schedule(steps: int, coefficients) -> list[tuple[float, float, float]]:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
        return [tuple(float(c) for c in coefficients)] * steps
    schedule = [tuple(float(c) for c in triple) for triple in coefficients]
    if len(schedule) != steps or any(len(t) != 3 for t in schedule):
        raise ValueError(f"coefficients must be one (a, b, c) triple or {steps} triples, got {coefficients!r}")
    return schedule


def newton_schulz_ref(G: torch.Tensor, steps: int = 5,
                      coefficients: Sequence[float] | Sequence[Sequence[float]] = QUINTIC,
                      safety: float = 0.0) -> torch.Tensor:
    """Approximate orthogonalization U V^T of G = U S V^T by `steps` Newton–Schulz iterations.

    G is (m, n) or batched (b, m, n). Each step: A = X X^T, B = b A + c A A, X <- a X + B X on
    X0 = G / (||G||_F (1 + safety)); wide form (m <= n) so that A is the smaller Gram matrix. Output in G's
    dtype. `safety` > 0 keeps rounding from pushing singular values past the range a schedule was fit on.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"G must be 2D (m, n) or 3D (b, m, n), got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"G must be a floating tensor, got {G.dtype}")
    schedule = _coefficient_schedule(steps, coefficients)
    X = G.to(_compute_dtype(G))
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + safety) + 1e-7)
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)
