"""One full training step (forward, backward, optimizer) of the same model on the same batch and noise, in two
formulations:

    ours   bdiff's objective: the block-diffusion attention operator with one schedule shared by every layer,
           the masked-weighted linear cross-entropy that computes only the rows that carry loss, Muon with the
           Triton Newton–Schulz; the objective compiled (fullgraph).
    seed   nano-block-diffusion's: FlexAttention with a BlockMask built from the mask rules for every sequence,
           the float32 logits of the whole noisy half and a plain cross-entropy, Muon with Newton–Schulz in
           torch matmuls (bf16 on a GPU); the objective compiled.

    python bench/bench_step.py              # CPU, tiny model: both give the same loss and gradients (exit 1 if not)
    python bench/bench_step.py --flops      # FLOPs of one record step by op, ours and the seed's (CPU, fake tensors)
    python bench/bench_step.py --memory     # peak memory of one record step at 16,384 tokens (CPU, fake tensors)
    python bench/bench_step.py --gpu        # CUDA, record model: step time, tokens/s and peak memory of each
    python -m pytest bench/bench_step.py --benchmark-only   # the suite: ours vs the seed, compiled vs eager

The model, the noise and x_t are shared; only the formulation differs, so the CPU check proves the baseline
computes the seed's objective.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdiff.config import PRESETS
from bdiff.kernels.reference import bd_attention_mask, bd_mask_mod
from bdiff.models.nano import BlockDiffusionLM
from bdiff.models.objective import Layout, document_layout, loss_weights, noise_blocks
from bdiff.training.muon import Muon

# (atol, rtol) of the seed formulation's loss and gradients against ours on CPU in float32: the same
# arithmetic up to summation order (softmax over allowed keys, the loss over rows), so float32 rounding only.
TOLERANCE = (1e-5, 1e-4)


@dataclass
class Batch:
    tokens: torch.Tensor  # (L,) clean tokens x_0
    layout: Layout
    x_t: torch.Tensor  # (L,) noised tokens
    weights: torch.Tensor  # (L,) 1/(t + 1e-3) on masked tokens, 0 elsewhere


def make_batch(cfg, L: int, mean_doc: int, seed: int, device) -> Batch:
    """Random tokens with BOS about every `mean_doc` tokens; one noise draw from U[0.3, 0.8] per block."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.mask_id, (L,), generator=gen)
    tokens[tokens == cfg.bos_id] = 0
    tokens[torch.rand(L, generator=gen) < 1 / mean_doc] = cfg.bos_id
    layout = document_layout(tokens, cfg.bos_id, cfg.block_size)
    x_t, masked, t = noise_blocks(tokens, layout.blocks, cfg.mask_id, 0.3, 0.8, generator=gen,
                                  num_blocks=layout.num_blocks)
    return Batch(tokens.to(device), layout.to(device), x_t.to(device), loss_weights(masked, t).to(device))


def ours_loss(model: BlockDiffusionLM, b: Batch) -> torch.Tensor:
    lay = b.layout
    return model.objective(b.x_t, b.tokens, b.weights, lay.positions, lay.cu_seqlens, lay.schedule)


def seed_loss(model: BlockDiffusionLM, b: Batch, attention) -> torch.Tensor:
    """The seed's formulation: `attention(q, k, v)` on (1, H, 2L, D) (FlexAttention with the sequence's
    BlockMask), the logits of the whole noisy half in float32, a plain cross-entropy."""
    def attend(layer, q, k, v):  # (2L, H, D) each
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
        return attention(q, k, v)[0].transpose(0, 1)

    positions = b.layout.positions
    h = model.run_layers(torch.cat([b.x_t, b.tokens]), torch.cat([positions, positions]), attend)
    L = b.tokens.numel()
    logits = model.logits(h[:L])  # (L, V) float32
    return (F.cross_entropy(logits, b.tokens, reduction="none") * b.weights).sum() / L


