"""Helpers shared by the tests (fixtures live in conftest.py)."""
import socket

import torch


def random_cu_seqlens(gen: torch.Generator, L: int, max_doc: int) -> torch.Tensor:
    """Random document boundaries over L positions (documents of length 1..max_doc)."""
    bounds = [0]
    while bounds[-1] < L:
        bounds.append(min(L, bounds[-1] + int(torch.randint(1, max_doc + 1, (1,), generator=gen))))
    return torch.tensor(bounds, dtype=torch.int32)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on, for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
