"""Block-diffusion attention: the mask (bd_attention_mask) against the four attention rules, and the
reference bd_attention_ref against a direct per-query softmax."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import bdiff.kernels.bd_attention as bda
from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens
from bdiff.kernels.reference import bd_attention_mask, bd_attention_ref
from helpers import random_cu_seqlens


def rule_mask(cu_seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """The attention rules, written entry by entry. A first document that starts before the sequence
    (cu_seqlens[0] = -offset) counts its positions from its real start."""
    bounds = cu_seqlens.tolist()
    L = bounds[-1]
    doc, block = [], []
    for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        for p in range(max(s, 0), e):
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
    torch.testing.assert_close(bd_attention_mask(cu, block_size), rule_mask(cu, block_size),
                               msg=lambda m: f"mask breaks the attention rules: {m}")


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


# ---- the Triton kernels (kernels/bd_attention.py) against the reference, through the interpreter ----------

# (dtype, atol, rtol) against the float64 reference. float32: fp32 accumulation over at most a few hundred
# keys. float16: inputs, P and the output are rounded to fp16 (2^-11 relative) before and after the dots.
KERNEL_TOLERANCES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 5e-3, 5e-3)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so a row they forget cannot pass for a result."""
    monkeypatch.setattr(bda, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))


def check_kernel(gen, lengths, block_size, heads, dim, dtype, atol, rtol):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    R = 2 * int(cu[-1])
    q, k, v = (torch.randn(R, heads, dim, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    do = torch.randn(R, heads, dim, generator=gen).to(dtype)
    out = bda.bd_attention(q, k, v, cu, block_size)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = bd_attention_ref(*ref_in, cu, block_size)
    want_grads = torch.autograd.grad(want, ref_in, do.double())
    assert out.dtype == dtype, "output must be in the input dtype"
    where = f"lengths {lengths}, block {block_size}, {dtype}"
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{where}: out: {m}")
    for name, g, w in zip("qkv", grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{where}: d{n}: {m}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,atol,rtol", KERNEL_TOLERANCES)
@pytest.mark.parametrize("lengths,block_size,heads,dim", [
    ([150, 300, 62], 16, 2, 64),  # realistic: FineWeb-like documents, the record's block size and head dim
    ([1, 7, 1, 20], 4, 1, 16),  # length-1 documents; L=29 fills no tile
    ([130, 70], 128, 1, 32),  # the largest block; blocks cut by document ends
    ([40, 2, 97], 3, 2, 16),  # block size dividing nothing
    ([64, 64], 1, 1, 16),  # block size 1: noisy rows see only themselves in the noisy half
])
def test_kernel_matches_reference(gen, lengths, block_size, heads, dim, dtype, atol, rtol):
    check_kernel(gen, lengths, block_size, heads, dim, dtype, atol, rtol)


@pytest.mark.interpreter
@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=5), block_size=st.integers(1, 128),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference_on_random_layouts(lengths, block_size, seed):
    check_kernel(torch.Generator().manual_seed(seed), lengths, block_size, 1, 16, torch.float32, 2e-5, 2e-5)


@pytest.mark.interpreter
def test_kernel_clean_rows_ignore_noisy_rows(gen):
    cu = random_cu_seqlens(gen, L=100, max_doc=60)
    q, k, v = (torch.randn(200, 2, 16, generator=gen) for _ in range(3))
    out = bda.bd_attention(q, k, v, cu, 16)
    k2, v2 = k.clone(), v.clone()
    k2[:100] += torch.randn(100, 2, 16, generator=gen)
    v2[:100] += torch.randn(100, 2, 16, generator=gen)
    torch.testing.assert_close(bda.bd_attention(q, k2, v2, cu, 16)[100:], out[100:], atol=0, rtol=0,
                               msg="clean tokens must not see noisy tokens")


@pytest.mark.interpreter
@pytest.mark.parametrize("mean,limit", [(300, 1.35), (1000, 1.2)])
def test_work_ratio(mean, limit):
    """The kernels count the entries they compute (COUNT=True); they must stay near the allowed ones, on
    the documents of bench/bench_bd_attention.py (L=16384, log-normal lengths, seed 0)."""
    L = 16384
    cu = fineweb_like_cu_seqlens(L, mean)
    q, k, v = (torch.randn(2 * L, 1, 16) for _ in range(3))
    entries, unmasked = bda.count_work(q, k, v, cu, 16)["forward"]
    ratio = entries / allowed_entries(cu, 16)
    assert 1.0 <= ratio <= limit, f"work ratio {ratio:.3f} at mean document length {mean} (limit {limit})"
    assert unmasked > 0.5 * entries, "most chunks of long documents should run without element masks"


@pytest.mark.interpreter
def test_backward_work_covers_allowed_entries(gen):
    cu = random_cu_seqlens(gen, L=300, max_doc=200)
    q, k, v = (torch.randn(600, 1, 16, generator=gen) for _ in range(3))
    allowed = allowed_entries(cu, 16)
    for kernel, (entries, _) in bda.count_work(q, k, v, cu, 16, backward=True).items():
        assert allowed <= entries <= 3 * allowed, f"{kernel}: {entries} entries for {allowed} allowed"


def good_inputs():
    q = torch.randn(20, 2, 16)
    return dict(q=q, k=q.clone(), v=q.clone(), cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), block_size=4)


@pytest.mark.parametrize("change,match", [
    (dict(k=torch.randn(20, 2, 32)), "k must have q's shape"),
    (dict(v=torch.randn(20, 2, 16).double()), "v must have q's dtype"),
    (dict(k=torch.empty(20, 2, 16, device="meta")), "k must be on q's device"),
    (dict(q=torch.randn(20, 16)), "q must be"),
    (dict(q=torch.randint(0, 5, (20, 2, 16)), k=torch.randint(0, 5, (20, 2, 16)), v=torch.randint(0, 5, (20, 2, 16))),
     "float16, bfloat16 or float32"),
    (dict(q=torch.randn(20, 2, 48), k=torch.randn(20, 2, 48), v=torch.randn(20, 2, 48)), "head dim"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 10.0])), "cu_seqlens"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=129), "block_size"),
])
def test_bad_input(change, match):
    args = dict(good_inputs(), **change)
    with pytest.raises(ValueError, match=match):
        bda.bd_attention(**args)


