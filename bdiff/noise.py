"""Document layout and block noising of one packed sequence (SPEC.md §1 steps 1-2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32 document boundaries over the L positions
    positions: torch.Tensor  # (L,) int64 position inside its document (rotary positions)
    blocks: torch.Tensor  # (L,) int64 global block id: unique per (document, block) pair


def document_layout(tokens: torch.Tensor, bos_id: int, block_size: int) -> Layout:
    """A new document starts at position 0 and at every BOS token."""
    L = tokens.numel()
    starts = torch.nonzero(tokens == bos_id).flatten()
    starts = starts[starts > 0]
    zero = torch.zeros(1, dtype=torch.long, device=tokens.device)
    cu_seqlens = torch.cat([zero, starts, zero + L]).to(torch.int32)  # (D+1,)
    idx = torch.arange(L, device=tokens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)  # (L,)
    positions = idx - cu_seqlens.long()[doc]
    # Global block id: documents' block counts are cumulated so that blocks never straddle documents.
    blocks_per_doc = (cu_seqlens[1:] - cu_seqlens[:-1] + block_size - 1).long() // block_size  # (D,)
    first_block = torch.cumsum(blocks_per_doc, 0) - blocks_per_doc
    blocks = first_block[doc] + positions // block_size
    return Layout(cu_seqlens, positions, blocks)


def noise_blocks(tokens: torch.Tensor, blocks: torch.Tensor, mask_id: int, low: float, high: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One t ~ U[low, high] per block; each token masked independently with probability t.

    Returns x_t (L,), masked (L,) bool, t per token (L,) float32.
    """
    num_blocks = int(blocks.max()) + 1
    device = tokens.device
    t_block = low + (high - low) * torch.rand(num_blocks, generator=generator, device=device)  # (B,)
    t = t_block[blocks]  # (L,)
    masked = torch.rand(tokens.shape, generator=generator, device=device) < t
    x_t = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    return x_t, masked, t


def loss_weights(masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-token loss weight: 1/(t + 1e-3) on masked tokens, 0 elsewhere (BD3-LM's NELBO weight)."""
    return masked.float() / (t + 1e-3)
