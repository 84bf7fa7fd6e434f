"""Block-diffusion attention: the mask (bd_attention_mask) against the four attention rules, and the
reference bd_attention_ref against a direct per-query softmax."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import bdiff.kernels.bd_attention as bda
from bdiff.kernels import tiles
from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens, flex_block_mask_entries
from bdiff.kernels.reference import bd_attention_mask, bd_attention_ref
from helpers import random_cu_seqlens, torch_flags


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


def check_kernel(gen, lengths, block_size, heads, dim, dtype, atol, rtol, kv_heads=None, configs=None):
    """The op (or, given `configs`, the kernels with those tiles) against bd_attention_ref in float64: the output and
    every gradient. kv_heads < heads: grouped-query attention, against the reference's repeated key/value heads."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    R = 2 * int(cu[-1])
    q = torch.randn(R, heads, dim, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(R, kv_heads or heads, dim, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    do = torch.randn(R, heads, dim, generator=gen).to(dtype)
    if configs is None:
        out = bda.bd_attention(q, k, v, cu, block_size)
        grads = torch.autograd.grad(out, (q, k, v), do)
    else:
        schedule = bda.schedule_bounds(cu, R // 2, block_size)
        out, lse = bda._launch_forward(q.detach(), k.detach(), v.detach(), schedule[0], dim ** -0.5,
                                       cfg=configs["forward"])
        grads = bda._launch_backward(q.detach(), k.detach(), v.detach(), out, lse, do, schedule[0], schedule[1],
                                     dim ** -0.5, cfgs=(configs["dq"], configs["dkdv"]))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = bd_attention_ref(*ref_in, cu, block_size)
    want_grads = torch.autograd.grad(want, ref_in, do.double())
    assert out.dtype == dtype, "output must be in the input dtype"
    where = f"lengths {lengths}, block {block_size}, {dtype}, {heads} query heads on {kv_heads or heads} kv heads"
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


# Grouped-query attention: (query heads, key/value heads, head dim). Group sizes 1, 2, 4 and 8, the last with one
# key/value head for all (multi-query), and Qwen2.5-1.5B's 12 on 2; head dims 16, 64 and 128.
GQA_SHAPES = [(2, 2, 64), (4, 2, 64), (8, 2, 128), (8, 1, 16), (12, 2, 128)]


@pytest.mark.interpreter
@pytest.mark.parametrize("heads,kv_heads,dim", GQA_SHAPES)
def test_grouped_query_attention_matches_reference(gen, heads, kv_heads, dim):
    """q's heads share k's and v's in groups of heads / kv_heads: the output, dq and the group-summed dk and dv equal
    the float64 reference over repeated key/value heads; documents that do not divide the tiles, a block that divides
    no document."""
    check_kernel(gen, [70, 3, 41], 16 if dim > 16 else 5, heads, dim, torch.float32, 2e-5, 2e-5, kv_heads)


@pytest.mark.interpreter
@pytest.mark.parametrize("atomic", [False, True])
def test_grouped_query_attention_in_other_tiles(gen, atomic):
    """A group of 4 in the smallest 16-bit tiles of the autotune space (several dK/dV programs per key head and
    chunk), with dQ apart or added atomically from dK/dV."""
    dim = 64
    configs = {kernel: bda.kernel_configs(kernel, dim, torch.float16)[-1] for kernel in ("forward", "dq", "dkdv")}
    configs["dkdv"] = dict(configs["dkdv"], ATOMIC_DQ=atomic)
    check_kernel(gen, [90, 37], 16, 4, dim, torch.float16, 5e-3, 5e-3, kv_heads=1, configs=configs)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 1)])
