"""The model and its objective: parameter count of the record preset, document layout and noising,
and the loss against a direct transcription of SPEC.md §1 step 5."""
import pytest
import torch

from bdiff.config import record, tiny
from bdiff.model import BlockDiffusionLM
from bdiff.noise import document_layout, noise_blocks

BOS, MASK = 256, 257


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """The model on CPU runs the PyTorch references (kernels/__init__ dispatch); the kernels have their
    own tests, and test_model_through_triton_kernel checks the model through them once."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_record_parameter_count():
    with torch.device("meta"):
        model = BlockDiffusionLM(record().model)
    assert sum(p.numel() for p in model.parameters()) == 162_166_314
    assert model.lm_head.weight.shape == (50304, 768), "lm_head rows are padded to a multiple of 128"


def random_tokens(gen, L, doc_starts):
    tokens = torch.randint(0, 256, (L,), generator=gen)
    tokens[doc_starts] = BOS
    return tokens


def test_document_layout(gen):
    tokens = random_tokens(gen, 100, [10, 11, 60])  # a document of length 1 at position 10
    layout = document_layout(tokens, BOS, block_size=16)
    assert layout.cu_seqlens.tolist() == [0, 10, 11, 60, 100]
    assert layout.positions[[0, 10, 11, 27, 60, 99]].tolist() == [0, 0, 0, 16, 0, 39], "positions restart at BOS"
    starts = [0, 10, 11, 27, 43, 59, 60, 76, 92]  # where a new block begins
    changes = (layout.blocks[1:] != layout.blocks[:-1]).nonzero().flatten() + 1
    assert [0] + changes.tolist() == starts, "blocks must restart at documents and never straddle one"
    assert layout.blocks.unique().numel() == len(starts), "block ids must be unique per (document, block)"


def test_noise_blocks(gen):
    tokens = random_tokens(gen, 4096, [0, 1000, 2500])
    layout = document_layout(tokens, BOS, block_size=16)
    x_t, masked, t = noise_blocks(tokens, layout.blocks, MASK, 0.3, 0.8, generator=gen)
    assert ((t >= 0.3) & (t <= 0.8)).all(), "t must lie in the noise range"
    for b in layout.blocks.unique():
        assert t[layout.blocks == b].unique().numel() == 1, "one t per block"
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], MASK)), "masked tokens become MASK"
    assert torch.equal(x_t[~masked], tokens[~masked]), "unmasked tokens stay"
    # 4096 Bernoulli draws: the masked fraction is within 4.5 standard deviations of the mean of t.
    assert abs(masked.float().mean() - t.mean()) < 4.5 * 0.5 / 4096**0.5


def tiny_model(gen):
    model = BlockDiffusionLM(tiny().model)
    with torch.no_grad():  # the head starts at zero; random values make the loss depend on everything
        model.lm_head.weight.normal_(0, 0.5, generator=gen)
        model.skip_weights.uniform_(0.5, 1.5, generator=gen)
    return model


def test_loss_matches_objective(gen):
    model = tiny_model(gen)
    tokens = random_tokens(gen, 80, [0, 23, 24, 50])
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    loss = model(tokens, (0.0, 1.0), generator=torch.Generator().manual_seed(seed))
    # Transcription: same noise draw, full logits of the noisy half, a sum over masked positions.
    layout = document_layout(tokens, BOS, 16)
    x_t, masked, t = noise_blocks(tokens, layout.blocks, MASK, 0.0, 1.0,
                                  generator=torch.Generator().manual_seed(seed))
    L, V = tokens.numel(), model.cfg.vocab_size
    h = model.hidden_states(torch.cat([x_t, tokens]), layout.positions, layout.cu_seqlens)
    logits = h[:L].double() @ model.lm_head.weight[:V].double().T
    want = sum(-torch.log_softmax(logits[i], -1)[tokens[i]] / (t[i] + 1e-3) for i in range(L) if masked[i]) / L
    assert masked.any()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)


def test_clean_half_ignores_noise(gen):
    model = tiny_model(gen)
    tokens = random_tokens(gen, 64, [0, 30])
    layout = document_layout(tokens, BOS, 16)
    L = 64
    h1 = model.hidden_states(torch.cat([tokens, tokens]), layout.positions, layout.cu_seqlens)
    noisy = torch.full_like(tokens, MASK)
    h2 = model.hidden_states(torch.cat([noisy, tokens]), layout.positions, layout.cu_seqlens)
    torch.testing.assert_close(h1[L:], h2[L:], atol=0, rtol=0, msg="clean tokens must not see noisy tokens")
    assert not torch.allclose(h1[:L], h2[:L]), "noisy rows must depend on the noisy tokens"


def test_forward_backward_reaches_every_parameter(gen):
    model = tiny_model(gen)
    loss = model(random_tokens(gen, 96, [0, 40]), generator=gen)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"


def test_bad_tokens_shape():
    with pytest.raises(ValueError, match="tokens"):
        BlockDiffusionLM(tiny().model)(torch.zeros(2, 8, dtype=torch.long) + 5)


def test_model_through_triton_kernel(gen, monkeypatch):
    """The loss and every gradient are the same whether attention runs the reference or the Triton kernel."""
    model = tiny_model(gen)
    tokens = random_tokens(gen, 96, [0, 37])
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    results = []
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        model.zero_grad()
        loss = model(tokens, generator=torch.Generator().manual_seed(seed))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
