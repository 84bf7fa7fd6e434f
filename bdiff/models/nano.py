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

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdiff.config import ModelConfig
from bdiff.kernels.bd_attention import schedule_bounds
from bdiff.models.objective import Layout, document_layout, loss_weights, noise_blocks
from bdiff.ops import bd_attention, masked_linear_cross_entropy

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
        self.lamb = nn.Parameter(torch.tensor(0.5))  # value-residual mix with the first layer's values
        self.rotary = Rotary(cfg.head_dim)

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
        v = (1 - self.lamb) * v + self.lamb * v1
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


class BlockDiffusionLM(nn.Module):
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

    # ---- sharing: huggingface_hub's mixin convention, over bdiff.hub's one loader and one writer ----------------

    run_config: dict | None = None  # the run's config (Config.to_dict()) where the model came from a run or a file

    @classmethod
    def from_pretrained(cls, name: str, device="cpu") -> BlockDiffusionLM:
        """A model (in eval mode) from a model directory, a run directory, a final.pt or a Hub id (user/name, through
        huggingface_hub's cache): the loader of every command. Its config dict ("model", "train", "dataset") is
        `model.run_config`. Weights that are not this config's model are refused in one line (bdiff.hub.HubError)."""
        from bdiff.hub import HubError, read_pretrained

        weights, config, where = read_pretrained(name)
        try:
            model = cls(ModelConfig(**config["model"]))
        except (TypeError, ValueError) as e:
            raise HubError(f"{where}: not a valid model config ({str(e).splitlines()[0]})") from None
        expected = set(model.state_dict())
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise HubError(f"{where}: not this model's weights (missing {missing[:3]}"
                           f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                           f"{'...' if len(unexpected) > 3 else ''})")
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise HubError(f"{where}: weights do not match the config ({' '.join(str(e).split())[:300]})") from None
        model.run_config = config
        return model.to(device).eval()

    def save_pretrained(self, directory: str, config: dict | None = None) -> str:
        """Write a model directory (bdiff.hub.save_pretrained: safetensors, config.json, the transformers code, a
        card). `config`: the run's config dict; by default the one it was loaded or trained with, else its model
        config alone. Returns the directory."""
        from bdiff import hub

        config = config or self.run_config or {"model": dataclasses.asdict(self.cfg), "train": {}, "dataset": {}}
        return hub.save_pretrained(self, directory, config, config.get("step"), config.get("tokens"),
                                   config.get("val_loss"))

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    config: dict | None = None) -> str:
        """Save the model (save_pretrained) and upload it to the Hub repository `repo_id` (bdiff.hub.push: created if
        needed; the token from `token`, HF_TOKEN or `hf auth login`). Returns the repository's URL."""
        import tempfile

        from bdiff import hub

        with tempfile.TemporaryDirectory() as directory:
            return hub.push(self.save_pretrained(directory, config), repo_id, private=private, token=token)

    def set_dtype(self, dtype: torch.dtype | str) -> BlockDiffusionLM:
        """Compute in `dtype` (torch.bfloat16 / "bfloat16" or float32): the embedding is stored in it, as the seed
        keeps its embedding in bf16; the other weights stay fp32 masters, cast where they are used."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        self.embed.to(dtype)
        return self

    def hidden_states(self, tokens_2l: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                      schedule: torch.Tensor | None = None, out_rows: int | None = None):
        """Final normalised hidden states (2L, dim) of the x_t ⊕ x_0 rows, or of the first `out_rows` rows.
        `schedule`: the attention range tables of the layout, shared by every layer (built from cu_seqlens
        when not given)."""
        block_size = self.cfg.block_size
        if schedule is None:  # once for every layer
            schedule = schedule_bounds(cu_seqlens, tokens_2l.numel() // 2, block_size)

        def attend(layer, q, k, v):
            return bd_attention(q, k, v, cu_seqlens, block_size, None, schedule)

        return self.run_layers(tokens_2l, torch.cat([positions, positions]), attend, out_rows)

    def run_layers(self, tokens: torch.Tensor, positions: torch.Tensor, attend, out_rows: int | None = None
                   ) -> torch.Tensor:
        """The transformer on rows of any leading shape: tokens and positions (...) -> normalised hidden
        states (..., dim). `attend(layer, q, k, v)` decides which rows see which. `out_rows`: only the first `out_rows`
        rows' states are returned, and the last layer computes queries, projection and MLP for those rows only
        (the rows after them are still read there as keys and values)."""
        x = x0 = norm(self.embed(tokens))
        angles = self.blocks[0].attn.rotary.angles(positions)  # the same for every layer
        v1, skips = None, []
        half = len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x, v1 = block(x, x0, v1, angles, attend, out_rows if i == len(self.blocks) - 1 else None)
            if i < half:
                skips.append(x)
        return norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the real vocabulary (padding rows of lm_head dropped)."""
        return (hidden @ self.lm_head.weight[:self.cfg.vocab_size].to(hidden.dtype).T).float()

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Which parameters each optimizer takes (the seed's split): Adam the lm_head, the embedding and the scalars
        (mixing and skip weights); Muon every 2-D matrix of the blocks. Every parameter is in exactly one group."""
        return {"head": [self.lm_head.weight], "embed": [self.embed.weight],
                "scalars": [p for p in self.parameters() if p.ndim < 2],
                "matrices": [p for p in self.blocks.parameters() if p.ndim == 2]}

    def forward(self, tokens: torch.Tensor, *, noise_range: tuple[float, float],
                generator: torch.Generator | None = None, layout: Layout | None = None,
                stratified: bool = False) -> torch.Tensor:
        """Weighted block-diffusion loss of one packed sequence `tokens` (L,): a scalar. `noise_range`: each block's
        t ~ U[low, high] (training: TrainConfig.noise_low/high; the record's validation: (0, 1)).

        `layout`: document_layout(tokens) on tokens' device, built by the caller where it is free (the trainer
        builds it from the loader's CPU tokens); computed here otherwise. Noise is drawn here, eagerly, from
        `generator` (`stratified`: the blocks' levels as one low-discrepancy set, noise.noise_blocks); the rest is
        `objective`, which `compile_objective` compiles."""
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be one packed sequence of shape (L,), got {tuple(tokens.shape)}")
        cfg = self.cfg
        layout = document_layout(tokens, cfg.bos_id, cfg.block_size, separator=cfg.separator) if layout is None \
            else layout
        x_t, masked, t = noise_blocks(tokens, layout.blocks, cfg.mask_id, *noise_range, generator=generator,
                                      num_blocks=layout.num_blocks, stratified=stratified)
        # The document count changes every sequence: one compiled graph serves them all.
        torch._dynamo.maybe_mark_dynamic(layout.cu_seqlens, 0)
        return self.objective(x_t, tokens, loss_weights(masked, t), layout.positions, layout.cu_seqlens,
                              layout.schedule)

    def objective(self, x_t: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                  cu_seqlens: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        """sum_i weights_i · CE(logits of noisy row i, tokens_i) / L over x_t ⊕ x_0; all shapes fixed by L.
        Only the noisy half's final states are read, so the last layer skips the clean rows' queries, attention
        projection and MLP (their keys and values still serve the noisy rows)."""
        L = tokens.numel()
        h = self.hidden_states(torch.cat([x_t, tokens]), positions, cu_seqlens, schedule, out_rows=L)  # (L, dim)
        return masked_linear_cross_entropy(h, self.lm_head.weight, tokens, weights, self.cfg.vocab_size) / L

    def compile_objective(self, **options) -> None:
        """Compile `objective` as one graph (fullgraph: a graph break is an error, not a silent slowdown).
        The three ops are opaque operators inside it; noise drawing and the layout stay eager."""
        self.objective = torch.compile(self.objective, fullgraph=True, **options)