def test_grouped_query_attention_on_the_cpu_path(gen, heads, kv_heads, monkeypatch):
    """The CPU path (SDPA per chunk, keys repeated per chunk) against the reference, every gradient."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_kernel(gen, [100, 7, 33], 16, heads, 32, torch.float32, 2e-5, 2e-5, kv_heads)


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


# Work ratios (entries computed / allowed) of the default 16-bit tiles at the record's attention, on the documents of
# bench/bench_bd_attention.py (L=16384, log-normal lengths, seed 0): 1.80 / 1.35 (128-row tiles by 64 keys). The
# limits leave 3% for a changed schedule to be noticed; FlexAttention's 128x128 BlockMask computes 2.50 / 1.65.
WORK_RATIO_LIMITS = [(300, 1.86, 2.50), (1000, 1.39, 1.65)]  # (mean document length, limit, FlexAttention's)


@pytest.mark.parametrize("mean,limit,flex", WORK_RATIO_LIMITS)
def test_work_ratio(mean, limit, flex):
    """Per kernel, the entries the default tiles compute (computed_entries: the kernels' loop bounds on the host,
    which test_computed_entries_equal_kernel_counts ties to the kernels' own counts) stay near the allowed ones and
    below what FlexAttention's BlockMask computes."""
    L = 16384
    cu = fineweb_like_cu_seqlens(L, mean)
    schedule = bda.schedule_bounds(cu, L, 16)
    allowed = allowed_entries(cu, 16)
    assert flex_block_mask_entries(cu, 16) / allowed == pytest.approx(flex, abs=0.01), "the layout changed"
    for kernel in ("forward", "dq", "dkdv"):
        ratio = bda.computed_entries(schedule, kernel, bda.kernel_config(kernel, 128, torch.bfloat16)) / allowed
        assert 1.0 <= ratio <= limit, f"{kernel}: work ratio {ratio:.3f} at mean document length {mean} (limit {limit})"


@pytest.mark.interpreter
def test_long_documents_run_mostly_full_chunks():
    """Inside a long document most chunks are full: every row of the tile sees every key, and no mask is computed."""
    cu = torch.tensor([-5, 1500, 2048], dtype=torch.int32)
    q, k, v = (torch.randn(4096, 1, 16) for _ in range(3))
    cfg = bda.kernel_config("forward", 16, torch.float16)
    for kernel, (entries, full) in bda.count_work(q, k, v, cu, 16, configs={"forward": cfg}).items():
        assert full > 0.5 * entries, f"{kernel}: {full} of {entries} entries in full chunks"


def good_inputs():
    q = torch.randn(20, 2, 16)
    return dict(q=q, k=q.clone(), v=q.clone(), cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), block_size=4)


@pytest.mark.parametrize("change,match", [
    (dict(k=torch.randn(20, 2, 32)), r"k must be \(2L, Hkv, D\) with q's 2L=20 and D=16"),
    (dict(k=torch.randn(20, 1, 16)), "k and v alike"),
    (dict(q=torch.randn(20, 3, 16), k=torch.randn(20, 2, 16), v=torch.randn(20, 2, 16)),
     "k and v have 2 heads, which must divide q's 3"),
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
    (dict(scale=0.0), "scale must be a positive number"),
    (dict(scale=-0.1), "scale must be a positive number"),
])
def test_bad_input(change, match):
    args = dict(good_inputs(), **change)
    with pytest.raises(ValueError, match=match):
        bda.bd_attention(**args)


@pytest.mark.parametrize("rows,heads,dim", [(bda.MAX_ROWS + 2, 1, 16), (2**19, 32, 128)])
def test_a_sequence_too_long_for_one_launch_is_refused(rows, heads, dim):
    """The kernels' grid holds at most 65,535 tiles on its second axis and their offsets are int32: past that, one
    line that says what to do, before any launch (the CPU reference has no such limit)."""
    q = torch.empty(rows, heads, dim, device="meta")
    with pytest.raises(ValueError, match="too many rows for the GPU kernels: 2L = .* split the sequence"):
        bda._launch_forward(q, q, q, torch.empty(rows, 6, dtype=torch.int32, device="meta"), 0.25)
    with pytest.raises(ValueError, match="too many rows"):
        bda._launch_backward(q, q, q, q, q, q, None, None, 0.25)


