"""The three heavy ops of bdiff. Each name is the op users call; today each runs its PyTorch reference
(kernels/reference.py). Triton versions replace them behind the same signatures, dispatching CUDA
tensors to Triton and CPU tensors to the reference (or to the Triton interpreter when
TRITON_INTERPRET=1 is set).
"""
from .reference import (
    bd_attention_mask,
    bd_attention_ref as bd_attention,
    masked_linear_cross_entropy_ref as masked_linear_cross_entropy,
    newton_schulz_ref as newton_schulz,
)

__all__ = ["bd_attention", "bd_attention_mask", "masked_linear_cross_entropy", "newton_schulz"]
