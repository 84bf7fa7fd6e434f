"""Muon: momentum SGD whose update is orthogonalized by Newton–Schulz (Jordan et al. 2024,
https://kellerjordan.github.io/posts/muon/), for the hidden weight matrices only.

Under DDP every rank holds the same all-reduced gradients, so every rank computes the same update.
"""
from __future__ import annotations

import torch

import kernels
from kernels.reference import QUINTIC


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.025, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, coefficients=QUINTIC, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        coefficients=coefficients, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2D weight matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])  # EMA of gradients
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = kernels.newton_schulz(g, group["ns_steps"], group["coefficients"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                # Orthogonal updates have unit spectral norm; tall matrices get a larger step (rows/cols)^0.5.
                p.add_(update.to(p.dtype), alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
