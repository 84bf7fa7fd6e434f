"""Masked, token-weighted linear cross-entropy: masked_linear_cross_entropy_ref against a row-by-row
log-sum-exp written out in float64."""
import pytest
import torch

import bdiff.kernels.masked_ce as mce
from bdiff.kernels.accounting import peak_extra_bytes
from bdiff.kernels.reference import masked_linear_cross_entropy_ref


def direct_loss(hidden, weight, targets, token_weights, vocab_size):
    total = torch.zeros((), dtype=torch.float64)
    for i in range(hidden.shape[0]):
        logits = weight[:vocab_size].double() @ hidden[i].double()  # (vocab_size,)
        lse = logits.max() + torch.log(torch.exp(logits - logits.max()).sum())
        total = total + token_weights[i].double() * (lse - logits[targets[i]])
    return total


# fp32 logits of size ~sqrt(D) summed over V: ~1e-5 relative error
TOLERANCES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-4)]


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,D,V,vocab_size", [(64, 32, 1024, 1000), (37, 16, 264, 258)])
def test_reference_matches_direct(gen, dtype, atol, rtol, N, D, V, vocab_size):
    hidden = torch.randn(N, D, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab_size, (N,), generator=gen)
    token_weights = torch.rand(N, generator=gen, dtype=dtype) * (torch.rand(N, generator=gen) < 0.55)
    loss = masked_linear_cross_entropy_ref(hidden, weight, targets, token_weights, vocab_size)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    want = direct_loss(hidden, weight, targets, token_weights, vocab_size)
    want_dh, want_dw = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(loss.double(), want, atol=atol * N, rtol=rtol)
    torch.testing.assert_close(dh, want_dh, atol=atol, rtol=rtol, msg=lambda m: f"dhidden: {m}")
    torch.testing.assert_close(dw, want_dw, atol=atol, rtol=rtol, msg=lambda m: f"dweight: {m}")
    assert not dw[vocab_size:].any(), "padded weight rows must get zero gradient"
    assert not dh[token_weights == 0].any(), "rows with zero weight must get zero gradient"


# ---- the Triton kernel (kernels/masked_ce.py) against the reference, through the interpreter ---------------

# (dtype, atol, rtol) against the float64 reference. float32: fp32 logits summed over 50k columns.
# float16: hidden, weight, logits and the logit gradient are fp16 (2^-11 relative) around fp32 sums.
KERNEL_TOLERANCES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 2e-2)]


def inputs(gen, N, D, V, vocab_size, dtype, scale=1.0, frac=0.55):
    hidden = (torch.randn(N, D, generator=gen) * scale).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab_size, (N,), generator=gen)
    token_weights = torch.rand(N, generator=gen) * 3 * (torch.rand(N, generator=gen) < frac)
    return hidden, weight, targets, token_weights


def against_reference(hidden, weight, targets, token_weights, vocab_size, atol, rtol, dw_atol=None):
    loss = mce.masked_linear_cross_entropy(hidden, weight, targets, token_weights, vocab_size)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    want = masked_linear_cross_entropy_ref(*ref_in, targets, token_weights.double(), vocab_size)
    want_dh, want_dw = torch.autograd.grad(want, ref_in)
    torch.testing.assert_close(loss.double(), want, atol=atol * len(targets), rtol=rtol)
    torch.testing.assert_close(dh.double(), want_dh, atol=atol, rtol=rtol, msg=lambda m: f"dhidden: {m}")
    torch.testing.assert_close(dw.double(), want_dw, atol=atol if dw_atol is None else dw_atol, rtol=rtol,
                               msg=lambda m: f"dweight: {m}")
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    return loss, dh, dw


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,atol,rtol", KERNEL_TOLERANCES)
@pytest.mark.parametrize("N,D,V,vocab_size", [
    (300, 32, 50304, 50258),  # realistic: GPT-2 + MASK, lm_head padded to 50304; N spans 2 chunks, unevenly
    (37, 16, 50257, 50257),  # unpadded weight: rows of width 50257, not 16-aligned
    (200, 16, 1000, 1000),  # small vocabulary
])
def test_kernel_matches_reference(gen, N, D, V, vocab_size, dtype, atol, rtol):
    _, _, dw = against_reference(*inputs(gen, N, D, V, vocab_size, dtype), vocab_size, atol, rtol)
    assert not dw[vocab_size:].any(), "padded weight rows must get zero gradient"