def flex(b: Batch, block_size: int, compiled=None):
    """FlexAttention as the seed runs it: a BlockMask built from the mask rules for this sequence."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    R = 2 * b.tokens.numel()
    block_mask = create_block_mask(bd_mask_mod(b.layout.cu_seqlens, block_size), None, None, R, R,
                                   device=b.tokens.device)
    return lambda q, k, v: (compiled or flex_attention)(q, k, v, block_mask=block_mask)


def seed_newton_schulz(G, steps, coefficients, safety):
    """The seed's Newton–Schulz: plain torch matmuls, bf16 on a GPU (float32 on CPU), wide form."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + safety) + 1e-7)
    for a, b, c in coefficients:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def gradients(model: BlockDiffusionLM, loss_fn) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def cpu_check(preset: str = "tiny", L: int = 256, seed: int = 0) -> dict:
    """Loss and gradients of both formulations on one batch, float32 on CPU. FlexAttention has no backward on
    CPU: the seed's loss is computed with FlexAttention itself (eager), its gradients with the dense mask that
    FlexAttention's `create_mask` makes from the same mask_mod (SDPA: the same masked softmax)."""
    from torch.nn.attention.flex_attention import create_mask

    torch.manual_seed(seed)
    cfg = PRESETS[preset]().model
    model = BlockDiffusionLM(cfg)
    with torch.no_grad():  # the head starts at zero; random values make the loss depend on everything
        model.lm_head.weight.normal_(0, 0.5)
    b = make_batch(cfg, L, mean_doc=90, seed=seed, device="cpu")
    ours, ours_grads = gradients(model, lambda: ours_loss(model, b))
    with torch.no_grad():
        seed_flex = seed_loss(model, b, flex(b, cfg.block_size)).item()
    dense = create_mask(bd_mask_mod(b.layout.cu_seqlens, cfg.block_size), None, None, 2 * L, 2 * L, device="cpu")
    seed_value, seed_grads = gradients(model, lambda: seed_loss(
        model, b, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)))
    worst = max(((ours_grads[n] - seed_grads[n]).abs().max() / seed_grads[n].abs().max().clamp_min(1e-12)).item()
                for n in ours_grads)
    return dict(L=L, documents=b.layout.cu_seqlens.numel() - 1, loss_ours=ours, loss_seed=seed_value,
                loss_seed_flex=seed_flex, worst_grad_rel=worst, grads=(ours_grads, seed_grads))


def make_step(name: str, cfg, L: int, mean_doc: int, device: str, compiled: bool = True, flex_compiled=None):
    """One training step (forward, backward, Adam + Muon) of one formulation, "ours" or "seed", on a fresh model:
    returns step() over three batches in turn. On a GPU the seed attends with FlexAttention (its BlockMask built
    every step, as the seed does), in bf16 (the embedding's dtype, as train.py and the seed run: no autocast); on a
    CPU with SDPA and the dense mask built every step (FlexAttention has no CPU backward), float32. `compiled`: the
    objective compiled (ours: compile_objective; the seed: torch.compile of its loss)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = BlockDiffusionLM(cfg.model).to(dev).set_dtype(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    groups = model.optimizer_groups()
    adam = torch.optim.Adam(groups["head"] + groups["embed"] + groups["scalars"], lr=1e-3, betas=(0.8, 0.95),
                            eps=1e-10)
    muon = Muon(groups["matrices"], lr=0.025, momentum=0.95,
                **({} if name == "ours" else dict(orthogonalize=seed_newton_schulz)))
    if name == "ours" and compiled:
        model.compile_objective()
    seed_fn = torch.compile(seed_loss) if compiled else seed_loss
    batches = [make_batch(cfg.model, L, mean_doc, seed=i, device=dev) for i in range(3)]
    block = cfg.model.block_size

    def dense(b):  # SDPA with the dense mask of this sequence
        mask = bd_attention_mask(b.layout.cu_seqlens, block)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    turn = iter(range(10**9))

    def step():
        b = batches[next(turn) % len(batches)]
        if name == "ours":
            loss = ours_loss(model, b)
        else:  # the seed builds its mask for every sequence
            loss = seed_fn(model, b, flex(b, block, flex_compiled) if dev.type == "cuda" else dense(b))
        loss.backward()
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)

    return step


def time_step(name: str, cfg, L: int, mean_doc: int, iters: int, flex_compiled) -> dict:
    """Step time, tokens/s and peak memory of one formulation ("ours" or "seed") on a fresh record model; every
    tensor of it is freed on return, so the next formulation's peak starts clean."""
    step = make_step(name, cfg, L, mean_doc, "cuda", flex_compiled=flex_compiled)
    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / iters
    return dict(ms=ms, tokens_per_s=L / ms * 1000, peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def gpu_bench(L: int = 16384, mean_doc: int = 1000, iters: int = 10):
    from torch.nn.attention.flex_attention import flex_attention

    cfg = PRESETS["record"]()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | record model, one micro-step of L={L} "
          f"tokens (2L={2 * L} rows), documents ~{mean_doc} tokens, bf16 activations; step = forward + backward + "
          f"Adam + Muon")
    flex_compiled = torch.compile(flex_attention, dynamic=False)
    # The seed's compiled loss breaks its graph at the attention call, so each layer's Attention.forward is a frame
    # of its own, compiled once per layer index (an int attribute dynamo specializes on): 12 layers pass dynamo's
    # default limit of 8 recompiles, after which the last layers would run eagerly and the baseline look slower.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * cfg.model.num_layers)
    results = {name: time_step(name, cfg, L, mean_doc, iters, flex_compiled) for name in ("ours", "seed")}
    print(f"{'formulation':>12} {'step ms':>9} {'tokens/s':>10} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:>12} {r['ms']:9.1f} {r['tokens_per_s']:10,.0f} {r['peak_gib']:9.2f}")
    print(f"speed-up ours/seed: {results['seed']['ms'] / results['ours']['ms']:.2f}x, "
          f"memory ratio: {results['ours']['peak_gib'] / results['seed']['peak_gib']:.2f}")
    return results


