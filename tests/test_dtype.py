"""The GPU's precision and devices, exercised on a CPU.

A GPU run computes in bfloat16 with no autocast (bdiff/models/nano.py): the embedding's dtype is every activation's.
So `--dtype bfloat16` on a CPU executes the same dtype flow, and these tests check what reaches each op: q, k, v
and the hidden states in bf16, the loss in fp32, for the training step (eager and compiled), evaluation and
sampling (cached and uncached), against the float32 run of the same weights and noise. Where only shapes, dtypes
and devices matter, fake CUDA tensors (FakeTensorMode) run the CUDA code path itself. Reference: the same model in
float32.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import bdiff.kernels.newton_schulz  # decorated now, while conftest's TRITON_INTERPRET is set
import bdiff.models.objective
from bdiff.config import tiny
from bdiff.eval import evaluate
from bdiff.generation.sampling import generate
from bdiff.models.nano import BlockDiffusionLM
from bdiff.models.objective import document_layout
from helpers import user_env

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path of the ops: the PyTorch references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bf16 activations against the fp32 run of the same weights: 8-bit mantissas through two layers, ~1% on the loss.
LOSS_RTOL = 3e-2


class Seen:
    """Wraps the ops the model calls and records the dtype and device of what reaches them."""

    def __init__(self, monkeypatch):
        self.calls = []
        attention, loss = bdiff.models.objective.bd_attention, bdiff.models.objective.masked_linear_cross_entropy

        def bd_attention(q, k, v, *args):
            self.calls.append(("attention", q.dtype, k.dtype, v.dtype, q.device))
            return attention(q, k, v, *args)

        def masked_linear_cross_entropy(hidden, *args):
            out = loss(hidden, *args)
            self.calls.append(("loss", hidden.dtype, out.dtype, hidden.device))
            return out

        monkeypatch.setattr(bdiff.models.objective, "bd_attention", bd_attention)
        monkeypatch.setattr(bdiff.models.objective, "masked_linear_cross_entropy", masked_linear_cross_entropy)

    def of(self, op):
        return [c[1:] for c in self.calls if c[0] == op]


def tiny_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = BlockDiffusionLM(tiny().model)
    with torch.no_grad():  # lm_head starts at zero: random values make the loss depend on every layer
        model.lm_head.weight.normal_(0, 0.5)
    return model.set_dtype(dtype)


def sequence(gen, L=256):
    tokens = torch.randint(0, 256, (L,), generator=gen)
    tokens[torch.randperm(L, generator=gen)[:4]] = 256  # BOS: a few documents
    return tokens


def training_loss(model, tokens, seed):
    loss = model(tokens, noise_range=(0.3, 0.8), generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_step_in_bfloat16(gen, monkeypatch, compiled):
    seen = Seen(monkeypatch)
    tokens = sequence(gen)
    want = training_loss(tiny_model(torch.float32), tokens, seed=1)
    seen.calls.clear()
    model = tiny_model(torch.bfloat16)
    if compiled:
        model.compile_objective()
    loss = training_loss(model, tokens, seed=1)
    attention, losses = seen.of("attention"), seen.of("loss")
    assert attention and all(c[:3] == (torch.bfloat16,) * 3 for c in attention), \
        f"q, k and v must reach the attention in bf16, got {attention}"
    assert losses and all(c[:2] == (torch.bfloat16, torch.float32) for c in losses), \
        f"the hidden states must reach the loss in bf16 and the loss leave it in fp32, got {losses}"
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, want, rtol=LOSS_RTOL, atol=0)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "every parameter gets a finite gradient"
    assert model.embed.weight.grad.dtype == torch.bfloat16 and model.lm_head.weight.grad.dtype == torch.float32, \
        "the bf16 embedding gets a bf16 gradient; the fp32 master weights fp32 gradients"


def test_evaluation_in_bfloat16(gen, monkeypatch):
    seen = Seen(monkeypatch)
    tokens = sequence(gen)
    sequences = [(tokens, document_layout(tokens, 256, 16))]
    want = evaluate(tiny_model(torch.float32), sequences, levels=(0.5,))
    got = evaluate(tiny_model(torch.bfloat16), sequences, levels=(0.5,))
    assert all(c[0] == torch.bfloat16 for c in seen.of("attention")[-2:]), "evaluation runs the bf16 flow"
    torch.testing.assert_close(got["loss"], want["loss"], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(got["levels"][0.5], want["levels"][0.5], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_sampling_in_bfloat16(monkeypatch, cache):
    seen = Seen(monkeypatch)
    model = tiny_model(torch.bfloat16).eval()
    prompt = [256] + list(b"def main():")
    out = generate(model, [prompt], max_new_tokens=20, cache=cache, keep_logits=True, temperature=0)
    attention = seen.of("attention")  # the uncached sampler runs the training layout's attention op
    want = generate(tiny_model(torch.float32).eval(), [prompt], max_new_tokens=20, cache=cache, keep_logits=True,
                    temperature=0)
    assert len(out.tokens[0]) == 20
    if not cache:
        assert attention and all(c[:3] == (torch.bfloat16,) * 3 for c in attention), attention
    assert all(s.dtype == torch.float32 for s in out.step_logits), "logits leave the model in fp32"
    # The first step sees the same context in both runs: its logits agree to bf16's precision.
    torch.testing.assert_close(out.step_logits[0], want.step_logits[0], rtol=0, atol=0.1 * want.step_logits[0].std())


def test_kv_cache_keeps_the_activation_dtype(monkeypatch):
    model = tiny_model(torch.bfloat16).eval()
    dtypes, stored = [], []
    attention, write = torch.nn.functional.scaled_dot_product_attention, bdiff.generation.sampling.KVCache.write

    def record_attention(q, k, v, **kw):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return attention(q, k, v, **kw)

    def record_write(self, rows, lengths, k, v):
        stored.append((k.dtype, self.k.dtype))
        return write(self, rows, lengths, k, v)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record_attention)
    monkeypatch.setattr(bdiff.generation.sampling.KVCache, "write", record_write)
    generate(model, [[256, 100, 101]], max_new_tokens=32)
    assert dtypes and set(dtypes) == {(torch.bfloat16,) * 3}, f"q, cached and new keys must be bf16, got {set(dtypes)}"
    assert stored and set(stored) == {(torch.bfloat16,) * 2}, f"the cache must hold bf16, got {set(stored)}"


def test_ops_on_fake_cuda_tensors():
    """The ops' CUDA code path up to the launch, on fake CUDA tensors (no GPU, no memory): bf16 in gives bf16 out
    on the same device, the loss is fp32, inputs on two devices are refused in one line, and every launch runs
    under its tensors' device guard (Triton launches on the current device, not the tensors')."""
    import bdiff.kernels._device as device_module
    from bdiff.kernels.bd_attention import bd_attention, schedule_bounds
    from bdiff.kernels.masked_ce import masked_linear_cross_entropy

    L, H, D = 64, 2, 32
    schedule = schedule_bounds(torch.tensor([0, 40, L], dtype=torch.int32), L, 16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = (torch.empty(2 * L, H, D, dtype=torch.bfloat16, device="cuda:1") for _ in range(3))
        cu = torch.empty(3, dtype=torch.int32, device="cuda:1")
        out = bd_attention(q, k, v, cu, 16, None, torch.empty(schedule.shape, dtype=torch.int32, device="cuda:1"))
        assert out.dtype == torch.bfloat16 and out.device == torch.device("cuda", 1)
        with pytest.raises(ValueError, match=r"k must be on q's device cuda:1, got cuda:0"):
            bd_attention(q, torch.empty(2 * L, H, D, dtype=torch.bfloat16, device="cuda:0"), v, cu, 16)
        hidden = torch.empty(L, D, dtype=torch.bfloat16, device="cuda:1")
        weight = torch.empty(40, D, dtype=torch.float32, device="cuda:1")
        targets = torch.empty(L, dtype=torch.int64, device="cuda:1")
        token_weights = torch.empty(L, dtype=torch.float32, device="cuda:1")
        loss = masked_linear_cross_entropy(hidden, weight, targets, token_weights, 33)
        assert loss.dtype == torch.float32 and loss.device == torch.device("cuda", 1)
        with pytest.raises(ValueError, match=r"weight must be on hidden's device cuda:1, got cuda:0"):
            masked_linear_cross_entropy(hidden, weight.to("cuda:0"), targets, token_weights, 33)
        guard = device_module.on_device(q)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1, "launches must run on the tensors' GPU"


def test_no_autocast_in_training_evaluation_or_sampling():
    """Autocast applies different op lists per device (CUDA runs rms_norm in fp32, CPU does not), so a CPU run
    could not execute a GPU run's dtype flow: precision is explicit everywhere instead."""
    files = [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "sample.py")]
    files += [os.path.join(ROOT, "bdiff", f) for f in os.listdir(os.path.join(ROOT, "bdiff")) if f.endswith(".py")]
    found = [f for f in files if "torch.autocast" in open(f).read() or "amp.autocast" in open(f).read()]
    assert not found, f"autocast in {found}"