@pytest.mark.interpreter
def test_all_weights_zero(gen):
    hidden, weight, targets, _ = inputs(gen, 64, 16, 1000, 1000, torch.float32)
    loss = mce.masked_linear_cross_entropy(hidden, weight, targets, torch.zeros(64), 1000)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and not dh.any() and not dw.any(), "no row carries loss: all zero, no NaN"


@pytest.mark.parametrize("magnitude", [1e4, 1e5])
def test_softmax_stays_normalised_at_huge_logits(gen, cpu_path, magnitude):
    """Logits around 1e4 and 1e5, exact in fp32 (an identity lm_head, so the logits are the hidden values): the
    gradient against float64 on the same fp32 logits, at the CPU reference's tolerance, on every CPU path. A
    softmax taken as exp(x − lse), with lse rounded to fp32, is off by up to half an ulp of 1e4 (5e-4 relative)."""
    N, V = 64, 128
    hidden = (magnitude + 30 * torch.randn(N, V, generator=gen)).requires_grad_()
    weight = torch.eye(V).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    token_weights = torch.rand(N, generator=gen) + 0.5
    (dh,) = torch.autograd.grad(mce.masked_linear_cross_entropy(hidden, weight, targets, token_weights, V), (hidden,))
    want = hidden.detach().double().softmax(-1)
    want[torch.arange(N), targets] -= 1
    torch.testing.assert_close(dh.double(), want * token_weights.double()[:, None], atol=1e-6, rtol=1e-5)