# ---- the operator torch.ops.bdiff.bd_attention: opcheck, and the reference backward it runs on CPU ----------

def test_opcheck(gen, cpu_path):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, on both CPU paths."""
    cu = torch.tensor([0, 5, 29], dtype=torch.int32)  # L=29 fills no tile; block 4 divides no document
    q, k, v = (torch.randn(58, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    for schedule in (None, bda.schedule_bounds(cu, 29, 4)):
        torch.library.opcheck(torch.ops.bdiff.bd_attention.default, (q, k, v, cu, 4, None, schedule))


@pytest.mark.parametrize("chunk", [64, 10, 1])
@pytest.mark.parametrize("cu", [[0, 1, 14, 17, 39], [-7, 26, 27, 39]], ids=["starts", "offset"])
def test_op_cpu_path_matches_reference(gen, monkeypatch, chunk, cu):
    """The CPU operator (PyTorch's CPU flash-attention kernels per chunk of a document, with the log-sum-exp they
    return fed to their backward) against autograd through bd_attention_ref, in float32. Chunks of 10 cut
    documents at every other block, 1 at every block (block 5 divides neither document length nor, with the
    first document starting 7 positions before the sequence, its offset)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(bda, "CPU_CHUNK", chunk)
    cu = torch.tensor(cu, dtype=torch.int32)
    q, k, v = (torch.randn(78, 3, 16, generator=gen, requires_grad=True) for _ in range(3))
    do = torch.randn(78, 3, 16, generator=gen)
    out = bda.bd_attention(q, k, v, cu, 5, 0.3)
    want = bd_attention_ref(q, k, v, cu, 5, 0.3)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)
    got = torch.autograd.grad(out, (q, k, v), do)
    want_grads = torch.autograd.grad(want, (q, k, v), do)
    for name, g, w in zip("qkv", got, want_grads):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"d{n}: {m}")


# (dtype, atol, rtol) of the CPU operator against the float64 reference on the same values. float32: summation
# order only. bfloat16 (what `--dtype bfloat16` runs on a CPU): two bfloat16 steps at the values' size (|out| and
# the gradients reach about 3, where a step is 1/64), dK/dV adding up over the chunks in bfloat16; a wrong mask
# errs by the values' own size.
CPU_OP_TOLERANCES = [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 3e-2, 2e-2)]


