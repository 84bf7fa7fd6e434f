"""The nano-block-diffusion transformer and its block-diffusion loss (docs/design.md §1).

One packed sequence of L tokens in; the transformer runs over the 2L rows x_t ⊕ x_0 (noisy half first)
with the same rotary positions on both halves, and the loss is computed on the noisy half only.

Precision is explicit, the seed's way, never autocast: the embedding's dtype is the activation dtype
(`set_dtype`: bfloat16 on a GPU, float32 on a CPU by default). Every linear layer keeps an fp32 weight and casts
it to the activation's dtype; norms, rotary and residual mixes return the dtype they are given, so every
activation, and q, k, v at the attention, has the embedding's dtype; the ops accumulate in fp32 inside, and the
loss op returns an fp32 loss. Autocast would not do the same on every device: under CUDA autocast rms_norm runs
in fp32 (CPU autocast has no such rule), so a CPU run would never execute the dtype flow of a GPU run. With the
dtype explicit, `--dtype bfloat16` on a CPU runs exactly the GPU's flow.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdiff.config import ModelConfig
from bdiff.models.objective import BlockDiffusionModel

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # the activation dtypes (config.DTYPES's names)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 weight is cast to the activation dtype (the embedding's, `set_dtype`)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        with torch.no_grad():
            if zero_init:
                self.weight.zero_()
            else:
                bound = math.sqrt(3) * 0.5 / math.sqrt(in_features)  # uniform with std 0.5/sqrt(fan_in)
                self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """Rotary embedding in which only the first quarter of the frequency slots rotate."""

    def __init__(self, head_dim: int):
        super().__init__()
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        self.register_buffer("freq", torch.cat([freq, freq.new_zeros(head_dim // 4)]), persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # positions (...)
        """(cos, sin), each (..., 1, D/2): computed once per forward and shared by every layer."""
        theta = positions.float()[..., None] * self.freq  # (..., D/2)
        return theta.cos()[..., None, :], theta.sin()[..., None, :]

    def forward(self, x: torch.Tensor, angles) -> torch.Tensor:  # x (..., H, D)
        cos, sin = angles
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Projections, value residual, QK-norm and rotary; which keys each query sees is the caller's `attend`:
    block-diffusion attention over the 2L training layout, or a KV cache when sampling
    (bdiff/generation/sampling.py)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, cfg.num_heads, cfg.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_v = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_proj = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.lamb = nn.Parameter(torch.tensor([0.5]))  # value-residual mix with the first layer's values (1,)
        self.rotary = Rotary(cfg.head_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Weights saved when lamb was a 0-d scalar load as (1,): FSDP2 shards no 0-d parameter."""
        if state_dict.get(prefix + "lamb") is not None and state_dict[prefix + "lamb"].ndim == 0:
            state_dict[prefix + "lamb"] = state_dict[prefix + "lamb"].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, v1, angles, attend, out_rows=None):  # x (..., dim); angles: Rotary.angles of the rows
        """`out_rows`: only the first `out_rows` rows' outputs are needed: queries and the projection are formed for
        those rows only (the other rows' queries are zeros, their outputs dropped); keys and values for all."""
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        if out_rows is None:
            q = self.c_q(x).view(heads)
        else:
            q = torch.cat([self.c_q(x[:out_rows]), x.new_zeros(x.shape[0] - out_rows, x.shape[1])]).view(heads)
        k, v = self.c_k(x).view(heads), self.c_v(x).view(heads)
        v1 = v if v1 is None else v1
        lamb = self.lamb[0]  # 0-d: mixes in the activations' dtype, as a (1,) fp32 tensor would not
        v = (1 - lamb) * v + lamb * v1
        q, k = self.rotary(norm(q), angles), self.rotary(norm(k), angles)
        y = attend(self.layer, q, k, v)  # (..., H, D)
        y = y.reshape(x.shape) if out_rows is None else y[:out_rows].reshape(out_rows, x.shape[1])
        return self.c_proj(y), v1


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = CastedLinear(cfg.model_dim, cfg.mlp_ratio * cfg.model_dim)
        self.c_proj = CastedLinear(cfg.mlp_ratio * cfg.model_dim, cfg.model_dim, zero_init=True)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # x <- a*x + b*x0

    def forward(self, x, x0, v1, angles, attend, out_rows=None):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        y, v1 = self.attn(norm(x), v1, angles, attend, out_rows)
        x = (x if out_rows is None else x[:out_rows]) + y
        x = x + self.mlp(norm(x))
        return x, v1


class BlockDiffusionLM(BlockDiffusionModel):
    """The nano-block-diffusion network (the module docstring); the objective is BlockDiffusionModel's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList([Block(cfg, layer) for layer in range(cfg.num_layers)])
        self.skip_weights = nn.Parameter(torch.ones(cfg.num_layers // 2))  # U-net skip scales
        padded_vocab = -(-cfg.vocab_size // cfg.lm_head_multiple) * cfg.lm_head_multiple
        self.lm_head = CastedLinear(cfg.model_dim, padded_vocab, zero_init=True)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the embedding's (every other activation follows it)."""
        return self.embed.weight.dtype

    @property
    def head(self) -> torch.Tensor:
        return self.lm_head.weight

    def set_dtype(self, dtype: torch.dtype | str) -> BlockDiffusionLM:
        """Compute in `dtype` (torch.bfloat16 / "bfloat16" or float32): the embedding is stored in it, as the seed
        keeps its embedding in bf16; the other weights stay fp32 masters, cast where they are used."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        self.embed.to(dtype)
        return self

    def run_layers(self, tokens: torch.Tensor, positions: torch.Tensor, attend, out_rows: int | None = None
                   ) -> torch.Tensor:
        """The transformer on rows of any leading shape: tokens and positions (...) -> normalised hidden
        states (..., dim). `attend(layer, q, k, v, scale=None)` decides which rows see which. `out_rows`: only the
        first `out_rows` rows' states are returned, and the last layer computes queries, projection and MLP for those
        rows only (the rows after them are still read there as keys and values)."""
        x = x0 = norm(self.embed(tokens))
        angles = self.blocks[0].attn.rotary.angles(positions)  # the same for every layer
        v1, skips = None, []
        half = len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            rows = out_rows if i == len(self.blocks) - 1 else None
            if self.activation_checkpointing and torch.is_grad_enabled():  # activations recomputed in the backward
                x, v1 = torch.utils.checkpoint.checkpoint(block, x, x0, v1, angles, attend, rows, use_reentrant=False)
            else:
                x, v1 = block(x, x0, v1, angles, attend, rows)
            if i < half:
                skips.append(x)
        return norm(x)

    activation_checkpointing = False  # TrainConfig.activation_checkpointing: each block recomputed in the backward

    def set_activation_checkpointing(self, on: bool) -> None:
        self.activation_checkpointing = on

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Which parameters each optimizer takes (the seed's split): Adam the lm_head, the embedding and the scalars
        (mixing and skip weights); Muon every 2-D matrix of the blocks. Every parameter is in exactly one group."""
        return {"head": [self.lm_head.weight], "embed": [self.embed.weight],
                "scalars": [p for p in self.parameters() if p.ndim < 2],
                "matrices": [p for p in self.blocks.parameters() if p.ndim == 2]}