@pytest.mark.interpreter
def test_huge_logits_stay_finite(gen):
    hidden, weight, targets, token_weights = inputs(gen, 50, 16, 1000, 1000, torch.float32, scale=2500.0)
    # fp32 logits of 1e4 carry ~1e4 * 2^-24 * sqrt(D) ≈ 1e-3 of rounding each, which goes straight into p.
    # dweight[v] sums token_weight * (p - onehot) * hidden over rows: where two logits of a row nearly tie, p's error
    # (up to p(1 - p) * 2 * 1e-2 ≈ 5e-3 for logits up to 4e4) arrives multiplied by token_weight * hidden, ~1e4.
    # Over 800 seeds the worst was 4e-4 of max|token_weight * hidden|; a flat 1e-2 failed one seed in 800.
    dw_atol = 5e-3 * (token_weights[:, None] * hidden.detach()).abs().max().item()
    loss, dh, dw = against_reference(hidden, weight, targets, token_weights, 1000, 1e-2, 1e-2, dw_atol=dw_atol)
    assert (hidden.detach() @ weight.detach().T).abs().max() > 1e4, "the test must reach logits of 1e4"
    assert torch.isfinite(loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


@pytest.mark.interpreter
def test_bf16_true_class_gradient():
    """p(target) ≈ 0.994: its gradient p − 1 ≈ −0.006 must come from fp32, not from a bf16 p that rounds
    toward 1. The logits are small integers, exact in bf16, so only the kernel's arithmetic can err."""
    V, D, t = 1000, 16, 7
    hidden = torch.zeros(4, D, dtype=torch.bfloat16)
    hidden[:, 0] = 1
    weight = torch.zeros(V, D, dtype=torch.bfloat16)
    weight[t, 0] = 12  # logit 12 for the target, 0 for the 999 others
    hidden.requires_grad_()
    loss = mce.masked_linear_cross_entropy(hidden, weight, torch.full((4,), t), torch.ones(4), V)
    (dh,) = torch.autograd.grad(loss, (hidden,))
    p = torch.tensor(12.0, dtype=torch.float64).exp() / (torch.tensor(12.0, dtype=torch.float64).exp() + 999)
    want = (p - 1) * 12  # dloss/dh[:, 0] = (p_t - 1) * W[t, 0]
    torch.testing.assert_close(dh[:, 0].double(), want.expand(4), rtol=1e-2, atol=0)


def good_inputs():
    return dict(hidden=torch.randn(8, 4), weight=torch.randn(16, 4), targets=torch.randint(0, 10, (8,)),
                token_weights=torch.rand(8), vocab_size=10)


@pytest.mark.parametrize("change,match", [
    (dict(hidden=torch.randn(8, 5)), "weight must be"),
    (dict(targets=torch.randint(0, 10, (7,))), "targets must be"),
    (dict(token_weights=torch.rand(9)), "token_weights must be"),
    (dict(hidden=torch.randn(8, 4).double()), "hidden must be float16"),
    (dict(targets=torch.rand(8)), "targets must be int"),
    (dict(weight=torch.empty(16, 4, device="meta")), "weight must be on"),
    (dict(targets=torch.full((8,), 10)), "targets must lie in"),
    (dict(token_weights=-torch.rand(8)), "token_weights must be >= 0"),
    (dict(vocab_size=17), "vocab_size"),
])
def test_bad_input(change, match, cpu_path):
    """Every path refuses the same inputs with the same error (tests/test_gpu.py checks the GPU's)."""
    with pytest.raises(ValueError, match=match):
        mce.masked_linear_cross_entropy(**dict(good_inputs(), **change))


@pytest.mark.interpreter
def test_memory_does_not_grow_with_rows(gen, monkeypatch):
    # A 4 MiB logits budget (128 rows of V=8192 in fp32) makes 4 and 16 chunks of a small problem: the same
    # bound as the real 32 MiB at V=50304, at a twelfth of the interpreter's time.
    budget = 4 * 2**20
    monkeypatch.setattr(mce, "LOGITS_BUDGET", budget)
    V, D = 8192, 16
    extra = {}
    for N in (512, 2048):
        args = inputs(gen, N, D, V, V - 46, torch.float32)
        extra[N] = peak_extra_bytes(mce.masked_linear_cross_entropy, *args[:4], V - 46)
    reference = peak_extra_bytes(masked_linear_cross_entropy_ref, *inputs(gen, 2048, D, V, V - 46, torch.float32),
                                 V - 46)
    assert extra[2048] <= 2 * budget, f"{extra[2048] / 2**20:.1f} MiB beyond inputs and gradients at N=2048"
    assert extra[2048] - extra[512] < 2**20, f"extra memory grows with N: {extra}"
    assert reference > 10 * extra[2048], f"the reference holds N x V logits: {reference / 2**20:.0f} MiB at N=2048"


def test_opcheck(gen, cpu_path):
    """torch.ops.bdiff.masked_linear_cross_entropy: schema, fake implementation, autograd and AOT dispatch."""
    hidden, weight, targets, token_weights = inputs(gen, 37, 16, 40, 33, torch.float32)
    for need in ((True, True), (True, False), (False, False)):
        torch.library.opcheck(torch.ops.bdiff.masked_linear_cross_entropy.default,
                              (hidden, weight, targets, token_weights, 33, *need))


def test_op_reference_gradients_match_autograd(gen, monkeypatch):
    """The CPU operator's written-out gradients (reference.masked_linear_cross_entropy_ref_grads) against
    autograd through masked_linear_cross_entropy_ref."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, targets, token_weights = inputs(gen, 50, 8, 24, 21, torch.float32)
    _, _, dw = against_reference(hidden, weight, targets, token_weights, 21, 1e-5, 1e-5)
    assert not dw[21:].any(), "the weight's padding rows take no part in the softmax: no gradient"
