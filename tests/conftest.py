import os

import pytest
import torch  # importing torch decorates none of our kernels

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when `kernels` is imported, so it is
# decided here, once per process. Without a GPU, CPU tensors run the Triton kernels through the interpreter
# (the parity tests, marked `interpreter`). With a GPU the kernels run natively (tests/test_gpu.py) and the
# interpreter tests skip, unless TRITON_INTERPRET=1 is set by hand (then the GPU tests skip).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if INTERPRET:
        return
    skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (the default "
                                   "without a GPU)")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def random_cu_seqlens(gen: torch.Generator, L: int, max_doc: int) -> torch.Tensor:
    """Random document boundaries over L positions (documents of length 1..max_doc)."""
    bounds = [0]
    while bounds[-1] < L:
        bounds.append(min(L, bounds[-1] + int(torch.randint(1, max_doc + 1, (1,), generator=gen))))
    return torch.tensor(bounds, dtype=torch.int32)