# ---- the operator torch.ops.bdiff.bd_attention: opcheck, and the reference backward it runs on CPU ----------

def test_opcheck(gen, cpu_path):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, on both CPU paths."""
    cu = torch.tensor([0, 5, 29], dtype=torch.int32)  # L=29 fills no tile; block 4 divides no document
    q = torch.randn(58, 2, 16, generator=gen, requires_grad=True)
    for kv_heads in (2, 1):  # and grouped-query attention
        k, v = (torch.randn(58, kv_heads, 16, generator=gen, requires_grad=True) for _ in range(2))
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


def configuration_sets():
    """Every distinct tile shape the kernels may run, per kernel (forward, dQ, dK/dV), zipped into sets of three:
    the defaults of every dtype, dot precision, head dim and GPU, the one-time autotune's space, the committed
    table's entries and the tuning space (warps and stages change nothing in the interpreter, so they are left out).
    A dK/dV shape with ATOMIC_DQ stands for its backward: its dQ shape does not run."""
    found = {kernel: [] for kernel in ("forward", "dq", "dkdv")}

    def add(kernel, cfg):
        shape = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "measured")}
        if kernel == "dkdv":
            shape.setdefault("ATOMIC_DQ", False)
        if shape not in found[kernel]:
            found[kernel].append(shape)

    for kernel in found:
        for arch in (80, 86, 89, 90):
            for dtype, prec in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")):
                for D in (32, 64, 128):
                    for cfg in bda.kernel_configs(kernel, D, dtype, arch, prec):
                        add(kernel, cfg)
        for entries in tiles.table("bd_attention").values():
            for key, cfg in entries.items():
                if key.startswith(kernel + " "):
                    add(kernel, cfg)
        for cfg in bda.TUNING_SPACE[kernel]:
            add(kernel, cfg)
    n = max(map(len, found.values()))
    return [{kernel: shapes[i % len(shapes)] for kernel, shapes in found.items()} for i in range(n)]


CONFIGURATION_SETS = configuration_sets()


@pytest.mark.interpreter
@pytest.mark.parametrize("index", range(len(CONFIGURATION_SETS)))
def test_every_configuration_matches_reference(gen, index):
    """Each tile shape of configuration_sets() against the float64 reference (bd_attention_ref), outputs and every
    gradient, on an awkward layout: documents of 1 to 150 tokens, the first starting 3 tokens before the sequence,
    block size 5, L = 197 (no tile size divides it). Float16 and float32 take turns."""
    cfgs = CONFIGURATION_SETS[index]
    dtype, atol, rtol = KERNEL_TOLERANCES[index % 2]
    cu = torch.tensor([-3, 1, 8, 9, 159, 197], dtype=torch.int32)
    q, k, v, do = (torch.randn(394, 2, 16, generator=gen).to(dtype) for _ in range(4))
    schedule = bda.schedule_bounds(cu, 197, 5)
    o, lse = bda._launch_forward(q, k, v, schedule[0], 0.25, cfg=cfgs["forward"])
    grads = bda._launch_backward(q, k, v, o, lse, do, schedule[0], schedule[1], 0.25, cfgs=(cfgs["dq"], cfgs["dkdv"]))
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    want = bd_attention_ref(*exact, cu, 5, 0.25)
    want_grads = torch.autograd.grad(want, exact, do.double())
    where = f"{dtype}, {cfgs}"
    torch.testing.assert_close(o.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{where}: out: {m}")
    for name, g, w in zip("qkv", grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{where}: d{n}: {m}")


@pytest.mark.interpreter
@pytest.mark.parametrize("index", [0, 1, len(CONFIGURATION_SETS) // 2, len(CONFIGURATION_SETS) - 1])
def test_computed_entries_equal_kernel_counts(gen, index):
    """computed_entries (the kernels' loop bounds replayed on the host, behind the FLOP counts, the work ratios and the
    tuning table) equals what the kernels count while they run, and covers every allowed entry."""
    cfgs = CONFIGURATION_SETS[index]
    cu = random_cu_seqlens(gen, L=300, max_doc=140)
    q, k, v = (torch.randn(600, 1, 16, generator=gen).half() for _ in range(3))  # fp16: the interpreter's dots
    schedule = bda.schedule_bounds(cu, 300, 16)
    counts = bda.count_work(q, k, v, cu, 16, backward=True, configs=cfgs)
    for kernel, (entries, full) in counts.items():
        assert bda.computed_entries(schedule, kernel, cfgs[kernel]) == entries, f"{kernel} {cfgs[kernel]}"
        assert allowed_entries(cu, 16) <= entries and 0 <= full <= entries, f"{kernel}: {entries}, {full} full"
    assert ("dq" in counts) != cfgs["dkdv"]["ATOMIC_DQ"], "an atomic dQ replaces the dQ kernel"


# ---- the tiles' order (LPT): most work first, the same bits -------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("kernel", ["forward", "dkdv"])
def test_tile_work_is_what_each_tile_computes_and_the_order_sorts_it(gen, kernel):
    """tile_work (what tile_order sorts) equals, tile by tile and head by head, the entries each program counts while
    it runs under LPT, and tile_order is a permutation of the tiles, most work first."""
    cu = random_cu_seqlens(gen, L=300, max_doc=140)
    H, cfg = 2, dict(BM=32, BN=16, BMD=16, DN=16) if kernel == "dkdv" else dict(BM=32, BN=16, DN=16)
    q, k, v, do = (torch.randn(600, H, 16, generator=gen).half() for _ in range(4))
    schedule = bda.schedule_bounds(cu, 300, 16)
    side = schedule[1 if kernel == "dkdv" else 0]
    work = bda.tile_work(side, kernel, cfg)
    order = bda.tile_order(side, kernel, cfg)
    assert sorted(order.tolist()) == list(range(len(work))), "the order is a permutation of the tiles"
    assert (work[order.long()].diff() <= 0).all(), "most work first"
    counts = torch.zeros(2 * len(work) * H, dtype=torch.int32)
    o, lse = bda._launch_forward(q, k, v, schedule[0], 0.25, cfg=dict(BM=32, BN=16, DN=16),
                                 count=counts if kernel == "forward" else None)
    if kernel == "dkdv":
        bda._launch_backward(q, k, v, o, lse, do, schedule[0], schedule[1], 0.25, count=(None, counts),
                             cfgs=(dict(BM=32, BN=16, DN=16), cfg))
    for h in range(H):
        assert torch.equal(counts.view(H, -1, 2)[h, :, 0].long(), work), f"head {h}: entries per tile"


@pytest.mark.interpreter
def test_the_tile_order_changes_no_bit(gen):
    """Each tile's sums run in the same order whichever program computes it: LPT on and off give the same bits, out
    and every gradient (dQ apart: an atomic dQ sums in the order the programs run)."""
    cu = torch.tensor([-3, 1, 8, 9, 159, 197], dtype=torch.int32)
    q, k, v, do = (torch.randn(394, 2, 16, generator=gen) for _ in range(4))
    schedule = bda.schedule_bounds(cu, 197, 5)
    runs = []
    for lpt in (True, False):
        fwd, dq, dkdv = (dict(bda.kernel_config(kn, 16, torch.float32, precision="ieee"), LPT=lpt)
                         for kn in ("forward", "dq", "dkdv"))
        o, lse = bda._launch_forward(q, k, v, schedule[0], 0.25, cfg=fwd)
        runs.append((o, lse, *bda._launch_backward(q, k, v, o, lse, do, schedule[0], schedule[1], 0.25,
                                                   cfgs=(dq, dkdv))))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs with the tiles in another order"


@pytest.mark.interpreter
def test_every_layer_of_a_step_shares_one_sort(gen, monkeypatch):
    """The tiles are sorted once per schedule (a model passes one to every layer), not once per call; a call without
    a schedule sorts its own."""
    sorted_kinds = []
    work = bda.tile_work
    monkeypatch.setattr(bda, "tile_work", lambda side, kernel, cfg: sorted_kinds.append(kernel) or work(side, kernel,
                                                                                                         cfg))
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    schedule = bda.schedule_bounds(cu, 70, 16)
    q, k, v = (torch.randn(140, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    bda.bd_attention(q, k, v, cu, 16, None, schedule).sum().backward()
    first = list(sorted_kinds)  # dQ shares the forward's order where their tiles are alike
    assert set(first) == {"forward", "dkdv"} and len(first) <= 3, f"sorts: {first}"
    for _ in range(2):  # two more layers
        bda.bd_attention(q, k, v, cu, 16, None, schedule).sum().backward()
    assert sorted_kinds == first, f"sorts after three layers: {sorted_kinds}"
    bda.bd_attention(q, k, v, cu, 16)
    assert sorted_kinds == first + ["forward"], "a call with no schedule sorts for itself"


# ---- dot precision: PyTorch's setting, on every path that launches the kernels ---------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("allow_tf32,want", [(False, "ieee"), (True, "tf32")])
def test_fp32_dots_follow_pytorchs_tf32_setting(monkeypatch, allow_tf32, want):
    """fp32 inputs run IEEE fp32 dots unless the user allowed TF32 (torch.backends.cuda.matmul.allow_tf32, which
    torch.set_float32_matmul_precision("high") sets too); 16-bit inputs ignore the setting."""
    seen = []
    launch = bda._query_kernel
    monkeypatch.setattr(bda, "_query_kernel", lambda *a, **kw: seen.append(a[6]) or launch(*a, **kw))
    cu = torch.tensor([0, 20, 40], dtype=torch.int32)
    with torch_flags(allow_tf32=allow_tf32):
        bda.bd_attention(*(torch.randn(80, 1, 16) for _ in range(3)), cu, 4)
    assert seen == [want], f"fp32 dots ran {seen}, PyTorch allows TF32: {allow_tf32}"
    assert bda.precision(torch.bfloat16) == "tf32", "16-bit dots are tensor-core dots whatever the setting"


@pytest.mark.interpreter
def test_deterministic_algorithms_turn_the_atomic_dq_off(gen, monkeypatch):
    """torch.use_deterministic_algorithms(True): a dK/dV configuration with an atomic dQ (whose sum order varies from
    run to run on a GPU) runs without it, and the dQ kernel runs instead."""
    ran = []
    launch = bda._dkdv_kernel
    monkeypatch.setattr(bda, "_dkdv_kernel", lambda *a, **kw: ran.append(a[11].get("ATOMIC_DQ")) or launch(*a, **kw))
    cu = torch.tensor([0, 30, 40], dtype=torch.int32)
    q, k, v, do = (torch.randn(80, 1, 16, generator=gen) for _ in range(4))
    schedule = bda.schedule_bounds(cu, 40, 4)
    o, lse = bda._launch_forward(q, k, v, schedule[0], 0.25)
    cfg = dict(bda.kernel_config("dkdv", 16, torch.float32, precision="ieee"), ATOMIC_DQ=True)
    dq_cfg = bda.kernel_config("dq", 16, torch.float32, precision="ieee")
    atomic = bda._launch_backward(q, k, v, o, lse, do, schedule[0], schedule[1], 0.25, cfgs=(dq_cfg, cfg))
    with torch_flags(deterministic=True):
        split = bda._launch_backward(q, k, v, o, lse, do, schedule[0], schedule[1], 0.25, cfgs=(dq_cfg, cfg))
    assert ran == [True, False], ran
    for name, a, b in zip("qkv", atomic, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


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
