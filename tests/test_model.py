"""The model and its objective: parameter count of the record preset, and the loss against a direct
transcription of the objective (docs/design.md §1); layout and noising are tests/test_noise.py's."""
import dataclasses

import pytest
import torch

from bdiff.config import PRESETS, record, tiny
from bdiff.models.nano import BlockDiffusionLM
from bdiff.models.objective import document_layout, noise_blocks
from helpers import BOS, MASK, random_tokens, seed_positions

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references


def test_record_parameter_count():
    with torch.device("meta"):
        model = BlockDiffusionLM(record().model)
    assert sum(p.numel() for p in model.parameters()) == 162_166_314
    assert model.lm_head.weight.shape == (50304, 768), "lm_head rows are padded to a multiple of 128"


def test_loss_on_a_mid_document_sequence_matches_the_formula(gen):
    """The model's loss on a sequence that starts inside a document, against the objective written out in
    float64 from the seed's position rule: blocks = position // block_size within each document, noisy rows
    see their own block and earlier clean blocks, clean rows clean blocks up to their own; loss = sum over
    masked positions of CE / (t + 1e-3), divided by L."""
    model = tiny_model(gen)
    tokens = random_tokens(gen, 90, [29, 30, 71])  # no BOS at 0: a fragment of 29 tokens opens the sequence
    L, bs = 90, model.cfg.block_size
    pos = seed_positions(tokens.tolist())
    doc = torch.tensor(tokens.tolist()).eq(BOS).cumsum(0)  # (L,) document index (the fragment is 0)
    block = torch.tensor(pos) // bs
    new_block = torch.cat([torch.tensor([False]), (doc[1:] != doc[:-1]) | (block[1:] != block[:-1])])
    blocks = new_block.cumsum(0)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    loss = model(tokens, noise_range=(0.0, 1.0), generator=torch.Generator().manual_seed(seed))
    x_t, masked, t = noise_blocks(tokens, blocks, MASK, 0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    d2, b2, noisy = doc.repeat(2), block.repeat(2), torch.arange(2 * L) < L
    same = d2[:, None] == d2[None, :]
    rules = torch.where(noisy[:, None],
                        torch.where(noisy[None, :], b2[None, :] == b2[:, None], b2[None, :] < b2[:, None]),
                        ~noisy[None, :] & (b2[None, :] <= b2[:, None]))
    mask = same & rules  # (2L, 2L)

    def attend(layer, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask).transpose(0, 1)

    model64 = model.double()
    h = model64.run_layers(torch.cat([x_t, tokens]), torch.tensor(pos * 2), attend)
    logits = h[:L] @ model64.lm_head.weight[:model.cfg.vocab_size].T
    want = sum(-torch.log_softmax(logits[i], -1)[tokens[i]] / (t[i] + 1e-3) for i in range(L) if masked[i]) / L
    assert masked.any()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)


def tiny_model(gen, separator="opens"):
    """The tiny model in the seed's layout by default: the objective written out below is the seed's."""
    model = BlockDiffusionLM(dataclasses.replace(tiny().model, separator=separator))
    with torch.no_grad():  # the head starts at zero; random values make the loss depend on everything
        model.lm_head.weight.normal_(0, 0.5, generator=gen)
        model.skip_weights.uniform_(0.5, 1.5, generator=gen)
    return model


def test_loss_matches_objective(gen):
    model = tiny_model(gen)
    tokens = random_tokens(gen, 80, [0, 23, 24, 50])
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    loss = model(tokens, noise_range=(0.0, 1.0), generator=torch.Generator().manual_seed(seed))
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
    loss = model(random_tokens(gen, 96, [0, 40]), noise_range=(0.3, 0.8), generator=gen)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"


def test_bad_tokens_shape():
    with pytest.raises(ValueError, match="tokens"):
        BlockDiffusionLM(tiny().model)(torch.zeros(2, 8, dtype=torch.long) + 5, noise_range=(0.3, 0.8))


@pytest.mark.interpreter
def test_model_through_triton_kernel(gen, monkeypatch):
    """The loss and every gradient are the same whether attention runs the reference or the Triton kernel."""
    model = tiny_model(gen)
    tokens = random_tokens(gen, 96, [0, 37])
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    results = []
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        model.zero_grad()
        loss = model(tokens, noise_range=(0.3, 0.8), generator=torch.Generator().manual_seed(seed))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---- the compiled objective (torch.compile, fullgraph) -------------------------------------------------------

# (atol, rtol) of the compiled loss and gradients against eager: fp32 on CPU, where inductor fuses and
# reorders the elementwise work (rms_norm, rotary, the value mix) and so rounds differently, never more.
COMPILE_TOLERANCE = (2e-5, 1e-4)


@pytest.fixture
def fresh_dynamo():
    """Each compile test starts from an empty dynamo cache and counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_step_matches_eager(gen, fresh_dynamo):
    """The demo's step compiled (fullgraph) against eager; the tiny preset compiles in test_train's compiled run."""
    model = BlockDiffusionLM(PRESETS["demo"]().model)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5, generator=gen)
    tokens = random_tokens(gen, 512, [0, 77, 78, 300])
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    results = []
    for compiled in (False, True):
        if compiled:
            model.compile_objective()
        model.zero_grad()
        loss = model(tokens, noise_range=(0.3, 0.8), generator=torch.Generator().manual_seed(seed))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    atol, rtol = COMPILE_TOLERANCE
    torch.testing.assert_close(loss, eager_loss, atol=atol, rtol=rtol)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"compiled gradient of {n}: {m}")


def test_compiled_step_does_not_recompile_per_layout(gen, fresh_dynamo):
    """20 sequences, each with its own document count and layout: one graph, at most one recompilation."""
    model = tiny_model(gen)
    model.compile_objective()
    for step in range(20):
        starts = sorted(set(torch.randint(1, 128, (step % 7 + 1,), generator=gen).tolist()) | {0})
        loss = model(random_tokens(gen, 128, starts), noise_range=(0.3, 0.8), generator=gen)
        loss.backward()
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= compiles <= 2, f"{compiles} graphs compiled for 20 layouts (at most one recompilation allowed)"
