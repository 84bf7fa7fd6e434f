"""The three heavy ops of bdiff, each a PyTorch operator (torch.library) with a Triton kernel for CUDA tensors
and a PyTorch reference (kernels/reference.py) for CPU tensors:

    torch.ops.bdiff.bd_attention                 kernels.bd_attention.bd_attention
    torch.ops.bdiff.masked_linear_cross_entropy  kernels.masked_ce.masked_linear_cross_entropy
    torch.ops.bdiff.newton_schulz                kernels.newton_schulz.newton_schulz

The functions on the right take the arguments of their references and return what the references return;
the operators behind them also carry what the backward needs (see each module). With TRITON_INTERPRET=1 set
before this package is imported, CPU tensors run the Triton kernels through the interpreter (how the tests
check them). Importing the package registers the operators.
"""
from . import bd_attention, masked_ce, newton_schulz, reference  # noqa: F401  (registers torch.ops.bdiff.*)
