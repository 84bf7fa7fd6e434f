"""The three heavy ops of bdiff, each behind one name with the signature of its PyTorch reference
(kernels/reference.py). Dispatch: CUDA tensors run the Triton kernel; CPU tensors run the reference,
except with TRITON_INTERPRET=1 set, where they run the Triton kernel through the interpreter (how the
tests check the kernels).
"""
import os

# The kernel modules load here, before the op functions below take their names on this package: Triton
# reads TRITON_INTERPRET when it decorates the kernels, i.e. now. Reach a module itself with
# importlib.import_module("kernels.bd_attention") (likewise kernels.newton_schulz).
from . import bd_attention as _bd_attention_kernels
from . import masked_ce as _masked_ce_kernels
from . import newton_schulz as _newton_schulz_kernels
from . import reference
from .reference import bd_attention_mask

__all__ = ["bd_attention", "bd_attention_mask", "masked_linear_cross_entropy", "newton_schulz"]


def use_triton(x) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def bd_attention(q, k, v, cu_seqlens, block_size, scale=None):
    """Block-diffusion attention over the 2L rows x_t ⊕ x_0; see reference.bd_attention_ref."""
    if use_triton(q):
        return _bd_attention_kernels.bd_attention(q, k, v, cu_seqlens, block_size, scale)
    return reference.bd_attention_ref(q, k, v, cu_seqlens, block_size, scale)


def masked_linear_cross_entropy(hidden, weight, targets, token_weights, vocab_size):
    """sum_i token_weights[i] · CE(hidden[i] · weight[:vocab_size]ᵀ, targets[i]); see the reference."""
    if use_triton(hidden):
        return _masked_ce_kernels.masked_linear_cross_entropy(hidden, weight, targets, token_weights, vocab_size)
    return reference.masked_linear_cross_entropy_ref(hidden, weight, targets, token_weights, vocab_size)


def newton_schulz(G, steps=5, coefficients=reference.QUINTIC, safety=0.0):
    """Newton–Schulz orthogonalization of a 2D or batched 3D tensor; see reference.newton_schulz_ref."""
    if use_triton(G):
        return _newton_schulz_kernels.newton_schulz(G, steps, coefficients, safety)
    return reference.newton_schulz_ref(G, steps, coefficients, safety)
