"""Helpers shared by the tests (fixtures live in conftest.py)."""
import contextlib
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


@contextlib.contextmanager
def torch_flags(allow_tf32: bool | None = None, deterministic: bool | None = None):
    """PyTorch's global switches set for the block and restored after it, read and written through their own API.
    Never monkeypatch.setattr on torch.backends.*: those are module objects whose attributes live behind
    __getattr__/__setattr__, and pytest >= 9.2 undoes a patch of an attribute missing from __dict__ by deleting it
    ("'cuBLASModule' object has no attribute 'allow_tf32'" at teardown)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if allow_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        if deterministic is not None:
            torch.use_deterministic_algorithms(deterministic, warn_only=True)  # warn: CPU ops need no proof here
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
