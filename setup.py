from setuptools import setup

setup(
    name="bdiff",
    version="0.1.0",
    description="Block-diffusion language models (BD3-LM) with Triton kernels and a DDP trainer",
    packages=["bdiff", "kernels"],
    python_requires=">=3.10",
    # torch is left unpinned for GPU users; the README pins the CPU build for the CPU commands.
    install_requires=["torch>=2.5", "triton>=3.2", "numpy", "huggingface_hub"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"], "plot": ["matplotlib"]},
)
