"""The cached decode loop as it stood before the loop without host syncs (commit 7d29e14), kept as the baseline
of bench/bench_sampling.py, which times both in one run. It reads the cache's span back at every model call,
writes each step's block into the cache, and reads every generated token back one at a time; the tokens it
generates equal the loop's of today (bench_sampling.py checks it: greedy, one prompt and a batch)."""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from bdiff.config import SamplingConfig
from bdiff.generation.sampling import Generation, _choose


class KVCache:
    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (cfg.num_layers, batch, max_len, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows, self.span = slice(None), 0

    def select(self, rows: slice, block: int) -> None:
        self.rows = rows
        self.span = int(self.lengths[rows].max()) + block  # a host read per model call

    def advance(self, block: int) -> None:
        self.lengths[self.rows] += block

    def attend(self, layer: int, q, k, v):
        K, V = self.k[layer, self.rows], self.v[layer, self.rows]
        lengths = self.lengths[self.rows]
        b, block = q.shape[:2]
        slots = lengths[:, None] + torch.arange(block, device=q.device)
        batch = torch.arange(b, device=q.device)[:, None]
        K[batch, slots] = k
        V[batch, slots] = v
        visible = torch.arange(self.span, device=q.device)[None, :] < (lengths[:, None] + block)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K[:, :self.span].transpose(1, 2),
                                             V[:, :self.span].transpose(1, 2), attn_mask=visible[:, None, None, :])
        return out.transpose(1, 2)


@torch.no_grad()
def generate(model, prompts: list[list[int]], config: SamplingConfig | None = None, **options) -> Generation:
    c = dataclasses.replace(config or SamplingConfig(), **options)
    cfg, B = model.cfg, model.cfg.block_size
    steps_per_block = B if c.steps_per_block is None else c.steps_per_block
    device = next(model.parameters()).device
    bsz = len(prompts)
    gens = [torch.Generator(device).manual_seed(c.seed) for _ in range(bsz)]
    P = torch.tensor([len(p) for p in prompts])
    total = int(P.max()) + c.max_new_tokens + 2 * B
    seq = torch.full((bsz, total), cfg.mask_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        seq[i, :len(p)] = torch.tensor(p, device=device)
    start = (P // B * B).to(device)
    arange_b = torch.arange(B, device=device)
    cache = KVCache(cfg, bsz, total, device, model.dtype)
    calls = prefill = 0
    t0 = time.perf_counter()
    for i in range(bsz):  # prefill
        for b0 in range(0, int(start[i]), B):
            cache.select(slice(i, i + 1), B)
            model.run_layers(seq[i:i + 1, b0:b0 + B], (b0 + arange_b)[None], cache.attend)
            cache.advance(B)
            calls, prefill = calls + 1, prefill + 1
    new = [[] for _ in range(bsz)]
    done = [False] * bsz
    while not all(done):
        idx = start[:, None] + arange_b
        block = seq.gather(1, idx)
        for step in range(steps_per_block):
            masked = block == cfg.mask_id
            if not masked.any():  # a host read per step
                break
            cache.select(slice(None), B)
            logits = model.logits(model.run_layers(block, idx, cache.attend))
            calls += 1
            logits[..., cfg.mask_id] = float("-inf")
            sample, reveal = _choose(logits, masked, steps_per_block - step, c.strategy, c.threshold, c.temperature,
                                     c.top_p, gens)
            block = torch.where(reveal, sample, block)
        seq.scatter_(1, idx, block)
        cache.select(slice(None), B)
        model.run_layers(block, idx, cache.attend)
        cache.advance(B)
        calls += 1
        for i in range(bsz):
            if done[i]:
                continue
            for pos in range(max(int(start[i]), len(prompts[i])), int(start[i]) + B):
                token = int(seq[i, pos])  # a host read per token
                new[i].append(token)
                if token == cfg.bos_id or len(new[i]) == c.max_new_tokens:
                    done[i] = True
                    break
        start += B
    return Generation(new, calls, prefill + (calls - prefill) * bsz, time.perf_counter() - t0,
                      cache.k.numel() * cache.k.element_size() * 2)
