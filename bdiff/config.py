"""Typed configuration: the model, the training run, and named presets.

`demo` (the default everywhere) is a small model on the embedded byte-level corpus that trains in a few minutes on two
CPU cores, or in seconds on a GPU; `record` is the nano-block-diffusion v0 recipe exactly (162,166,314 parameters,
FineWeb-Edu, GPUs); `tiny` is the smallest useful run, for tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import re
import subprocess
from dataclasses import dataclass, field

import torch

from bdiff.errors import BdiffError

RECORD_VAL_LOSS = 3.44  # the nano-block-diffusion record's target: FineWeb-Edu validation loss, t ~ U[0, 1]


class ConfigError(BdiffError):
    """A configuration value is out of range; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 50258  # real tokens + the MASK token (GPT-2: 50257 + 1)
    mask_id: int = 50257  # id of the MASK token that replaces noised tokens
    bos_id: int = 50256  # document separator; positions restart after it
    num_layers: int = 12  # transformer blocks; even, for the U-net skips
    model_dim: int = 768  # residual stream width
    num_heads: int = 6  # attention heads
    head_dim: int = 128  # per head; a multiple of 4 (a quarter of the rotary slots rotate)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * model_dim
    block_size: int = 16  # denoising block length in tokens (the record rules fix 16)
    lm_head_multiple: int = 128  # lm_head rows padded to a multiple of this (tensor-core friendly)
    # Where the document separator (BOS) sits: "opens" each document (the seed's layout, which the record rules fix;
    # no model learns where a document ends) or "closes" the one it follows (the model learns to end documents,
    # sampling stops there). bdiff/models/objective.py: document_layout.
    separator: str = "opens"
    # A Hugging Face causal LM to start from instead of the nano architecture (bdiff/models/adapted.py): a local
    # transformers directory or a Hub id (Llama, Qwen2, Qwen3, Mistral, ...). Its architecture then fills the fields
    # above that describe the network (num_layers, model_dim, num_heads, num_kv_heads, head_dim); "" trains the
    # nano network from scratch.
    init: str = ""
    num_kv_heads: int = 0  # key/value heads (grouped-query attention, from --init's model); 0: num_heads
    # The prediction of position i comes from the row of position i-1 (Fast-dLLM v2's token shift): a block's first
    # position from the clean row before it, the others from the noisy row before them, so an adapted model's
    # next-token head keeps its meaning; a document's first token is never predicted
    token_shift: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def validate(self) -> None:
        self.validate_objective()
        if self.init:  # the network is the pretrained model's
            return
        if self.num_kv_heads not in (0, self.num_heads):
            raise ConfigError(f"num_kv_heads applies to models from --init; the nano network has num_heads key/value "
                              f"heads, got {self.num_kv_heads}")
        if self.num_layers < 2 or self.num_layers % 2:
            raise ConfigError(f"num_layers must be even and >= 2 (U-net skips), got {self.num_layers}")
        if self.head_dim % 4:
            raise ConfigError(f"head_dim must be a multiple of 4 (rotary quarter), got {self.head_dim}")
        if self.num_heads * self.head_dim != self.model_dim:
            raise ConfigError(
                f"num_heads * head_dim must equal model_dim, got {self.num_heads}*{self.head_dim} != {self.model_dim}")

    def validate_objective(self) -> None:
        """The fields every family shares: block size, vocabulary, MASK, BOS, separator."""
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        for name in ("mask_id", "bos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} must lie in [0, vocab_size={self.vocab_size}), got {getattr(self, name)}")
        if self.mask_id == self.bos_id:
            raise ConfigError("mask_id and bos_id must differ")
        if self.separator not in ("opens", "closes"):
            raise ConfigError(f"separator must be 'opens' or 'closes', got {self.separator!r}")


