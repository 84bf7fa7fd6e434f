"""Masked, token-weighted linear cross-entropy with the lm_head (same semantics as
`masked_linear_cross_entropy_ref`): sum_i w_i · CE(h_i · W[:vocab_size]ᵀ, t_i).

Block diffusion puts loss on masked tokens only, so about 45% of the rows have w_i = 0: they are never
computed. The others are processed in chunks of rows so that one chunk of logits exists at a time (never
the N x V matrix); for each chunk `_masked_ce_kernel` (one program per row) takes the log-sum-exp in fp32
with an online max, writes the row's weighted loss, and overwrites the logits in place with their gradient
w·(softmax − onehot), the true class's p − 1 formed in fp32 (in bf16, p ≈ 0.999 would round to 1 and the
gradient to 0). That gradient is turned into dhidden and dweight right away (dweight accumulated in fp32),
so the backward pass only scales them by the incoming gradient: no second pass over the vocabulary.
Liger-Kernel's fused linear cross-entropy works the same way, without token weights or skipped rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils.flop_counter import register_flop_formula

from . import reference
from ._device import TileConfig, on_device, use_triton


@triton.jit
def _masked_ce_kernel(LOGITS, TARGETS, WEIGHTS, LOSS, V, stride, BV: tl.constexpr, GRAD: tl.constexpr):
    """One row: LOSS = w·(lse − x_t) over the first V columns; with GRAD, LOGITS <- w·(softmax − onehot(t))
    in place, and the columns V..stride-1 (alignment padding) <- 0."""
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride
    t = tl.load(TARGETS + row)
    w = tl.load(WEIGHTS + row).to(tl.float32)
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    x_t = tl.load(logits + t).to(tl.float32)
    tl.store(LOSS + row, w * (lse - x_t))
    if GRAD:
        for v0 in range(0, stride, BV):
            cols = v0 + tl.arange(0, BV)
            x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            # exp(x - m) / s, not exp(x - lse): lse = m + log(s) rounded to fp32 is off by up to half an ulp of
            # m (5e-4 at logits of 1e4), and that error would go straight into every p.
            p = tl.exp(x - m) / s  # 0 on the padding
            g = tl.where(cols == t, p - 1.0, p) * w
            tl.store(logits + cols, g.to(LOGITS.dtype.element_ty), mask=cols < stride)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

LOGITS_BUDGET = 32 * 2**20  # bytes of logits alive at once (one chunk) on a CPU and in the interpreter
GPU_LOGITS_BUDGET = (32 * 2**20, 2**30)  # on a GPU: 1/64 of its memory, within these bounds (bytes)


def kernel_config() -> TileConfig:
    """A row is swept in 8192-wide vocabulary blocks (7 for GPT-2's 50,257): 32 fp32 values per thread with 8
    warps, wide enough for 16-byte loads, small enough not to spill."""
    return dict(BV=8192, num_warps=8, num_stages=1)


def logits_budget(device: torch.device) -> int:
    """Bytes of logits (and of a dweight partial product) alive at once. Every chunk re-reads and rewrites the
    float32 dweight (V x D: 154 MB for the record's lm_head) and costs ~10 launches, so a GPU takes the largest
    chunk it can spare: 1/64 of its memory (1 GiB on an 80 GB H100, 384 MiB on a 24 GB card), which holds a
    record micro-step's ~9,000 loss rows in one chunk. A function of the GPU model only, never of the memory
    free at the moment: the same run chunks the same way, so its sums are reproducible."""
    if device.type != "cuda":
        return LOGITS_BUDGET
    low, high = GPU_LOGITS_BUDGET
    return min(high, max(low, torch.cuda.get_device_properties(device).total_memory // 64))


def chunk_rows(V: int, dtype: torch.dtype, budget: int = LOGITS_BUDGET) -> int:
    """Rows per chunk: the most whose logits fit `budget` bytes, a multiple of 16 (the M of a tensor-core tile):
    160 at V=50258 in fp32 and 32 MiB; 10,672 in bf16 and 1 GiB."""
    rows = budget // (V * torch.empty(0, dtype=dtype).element_size())
    return max(16, rows // 16 * 16)


def dweight_slice_rows(V: int, D: int, dtype: torch.dtype, budget: int = LOGITS_BUDGET) -> int:
    """Vocabulary rows per low-precision dweight partial product (grad_chunkᵀ h, V x D) before it joins the fp32
    sum: a fraction 1/4 of the logits budget, so that the product never costs more memory than the chunk."""
    return max(1, min(V, budget // 4 // (D * torch.empty(0, dtype=dtype).element_size())))


def lm_head_traffic(rows: int, V: int, D: int, dtype: torch.dtype, budget: int,
                    chunk: int | None = None) -> dict:
    """What the fused loss costs around the lm_head gradient for `rows` loss rows, replayed from the launcher's
    own sizing (`_forward`): chunks, bytes of the float32 dweight read and written (each chunk reads and writes
    all of it, and with low-precision logits also writes and reads its partial products), and kernel launches
    (per chunk: 3 gathers, the logits GEMM, the row kernel, the loss sum and add, dhidden's GEMM and scatter; per
    dweight slice: the GEMM and the cast-and-add, or one addmm in fp32). `chunk`: rows per chunk, if not the
    launcher's choice for `budget`."""
    chunks = -(-rows // (chunk or chunk_rows(V, dtype, budget)))
    size = torch.empty(0, dtype=dtype).element_size()
    fp32 = dtype == torch.float32
    slices = 1 if fp32 else -(-V // dweight_slice_rows(V, D, dtype, budget))
    per_chunk_bytes = 2 * V * D * 4 + (0 if fp32 else 2 * V * D * size)
    per_chunk_launches = 9 + (1 if fp32 else 2 * slices)
    return dict(chunks=chunks, dweight_bytes=chunks * per_chunk_bytes, launches=chunks * per_chunk_launches)


def _validate(hidden, weight, targets, token_weights, vocab_size):
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be (N, D), got shape {tuple(hidden.shape)}")
    N, D = hidden.shape
    if weight.ndim != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must be (V, D={D}), got shape {tuple(weight.shape)}")
    if targets.shape != (N,):
        raise ValueError(f"targets must be ({N},), got shape {tuple(targets.shape)}")
    if token_weights.shape != (N,):
        raise ValueError(f"token_weights must be ({N},), got shape {tuple(token_weights.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("token_weights", token_weights)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("token_weights", token_weights)):
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size must be an int in [1, weight rows={weight.shape[0]}], got {vocab_size!r}")


def _read_values(targets, token_weights, vocab_size) -> int:
    """The count of rows that carry loss, after refusing out-of-range targets and negative weights: every path
    (the CPU reference, the interpreter, the GPU) checks the same values with the same errors. One host read,
    which on a GPU is the op's one sync (the count sizes the work)."""
    count, bad_target, negative = torch.stack([(token_weights != 0).sum(),
                                               ((targets < 0) | (targets >= vocab_size)).any(),
                                               (token_weights < 0).any()]).tolist()
    if bad_target:
        raise ValueError(f"targets must lie in [0, vocab_size={vocab_size})")
    if negative:
        raise ValueError("token_weights must be >= 0")
    return count


def _accumulate_dweight(dweight, grad, h, slice_rows):
    """dweight (V, D) fp32 += gradᵀ h. Low-precision products go `slice_rows` vocabulary rows at a time, so that
    no V x D temporary larger than the budget exists."""
    if grad.dtype == dweight.dtype:
        dweight.addmm_(grad.T, h)
        return
    for v0 in range(0, dweight.shape[0], slice_rows):
        dweight[v0:v0 + slice_rows] += grad[:, v0:v0 + slice_rows].T @ h


def _forward(hidden, weight, targets, token_weights, vocab_size, need_dh, need_dw):
    """The loss, and the gradients requested, in one pass over the active rows (see the module docstring)."""
    N, D = hidden.shape
    count = _read_values(targets, token_weights, vocab_size)
    # Rows that carry loss, in order: a stable sort puts them first; unlike nonzero, no second sync.
    active = torch.argsort((token_weights == 0).to(torch.uint8), stable=True)[:count]
    # Logit rows 16-aligned where the weight is padded (lm_head is, to 128): vectorized loads in the kernel.
    width = min(weight.shape[0], -(-vocab_size // 16) * 16)
    W = weight[:width].to(hidden.dtype)  # (width, D); a view when the dtypes agree
    dhidden = torch.zeros_like(hidden) if need_dh else hidden.new_empty(0)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw \
        else weight.new_empty(0, dtype=torch.float32)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    budget = logits_budget(hidden.device)
    C = chunk_rows(vocab_size, hidden.dtype, budget)
    slice_rows = dweight_slice_rows(width, D, hidden.dtype, budget)
    logits_buf = torch.empty((min(C, count), width), dtype=hidden.dtype, device=hidden.device)
    row_loss = torch.empty(min(C, count), dtype=torch.float32, device=hidden.device)
    cfg = kernel_config()
    for c0 in range(0, count, C):
        rows = active[c0:c0 + C]
        n = rows.numel()
        h = hidden.index_select(0, rows)  # (n, D)
        logits = torch.mm(h, W.T, out=logits_buf[:n])  # (n, width)
        _masked_ce_kernel[(n,)](LOGITS=logits, TARGETS=targets.index_select(0, rows),
                                WEIGHTS=token_weights.index_select(0, rows).float(), LOSS=row_loss, V=vocab_size,
                                stride=width, GRAD=need_dh or need_dw, **cfg)
        loss += row_loss[:n].sum()
        if need_dh:
            dhidden.index_copy_(0, rows, logits @ W)  # logits now hold the gradient
        if need_dw:
            _accumulate_dweight(dweight[:width], logits, h, slice_rows)
    return loss, dhidden, dweight


# ---------------------------------------------------------------------------------------------------
# The operator: torch.ops.bdiff.masked_linear_cross_entropy, CPU and CUDA, fake and autograd
# ---------------------------------------------------------------------------------------------------
# A custom_op (opaque to torch.compile): the launcher picks its rows from the data (one sync, a loop over
# chunks), which a traced triton_op body could not do without breaking the graph.

@torch.library.custom_op("bdiff::masked_linear_cross_entropy", mutates_args=())
def _masked_ce_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor,
                  vocab_size: int, need_dhidden: bool = False, need_dweight: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dhidden, dweight): the float32 loss and, where asked for, its gradients (dhidden in hidden's
    dtype, dweight in float32 over every weight row, zero on the padding); a gradient not
    asked for is an empty tensor. They are formed during the forward pass, while the logits exist."""
    _validate(hidden, weight, targets, token_weights, vocab_size)
    if not use_triton(hidden):
        _read_values(targets, token_weights, vocab_size)
        loss, dh, dw = reference.masked_linear_cross_entropy_ref_grads(hidden, weight, targets, token_weights,
                                                                       vocab_size)
        return loss, dh if need_dhidden else dh.new_empty(0), dw if need_dweight else dw.new_empty(0)
    with on_device(hidden):
        return _forward(hidden, weight, targets, token_weights, vocab_size, need_dhidden, need_dweight)


@_masked_ce_op.register_fake
def _(hidden, weight, targets, token_weights, vocab_size, need_dhidden=False, need_dweight=False):
    _validate(hidden, weight, targets, token_weights, vocab_size)
    return (hidden.new_empty((), dtype=torch.float32),
            torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0),
            weight.new_empty(weight.shape if need_dweight else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    _, dhidden, dweight = output
    ctx.mark_non_differentiable(dhidden, dweight)
    ctx.save_for_backward(dhidden, dweight)
    ctx.weight_dtype = inputs[1].dtype


def _backward(ctx, grad_loss, _dh, _dw):
    dhidden, dweight = ctx.saved_tensors
    dh = dhidden * grad_loss.to(dhidden.dtype) if dhidden.numel() else None
    dw = (dweight * grad_loss).to(ctx.weight_dtype) if dweight.numel() else None
    return dh, dw, None, None, None, None, None


_masked_ce_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.bdiff.masked_linear_cross_entropy, get_raw=True)
def _(hidden, weight, targets, token_weights, vocab_size, need_dhidden=False, need_dweight=False, *, out_val=None):
    """FLOPs for torch.utils.flop_counter: only the rows with a nonzero weight are computed (the counter must see
    the real weights): logits, and dhidden and dweight where asked for, 2·D per entry of the row x vocabulary."""
    with unset_fake_temporarily():  # the counter may run under a fake-tensor mode; the weights must be real
        if isinstance(token_weights, FakeTensor):
            raise ValueError("counting masked_linear_cross_entropy FLOPs needs the real token_weights (only rows "
                             "with a nonzero weight are computed)")
        rows = int((token_weights != 0).sum())
    width = min(weight.shape[0], -(-vocab_size // 16) * 16)
    return 2 * rows * width * hidden.shape[1] * (1 + need_dhidden + need_dweight)


def masked_linear_cross_entropy(hidden, weight, targets, token_weights, vocab_size):
    """sum_i token_weights[i] · CE(hidden[i] · weight[:vocab_size]ᵀ, targets[i]); semantics of
    `reference.masked_linear_cross_entropy_ref`. CUDA runs the fused Triton path, CPU the reference (the
    kernel through the interpreter with TRITON_INTERPRET=1). Gradients are computed in the forward pass for
    the inputs that need them."""
    grad = torch.is_grad_enabled()
    return torch.ops.bdiff.masked_linear_cross_entropy(hidden, weight, targets, token_weights, vocab_size,
                                                       grad and hidden.requires_grad, grad and weight.requires_grad)[0]


def compile_configs(arch: int) -> list[dict]:
    """Every configuration the launcher picks: logits in each dtype, with and without the gradient pass."""
    cfg = kernel_config()
    configs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for grad in (False, True):
            configs.append(dict(
                name=f"masked_ce {'loss+grad' if grad else 'loss'} {dtype}", fn=_masked_ce_kernel,
                pointer=f"*{dtype}", types=dict(TARGETS="*i64", WEIGHTS="*fp32", LOSS="*fp32", V="i32", stride="i32"),
                constexprs=dict(BV=cfg["BV"], GRAD=grad), divisible=["stride"],
                options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), hgmma=False))
    return configs
