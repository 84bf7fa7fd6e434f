"""The three ops run natively on a CUDA GPU, in bf16 and fp16, against the PyTorch references computed in float32 on
the same inputs; the loss op refuses bad input as the CPU paths do and stays normalised at huge logits; a compiled
20-step training run in bf16, then evaluation and sampling (cached, uncached, compiled) of the model it trained;
--cpu_rng's weights and noise equal to a CPU run's; with two GPUs, ops on cuda:1. Skipped without a GPU, and in a
process where the Triton interpreter is on (tests/conftest.py decides that once per process)."""
import json
import math
import os

import pytest
import torch

import train
from bdiff.kernels.bd_attention import bd_attention
from bdiff.kernels.masked_ce import masked_linear_cross_entropy
from bdiff.kernels.newton_schulz import newton_schulz
from bdiff.kernels.reference import bd_attention_ref, masked_linear_cross_entropy_ref, newton_schulz_ref
from conftest import INTERPRET
from helpers import torch_flags

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                                  reason="needs a CUDA GPU and the Triton interpreter off")]

# (dtype, atol, rtol) against the float32 reference on the same rounded inputs. The kernels round P (and dS) to
# the input dtype before their second dot and the output at the end: bf16 keeps 8 bits (2^-9 relative), fp16 11.
TOLERANCES = [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 4e-3, 4e-3)]


