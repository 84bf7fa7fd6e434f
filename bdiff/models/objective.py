"""Document layout and block noising of one packed sequence (the steps before the transformer).

The layout depends on the tokens only, so the trainer builds it on the host from the loader's CPU tokens
(no device sync) and moves it to the device once per sequence; every layer then shares its attention
schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from bdiff.kernels.bd_attention import schedule_bounds, validate_cu_seqlens
from bdiff.kernels.reference import document_positions


@dataclass
class Layout:
    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32 document boundaries over the L positions
    positions: torch.Tensor  # (L,) int64 position inside its document (rotary positions)
    blocks: torch.Tensor  # (L,) int64 global block id: unique per (document, block) pair
    schedule: torch.Tensor  # (2, 2L, 6) int32 attention range tables (kernels/bd_attention.py), one per sequence
    num_blocks: int  # blocks in the sequence: how many noise levels to draw

    def to(self, device, non_blocking: bool = False) -> Layout:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return Layout(**moved)


SEPARATORS = ("opens", "closes")  # ModelConfig.separator: where the document separator (BOS) sits


def document_layout(tokens: torch.Tensor, bos_id: int, block_size: int, first_offset: int | None = None,
                    separator: str = "opens") -> Layout:
    """Where documents start, their positions and blocks. `separator` "opens" (the seed's layout): documents start
    at every BOS token, position 0 of its document, which by the attention rules cannot see the document before:
    no model learns where a document ends. "closes": the BOS closes the document it follows (it takes that
    document's next position and block, so the model learns to predict it, and sampling stops there); the next
    document starts with its first token at position 0.

    The sequence's first tokens continue a document that began earlier: `first_offset` is how many of its tokens
    the sequence does not hold. None applies the seed's rule (nano-block-diffusion, which the record is measured
    with): 1 for a sequence that does not open a document, as if a BOS stood just before it; 0 for one that starts
    with BOS under "opens" (under "closes" the token before the sequence, which would tell, is not seen: always
    1). A loader that knows the true offset may pass it. The fragment's positions count from the offset and its
    blocks follow the document's own block grid, clipped at the sequence start: with offset 1 its first block
    holds block_size - 1 tokens. cu_seqlens[0] = -first_offset.

    On the tokens' device; on a GPU this reads the document count back (a sync), so the trainer calls it on
    the loader's CPU tokens."""
    if separator not in SEPARATORS:
        raise ValueError(f"separator must be one of {SEPARATORS}, got {separator!r}")
    L = tokens.numel()
    opens_here = separator == "opens" and int(tokens[0]) == bos_id
    if first_offset is None:
        first_offset = 0 if opens_here else 1
    if first_offset < 0 or (first_offset > 0 and opens_here):
        raise ValueError(f"first_offset must be >= 0, and 0 for a sequence that starts with BOS, got {first_offset}")
    starts = torch.nonzero(tokens == bos_id).flatten() + (separator == "closes")  # the token after a closing BOS
    starts = starts[(starts > 0) & (starts < L)]
    cu_seqlens = torch.cat([starts.new_tensor([-first_offset]), starts, starts.new_tensor([L])]).to(torch.int32)
    if not tokens.is_cuda:
        validate_cu_seqlens(cu_seqlens, L)  # free on the host: the kernels trust the boundaries
    return bounds_layout(cu_seqlens, L, block_size)


def bounds_layout(cu_seqlens: torch.Tensor, L: int, block_size: int) -> Layout:
    """The layout of L positions cut into documents at `cu_seqlens` (int32, validated by the caller): positions
    restart in each document, blocks follow each document's own grid."""
    doc, positions = document_positions(cu_seqlens)  # (L,) each
    # Global block ids, 0, 1, ...: a new block wherever the document or the block inside it changes.
    block = positions // block_size
    change = (doc[1:] != doc[:-1]) | (block[1:] != block[:-1])
    blocks = torch.cat([doc.new_zeros(1), torch.cumsum(change, 0)])
    return Layout(cu_seqlens, positions, blocks, schedule_bounds(cu_seqlens, L, block_size), int(blocks[-1]) + 1)


def noise_blocks(tokens: torch.Tensor, blocks: torch.Tensor, mask_id: int, low: float, high: float,
                 generator: torch.Generator | None = None, num_blocks: int | None = None,
                 stratified: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One t ~ U[low, high] per block; each token masked independently with probability t. `num_blocks`
    (Layout.num_blocks) spares a device sync; by default it is read from `blocks`.

    stratified: the n blocks' levels are a low-discrepancy set instead of n independent draws: [low, high] is cut
    into n equal strata, one uniform draw in each, the strata shuffled over the blocks. Each block's t is still
    U[low, high], so the loss estimates the same objective, with less variance (BD3-LM's antithetic sampling).

    `generator` may be a CPU one whatever tokens' device: the draws are made on the CPU and moved.

    Returns x_t (L,), masked (L,) bool, t per token (L,) float32.
    """
    num_blocks = int(blocks.max()) + 1 if num_blocks is None else num_blocks
    device = tokens.device
    rng = device if generator is None else generator.device  # a CPU generator serves a GPU run (TrainConfig.cpu_rng)
    u = torch.rand(num_blocks, generator=generator, device=rng)  # (n,)
    if stratified:
        u = (torch.randperm(num_blocks, generator=generator, device=rng) + u) / num_blocks
    t_block = low + (high - low) * u.to(device)  # (n,)
    t = t_block[blocks]  # (L,)
    masked = torch.rand(tokens.shape, generator=generator, device=rng).to(device) < t
    x_t = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    return x_t, masked, t


def loss_weights(masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-token loss weight: 1/(t + 1e-3) on masked tokens, 0 elsewhere (BD3-LM's NELBO weight)."""
    return masked.float() / (t + 1e-3)


def noise_seed(seed: int, rank: int = 0, *, validation: bool = False, draw: int = 0, step: int = 0) -> int:
    """The seed of a noise stream, in one place: rank r of a run trains on seed·1000 + 1 + r (plus 7919·step when
    a resume on another number of ranks starts fresh streams at `step`); validation draws from seed·1000 + 999 + r,
    and bdiff.eval's draw k from seed·1000 + 999 + k, so its draw 0 is a one-process run's own validation loss."""
    if validation:
        return seed * 1000 + 999 + rank + draw
    return seed * 1000 + 1 + rank + 7919 * step
