"""A Hugging Face causal LM as a block-diffusion LM ("adapted", as Fast-dLLM v2 adapts Qwen2.5 and SDAR Qwen3): the
pretrained network is the trunk, bdiff's objective, kernels and sampler are the rest.

No model code is copied or patched per family. bdiff registers its attention with transformers'
AttentionInterface under the name "bdiff"; a model loaded with attn_implementation="bdiff" (Llama, Qwen2 with its
q/k/v biases, Qwen3 with its q/k norms, Mistral, ... any model whose attention goes through transformers' attention
functions) then calls bdiff for every layer's attention, with its own projections, norms and rotary embedding
around it. What bdiff runs there arrives as a keyword argument of the model's forward (`bdiff_attend`, which
transformers hands to the attention function): block-diffusion attention over the 2L rows x_t ⊕ x_0 while training
(grouped-query heads are bd_attention's own), the KV cache while sampling. No entry is registered with
AttentionMaskInterface, on purpose: for an implementation without one, transformers returns no mask at once,
whereas with one it first scans position_ids for packed sequences (a device sync each forward) before calling it;
either way no dense mask is ever built.

Precision: the weights stay fp32 masters; `--dtype bfloat16` runs the trunk under torch.autocast (transformers'
modules cast nothing themselves, and their norms compute in fp32 in any case), with q, k and v handed to the attention
and the final states handed to the loss in bf16. This is the one place bdiff uses autocast: a CPU run in bf16 shows
this family's dtype flow only up to autocast's CPU rules.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn as nn

from bdiff.config import ModelConfig
from bdiff.errors import BdiffError
from bdiff.models.objective import BlockDiffusionModel

ATTENTION = "bdiff"  # the attention implementation's name in transformers' AttentionInterface
MASK_TOKEN = "<|mask|>"  # the token added to a tokenizer that has no mask token of its own
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json")  # what transformers' tokenizers read


class AdaptError(BdiffError):
    """A model bdiff cannot adapt, or transformers missing; the message names the model and what to do."""


def require_transformers():
    """transformers (an extra), at a version whose attention functions receive the forward's keyword arguments."""
    try:
        import transformers
    except ImportError:
        raise AdaptError('a model from --init needs transformers: pip install -e ".[hf]"') from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise AdaptError(f"a model from --init needs transformers >= 5 (its attention functions receive the forward's "
                         f"keyword arguments), found {transformers.__version__}: pip install -U transformers")
    return transformers


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query (B, H, S, D), key and value (B, Hkv, S, D) -> ((B, S, H, D),
    None). Hands the heads to the forward's `bdiff_attend(layer, q, k, v, scale)` in bdiff's row-major layout."""
    attend = kwargs.get("bdiff_attend")
    if attend is None:
        raise AdaptError(f"{type(module).__name__}: this model's attention is bdiff's (attn_implementation="
                         f"'{ATTENTION}'); run it through bdiff (bdiff.models.adapted.AdaptedLM), or load it with "
                         "another attention implementation")
    if dropout:
        raise AdaptError(f"{type(module).__name__}: attention dropout ({dropout}) is not supported; set the config's "
                         "attention_dropout to 0")
    window = kwargs.get("sliding_window")
    if window is not None and query.shape[2] > 2 * window:  # 2L rows: positions run to L at most
        raise AdaptError(f"{type(module).__name__}: sliding-window attention (window {window}) is not supported; use "
                         f"sequences of at most {window} tokens")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise AdaptError(f"{type(module).__name__}: attention with {name} is not supported")
    out = attend(module.layer_idx, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling)
    return out, None


def register_attention() -> None:
    """bdiff's attention in transformers' AttentionInterface (idempotent)."""
    require_transformers().AttentionInterface.register(ATTENTION, _attention)


class AdaptedLM(BlockDiffusionModel):
    """A transformers causal LM (`lm`, its attention bdiff's) trained and sampled as a block-diffusion LM. `cfg` holds
    the objective's fields (block size, MASK, BOS, separator, token shift) and, for the record and the sampler's
    cache, the network's shape read from the model's config."""

    def __init__(self, lm, cfg: ModelConfig, check: bool = True):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        self.compute_dtype = torch.float32
        name = type(lm).__name__
        if getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise AdaptError(f"{name}: an lm_head with a bias is not supported")
        if getattr(lm.config, "final_logit_softcapping", None):
            raise AdaptError(f"{name}: logit soft-capping is not supported")
        if check:
            self._check_attention()

    @classmethod
    def from_base(cls, name: str, cfg: ModelConfig, log=print) -> AdaptedLM:
        """The causal LM `name` (a local transformers directory or a Hub id) as a block-diffusion model whose
        objective fields are `cfg`'s: the embeddings grow where MASK (cfg.mask_id) lies past them, and the network's
        fields of `cfg` are filled from the model's config. Says where MASK comes from."""
        lm = load_causal_lm(name)
        rows = lm.get_input_embeddings().weight.shape[0]
        if cfg.vocab_size > rows:
            lm.resize_token_embeddings(cfg.vocab_size, mean_resizing=True)  # new rows at the embeddings' mean
            log(f"mask token: id {cfg.mask_id}, new: the embeddings and the head grow from {rows:,} to "
                f"{cfg.vocab_size:,} rows (at the mean of the others)")
        else:
            log(f"mask token: id {cfg.mask_id}, a row of the model's {rows:,}-row embeddings")
        return cls(lm, fill_network(cfg, lm.config))

    @classmethod
    def on_meta(cls, name: str, cfg: ModelConfig) -> AdaptedLM:
        """The model of `name` on the meta device, from its config alone (train.py --dry_run: no weights read)."""
        transformers = require_transformers()
        register_attention()
        try:
            hf = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError, KeyError) as e:
            cause = " ".join(str(e).split())[:200]
            raise AdaptError(f"--init {name}: no transformers config there ({cause})") from None
        with torch.device("meta"):
            lm = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation=ATTENTION)
            if cfg.vocab_size > lm.get_input_embeddings().weight.shape[0]:
                lm.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
        return cls(lm, fill_network(cfg, lm.config), check=False)

    @classmethod
    def from_config(cls, config: dict, hf_config: dict) -> AdaptedLM:
        """An untrained model of the run config `config` ("model": ModelConfig's fields) over the transformers config
        `hf_config` (a to_dict()): what a final.pt's weights load into."""
        transformers = require_transformers()
        register_attention()
        hf = transformers.AutoConfig.for_model(**hf_config)
        lm = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation=ATTENTION, dtype=torch.float32)
        return cls(lm, ModelConfig(**config["model"]))

    @classmethod
    def from_directory(cls, directory: str, config: dict) -> AdaptedLM:
        """A model directory bdiff wrote for an adapted model: transformers reads its weights (the base class's own
        loader, not the directory's remote code)."""
        lm = load_causal_lm(directory)
        return cls(lm, ModelConfig(**config["model"]))

    @property
    def head(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (set_dtype); the weights stay fp32."""
        return self.compute_dtype

    def set_dtype(self, dtype: torch.dtype | str) -> AdaptedLM:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        self.compute_dtype = dtype
        return self

    def set_activation_checkpointing(self, on: bool) -> None:
        """transformers' own checkpointing of each decoder layer (non-reentrant); off as loaded."""
        if on and hasattr(self.lm, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif on:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def run_layers(self, tokens: torch.Tensor, positions: torch.Tensor, attend, out_rows: int | None = None
                   ) -> torch.Tensor:
        """The pretrained trunk on rows (R,) or (b, R) -> its final (normed) hidden states (..., R, dim) in the
        activation dtype; `attend(layer, q, k, v, scale)` with q (..., R, H, D), k and v (..., R, Hkv, D) decides
        which rows see which. `out_rows`: only the first `out_rows` rows are returned (all rows are computed)."""
        flat = tokens.ndim == 1
        ids, pos = (tokens[None], positions[None]) if flat else (tokens, positions)

        def hf_attend(layer, q, k, v, scale):  # (B, S, H, D) from _attention
            q, k, v = (x.to(self.compute_dtype) for x in (q, k, v))
            out = attend(layer, q[0], k[0], v[0], scale)[None] if flat else attend(layer, q, k, v, scale)
            return out.to(self.compute_dtype)

        with torch.autocast(tokens.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            hidden = self.lm.base_model(input_ids=ids, position_ids=pos, use_cache=False,
                                        bdiff_attend=hf_attend).last_hidden_state
        hidden = (hidden[0] if flat else hidden).to(self.compute_dtype)
        return hidden if out_rows is None else hidden[..., :out_rows, :]

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """The same groups as the nano model's: the head (none where it is tied to the embedding), the embedding,
        the hidden 2-D matrices (Muon's, with optimizer muon) and the rest (norms, biases). Every parameter is in
        exactly one group."""
        embed, head = self.lm.get_input_embeddings().weight, self.head
        special = {id(embed), id(head)}
        params = list(self.parameters())
        return {"head": [head] if head is not embed else [], "embed": [embed],
                "scalars": [p for p in params if p.ndim != 2 and id(p) not in special],
                "matrices": [p for p in params if p.ndim == 2 and id(p) not in special]}

    def _check_attention(self) -> None:
        """A model whose attention bypasses transformers' attention functions would train with its own causal
        attention, silently: a two-token probe counts the layers that called bdiff's, and any shortfall is an
        error naming the model's type."""
        if self.head.device.type == "meta":
            return
        called = []

        def count(layer, q, k, v, scale):
            called.append(layer)
            return torch.zeros_like(q)

        device = self.head.device
        with torch.no_grad():
            self.run_layers(torch.zeros(2, dtype=torch.long, device=device), torch.arange(2, device=device), count)
        layers = self.lm.config.num_hidden_layers
        if len(called) != layers:
            raise AdaptError(f"{type(self.lm).__name__}: {len(called)} of its {layers} layers call transformers' "
                             "attention functions (AttentionInterface); bdiff adapts models whose attention goes "
                             "through them (Llama, Qwen2, Qwen3, Mistral, ...)")


def load_causal_lm(name: str):
    """transformers' AutoModelForCausalLM for a local directory or a Hub id, fp32, with bdiff's attention; any
    failure is one line naming `name`."""
    transformers = require_transformers()
    register_attention()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(name, attn_implementation=ATTENTION,
                                                                 dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        cause = " ".join(str(e).split())[:240]
        raise AdaptError(f"--init {name}: not a transformers causal LM that loads here ({type(e).__name__}: "
                         f"{cause})") from None


def fill_network(cfg: ModelConfig, hf) -> ModelConfig:
    """`cfg` with the network's fields read from a transformers config `hf` (for the record, the sampler's cache
    and the card) and vocab_size that of the (possibly grown) embeddings."""
    import dataclasses

    heads = hf.num_attention_heads
    return dataclasses.replace(cfg, num_layers=hf.num_hidden_layers, model_dim=hf.hidden_size, num_heads=heads,
                               num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
                               head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
                               vocab_size=max(cfg.vocab_size, hf.vocab_size), lm_head_multiple=1,
                               mlp_ratio=getattr(hf, "intermediate_size", 0) // hf.hidden_size)


# ---- the directory transformers loads: the base's config and weights, the tokenizer with MASK, remote code ------

REMOTE_TEMPLATE = "modeling_bdiff_adapted.py"  # in bdiff/models/remote/; its base-class import is rewritten per model
BASE_IMPORT = "from transformers import LlamaForCausalLM as Base  # bdiff: the base class"


def save_directory(model: AdaptedLM, directory: str, meta: dict, tokenizer: str | None) -> None:
    """Write `model` where transformers alone loads it: `lm.save_pretrained` (the base model's config and weights,
    MASK's row included), config.json extended with the auto_map to the block-diffusion class and bdiff's entry
    `meta` (the run's config, the objective's fields), that class's code for the model's family, and the tokenizer
    of `tokenizer` (a directory, a tokenizer.json or a Hub id) with MASK added where it has none."""
    from bdiff.models import remote

    lm, cfg = model.lm, model.cfg
    lm.save_pretrained(directory, safe_serialization=True)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(auto_map={"AutoModelForCausalLM": f"{REMOTE_TEMPLATE[:-3]}.BlockDiffusionForCausalLM"},
                  architectures=["BlockDiffusionForCausalLM"], mask_token_id=cfg.mask_id,
                  bdiff=dict(meta, block_size=cfg.block_size, document_separator_id=cfg.bos_id,
                             separator=cfg.separator, token_shift=cfg.token_shift))
    _write_json(path, config)
    with open(os.path.join(remote.DIRECTORY, REMOTE_TEMPLATE)) as f:
        code = f.read()
    base = type(lm)
    code = code.replace(BASE_IMPORT, f"from {base.__module__} import {base.__name__} as Base  # bdiff: the base class")
    with open(os.path.join(directory, REMOTE_TEMPLATE), "w") as f:
        f.write(code)
    shutil.copyfile(os.path.join(remote.DIRECTORY, remote.LAYOUT), os.path.join(directory, remote.LAYOUT))
    if tokenizer:
        copy_tokenizer(tokenizer, directory, cfg.mask_id)


def copy_tokenizer(spec: str, directory: str, mask_id: int) -> None:
    """The tokenizer files of `spec` into `directory`; MASK (`mask_id`) added as a special token where the tokenizer
    has no token of that id, and named as its mask token."""
    from tokenizers import AddedToken, Tokenizer

    if os.path.isdir(spec):
        source = spec
    elif os.path.isfile(spec):
        source = None
        shutil.copyfile(spec, os.path.join(directory, "tokenizer.json"))
    else:  # a Hub id: its files through huggingface_hub's cache
        from huggingface_hub import snapshot_download

        source = snapshot_download(spec, allow_patterns=list(TOKENIZER_FILES))
    if source is not None:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
    tok_path = os.path.join(directory, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    mask = tok.id_to_token(mask_id)
    if mask is None:
        tok.add_special_tokens([AddedToken(MASK_TOKEN, special=True)])
        if tok.token_to_id(MASK_TOKEN) != mask_id:
            raise AdaptError(f"{spec}: the tokenizer's next id is {tok.token_to_id(MASK_TOKEN)}, not MASK's {mask_id}")
        tok.save(tok_path)
        mask = MASK_TOKEN
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    config["mask_token"] = mask
    _write_json(config_path, config)


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
