"""A bdiff block-diffusion language model (BD3-LM objective, nano-block-diffusion architecture) for 🤗 transformers
(trust_remote_code): the network of bdiff/models/nano.py in plain PyTorch, its attention PyTorch's SDPA under the
block-diffusion mask. Needs transformers and torch only.

    model = AutoModelForMaskedLM.from_pretrained("user/name", trust_remote_code=True)
    logits = model(x_t, clean_ids=x_0).logits          # the noisy tokens' logits, as bdiff's training computes them
    ids = model.generate(prompt_ids, max_new_tokens=64)   # block by block, each block denoised in a few steps

One packed sequence of L tokens runs as 2L rows, x_t (noisy: MASK where noised) then x_0 (clean), both with each
token's position inside its document. A document starts at every BOS ("opens", the seed's layout) or after it
("closes"); a sequence that does not open with a document's start counts its first fragment's positions from 1, as
bdiff does. Query row i sees key row j when both are in the same document and: noisy -> noisy, the same block;
noisy -> clean, a strictly earlier block; clean -> clean, the same or an earlier block; clean -> noisy, never.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_bdiff import BdiffConfig
from .layout_bdiff import block_diffusion_mask, denoise_block, layout


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear whose weight is cast to the activations' dtype."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """Rotary embedding in which only the first quarter of the frequency slots rotate. The frequencies are made at
    each call, not kept in a buffer: transformers builds models on the meta device, where a buffer that is not in
    the weights file would stay empty."""

    def __init__(self, head_dim):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, positions):  # x (B, R, H, D), positions (B, R)
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=self.head_dim // 4, dtype=torch.float32, device=x.device)
        theta = positions.float()[..., None] * torch.cat([freq, freq.new_zeros(self.head_dim // 4)])
        cos, sin = theta.cos()[..., None, :], theta.sin()[..., None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg["model_dim"]
        self.num_heads, self.head_dim = cfg["num_heads"], cfg["head_dim"]
        self.c_q, self.c_k, self.c_v, self.c_proj = (CastedLinear(dim, dim) for _ in range(4))
        self.lamb = nn.Parameter(torch.tensor([0.5]))  # value-residual mix with the first layer's values (1,)
        self.rotary = Rotary(self.head_dim)

    def forward(self, x, v1, positions, mask):  # x (B, R, dim), mask (B, 1, R, R) bool: True where allowed
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = self.c_q(x).view(heads), self.c_k(x).view(heads), self.c_v(x).view(heads)
        v1 = v if v1 is None else v1
        lamb = self.lamb[0]  # 0-d: mixes in the activations' dtype, as a (1,) fp32 tensor would not
        v = (1 - lamb) * v + lamb * v1
        q, k = self.rotary(norm(q), positions), self.rotary(norm(k), positions)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(x.shape)), v1


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = CastedLinear(cfg["model_dim"], cfg["mlp_ratio"] * cfg["model_dim"])
        self.c_proj = CastedLinear(cfg["mlp_ratio"] * cfg["model_dim"], cfg["model_dim"])

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # x <- a*x + b*x0

    def forward(self, x, x0, v1, positions, mask):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        y, v1 = self.attn(norm(x), v1, positions, mask)
        x = x + y
        return x + self.mlp(norm(x)), v1


class BdiffForMaskedLM(PreTrainedModel):
    """bdiff's network. `forward(input_ids, clean_ids)`: the logits of the noisy tokens x_t given x_0, exactly as
    bdiff's training computes them; `generate(input_ids, ...)`: new tokens after a prompt, block by block."""
    config_class = BdiffConfig
    base_model_prefix = "bdiff"
    main_input_name = "input_ids"

    def __init__(self, config: BdiffConfig):
        super().__init__(config)
        cfg = config.model
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["model_dim"])
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg["num_layers"])])
        self.skip_weights = nn.Parameter(torch.ones(cfg["num_layers"] // 2))  # U-net skip scales
        padded = -(-cfg["vocab_size"] // cfg["lm_head_multiple"]) * cfg["lm_head_multiple"]
        self.lm_head = CastedLinear(cfg["model_dim"], padded)
        self.post_init()

    def _init_weights(self, module):  # bdiff's initialisation, for a model made from a config alone
        if isinstance(module, CastedLinear):
            bound = math.sqrt(3) * 0.5 / math.sqrt(module.in_features)
            nn.init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight)

    def forward(self, input_ids, clean_ids=None, labels=None, starts_document=False, return_dict=True, **kwargs):
        """input_ids: x_t (B, L), the noisy tokens (MASK where noised); clean_ids: x_0 (B, L), the clean sequence
        (default: input_ids, as when sampling a block on its clean context); starts_document: the sequences open a
        document (positions from 0; by default only one that opens with BOS under the "opens" layout does). Returns
        MaskedLMOutput with float32 logits (B, L, vocab) of the noisy rows, and with `labels` (B, L; -100 where no
        loss) their mean cross-entropy."""
        cfg = self.config.model
        clean_ids = input_ids if clean_ids is None else clean_ids
        doc, positions, block = layout(clean_ids, cfg["bos_id"], cfg["block_size"], cfg["separator"], starts_document)
        mask = block_diffusion_mask(doc, block)
        tokens, positions = torch.cat([input_ids, clean_ids], 1), positions.repeat(1, 2)  # (B, 2L)
        x = x0 = norm(self.embed(tokens))
        v1, skips, half = None, [], len(self.blocks) // 2
        for i, layer in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x, v1 = layer(x, x0, v1, positions, mask)
            if i < half:
                skips.append(x)
        hidden = norm(x[:, :input_ids.shape[1]])
        logits = (hidden @ self.lm_head.weight[:cfg["vocab_size"]].to(hidden.dtype).T).float()
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits) if return_dict else (logits,)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=64, steps_per_block=None, temperature=0.0, generator=None):
        """Continue the prompt `input_ids` (1, P) (a document's start) by up to `max_new_tokens`: each block of
        block_size starts as MASK and is denoised in `steps_per_block` steps (default: one token a step), each step
        revealing its most confident masked tokens (temperature 0) or a random draw of them; it stops after the BOS
        that ends the text. Returns the new ids (1, N). Recomputes the context at every step (no KV cache: for
        speed use bdiff's sampler)."""
        cfg = self.config.model
        B, mask_id = cfg["block_size"], cfg["mask_id"]
        steps_per_block = steps_per_block or B
        seq = input_ids[:1]
        while seq.shape[1] - input_ids.shape[1] < max_new_tokens:
            start = seq.shape[1] // B * B  # the prompt's last, partial block is completed first
            seq = torch.cat([seq, seq.new_full((1, start + B - seq.shape[1]), mask_id)], 1)
            denoise_block(seq, start, lambda s: self(s, starts_document=True).logits, mask_id, steps_per_block,
                          temperature, generator)
            new = seq[0, input_ids.shape[1]:]
            if (new == cfg["bos_id"]).any():
                return new[:int((new == cfg["bos_id"]).nonzero()[0]) + 1][None]
        return seq[:, input_ids.shape[1]:input_ids.shape[1] + max_new_tokens]
