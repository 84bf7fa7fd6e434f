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


BOS, MASK = 256, 257  # the byte-level data set's (bdiff.data.DATASETS['stdlib'])


def random_tokens(gen, L, doc_starts):
    tokens = torch.randint(0, 256, (L,), generator=gen)
    tokens[doc_starts] = BOS
    return tokens


def seed_positions(tokens: list[int]) -> list[int]:
    """The seed's rule, as written in its code: index minus the index of the latest BOS at or before it, a
    sequence with no BOS yet counting as if one stood at index -1."""
    last, out = -1, []
    for i, tok in enumerate(tokens):
        last = i if tok == BOS else last
        out.append(i - last)
    return out