def documents(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("lengths,block_size,heads,dim", [
    ([900, 2100, 96, 1000], 16, 6, 128),  # the record's heads, head dim and block size; L=4096
    ([1, 7, 1, 200, 33], 5, 2, 64),  # length-1 documents, a block size that divides nothing, L fills no tile
])
def test_bd_attention_on_gpu(dtype, atol, rtol, lengths, block_size, heads, dim):
    cu = documents(lengths)
    R = 2 * int(cu[-1])
    q, k, v = (torch.randn(R, heads, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(R, heads, dim, device="cuda", dtype=dtype)
    out = bd_attention(q, k, v, cu, block_size)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = bd_attention_ref(*ref_in, cu, block_size)
    want_grads = torch.autograd.grad(want, ref_in, do.float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    for name, g, w in zip("qkv", grads, want_grads):
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def norm_error(got, want):
    return float((got.double() - want).norm() / want.norm())


# (dtype, allow TF32, limit) on the error relative to the float64 reference, in norm. bf16: the inputs' own rounding
# aside, P and dS are rounded to bf16 before their second dot and the results at the end (2.0-2.8e-3 measured before
# the tile classes). fp32: IEEE dots sum in fp32 (about 1e-7); TF32 dots keep 10 bits of each operand (1e-3).
PRECISION_LIMITS = [(torch.bfloat16, False, 3e-3), (torch.float32, False, 1e-5), (torch.float32, True, 3e-3)]


@pytest.mark.parametrize("dtype,allow_tf32,limit", PRECISION_LIMITS)
def test_bd_attention_precision_against_float64(dtype, allow_tf32, limit):
    """The record's heads on ~1000-token documents against the float64 reference on the same rounded inputs: fp32 runs
    IEEE fp32 dots unless PyTorch allows TF32 (torch.backends.cuda.matmul.allow_tf32)."""
    cu = documents([900, 2100, 96, 1000])
    q, k, v = (torch.randn(8192, 6, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(8192, 6, 128, device="cuda", dtype=dtype)
    with torch_flags(allow_tf32=allow_tf32):
        out = bd_attention(q, k, v, cu, 16)
        grads = torch.autograd.grad(out, (q, k, v), do)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = bd_attention_ref(*exact, cu, 16)
    want_grads = torch.autograd.grad(want, exact, do.double())
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        assert norm_error(got, w) <= limit, f"{name}: {norm_error(got, w):.2e} relative error (limit {limit:.0e})"


def test_bd_attention_backward_is_deterministic_when_asked():
    """torch.use_deterministic_algorithms(True): two backward passes give the same bits (an atomic dQ, whose sum order
    varies, is turned off)."""
    cu = documents([300, 700, 24])
    q, k, v = (torch.randn(2048, 6, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(2048, 6, 128, device="cuda", dtype=torch.bfloat16)
    with torch_flags(deterministic=True):
        first = torch.autograd.grad(bd_attention(q, k, v, cu, 16), (q, k, v), do)
        second = torch.autograd.grad(bd_attention(q, k, v, cu, 16), (q, k, v), do)
    for name, a, b in zip("qkv", first, second):
        assert torch.equal(a, b), f"d{name} differs between two runs"


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_masked_linear_cross_entropy_on_gpu(dtype, atol, rtol):
    N, D, V, vocab = 3000, 768, 50304, 50258  # record head; N spans several chunks
    hidden = torch.randn(N, D, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device="cuda") * 0.02).requires_grad_()  # fp32 like lm_head
    targets = torch.randint(0, vocab, (N,), device="cuda")
    token_weights = torch.rand(N, device="cuda") * 3 * (torch.rand(N, device="cuda") < 0.55)
    loss = masked_linear_cross_entropy(hidden, weight, targets, token_weights, vocab)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    ref_in = [hidden.detach().float().requires_grad_(), weight.detach().to(dtype).float().requires_grad_()]
    want = masked_linear_cross_entropy_ref(*ref_in, targets, token_weights, vocab)
    want_dh, want_dw = torch.autograd.grad(want, ref_in)
    torch.testing.assert_close(loss, want, atol=atol * N, rtol=rtol)
    torch.testing.assert_close(dh.float(), want_dh, atol=atol, rtol=rtol, msg=lambda m: f"dhidden: {m}")
    torch.testing.assert_close(dw, want_dw, atol=atol, rtol=rtol, msg=lambda m: f"dweight: {m}")


@pytest.mark.parametrize("shape", [(768, 768), (6, 768, 3072), (3072, 768), (130, 200)])
def test_newton_schulz_on_gpu(shape):
    G = torch.randn(*shape, device="cuda")
    # bf16 operands over five iterations: each entry of the result (size ~1/sqrt(n)) within 3e-2 absolute.
    torch.testing.assert_close(newton_schulz(G), newton_schulz_ref(G), atol=3e-2, rtol=0)


@pytest.mark.parametrize("change,match", [
    (dict(targets=lambda t: t.fill_(10)), "targets must lie in"),
    (dict(targets=lambda t: t.fill_(-1)), "targets must lie in"),
    (dict(token_weights=lambda w: w.neg_()), "token_weights must be >= 0"),
])
def test_masked_ce_refuses_what_the_cpu_paths_refuse(change, match):
    """The same bad values as tests/test_masked_ce.py::test_bad_input, the same one-line errors."""
    args = dict(hidden=torch.randn(8, 64, device="cuda"), weight=torch.randn(16, 64, device="cuda"),
                targets=torch.randint(0, 10, (8,), device="cuda"), token_weights=torch.rand(8, device="cuda") + 0.1)
    for name, edit in change.items():
        edit(args[name])
    with pytest.raises(ValueError, match=match):
        masked_linear_cross_entropy(**args, vocab_size=10)


@pytest.mark.parametrize("magnitude", [1e4, 1e5])
def test_masked_ce_stays_normalised_at_huge_logits(magnitude):
    """Logits around 1e4 and 1e5 (fp32, exact: an identity lm_head): the gradient against float64 on the same
    logits, at the CPU path's tolerance (softmax as exp(x - max) / sum, not exp(x - lse))."""
    N, V = 64, 128
    hidden = (magnitude + 30 * torch.randn(N, V, device="cuda")).requires_grad_()
    weight = torch.eye(V, device="cuda").requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    token_weights = torch.rand(N, device="cuda") + 0.5
    (dh,) = torch.autograd.grad(masked_linear_cross_entropy(hidden, weight, targets, token_weights, V), (hidden,))
    logits = (hidden.detach() @ weight.detach().T).double()  # the fp32 logits the op computes
    want = logits.softmax(-1)
    want[torch.arange(N), targets] -= 1
    torch.testing.assert_close(dh.double(), want * token_weights.double()[:, None], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_run_on_their_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: every launch must run under cuda:1's device guard."""
    torch.cuda.set_device(0)
    cu = torch.tensor([0, 300, 512], dtype=torch.int32, device="cuda:1")
    q, k, v = (torch.randn(1024, 2, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    out = bd_attention(q, k, v, cu, 16)
    want = bd_attention_ref(q.float(), k.float(), v.float(), cu, 16)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    G = torch.randn(256, 384, device="cuda:1")
    torch.testing.assert_close(newton_schulz(G), newton_schulz_ref(G), atol=3e-2, rtol=0)


def test_compiled_training_then_evaluation_and_sampling(stdlib_dir, tmp_path):
    """20 compiled steps of a small model (head dim 64, a shipped kernel configuration) on the GPU in bf16 (the
    default there); then its evaluation and sampling, cached and uncached, run on the GPU in bf16."""
    from bdiff.data import shard_files
    from bdiff.eval import evaluate, validation_sequences
    from bdiff.generation.sampling import generate

    model = train.main(["--preset", "tiny", "--model_dim", "128", "--num_heads", "2", "--head_dim", "64",
                        "--steps", "20", "--compile", "--data_dir", stdlib_dir, "--out_dir", str(tmp_path),
                        "--run_name", "gpu", "--log_every", "5"])
    assert next(model.parameters()).is_cuda and model.dtype == torch.bfloat16
    with open(os.path.join(tmp_path, "gpu.jsonl")) as f:
        losses = [line for line in f if '"train_loss"' in line]
    assert len(losses) == 20
    sequences = validation_sequences(shard_files("stdlib", stdlib_dir, "val"), 512, 2048, model.cfg)
    result = evaluate(model, sequences, draws=2, levels=(0.5,), device="cuda")
    assert all(map(math.isfinite, result["draws"])) and result["loss"] < 6, result
    prompt = [model.cfg.bos_id] + list(b"def main():")
    cached = generate(model, [prompt], max_new_tokens=48, temperature=0, keep_logits=True)
    uncached = generate(model, [prompt], max_new_tokens=48, temperature=0, keep_logits=True, cache=False)
    assert len(cached.tokens[0]) == 48 and len(uncached.tokens[0]) == 48
    # The first step sees the same context both ways: its logits agree to bf16's precision.
    first, again = cached.step_logits[0], uncached.step_logits[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0.05 * float(again.std()) + 1e-3)
    # The model call compiled and captured as CUDA graphs, for a batch of prompts of two lengths: the same first
    # step to bf16's precision (compiled kernels may round otherwise), and text for every sequence.
    batch = [prompt, prompt[:4]]
    eager = generate(model, batch, max_new_tokens=48, temperature=0, keep_logits=True)
    graphed = generate(model, batch, max_new_tokens=48, temperature=0, keep_logits=True, compile="reduce-overhead")
    assert len(graphed.tokens) == 2 and all(graphed.tokens), graphed.tokens
    first, again = graphed.step_logits[0], eager.step_logits[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0.05 * float(again.std()) + 1e-3)


def test_cpu_rng_gives_a_gpu_run_the_cpu_runs_weights_and_noise(stdlib_dir, tmp_path):
    """--cpu_rng: a GPU run starts from the CPU run's weights and draws its noise, so in float32 their first losses
    agree to arithmetic (CUDA's own streams give other weights and masks: losses a few percent apart)."""
    from bdiff.models.objective import noise_blocks

    tokens = torch.randint(0, 256, (4096,))
    blocks = torch.arange(4096) // 16
    want = noise_blocks(tokens, blocks, 256, 0.3, 0.8, generator=torch.Generator().manual_seed(5))
    got = noise_blocks(tokens.cuda(), blocks.cuda(), 256, 0.3, 0.8, generator=torch.Generator().manual_seed(5))
    for name, a, b in zip(("x_t", "masked", "t"), want, got):
        assert torch.equal(a, b.cpu()), f"a CPU generator's {name} differs when the tokens are on the GPU"
    args = ["--preset", "tiny", "--steps", "2", "--dtype", "float32", "--cpu_rng", "--val_every", "0",
            "--data_dir", stdlib_dir, "--out_dir", str(tmp_path), "--log_every", "1"]
    losses = {}
    for device in ("cpu", "cuda"):
        train.main(args + ["--device", device, "--run_name", device])
        with open(os.path.join(tmp_path, f"{device}.jsonl")) as f:
            losses[device] = [json.loads(line)["train_loss"] for line in f if '"train_loss"' in line]
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=1e-4), losses
