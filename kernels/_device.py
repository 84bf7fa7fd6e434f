"""Where an op runs: which GPU a tensor lives on (for the launchers' tile choices and their device guard), and
whether CPU tensors take the Triton kernels through the interpreter."""
import contextlib
import os
from typing import TypedDict

import torch


class TileConfig(TypedDict, total=False):
    """A kernel configuration as the launchers pass it (`kernel[grid](..., **config)`): tile sizes, warps, pipeline
    stages. Every kernel_config returns one; compile_check compiles each shipped one."""
    BM: int  # rows of a tile (queries, keys, or the output's)
    BN: int  # columns of a tile, or rows of the chunk a tile visits
    BK: int  # depth of one step of a tiled product (Newton–Schulz)
    BV: int  # vocabulary columns swept per step (the loss)
    num_warps: int
    num_stages: int


def arch(x: torch.Tensor) -> int:
    """Compute capability as 80, 86, 89, 90...; CPU tensors (the interpreter) take Hopper's configuration."""
    if not x.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference, or the kernels through the
    interpreter when TRITON_INTERPRET=1 (it must be set before `kernels` is imported: Triton reads it when
    it decorates a kernel)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def on_device(x: torch.Tensor):
    """The context every launch runs in. Triton launches on the *current* CUDA device, whatever device its
    tensors are on, and a custom op gets no device guard of its own: without this, tensors on cuda:1 would be
    handed to a kernel running on cuda:0."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