def _fake_model(cfg, device, gpu_dtypes: bool = False):
    """The model with fake parameters on `device` (FakeTensorMode must be active): shapes and dtypes, no memory,
    no values (they matter neither for FLOPs nor for bytes). `gpu_dtypes`: the embedding in bf16, as train.py
    keeps it on a GPU (every activation is then bf16: the GPU's dtype flow)."""
    with torch.device("meta"):
        model = BlockDiffusionLM(cfg.model)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:  # a Linear's absent bias
                continue
            dtype = torch.bfloat16 if module is model.embed and gpu_dtypes else p.dtype
            module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device))
        for name, buf in module._buffers.items():
            module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device=device)
    return model


def flop_table(L: int = 16384, mean_doc: int = 1000) -> dict:
    """FLOPs of one record training step (forward and backward of one micro-step, and the Muon update), by op,
    in both formulations, from torch.utils.flop_counter on fake tensors (no FLOP is executed). Our ops count
    the entries they compute (their registered formulas read the real layout). The seed's attention is
    FlexAttention's: every 128x128 tile of its BlockMask that is not wholly masked, 4·D FLOPs per entry forward
    and 10·D backward (FlashAttention-2's five matmuls); its loss computes all L rows of logits."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from bdiff.kernels.accounting import flex_block_mask_entries

    cfg = PRESETS["record"]()
    b = make_batch(cfg.model, L, mean_doc, seed=0, device="cpu")  # real: the formulas read the layout
    D, H, layers = cfg.model.head_dim, cfg.model.num_heads, cfg.model.num_layers
    table = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _fake_model(cfg, torch.device("cpu"))
        for name in ("ours", "seed"):
            counter = FlopCounterMode(display=False)
            with counter:
                if name == "ours":
                    loss = ours_loss(model, b)
                else:  # the attention's FLOPs are FlexAttention's tiles, added below
                    loss = seed_loss(model, b, lambda q, k, v: q + k + v)  # no FLOPs; gradients reach q, k, v
                loss.backward()
                muon = Muon(model.optimizer_groups()["matrices"],
                            **({} if name == "ours" else dict(orthogonalize=seed_newton_schulz)))
                muon.step()
            model.zero_grad(set_to_none=True)
            counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
            row = dict(attention=sum(n for op, n in counts.items() if "bd_attention" in op),
                       loss=counts.get("bdiff.masked_linear_cross_entropy", 0),
                       newton_schulz=counts.get("bdiff.newton_schulz", 0))
            row["matmuls"] = sum(counts.values()) - sum(row.values())
            table[name] = row
    flex_entries = flex_block_mask_entries(b.layout.cu_seqlens, cfg.model.block_size)
    table["seed"]["attention"] = (4 + 10) * D * H * layers * flex_entries
    # The seed's loss is plain matmuls (lm_head on all L rows, its two gradients) and Newton–Schulz is torch
    # matmuls: split them out of "matmuls" so that both columns have the same rows.
    table["seed"]["loss"] = 6 * L * cfg.model.model_dim * cfg.model.vocab_size  # logits, dhidden, dweight
    table["seed"]["matmuls"] -= table["seed"]["loss"]
    ns = sum(5 * (4 * min(p.shape) ** 2 * max(p.shape) + 2 * min(p.shape) ** 3)
             for p in model.optimizer_groups()["matrices"])
    table["seed"]["newton_schulz"] = ns
    table["seed"]["matmuls"] -= ns
    return dict(L=L, mean_doc=mean_doc, documents=b.layout.cu_seqlens.numel() - 1, table=table)


def memory_table(L: int = 16384, mean_doc: int = 1000) -> dict:
    """Peak memory of one record training step at the full micro-batch, as a GPU would hold it, measured
    without one: MemTracker under FakeTensorMode (no memory is allocated) by category, and the tensors autograd
    saves for the backward by dtype (saved_tensors_hooks). The bf16 embedding (as train.py keeps it on a GPU)
    makes every activation bf16, the GPU's dtype flow. Not seen:
    the temporaries inside the loss op (one chunk of logits and the bf16 copy of lm_head, ~110 MiB) and the
    CUDA context."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = PRESETS["record"]()
    b = make_batch(cfg.model, L, mean_doc, seed=0, device="cpu")
    saved: dict[str, int] = {}
    seen: set[int] = set()
    loss_seen: list = []

    def pack(t):  # bytes saved by the first micro-step's forward, by dtype
        key = id(t.untyped_storage())
        if not loss_seen and key not in seen:  # a storage saved by several ops counts once
            seen.add(key)
            saved[str(t.dtype).removeprefix("torch.")] = saved.get(str(t.dtype).removeprefix("torch."), 0) + \
                t.untyped_storage().nbytes()
        return t

    with FakeTensorMode(allow_non_fake_inputs=True):
        # Fake CPU tensors: autograd on fake CUDA tensors needs CUDA's device guard, which a CPU-only build
        # lacks. Bytes do not depend on the device; the model is set up as on a GPU (bf16 embedding).
        dev = torch.device("cpu")
        model = _fake_model(cfg, dev, gpu_dtypes=True)
        def fake(t):  # a fake tensor of t's shape and dtype: the byte count needs no values
            return torch.empty(t.shape, dtype=t.dtype, device=dev)

        lay = b.layout
        layout = Layout(fake(lay.cu_seqlens), fake(lay.positions), fake(lay.blocks), fake(lay.schedule), lay.num_blocks)
        batch = Batch(fake(b.tokens), layout, fake(b.x_t), fake(b.weights))
        groups = model.optimizer_groups()
        adam = torch.optim.Adam(groups["embed"] + groups["head"] + groups["scalars"], lr=1e-3)
        muon = Muon(groups["matrices"])
        tracker = MemTracker()
        tracker.track_external(model, adam, muon)
        with tracker:  # two optimizer steps of two micro-steps: the second runs with optimizer state and
            for _ in range(2):  # accumulated gradients alive, as every step after the first does
                for _ in range(2):
                    tracker.reset_mod_stats()  # per-module stats cover one call; the peak spans all four
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        loss = ours_loss(model, batch)
                    loss_seen.append(loss)
                    loss.backward()
                adam.step()
                muon.step()
                model.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
    categories = {str(k).split(".")[-1].lower(): v for k, v in next(iter(peak.values())).items()}
    return dict(L=L, categories=categories, saved_by_dtype=saved)


