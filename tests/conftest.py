import os

import pytest

# The README's command runs the suite in one pytest-xdist worker per core: each keeps torch's intra-op pool to one
# thread (read at import, and inherited by the trainers the tests start), since pools of one thread per core in
# every worker would spin against each other (OpenMP) and run slower than one pool alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # importing torch decorates none of our kernels

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when `kernels` is imported, so it is
# decided here, once per process. Without a GPU, CPU tensors run the Triton kernels through the interpreter
# (the parity tests, marked `interpreter`). With a GPU the kernels run natively (tests/test_gpu.py) and the
# interpreter tests skip, unless TRITON_INTERPRET=1 is set by hand (then the GPU tests skip).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_report_header(config):
    """The releases a run used, first in its output: a failure after a new release names the release."""
    import importlib.metadata as metadata
    import platform

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    names = ("torch", "triton", "transformers", "tokenizers", "numpy")
    return f"bdiff's dependencies: python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names)


# The files that take longest (a run's --durations), in that order. The README's command runs the suite in xdist
# workers that take whole files (`--dist loadfile`, for the module-scoped fixtures) in collection order
# (`--no-loadscope-reorder`): longest first, so that the workers end together rather than one waiting on the other.
LONGEST_FIRST = ["test_compile.py", "test_bd_attention.py", "test_checkpoint.py", "test_train.py", "test_fsdp.py"]


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))  # stable: each file's tests stay together and in order
    if INTERPRET:
        return
    skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (the default "
                                   "without a GPU)")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def interpreter_setting_kept():
    """Which CPU path an op takes is read from TRITON_INTERPRET at each call: a test that unsets it for good (rather
    than through `reference_ops`) silently turns every later kernel-parity test in its process into the reference
    compared with itself (this happened: test_muon once left the Newton–Schulz kernels untested)."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    assert os.environ.get("TRITON_INTERPRET") == before, \
        "this test left TRITON_INTERPRET changed for the tests after it: use the reference_ops fixture"


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.fixture
def reference_ops(monkeypatch):
    """CPU tensors run the PyTorch references (the model's and trainer's CPU path), not the interpreter, which
    would take minutes per training step; the kernels have their own tests."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="session")
def stdlib_dir(tmp_path_factory):
    """The embedded byte-level corpus, built once per test session."""
    from bdiff.data import build_stdlib_corpus  # imported late: nothing of bdiff loads before the setting above

    path = tmp_path_factory.mktemp("stdlib")
    build_stdlib_corpus(str(path))
    return str(path)


@pytest.fixture(params=["reference", "interpreter"])
def cpu_path(request, monkeypatch):
    """Each CPU path of an operator in turn: the PyTorch reference, then the Triton kernels in the interpreter."""
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif not INTERPRET:
        pytest.skip("the interpreter is off in this process")
    return request.param