@dataclass
class TrainConfig:
    data: str = "finewebedu"  # a built-in data set (bdiff.data.DATASETS: finewebedu, stdlib) or a prepared one's name
    data_dir: str = "data/finewebedu10B"  # where the shards live; a prepared data set's directory names it (bdiff.json)
    seq_len: int = 16384  # tokens per micro-step per rank (one packed sequence)
    micro_steps: int = 8  # micro-steps per optimizer step across ALL ranks; divisible by world size
    steps: int = 10000  # optimizer steps
    noise_low: float = 0.3  # training noise t ~ U[noise_low, noise_high] per block (BD3-LM clipped schedule)
    noise_high: float = 0.8  # the upper end of the training noise range
    noise_stratified: bool = False  # the blocks' levels of a sequence as one stratified draw: the same objective,
    # estimated with less variance (bdiff/models/objective.py, noise_blocks); validation always draws independently
    complementary: bool = False  # each sequence trained twice a step, with its mask and with the complement (at level
    # 1 - t), so every token carries loss once (Fast-dLLM v2); twice the model calls of a step
    ema: float = 0.0  # decay of an average of the weights that validation, the saved model and its sample use
    # (bdiff/training/ema.py; BD3-LM evaluates with 0.9999); 0: off, the trained weights themselves
    val_every: int = 125  # validate every N steps (and at the end); 0 = only at the end
    val_tokens: int = 10_485_760  # validation tokens across all ranks (a smaller validation split is read whole)
    val_seq_len: int = 65536  # tokens per validation sequence per rank
    # "muon": the seed's split, Adam for the embedding, head and scalars at lr_embed/lr_head/lr_scalar and Muon for
    # every hidden matrix at lr_muon (for a model from --init: AdamW at lr for all but the hidden matrices); "adamw":
    # AdamW at lr on every parameter (the default for a model from --init)
    optimizer: str = "muon"
    lr: float = 2e-5  # AdamW's learning rate (optimizer adamw; with --init, also the rate beside Muon)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    lr_head: float = 0.0011  # Adam lr for lm_head
    lr_embed: float = 0.06  # Adam lr for the embedding
    lr_scalar: float = 0.04  # Adam lr for the scalar parameters (mixing weights, skip weights)
    adam_betas: tuple[float, float] = (0.8, 0.95)  # Adam's betas (the seed's)
    adam_eps: float = 1e-10  # Adam's epsilon
    lr_muon: float = 0.025  # Muon lr for every hidden matrix
    muon_momentum_start: float = 0.85  # Muon momentum warms linearly from this ...
    muon_momentum_end: float = 0.95  # ... to this ...
    muon_momentum_warmup: int = 300  # ... over this many steps
    muon_schedule: str = "quintic"  # Newton–Schulz coefficients: "quintic" or "polar_express" (bdiff/training/muon.py)
    muon_weight_decay: float = 0.0  # decoupled weight decay on the hidden matrices
    lr_warmup: int = 0  # the LRs rise linearly over the first N steps, from 1/N of their value (0: none, as the seed)
    lr_constant_frac: float = 0.2  # LR constant for this fraction of steps, then linear decay ...
    lr_final_frac: float = 0.1  # ... to this fraction of the initial LR
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2,
    # bdiff/training/fsdp.py) instead of replicating them (DDP): for a model whose training state outgrows one GPU
    activation_checkpointing: bool = False  # recompute each transformer block's activations in the backward: memory
    # for about a third more compute (both model families)
    seed: int = 0  # model init and noise
    cpu_rng: bool = False  # model init and noise from CPU generators on any device: a GPU run then starts from
    # the weights and draws the noise of a CPU run of the same seed (CUDA's streams differ): arithmetic apart, alike
    out_dir: str = "logs"  # JSONL log and checkpoints go under out_dir/
    ckpt_every: int = 0  # write a resumable checkpoint every N steps (0: only at the end)
    ckpt_keep: int = 3  # keep the newest K checkpoints of a run
    log_every: int = 0  # print a line every N steps; 0: about 50 lines a run (train.py's auto_log_every)
    collective_timeout_s: int = 300  # a rank waits this long in a collective for the others before the job fails

    def validate(self) -> None:
        for name in ("seq_len", "micro_steps", "steps", "val_tokens", "val_seq_len", "ckpt_keep",
                     "collective_timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_warmup < 0:
            raise ConfigError(f"lr_warmup must be >= 0 (0: none), got {self.lr_warmup}")
        if self.log_every < 0:
            raise ConfigError(f"log_every must be >= 0 (0: automatic), got {self.log_every}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must lie in [0, 1) (0: off), got {self.ema}")
        if not 0.0 <= self.noise_low <= self.noise_high <= 1.0:
            raise ConfigError(f"need 0 <= noise_low <= noise_high <= 1, got {self.noise_low}, {self.noise_high}")
        if self.fsdp and self.ema:
            raise ConfigError("ema: the weights' average is not kept under --fsdp; use --ema 0")
        if self.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.muon_schedule not in ("quintic", "polar_express"):
            raise ConfigError(f"muon_schedule must be 'quintic' or 'polar_express', got {self.muon_schedule!r}")
        if not 0.0 <= self.lr_constant_frac <= 1.0:
            raise ConfigError(f"lr_constant_frac must lie in [0, 1], got {self.lr_constant_frac}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dataset: dict = field(default_factory=dict)  # the data set's record (bdiff.data.DataSet), filled in by train.py
    hf: dict = field(default_factory=dict)  # --init's transformers config (its to_dict()), filled in by train.py
    code: dict = field(default_factory=dict)  # the code that ran: code_version(), filled in by train.py

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def code_version() -> dict:
    """The git commit of bdiff's checkout and whether its tree had uncommitted changes ({} outside a git checkout,
    e.g. an installed wheel): what a run's log header and model card record, so a result names the code behind it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return {}
    if commit.returncode or status.returncode:
        return {}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


@dataclass
class SamplingConfig:
    """How bdiff.generation.sampling.generate samples; its fields are sample.py's flags, and train.py's end-of-run
    sample uses the same defaults."""
    max_new_tokens: int = 256  # new tokens per prompt at most (a sequence also stops after its first BOS)
    steps_per_block: int | None = None  # denoising steps per block; None: block_size (one token a step)
    strategy: str = "random"  # which masked tokens a step reveals: "random", "confidence" or "threshold"
    threshold: float = 0.9  # the "threshold" strategy reveals every token above this confidence (one at least)
    temperature: float = 0.8  # softmax temperature; 0 is greedy
    top_p: float = 0.9  # nucleus sampling: keep the smallest set of tokens with this much probability
    seed: int = 0  # every prompt draws from its own generator seeded with this: a batch changes no text
    cache: bool = True  # keys/values of finished blocks cached (exact); False recomputes every step (slow)
    stop_entropy: float | None = None  # stop a sequence whose last entropy_window new tokens have less entropy (nats)
    # than this: degenerate repetition (BD3-LM stops at 4 over 256 GPT-2 tokens); None never does. It depends on
    # the tokenizer: text read as bytes has about 3 nats
    entropy_window: int = 256  # new tokens the entropy stop reads (checked once per block, from this many on)
    compile: str = "auto"  # the model call of each step: "auto" (CUDA graphs on a GPU, eager on a CPU), "none"
    # (eager), or a torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune"


COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune")  # SamplingConfig.compile's choices
DTYPES = ("bfloat16", "float32")  # --dtype choices: the activation dtype (bdiff/models/nano.py, set_dtype)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str) -> torch.device:
    """--device: cpu, cuda or cuda:N, refused in one line when this machine cannot use it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: bdiff runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                          f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                          "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def default_dtype(device: torch.device) -> str:
    """--dtype's default: bfloat16 on a GPU (the seed's precision, tensor cores), float32 on a CPU (exact, and no
    faster in bf16 there)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, as every command (train.py, sample.py, bdiff.eval) takes them."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="activation dtype (default: bfloat16 on CUDA, float32 on CPU); --dtype bfloat16 on a "
                             "CPU runs the dtype flow of a GPU run")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The device and dtype that --device and --dtype ask for, defaults filled in."""
    device = parse_device(args.device or default_device())
    return device, args.dtype or default_dtype(device)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default after its help where the help does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bdiff's error convention: a bad command line ends in one stderr line and exit code 2; help
    formatted by HelpFormatter unless told otherwise."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # under torchrun every rank parses the same command line: rank 0 alone says what is wrong with it
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n" if os.environ.get("RANK", "0") == "0" else None)


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the dataclass's source: what --help says of it. Comment lines between two fields
    continue the first one's comment, or, where the second field has none of its own, are the second's."""
    comments, previous, pending = {}, None, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        declared = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
        comment = re.match(r"\s+#\s*(.*)$", line)
        if comment:
            pending.append(comment.group(1))
            continue
        if declared and not line.strip().startswith(("def ", "@", '"')):
            name, own = declared.groups()
            if pending and own is None:
                comments[name] = " ".join(pending)
            elif pending and previous:
                comments[previous] = " ".join([comments.get(previous, ""), *pending]).strip()
            if own is not None:
                comments[name] = own
            previous, pending = name, []
        else:
            if pending and previous:
                comments[previous] = " ".join([comments.get(previous, ""), *pending]).strip()
            previous, pending = None, []
    if pending and previous:
        comments[previous] = " ".join([comments.get(previous, ""), *pending]).strip()
    return comments


def add_flags(parser: argparse.ArgumentParser, cls, defaults=None) -> None:
    """One --flag per field of the dataclass `cls`, defaulting to None (unset); a boolean field gives both --<name>
    and --no_<name>, and --help shows the one that changes its default (the preset's: --no_<name> where it is on).
    The help is the field's comment and its value in `defaults` (an instance: the chosen preset's), or the class's
    default."""
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else eval(f.type)  # "from __future__" annotations are strings
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        shown = ("on" if default else "off") if kind is bool else shown
        text = f"{comments.get(f.name, f.name).replace('%', '%%')} (default: {shown})"
        if kind is bool:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=None,
                                help=text if default else argparse.SUPPRESS)
            parser.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=None,
                                help=argparse.SUPPRESS if default else text)
        elif getattr(kind, "__origin__", None) is tuple:
            parser.add_argument(f"--{f.name}", type=float, nargs=2, default=None, help=text)
        else:
            kind = next((k for k in getattr(kind, "__args__", ()) if k is not type(None)), kind)  # int | None -> int
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=text)


def apply_flags(args: argparse.Namespace, instance) -> None:
    """Set every field of the dataclass `instance` whose flag was given."""
    for f in dataclasses.fields(instance):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(instance, f.name, tuple(value) if isinstance(value, list) else value)


def record() -> Config:
    """nano-block-diffusion v0: 162,166,314 parameters, 8 x 16,384 tokens a step, 10,000 steps."""
    return Config(ModelConfig(), TrainConfig(log_every=1))  # a line a step, as the record runs log


def demo() -> Config:
    """Byte-level model on the embedded Python-stdlib corpus; about 4 minutes of training on 2 CPU cores. Tuned with
    bench/bench_training.py over seeds 0-2 (docs/results.md §3): many small steps (one 512-token sequence each) beat
    fewer steps of two at the same training time; Muon's rate for such small steps is 0.01 (0.04 lands runs 0.1
    apart, 0.01 within 0.04 and lower), and the weights are averaged for validation and sampling."""
    model = ModelConfig(vocab_size=258, mask_id=257, bos_id=256, num_layers=4, model_dim=128, num_heads=4,
                        head_dim=32, block_size=16, lm_head_multiple=8, separator="closes")
    train = TrainConfig(data="stdlib", data_dir="data/stdlib", seq_len=512, micro_steps=1, steps=1650, ema=0.99,
                        val_every=250, val_tokens=32768, val_seq_len=512, lr_head=0.008, lr_embed=0.06,
                        lr_scalar=0.04, lr_muon=0.01, muon_momentum_warmup=50)
    return Config(model, train)


def tiny() -> Config:
    """Smallest useful run: for tests and smoke checks (seconds on a CPU)."""
    cfg = demo()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, model_dim=64, num_heads=2, head_dim=32)
    cfg.train = dataclasses.replace(cfg.train, seq_len=128, micro_steps=2, steps=4, val_every=0, val_tokens=1024,
                                    val_seq_len=256, muon_momentum_warmup=2, lr_muon=0.05, ema=0.0)
    return cfg


def adapt() -> Config:
    """A Hugging Face causal LM (--init) fine-tuned into a block-diffusion model, on a data set prepared with its
    tokenizer: AdamW with a warm-up and a linear decay (the usual fine-tuning schedule; Fast-dLLM v2 and SDAR train
    this way), the seed's objective and block size, documents that end (separator "closes"), token shift on
    (bench/bench_adapt.py measured it against no shift). The network's fields come from the model."""
    model = ModelConfig(separator="closes", token_shift=True)
    train = TrainConfig(data="", data_dir="", seq_len=2048, micro_steps=8, steps=1000, val_every=100,
                        val_tokens=262_144, val_seq_len=2048, optimizer="adamw", lr=1e-5, adam_betas=(0.9, 0.95),
                        adam_eps=1e-8, lr_warmup=50, lr_constant_frac=0.0, lr_final_frac=0.1, lr_muon=0.002)
    return Config(model, train)


PRESETS = {"demo": demo, "record": record, "tiny": tiny, "adapt": adapt}
RENAMED = {"cpu": "demo"}  # presets' former names, still understood


def get_preset(name: str) -> Config:
    if name not in PRESETS and name not in RENAMED:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[RENAMED.get(name, name)]()


def preset_note(name: str | None, init: str = "") -> str:
    """The line a run starts with: which preset it took, and why."""
    if name is None and init:
        return f"preset: adapt (the default with --init: fine-tuning {init} into a block-diffusion model)"
    if name is None:
        return ("preset: demo (the default: a small byte-level model on the embedded Python corpus; "
                "--preset record for the nano-block-diffusion record on FineWeb-Edu)")
    if name in RENAMED:
        return f"preset: {RENAMED[name]} (--preset {name}: its former name)"
    return f"preset: {name} (--preset {name})"
