"""bdiff: block-diffusion language models (BD3-LM) with Triton kernels; see README.md."""
__version__ = "0.1.0"
