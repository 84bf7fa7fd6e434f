"""Masked, token-weighted linear cross-entropy: masked_linear_cross_entropy_ref against a row-by-row
log-sum-exp written out in float64."""
import pytest
import torch

from kernels.reference import masked_linear_cross_entropy_ref


def direct_loss(hidden, weight, targets, token_weights, vocab_size):
    total = torch.zeros((), dtype=torch.float64)
    for i in range(hidden.shape[0]):
        logits = weight[:vocab_size].double() @ hidden[i].double()  # (vocab_size,)
        lse = logits.max() + torch.log(torch.exp(logits - logits.max()).sum())
        total = total + token_weights[i].double() * (lse - logits[targets[i]])
    return total


TOLERANCES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-4)]  # fp32 logits of size ~sqrt(D) summed over V: ~1e-5 relative error


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
