"""Work and memory accounting shared by the benches and the tests: synthetic document layouts, entries the mask
allows, what FlexAttention's BlockMask would compute, and the peak memory of an op from the profiler."""
from __future__ import annotations

import numpy as np
import torch

from .bd_attention import schedule_bounds


def fineweb_like_cu_seqlens(L: int, mean: float, seed: int = 0) -> torch.Tensor:
    """Packed documents with log-normal lengths (sigma 1, the given mean), the last one cut at L."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2
    bounds = [0]
    while bounds[-1] < L:
        bounds.append(min(L, bounds[-1] + max(1, int(round(rng.lognormal(mu, sigma))))))
    return torch.tensor(bounds, dtype=torch.int32)


def allowed_entries(cu_seqlens: torch.Tensor, block_size: int) -> int:
    """Entries the mask allows, from the schedule's row ranges (no (2L)^2 mask needed)."""
    rows, _ = schedule_bounds(cu_seqlens, int(cu_seqlens[-1]), block_size)
    return int((rows[:, 1::2] - rows[:, 0::2]).long().sum())


def flex_block_mask_entries(cu_seqlens: torch.Tensor, block_size: int, tile: int = 128) -> int:
    """Area of the tile x tile tiles of the (2L)^2 mask that hold at least one allowed entry."""
    L = int(cu_seqlens[-1])
    rows, _ = schedule_bounds(cu_seqlens, L, block_size)
    rows = rows.long().numpy()
    T = -(-2 * L // tile)
    live = np.zeros((T, T), dtype=bool)
    for seg, key_base in ((0, 0), (2, L)):  # segment 0: noisy keys; 2: clean keys (1 is empty for queries)
        lo, hi = rows[:, 2 * seg], rows[:, 2 * seg + 1]
        for r in np.nonzero(hi > lo)[0]:
            live[r // tile, (key_base + lo[r]) // tile:(key_base + hi[r] - 1) // tile + 1] = True
    return int(live.sum()) * tile * tile


def peak_extra_bytes(fn, hidden, weight, targets, token_weights, vocab_size):
    """Peak bytes PyTorch holds during forward + backward beyond the inputs, the loss and the gradients,
    from the profiler's allocation events (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fn(hidden, weight, targets, token_weights, vocab_size)
        dh, dw = torch.autograd.grad(loss, (hidden, weight))
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak - (dh.numel() * dh.element_size() + dw.numel() * dw.element_size() + 8)