def test_train_command_in_bfloat16(stdlib_dir, tmp_path):
    """`python train.py --preset tiny --steps 3 --dtype bfloat16` on a CPU: the GPU's dtype flow, end to end."""
    result = subprocess.run([sys.executable, "train.py", "--device", "cpu", "--preset", "tiny", "--steps", "3",
                             "--dtype", "bfloat16", "--data_dir", stdlib_dir, "--out_dir", str(tmp_path), "--run_name",
                             "bf16"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=user_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dtype bfloat16" in result.stdout and "step 3/3 | val loss" in result.stdout, result.stdout[-2000:]
    final = torch.load(tmp_path / "bf16" / "final.pt", weights_only=True)
    assert final["model"]["embed.weight"].dtype == torch.bfloat16, "the embedding is kept in bf16, as the seed does"


@pytest.mark.interpreter
def test_every_launch_runs_under_its_tensors_device_guard(gen, monkeypatch):
    """Each op's launches (attention forward and backward, the loss, Newton–Schulz) happen inside `on_device`,
    the guard that makes a launch run on its tensors' GPU: counted through the interpreter."""
    import contextlib

    from triton.runtime.interpreter import InterpretedFunction

    import bdiff.kernels.bd_attention as attention
    import bdiff.kernels.masked_ce as loss
    import bdiff.kernels.newton_schulz as ns

    depth, launches = [0], []

    @contextlib.contextmanager
    def guard(x):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    launch = InterpretedFunction.__getitem__

    def checked(self, grid):
        launches.append((self.fn.__name__, depth[0]))
        return launch(self, grid)

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # this module's other tests take the references
    for module in (attention, loss, ns):
        monkeypatch.setattr(module, "on_device", guard)
    monkeypatch.setattr(InterpretedFunction, "__getitem__", checked)
    q, k, v = (torch.randn(64, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    attention.bd_attention(q, k, v, torch.tensor([0, 20, 32], dtype=torch.int32), 8).sum().backward()
    hidden = torch.randn(16, 16, generator=gen, requires_grad=True)
    loss.masked_linear_cross_entropy(hidden, torch.randn(40, 16, generator=gen), torch.randint(0, 33, (16,)),
                                     torch.rand(16, generator=gen), 33).backward()
    ns.newton_schulz(torch.randn(32, 48, generator=gen), steps=1)
    kernels = {name for name, _ in launches}
    assert {"_bd_attn_query_kernel", "_bd_attn_dkdv_kernel", "_bd_attn_delta_kernel", "_masked_ce_kernel",
            "_ns_sym_kernel", "_ns_update_kernel"} <= kernels, f"every kernel launched: {kernels}"
    outside = [name for name, d in launches if d == 0]
    assert not outside, f"launched outside the device guard: {outside}"
