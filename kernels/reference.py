"""Plain PyTorch references for the three heavy ops: the truth the Triton kernels are tested against,
and the CPU path. Short and obviously correct, computed in float32 (float64 when given float64).

Layout of the attention (docs/design.md §1-2): q, k, v have 2L rows; rows 0..L-1 are the noisy copy x_t,
rows L..2L-1 the clean copy x_0 of the same L positions. `cu_seqlens` (int32, [0, ..., L]) marks the
document boundaries over the L positions; positions, and so blocks, restart at each document. cu_seqlens[0]
may be negative: the sequence then starts -cu_seqlens[0] tokens into its first document.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

QUINTIC = (3.4445, -4.7750, 2.0315)  # Newton–Schulz quintic of Muon (Jordan et al. 2024)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def document_positions(cu_seqlens: torch.Tensor, L: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position inside the document) of each of the L positions, int64 (L,) each.
    cu_seqlens[0] = -offset <= 0: the first document began `offset` tokens before the sequence, so its
    positions count from `offset` (the seed counts a leading fragment from 1: offset 1). Passing L spares
    reading cu_seqlens[-1] (a host sync on a GPU)."""
    cu = cu_seqlens.long()
    idx = torch.arange(int(cu[-1]) if L is None else L, device=cu.device)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    return doc, idx - cu[doc]


def bd_mask_mod(cu_seqlens: torch.Tensor, block_size: int):
    """The attention rules as a predicate over row indices of the 2L layout, in FlexAttention's `mask_mod(b, h,
    q_idx, kv_idx)` form (attention-gym style); every mask in bdiff (the dense reference mask, the
    FlexAttention baselines of the benches) comes from here. Rows < L are noisy, rows >= L clean, both
    halves with the same positions; every rule also needs query and key in the same document:
    noisy -> noisy same block; noisy -> clean strictly earlier blocks; clean -> clean same or earlier blocks;
    clean -> noisy never."""
    doc, pos = document_positions(cu_seqlens)
    L = doc.numel()
    doc2, block2 = doc.repeat(2), (pos // block_size).repeat(2)  # (2L,)

    def mask_mod(b, h, q_idx, kv_idx):
        q_noisy, kv_noisy = q_idx < L, kv_idx < L
        qb, kb = block2[q_idx], block2[kv_idx]
        rule = torch.where(q_noisy, torch.where(kv_noisy, kb == qb, kb < qb), ~kv_noisy & (kb <= qb))
        return rule & (doc2[q_idx] == doc2[kv_idx])

    return mask_mod


def bd_attention_mask(cu_seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean (2L, 2L) mask, True where query row i may attend to key row j (`bd_mask_mod` on every pair)."""
    rows = torch.arange(2 * int(cu_seqlens[-1]), device=cu_seqlens.device)
    return bd_mask_mod(cu_seqlens, block_size)(None, None, rows[:, None], rows[None, :])


def document_rows(q: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int):
    """Per document: its 2n rows (noisy then clean) in the 2L layout and its (2n, 2n) mask. Documents never
    see each other, so attention can be computed one document at a time: memory is the sum of squared
    document lengths rather than (2L)^2. A first document that starts before the sequence keeps its offset."""
    L = q.shape[0] // 2
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        first = max(start, 0)
        rows = torch.cat([torch.arange(first, end), torch.arange(L + first, L + end)]).to(q.device)
        yield rows, bd_attention_mask(torch.tensor([start - first, end - first]), block_size).to(q.device)


def bd_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     block_size: int, scale: float | None = None) -> torch.Tensor:
    """Softmax attention under `bd_attention_mask`, q (2L, H, D), k/v (2L, Hkv, D) -> (2L, H, D) in q's dtype, one
    document at a time (`document_rows`). Hkv < H: each key/value head serves H / Hkv consecutive query heads,
    repeated here as transformers' repeat_kv repeats them."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    cdt = _compute_dtype(q)
    out = torch.empty(q.shape, dtype=cdt, device=q.device)
    for rows, mask in document_rows(q, cu_seqlens, block_size):
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


def masked_linear_cross_entropy_ref_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                          token_weights: torch.Tensor, vocab_size: int):
    """(loss, dhidden, dweight) of `masked_linear_cross_entropy_ref`, written out (the CPU path of the
    operator, which runs where autograd cannot record): dlogits = w · (softmax − onehot(target)).
    dweight covers all rows of the weight (zero on the padding rows), in the compute dtype like the loss."""
    cdt = _compute_dtype(hidden)
    h, W = hidden.to(cdt), weight[:vocab_size].to(cdt)
    logits = h @ W.T  # (N, vocab_size)
    ce = torch.nn.functional.cross_entropy(logits, targets.long(), reduction="none")  # (N,)
    w = token_weights.to(cdt)
    dlogits = logits.softmax(-1)
    dlogits[torch.arange(len(targets)), targets.long()] -= 1
    dlogits *= w[:, None]
    dweight = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    dweight[:vocab_size] = dlogits.T @ h
    return (ce * w).sum(), (dlogits @ W).to(hidden.dtype), dweight


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