# Transformers configs of the shapes bench_step --memory --model measures (no download: the shapes as published).
HF_SHAPES = {
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}


def _meta_hf(shape: str):
    """The adapted model of HF_SHAPES[shape] (bdiff's attention, fp32 weights, token shift) on the meta device."""
    import transformers

    from bdiff.config import ModelConfig
    from bdiff.models.adapted import ATTENTION, AdaptedLM, fill_network, register_attention

    register_attention()
    config = transformers.AutoConfig.for_model(**HF_SHAPES[shape])
    with torch.device("meta"):
        lm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)
    cfg = ModelConfig(vocab_size=config.vocab_size, mask_id=config.vocab_size - 1, bos_id=config.vocab_size - 2,
                      block_size=16, separator="closes", token_shift=True, init=shape)
    return AdaptedLM(lm, fill_network(cfg, config), check=False)


def step_memory(shape: str, L: int, batch: Batch, checkpointing: bool, world: int = 1,
                formulation: str = "bdiff") -> dict:
    """Peak memory by category of one GPU's training step of the adapted HF_SHAPES[shape] (fp32 weights, bf16, AdamW,
    L tokens: 2L rows), as a GPU would hold it, measured without one: MemTracker under FakeTensorMode (nothing is
    allocated). `world` > 1: FSDP2 over a fake process group of that many ranks (torch's FakeStore; this process is
    rank 0, its collectives move nothing), the model sharded on the meta device and materialised as fake shards;
    1: the whole model on the GPU, as DDP keeps it. `formulation` "transformers": the same model as a user of
    transformers alone trains it, SDPA under the dense (2L, 2L) block-diffusion mask and the full fp32 logits of the
    noisy half into a weighted cross-entropy. Not seen: the temporaries inside bdiff's loss op (one chunk of
    logits), the CUDA context, NCCL's buffers and the allocator's slack."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from bdiff.training import fsdp

    model = _meta_hf(shape).set_dtype(torch.bfloat16)
    model.set_activation_checkpointing(checkpointing)
    if world > 1:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if not dist.is_initialized():
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        fsdp.shard(model, torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        dev = torch.device("cpu")  # fake CPU tensors: bytes do not depend on the device
        model.to_empty(device=dev)
        if world == 1:
            model.lm.tie_weights()  # a plain module's to_empty unties them (FSDP2's keeps them)
        model.train()

        def fake(t):
            return torch.empty(t.shape, dtype=t.dtype, device=dev)

        lay = batch.layout
        layout = Layout(fake(lay.cu_seqlens), fake(lay.positions), fake(lay.blocks), fake(lay.schedule),
                        lay.num_blocks)
        tokens, x_t, weights = fake(batch.tokens), fake(batch.x_t), fake(batch.weights)
        mask = torch.empty(1, 1, 2 * L, 2 * L, dtype=torch.bool, device=dev)

        def loss_fn():
            if formulation == "bdiff":  # through forward, whose hooks gather a sharded root's weights
                return model(tokens, noise_range=(0.3, 0.8), layout=layout)
            lm = model.lm
            lm.config._attn_implementation = "sdpa"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = lm(input_ids=torch.cat([x_t, tokens])[None], position_ids=layout.positions.repeat(2)[None],
                            attention_mask=mask, use_cache=False).logits[0, :L].float()
            return (F.cross_entropy(logits, tokens, reduction="none") * weights).sum() / L

        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:  # two steps: the second with AdamW's state alive
            for _ in range(2):
                tracker.reset_mod_stats()
                loss_fn().backward()
                opt.step()
                model.zero_grad(set_to_none=True)
            peak = tracker.get_tracker_snapshot("peak")
    return {str(k).split(".")[-1].lower(): v for k, v in next(iter(peak.values())).items()}


def memory_batch(shape: str, L: int, mean_doc: int) -> Batch:
    from bdiff.config import ModelConfig

    vocab = HF_SHAPES[shape]["vocab_size"]
    return make_batch(ModelConfig(vocab_size=vocab, mask_id=vocab - 1, bos_id=vocab - 2), L, mean_doc, 0, "cpu")


def adapted_memory_table(shape: str = "qwen2.5-1.5b", L: int = 8192, mean_doc: int = 1000,
                         checkpointing: bool = False) -> dict:
    """step_memory of bdiff's step against transformers' (SDPA, dense mask, full logits) on one GPU."""
    batch = memory_batch(shape, L, mean_doc)
    params = sum(p.numel() for p in _meta_hf(shape).parameters())
    return dict(shape=shape, L=L, params=params, checkpointing=checkpointing,
                categories={name: step_memory(shape, L, batch, checkpointing, formulation=name)
                            for name in ("bdiff", "transformers")})


def sharding_table(shapes=("qwen2.5-1.5b", "qwen2.5-7b"), L: int = 8192, world: int = 8, mean_doc: int = 1000) -> dict:
    """Each shape's peak per GPU with bdiff's step: DDP (the whole model and its optimizer state on every GPU) and
    FSDP2 over `world` GPUs, each with and without activation checkpointing."""
    rows = {}
    for shape in shapes:
        batch = memory_batch(shape, L, mean_doc)
        for ranks, name in ((1, "DDP"), (world, f"FSDP2 x{world}")):
            for checkpointing in (False, True):
                rows[(shape, name, checkpointing)] = step_memory(shape, L, batch, checkpointing, ranks)["total"]
    return dict(L=L, world=world, rows=rows)


# The suite (bench/conftest.py): a whole step, documents of ~300 tokens. On a GPU the record model at L=16,384:
# ours and the seed's, eager and compiled. On a CPU the demo preset: ours against the seed's at L=1024 (2x the
# preset's, where the dense mask's cost shows), ours compiled against eager at the preset's own L=512 (the demo).
SUITE = [  # (candidate, formulation, compiled, compared with, L on a CPU)
    ("seed eager", "seed", False, None, 1024),
    ("seed compiled", "seed", True, "seed eager", None),
    ("bdiff eager", "ours", False, "seed eager", 1024),
    ("bdiff eager", "ours", False, None, 512),
    ("bdiff compiled", "ours", True, "bdiff eager", 512),
]
CASES = [case for case in SUITE if torch.cuda.is_available() or case[-1]]


@pytest.mark.parametrize("candidate, name, compiled, compare_with, cpu_L", CASES,
                         ids=[f"{c[0]}-L{c[-1]}" if c[-1] else c[0] for c in CASES])
def test_step(measure, candidate, name, compiled, compare_with, cpu_L):
    from torch.nn.attention.flex_attention import flex_attention

    cuda = torch.cuda.is_available()
    cfg = PRESETS["record" if cuda else "demo"]()
    L = cfg.train.seq_len if cuda else cpu_L
    step = make_step(name, cfg, L, 300, "cuda" if cuda else "cpu", compiled,
                     torch.compile(flex_attention, dynamic=False) if cuda else None)
    measure(f"training step L={L}", candidate, step, compare_with=compare_with, work=L, unit="token",
            warmup=3,  # one call per batch: the compiled step's recompilation for a new document count is not timed
            model=cfg.model.__dict__ | {}, L=L, mean_doc=300, compiled=compiled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="time both formulations on a CUDA GPU, record model")
    parser.add_argument("--flops", action="store_true", help="FLOPs of one record step by op, both formulations")
    parser.add_argument("--memory", action="store_true", help="peak memory of one record step (fake tensors)")
    parser.add_argument("--mean-doc", type=int, default=1000, help="mean document length of the batches")
    parser.add_argument("--model", choices=sorted(HF_SHAPES), help="with --memory: a transformers model of this "
                        "shape adapted by bdiff, against transformers with SDPA and full logits")
    parser.add_argument("--tokens", type=int, default=8192, help="with --model: tokens per step (2L rows)")
    parser.add_argument("--activation_checkpointing", action="store_true", help="with --model: recompute each "
                        "decoder layer in the backward")
    parser.add_argument("--sharding", action="store_true", help="with --memory: Qwen2.5-1.5B and 7B shapes per GPU, "
                        "DDP against FSDP2 over 8 GPUs, with and without activation checkpointing")
    args = parser.parse_args()
    if args.memory and args.sharding:
        r = sharding_table(L=args.tokens)
        print(f"peak memory per GPU (GiB), one training step at L={r['L']} tokens per GPU (bdiff: fused loss, "
              f"bd_attention), fp32 weights, bf16, AdamW; fake tensors")
        print(f"{'model':>14} {'sharding':>10} {'no checkpointing':>17} {'activation checkpointing':>25}")
        for shape in dict.fromkeys(k[0] for k in r["rows"]):
            for name in dict.fromkeys(k[1] for k in r["rows"]):
                plain, saved = (r["rows"][(shape, name, c)] / 2**30 for c in (False, True))
                print(f"{shape:>14} {name:>10} {plain:17.1f} {saved:25.1f}")
        return 0
    if args.memory and args.model:
        r = adapted_memory_table(args.model, args.tokens, args.mean_doc, args.activation_checkpointing)
        print(f"{r['shape']} ({r['params'] / 1e9:.2f}B parameters, fp32 weights, bf16 autocast, AdamW), one step at "
              f"L={r['L']} tokens ({2 * r['L']} rows), activation checkpointing "
              f"{'on' if r['checkpointing'] else 'off'}: peak by category (GiB)")
        names = list(r["categories"]["bdiff"])
        print(f"{'':>14} {'bdiff':>8} {'transformers (SDPA, dense mask, full logits)':>46}")
        for name in names:
            print(f"{name:>14} {r['categories']['bdiff'][name] / 2**30:8.2f} "
                  f"{r['categories']['transformers'].get(name, 0) / 2**30:46.2f}")
        return 0
    if args.gpu:
        gpu_bench(mean_doc=args.mean_doc)
        return 0
    if args.flops:
        r = flop_table(mean_doc=args.mean_doc)
        print(f"record model, one micro-step of L={r['L']} tokens, {r['documents']} documents (mean ~{r['mean_doc']}),"
              f" forward + backward + Muon; TFLOP")
        print(f"{'op':>16} {'ours':>9} {'seed':>9} {'ours/seed':>10}")
        for op in ("matmuls", "attention", "loss", "newton_schulz"):
            ours, seed = r["table"]["ours"][op], r["table"]["seed"][op]
            print(f"{op:>16} {ours / 1e12:9.3f} {seed / 1e12:9.3f} {ours / seed:10.3f}")
        ours, seed = (sum(r["table"][n].values()) for n in ("ours", "seed"))
        print(f"{'total':>16} {ours / 1e12:9.3f} {seed / 1e12:9.3f} {ours / seed:10.3f}")
        return 0
    if args.memory:
        r = memory_table(mean_doc=args.mean_doc)
        print(f"record model, one training step at L={r['L']} tokens (2L={2 * r['L']} rows), peak by category (GiB)")
        for name, value in r["categories"].items():
            print(f"{name:>12} {value / 2**30:8.2f}")
        print("tensors saved for the backward, by dtype (GiB): " +
              ", ".join(f"{k} {v / 2**30:.2f}" for k, v in sorted(r["saved_by_dtype"].items())))
        return 0
    r = cpu_check()
    atol, rtol = TOLERANCE
    print(f"tiny model, L={r['L']}, {r['documents']} documents, float32 on CPU")
    print(f"loss ours {r['loss_ours']:.8f} | seed with FlexAttention {r['loss_seed_flex']:.8f} | seed with its "
          f"dense mask {r['loss_seed']:.8f}")
    print(f"worst gradient difference ours vs seed: {r['worst_grad_rel']:.2e} of the largest entry")
    ok = all(abs(r["loss_ours"] - r[k]) <= atol + rtol * abs(r[k]) for k in ("loss_seed", "loss_seed_flex"))
    for n, g in r["grads"][0].items():
        ok &= torch.allclose(g, r["grads"][1][n], atol=atol, rtol=rtol)
    print("same loss and gradients" if ok else f"MISMATCH beyond (atol, rtol) = {TOLERANCE}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
