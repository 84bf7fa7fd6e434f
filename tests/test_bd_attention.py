"""Block-diffusion attention: the mask (bd_attention_mask) against the four rules of SPEC.md §1, and the
reference bd_attention_ref against a direct per-query softmax."""
import pytest
import torch

from conftest import random_cu_seqlens
from kernels.reference import bd_attention_mask, bd_attention_ref


def rule_mask(cu_seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """SPEC.md §1 rules, written entry by entry."""
    bounds = cu_seqlens.tolist()
    L = bounds[-1]
    doc, block = [], []
    for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        for p in range(s, e):
            doc.append(d)
            block.append((p - s) // block_size)
    mask = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for i in range(2 * L):
        for j in range(2 * L):
            qi, kj = i % L, j % L
            if doc[qi] != doc[kj]:
                continue
            q_noisy, k_noisy = i < L, j < L
            if q_noisy and k_noisy:
                mask[i, j] = block[kj] == block[qi]
            elif q_noisy:
                mask[i, j] = block[kj] < block[qi]
            elif not k_noisy:
                mask[i, j] = block[kj] <= block[qi]
    return mask


LAYOUTS = [  # (document lengths, block_size): awkward on purpose
    ([1, 1, 1], 1),
    ([1, 7, 1, 20], 4),  # length-1 documents, lengths the block does not divide
    ([33], 16),
    ([5, 64, 3], 64),
    ([40, 2], 3),
]


@pytest.mark.parametrize("lengths,block_size", LAYOUTS)
def test_mask_follows_rules(lengths, block_size):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    torch.testing.assert_close(bd_attention_mask(cu, block_size), rule_mask(cu, block_size), msg=lambda m: f"mask breaks the SPEC rules: {m}")


@pytest.mark.parametrize("block_size", [1, 2, 5, 16, 64])
def test_mask_random_layouts(gen, block_size):
    cu = random_cu_seqlens(gen, L=50, max_doc=30)
    assert torch.equal(bd_attention_mask(cu, block_size), rule_mask(cu, block_size)), f"layout {cu.tolist()}"


def test_mask_invariants(gen):
    cu = random_cu_seqlens(gen, L=200, max_doc=80)
    L, bs = 200, 16
    mask = bd_attention_mask(cu, bs)
    assert not mask[L:, :L].any(), "clean tokens must not see noisy tokens"
    assert mask.diagonal().all(), "every token must see itself"
    doc = torch.searchsorted(cu[1:].long(), torch.arange(L), right=True).repeat(2)
    assert not (mask & (doc[:, None] != doc[None, :])).any(), "no token may see another document"
    # A noisy token never sees the clean copy of its own block: that would leak its answer.
    assert not (mask[:L, L:].diagonal()).any(), "noisy token must not see its own clean copy"


# float64 for an exact comparison; float32 as the model runs it on CPU.
TOLERANCES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-5, 2e-5)]  # (dtype, atol, rtol)


def direct_attention(q, k, v, mask, scale):
    """Per query row: softmax over its allowed keys only."""
    rows = []
    for i in range(q.shape[0]):
        allowed = mask[i].nonzero().flatten()
        s = torch.einsum("hd,khd->hk", q[i], k[allowed]) * scale  # (H, n_allowed)
        p = torch.exp(s - s.max(-1, keepdim=True).values)
        rows.append(torch.einsum("hk,khd->hd", p / p.sum(-1, keepdim=True), v[allowed]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("lengths,block_size,heads,dim", [([48, 30, 50], 16, 2, 32), ([1, 13, 3, 22], 5, 3, 8)])
def test_reference_matches_direct_softmax(gen, dtype, atol, rtol, lengths, block_size, heads, dim):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    R = 2 * cu[-1].item()
    q, k, v = (torch.randn(R, heads, dim, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(R, heads, dim, generator=gen, dtype=dtype)
    scale = 0.7 / dim**0.5
    out = bd_attention_ref(q, k, v, cu, block_size, scale)
    grads = torch.autograd.grad(out, (q, k, v), do)
    want = direct_attention(q, k, v, rule_mask(cu, block_size), scale)
    want_grads = torch.autograd.grad(want, (q, k, v), do)
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    for name, g, w in zip("qkv", grads, want_grads):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")
