"""The three ops in one import, each a PyTorch operator with a reference, a fake implementation and autograd
(torch.ops.bdiff.*): CUDA tensors run the Triton kernels, CPU tensors the PyTorch references (kernels/).

    from bdiff.ops import bd_attention, masked_linear_cross_entropy, newton_schulz
"""
from bdiff.kernels.bd_attention import bd_attention
from bdiff.kernels.masked_ce import masked_linear_cross_entropy
from bdiff.kernels.newton_schulz import newton_schulz

__all__ = ["bd_attention", "masked_linear_cross_entropy", "newton_schulz"]