@pytest.mark.parametrize("dtype,atol,rtol", CPU_OP_TOLERANCES)
@pytest.mark.parametrize("cu", [[-7, 26, 27, 300], [0, 150, 300]], ids=["offset", "starts"])
def test_op_cpu_path_in_activation_dtypes(gen, monkeypatch, cu, dtype, atol, rtol):
    """The CPU operator at the demo's head shape (4 x 32, block 16) on documents longer than a chunk, so dK/dV add
    up over several chunks, against bd_attention_ref in float64 on the same (rounded) values."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cu = torch.tensor(cu, dtype=torch.int32)
    q, k, v = (torch.randn(600, 4, 32, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    do = torch.randn(600, 4, 32, generator=gen).to(dtype)
    out = bda.bd_attention(q, k, v, cu, 16)
    assert out.dtype == dtype
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = bd_attention_ref(*exact, cu, 16)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    got = torch.autograd.grad(out, (q, k, v), do)
    want_grads = torch.autograd.grad(want, exact, do.double())
    for name, g, w in zip("qkv", got, want_grads):
        assert g.dtype == dtype, f"d{name} must come back in q's dtype"
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def test_shared_schedule_equals_built_one(gen):
    """A schedule built once and passed to every call gives what each call would build for itself."""
    cu = random_cu_seqlens(gen, L=70, max_doc=40)
    q, k, v = (torch.randn(140, 1, 16, generator=gen) for _ in range(3))
    shared = bda.bd_attention(q, k, v, cu, 16, None, bda.schedule_bounds(cu, 70, 16))
    torch.testing.assert_close(shared, bda.bd_attention(q, k, v, cu, 16), atol=0, rtol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("config", range(4))
def test_computed_entries_equal_kernel_counts(gen, config):
    """computed_entries (the kernels' loop bounds replayed on the host, behind the FLOP counts and the autotune
    table) equals what the kernels count while they run, for every configuration of the autotune space."""
    cu = random_cu_seqlens(gen, L=300, max_doc=140)
    q, k, v = (torch.randn(600, 1, 64, generator=gen).half() for _ in range(3))  # fp16: the interpreter's dots
    schedule = bda.schedule_bounds(cu, 300, 16)
    chosen = {}
    for kernel in ("forward", "dq", "dkdv"):
        space = bda.kernel_configs(kernel, 64, torch.bfloat16)  # the space; its tiles run in fp16 here
        chosen[kernel] = space[min(config, len(space) - 1)]
    counts = bda.count_work(q, k, v, cu, 16, backward=True, configs=chosen)
    for kernel, cfg in chosen.items():
        assert bda.computed_entries(schedule, kernel, cfg) == counts[kernel][0], f"{kernel} {cfg}"


# ---- a first document that starts before the sequence (cu_seqlens[0] = -offset) -------------------------------

OFFSETS = [0, 1, 15, 16, 37]  # none, the seed's rule, block_size - 1, block_size, larger


@pytest.mark.parametrize("offset", OFFSETS)
def test_mask_with_first_document_offset(offset):
    cu = torch.tensor([-offset, 40, 65, 125], dtype=torch.int32)
    assert torch.equal(bd_attention_mask(cu, 16), rule_mask(cu, 16)), f"offset {offset}"


def test_offset_one_shifts_the_first_blocks():
    """Worked example, block size 4, offset 1: the fragment's positions are 1, 2, ... so its first block holds
    3 tokens (rows 0-2) and its second starts at row 3."""
    cu = torch.tensor([-1, 6, 9], dtype=torch.int32)
    mask = bd_attention_mask(cu, 4)
    L = 9
    assert mask[0, :3].all() and not mask[0, 3:L].any(), "noisy row 0 sees noisy rows 0-2: its block"
    assert mask[3, 3:6].all() and not mask[3, :3].any(), "noisy row 3 starts the second block (positions 4-7)"
    assert mask[3, L:L + 3].all() and not mask[3, L + 3:].any(), "noisy row 3 sees the clean first block only"


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_reference_with_offset_matches_direct_softmax(gen, dtype, atol, rtol, offset):
    cu = torch.tensor([-offset, 40, 65, 125], dtype=torch.int32)
    q, k, v = (torch.randn(250, 2, 8, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(250, 2, 8, generator=gen, dtype=dtype)
    out = bd_attention_ref(q, k, v, cu, 16)
    want = direct_attention(q, k, v, rule_mask(cu, 16), 8 ** -0.5)
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.interpreter
@pytest.mark.parametrize("offset", OFFSETS)
def test_kernel_with_offset_matches_reference(gen, monkeypatch, offset):
    """Forward and backward kernels (schedule_bounds clips the first document's grid at 0) and the CPU
    operator, against the float64 reference built from the same cu_seqlens."""
    cu = torch.tensor([-offset, 70, 75, 150], dtype=torch.int32)
    q, k, v = (torch.randn(300, 2, 16, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(300, 2, 16, generator=gen)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = bd_attention_ref(*ref_in, cu, 16)
    want_grads = torch.autograd.grad(want, ref_in, do.double())
    for interpret in ("1", "0"):  # the Triton kernels, then the CPU operator
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        out = bda.bd_attention(q, k, v, cu, 16)
        grads = torch.autograd.grad(out, (q, k, v), do)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{interpret}: out {m}")
        for name, g, w in zip("qkv", grads, want_grads):
            torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"d{n}: {m}")
