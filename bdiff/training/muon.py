"""Muon: momentum SGD whose update is orthogonalized by Newton–Schulz (Jordan et al. 2024,
https://kellerjordan.github.io/posts/muon/), for the hidden weight matrices only.

Distributed: gradients are already all-reduced, so every rank could compute every update; instead each
rank orthogonalizes a disjoint share of the matrices (same-shape matrices batched into one call) and the
results are all-gathered, one asynchronous all-gather per shape, launched as soon as that shape is done so
that it overlaps the next shape's Newton–Schulz. Momentum buffers live only on the rank that owns the
matrix. One process takes the same path with world size 1.

Under FSDP2 (train.py --fsdp) each rank holds rows of every matrix and of its gradient and momentum (DTensors). The
momentum updates its rows where they are; each matrix is then gathered whole to its owner rank (matrix i of a shape:
rank i % world), orthogonalized there (an owner's matrices of a shape in one call), and its rows scattered back: the
same update as one process's, with each rank receiving only the matrices it owns.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bdiff.kernels.reference import QUINTIC
from bdiff.ops import newton_schulz
from bdiff.training.fsdp import is_dtensor

# Newton–Schulz schedules: (coefficients, safety). "quintic": Muon's (a, b, c) for every step.
# "polar_express": Amsel, Persson, Musco & Gower 2025, "The Polar Express" (arXiv 2505.16932), one
# minimax-optimal triple per step, as used by modded-nanogpt with X normalized by ||X||_F (1 + 0.02).
SCHEDULES = {
    "quintic": ([QUINTIC] * 5, 0.0),
    "polar_express": ([
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ], 0.02),
}


def _by_shape(group: dict) -> dict[tuple, list]:
    """A group's matrices by shape, in parameter order (every rank sees the same parameters in the same order):
    matrix i of a shape is orthogonalized by rank i % world."""
    by_shape: dict[tuple, list] = {}
    for p in group["params"]:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    return by_shape


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.025, momentum: float = 0.95, nesterov: bool = True,
                 schedule: str = "quintic", weight_decay: float = 0.0, orthogonalize=newton_schulz):
        """`orthogonalize(G, steps, coefficients, safety)`: the Newton–Schulz implementation (the Triton/reference
        operator; bench/bench_step.py passes the seed's plain-torch one to compare the two)."""
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.orthogonalize = orthogonalize
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, schedule=schedule,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2D weight matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every matrix. A parameter without a gradient counts as a zero gradient: every rank
        must take part in every collective, whatever gradients it holds. `closure` re-evaluates the loss (the
        torch.optim protocol) and its value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            if group["params"] and is_dtensor(group["params"][0]):
                self._step_sharded(group, rank, world)
                continue
            coefficients, safety = SCHEDULES[group["schedule"]]
            pending = []
            for shape, same in _by_shape(group).items():
                share = -(-len(same) // world)  # matrices per rank, the last ranks padded
                mine = same[rank::world]
                updates = torch.zeros((share, *shape), device=same[0].device, dtype=same[0].dtype)
                if mine:
                    grads = [self._direction(p, group) for p in mine]
                    updates[:len(mine)] = self.orthogonalize(torch.stack(grads), len(coefficients),
                                                             coefficients, safety)
                if distributed:
                    gathered = [torch.empty_like(updates) for _ in range(world)]
                    pending.append((same, gathered, dist.all_gather(gathered, updates, async_op=True)))
                else:
                    pending.append((same, [updates], None))
            for same, gathered, work in pending:
                if work is not None:
                    work.wait()
                for i, p in enumerate(same):  # matrix i was orthogonalized by rank i % world, slot i // world
                    update = gathered[i % world][i // world]
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                    # Orthogonal updates have unit spectral norm; tall matrices step by (rows/cols)^0.5 more.
                    p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
        return loss

    def _direction(self, p, group) -> torch.Tensor:
        """The momentum-averaged gradient of `p` (its buffer updated in place), as p's type (a DTensor's rows)."""
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
        buf.lerp_(grad, 1 - group["momentum"])  # EMA of gradients
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _step_sharded(self, group: dict, rank: int, world: int) -> None:
        """The update of FSDP2-sharded matrices (the module docstring): rows gathered to each matrix's owner,
        orthogonalized there, scattered back. Shard(0) rows: rank r holds rows [r*c, (r+1)*c) of c = ceil(rows /
        world), the last ranks fewer or none; every transfer is padded to c rows."""
        coefficients, safety = SCHEDULES[group["schedule"]]
        for shape, same in _by_shape(group).items():
            rows, cols = shape
            chunk = -(-rows // world)

            def padded(x):  # (n <= chunk, cols) -> (chunk, cols)
                return torch.cat([x, x.new_zeros(chunk - x.shape[0], cols)]) if x.shape[0] < chunk else x

            local = [self._direction(p, group).to_local() for p in same]
            gathered, works = {}, []
            for i, d in enumerate(local):
                owner = i % world
                parts = [torch.empty(chunk, cols, dtype=d.dtype, device=d.device) for _ in range(world)] \
                    if rank == owner else None
                works.append(dist.gather(padded(d), parts, dst=owner, async_op=True))
                if parts is not None:
                    gathered[i] = parts
            for work in works:
                work.wait()
            mine = sorted(gathered)
            done = {}
            if mine:
                whole = torch.stack([torch.cat(gathered[i])[:rows] for i in mine])  # (owned, rows, cols)
                for i, u in zip(mine, self.orthogonalize(whole, len(coefficients), coefficients, safety)):
                    done[i] = list(torch.cat([u, u.new_zeros(chunk * world - rows, cols)]).split(chunk))
            works, received = [], []
            for i, d in enumerate(local):
                out = torch.empty(chunk, cols, dtype=d.dtype, device=d.device)
                works.append(dist.scatter(out, done.get(i), src=i % world, async_op=True))
                received.append(out)
            for work in works:
                work.wait()
            for p, d, out in zip(same, local, received):
                mine_rows = p.to_local()  # this rank's rows of the parameter, updated in place
                if group["weight_decay"]:
                    mine_rows.mul_(1 - group["lr"] * group["weight_decay"])
                mine_rows.add_(out[:d.shape[0]], alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    def keep_own_state(self, rank: int, world: int) -> None:
        """Drop the momentum buffers of the matrices that `rank` of `world` does not orthogonalize: after loading
        the merged state of a checkpoint written by a different number of ranks, each rank keeps its new share."""
        own = {id(p) for group in self.param_groups for same in _by_shape(group).values() for p in same[rank::world]}
        for p in [p for p in self.state if id(p) not in own]:
            del self.state[p]
