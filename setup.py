from setuptools import setup

setup(
    name="bdiff",
    version="0.1.0",
    description="Block-diffusion language models (BD3-LM) with Triton kernels and a DDP trainer",
    # The Triton kernels live in the top-level kernels/ directory and install as bdiff.kernels (bdiff/kernels is a
    # link to it): the name `kernels` belongs to Hugging Face's package. kernels/ has no __init__.py, so even
    # from the repository root it never shadows an installed `kernels` (a regular package wins over it).
    packages=["bdiff", "bdiff.kernels"],
    python_requires=">=3.10",
    # torch is left unpinned for GPU users; the README pins the CPU build for the CPU commands.
    # pytest-benchmark: bench/bench_<op>.py are both scripts and the benchmark suite's tests. safetensors: the
    # weights format of model directories and the Hub (bdiff/hub.py).
    install_requires=["torch>=2.5", "triton>=3.2", "numpy", "huggingface_hub", "safetensors", "pytest-benchmark"],
    extras_require={"test": ["pytest", "hypothesis", "matplotlib", "kernels"], "plot": ["matplotlib"]},
)
