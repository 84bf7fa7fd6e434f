"""Train a block-diffusion LM (BD3-LM objective, nano-block-diffusion architecture).

    python train.py                                   # the `demo` preset on the embedded corpus (CPU or GPU)
    torchrun --standalone --nproc_per_node=8 train.py --preset record
    python train.py --preset record --dry_run         # parameter count and config, no training
    python train.py --run_name r1 --ckpt_every 100 ... then, after a crash:  --run_name r1 --resume auto
    python train.py --preset tiny --dtype bfloat16    # a CPU run in the GPU's precision (what a GPU run executes)

SIGTERM or SIGINT (a preemption, Ctrl-C): every rank finishes its step, a checkpoint is written and the run exits
with code 75 (PREEMPTED); the same command with --resume auto continues it.

Any field of ModelConfig / TrainConfig can be overridden: --steps 100 --block_size 8 ...
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bdiff
from bdiff import hub
from bdiff.config import (
    PRESETS,
    RECORD_VAL_LOSS,
    ArgumentParser,
    Config,
    ConfigError,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
    add_device_flags,
    add_flags,
    apply_flags,
    code_version,
    default_device,
    default_dtype,
    get_preset,
    parse_device,
    preset_note,
)
from bdiff.data import (
    DistributedLoader,
    check_model_fits_data,
    default_prompt,
    find_dataset,
    shard_files,
    tokenizer_of,
    unigram_entropy,
)
from bdiff.data.formats import DataError, read_shard
from bdiff.data.tokenizer import decode
from bdiff.errors import BdiffError
from bdiff.eval import validation_total
from bdiff.generation.judge import corpus_words, known_word_fraction
from bdiff.generation.sampling import generate, prompt_ids
from bdiff.models.nano import BlockDiffusionLM
from bdiff.models.objective import BlockDiffusionModel, document_layout, noise_seed
from bdiff.training import checkpoint, fsdp, tracking
from bdiff.training.checkpoint import CheckpointError
from bdiff.training.ema import WeightAverage
from bdiff.training.muon import Muon

RECORD_PARAMS = 162_166_314  # the seed's parameter count: the record rules' ceiling
NETWORK_FIELDS = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_ratio", "lm_head_multiple",
                  "vocab_size")  # ModelConfig's fields that --init's model decides
PREEMPTED = 75  # exit code after SIGTERM/SIGINT: stopped cleanly with a checkpoint (EX_TEMPFAIL: run it again)


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: demo, on the GPU where "
                                                        "there is one)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the parameter count and config, "
                                                                             "then exit")
    parser.add_argument("--run_name", "--run-name", default=None, help="name of the log and checkpoints "
                                                                       "(default: random)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the model's step with torch.compile(fullgraph=True) (default: on with CUDA, "
                             "off on CPU, where compiling costs more than it saves in a short run)")
    parser.add_argument("--resume", default=None, help="a checkpoint directory, or 'auto' for the newest complete "
                                                        "one of --run_name")
    parser.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this Weights & Biases project "
                                                                        "(pip install -e \".[wandb]\")")
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help=f"profile {PROFILE_STEPS} steps after the run's first N+1 (compilation, warm-up): where "
                             "a step's time goes, as a table in the log and a trace in RUN/profile/")
    parser.add_argument("--tensorboard", default=None, metavar="DIR", help="also log TensorBoard events to "
                                                                           "DIR/RUN_NAME (pip install -e "
                                                                           "\".[tensorboard]\")")
    add_device_flags(parser)
    preset = ArgumentParser(add_help=False)
    preset.add_argument("--preset")
    preset.add_argument("--init", default="")
    known = preset.parse_known_args(argv)[0]
    args_preset = known.preset or ("adapt" if known.init else "demo")  # --init's runs default to `adapt`
    defaults = get_preset(args_preset)  # what --help shows for each field
    add_flags(parser.add_argument_group("model (the preset's value as default)"), ModelConfig, defaults.model)
    add_flags(parser.add_argument_group("training (the preset's value as default)"), TrainConfig, defaults.train)
    args = parser.parse_args(argv)
    tracking.require(args.wandb, args.tensorboard)
    args.device = args.device or default_device()
    cfg = get_preset(args_preset)
    apply_flags(args, cfg.model)
    apply_flags(args, cfg.train)
    if cfg.model.init:
        given = [f"--{name}" for name in NETWORK_FIELDS if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: the network of --init {cfg.model.init} is that model's; these "
                              "flags shape the nano network only")
    use_dataset(cfg, args)
    cfg.code = code_version()
    cfg.validate()
    if args.profile is not None and not 0 <= args.profile <= cfg.train.steps - PROFILE_STEPS - 1:
        parser.error(f"--profile: expected 0 .. {cfg.train.steps - PROFILE_STEPS - 1} (the {PROFILE_STEPS} steps "
                     f"it records after N+1 must fit in --steps {cfg.train.steps}), got {args.profile}")
    check_model_fits_data(find_dataset(cfg.train.data, cfg.train.data_dir)[0], cfg.model.vocab_size, cfg.model.bos_id,
                          cfg.model.mask_id)  # before anything else runs
    return cfg, args


def use_dataset(cfg: Config, args: argparse.Namespace) -> None:
    """The data set that --data and --data_dir name, recorded in the config. A prepared data set (a directory with
    bdiff.json) sets the data's name and, unless given as flags, the model's vocabulary, BOS and MASK to fit it. A
    --data_dir given without --data must hold data (a mistyped path is an error, not a new copy of the preset's
    corpus)."""
    if cfg.model.init and not cfg.train.data and args.data_dir is None:
        raise ConfigError(f"--init {cfg.model.init} trains on text prepared with its tokenizer: `python -m bdiff.data "
                          f"prepare INPUT --tokenizer {cfg.model.init} --out DIR`, then --data_dir DIR")
    given_dir = args.data_dir is not None or args.data is None  # --data alone: that data set's own directory
    data, cfg.train.data_dir = find_dataset(cfg.train.data, cfg.train.data_dir if given_dir else None,
                                            must_hold_data=args.data_dir is not None and args.data is None)
    cfg.train.data = data.name
    cfg.dataset = dataclasses.asdict(data)
    if data.name not in ("stdlib", "finewebedu"):
        for name, value in (("vocab_size", data.vocab_size), ("bos_id", data.bos_id), ("mask_id", data.mask_id),
                            ("separator", "closes")):  # documents that end, for data of one's own
            if getattr(args, name) is None:
                setattr(cfg.model, name, value)
    if data.packed:  # conversations: sequences are the windows they were packed into
        for name in ("seq_len", "val_seq_len"):
            if getattr(args, name) not in (None, data.packed):
                raise ConfigError(f"--{name} {getattr(args, name)}: {cfg.train.data_dir} holds conversations packed "
                                  f"whole into windows of {data.packed} tokens; use {data.packed} (or prepare again "
                                  "with --seq_len)")
            setattr(cfg.train, name, data.packed)
        if cfg.model.separator != "closes":
            raise ConfigError("--separator opens: conversations end with the separator (separator closes)")
        if data.block_size != cfg.model.block_size:
            raise ConfigError(f"--block_size {cfg.model.block_size}: {cfg.train.data_dir}'s answers are padded to "
                              f"blocks of {data.block_size} tokens (prepare with --block_size {cfg.model.block_size})")


@dataclasses.dataclass
class Process:
    """This process's place in the job: one process, or one rank of torchrun."""
    rank: int
    world: int
    local_rank: int
    ddp: bool
    device: torch.device
    dtype: str  # the activation dtype (--dtype)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.master:
            print(msg, flush=True)


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT after writing a complete checkpoint."""


PROFILE_STEPS = 10  # the steps --profile records: enough to average over, few enough to read in a trace
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")  # host-side API events
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_summary(events, start: int, cuda: bool) -> str:
    """One line from a --profile window's key_averages(): per step, the wall time (the profiler's step events) and
    on CUDA the device's busy time (the kernels' own events, as torch's table sums them), launches and syncs."""
    def per_step(keys) -> float:
        return sum(e.count for e in events if e.key in keys) / PROFILE_STEPS

    wall = sum(e.cpu_time_total for e in events if e.key.startswith("ProfilerStep")) / 1e3 / PROFILE_STEPS
    summary = f"profile of {PROFILE_STEPS} steps from step {start + 2}: wall {wall:.2f} ms/step"
    if cuda:
        busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA and
                   not getattr(e, "is_user_annotation", False)) / 1e3 / PROFILE_STEPS
        summary += (f", device busy {busy:.2f} ms/step (the rest is the host's), {per_step(LAUNCHES):.0f} kernel "
                    f"launches and {per_step(SYNCS):.0f} host syncs a step")
    return summary


class NoProfile(contextlib.nullcontext):
    def step(self) -> None:
        pass


def step_profiler(start: int | None, run_dir: str, proc: Process):
    """--profile N: torch.profiler over PROFILE_STEPS steps after the run's first N+1 (N skipped, one to warm the
    profiler up), on the master rank. When they end: wall time, device time, kernel launches and host syncs per
    step, and the ops that take the most time, in the log and in RUN/profile/table.txt; the trace in
    RUN/profile/trace.json (Perfetto, chrome://tracing). A failure to write them is logged, never fatal. Otherwise a
    profiler that does nothing."""
    if start is None or not proc.master:
        return NoProfile()
    cuda = proc.device.type == "cuda"

    def report(prof) -> None:
        try:
            out = os.path.join(run_dir, "profile")
            os.makedirs(out, exist_ok=True)
            prof.export_chrome_trace(os.path.join(out, "trace.json"))
            events = prof.key_averages()
            summary = profile_summary(events, start, cuda)
            table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25)
            with open(os.path.join(out, "table.txt"), "w") as f:
                f.write(summary + "\n" + table)
            proc.log(f"{summary}\n{table}\ntrace: {os.path.join(out, 'trace.json')}")
        except Exception as e:  # noqa: BLE001  the profile is a side product: the run goes on without it
            proc.log(f"profile not written ({type(e).__name__}: {e}); training goes on")

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=activities, on_trace_ready=report, schedule=torch.profiler.schedule(
        skip_first=start, wait=0, warmup=1, active=PROFILE_STEPS, repeat=1))


def agree(proc: Process, flag: bool, every: bool) -> bool:
    """The same answer on every rank: whether `flag` holds on every rank (every=True) or on any. A collective:
    every rank must call it."""
    if not proc.ddp:
        return flag
    t = torch.tensor([int(flag)], device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (what SLURM and Kubernetes send before preempting, with a grace period) and SIGINT only set a flag:
    the run finishes its optimizer step, checkpoints and exits. Yields a one-element list holding the signal's
    name once one arrived. The previous handlers come back afterwards."""
    received: list[str] = []

    def handler(signum, frame):
        received[:] = [signal.Signals(signum).name]

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---- process setup ----------------------------------------------------------------------------------------

def fit_micro_steps(train_cfg: TrainConfig, proc: Process, given: bool) -> None:
    """Each rank runs micro_steps / world of every step, so the world size must divide micro_steps. A preset's value
    (the demo's 1) is rounded up to the next multiple, with a line saying so: `torchrun --nproc_per_node=N train.py`
    runs any preset on any N. A value the user gave is theirs: one that does not divide is an error."""
    world, micro = proc.world, train_cfg.micro_steps
    if micro % world == 0:
        return
    if given:
        raise ConfigError(f"--micro_steps {micro} must be divisible by the world size {world} (each rank runs "
                          f"micro_steps / world of every step); try --micro_steps {-(-micro // world) * world}")
    train_cfg.micro_steps = -(-micro // world) * world
    proc.log(f"micro_steps: the preset's {micro} rounded up to {train_cfg.micro_steps}, a multiple of the world size "
             f"{world} (one micro-step of {train_cfg.seq_len} tokens per rank per step; --micro_steps sets it)")


def setup_process(timeout_s: int, device_name: str, dtype: str | None) -> Process:
    """This process's rank, device and dtype; under torchrun the process group, whose collectives fail after
    `timeout_s` seconds without an answer from every rank (a hung rank; a dead one ends the job sooner: the
    connection drops, and torchrun stops the other workers). `device_name` (--device): cpu; cuda, which under
    torchrun is each rank's cuda:LOCAL_RANK; or cuda:N for one process."""
    ddp = "RANK" in os.environ
    rank, world, local_rank = ((int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
                               if ddp else (0, 1, 0))
    device = parse_device(device_name)
    if device.type == "cuda" and ddp:
        if device.index is not None and world > 1:
            raise ConfigError(f"--device {device_name}: under torchrun each rank takes cuda:LOCAL_RANK; pass "
                              "--device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
        device = parse_device(f"cuda:{local_rank}")
    elif device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Process(rank, world, local_rank, ddp, device, dtype or default_dtype(device))


@dataclasses.dataclass
class Data:
    """What the run reads: the training sequences (epoch after epoch) and the validation plan."""
    loader: DistributedLoader  # this rank's training sequences
    train_files: list[str]
    val_files: list[str]
    val_seq_len: int  # tokens per validation sequence: val_seq_len, or all a small split holds
    val_steps: int  # validation sequences per rank
    accum: int  # micro-steps per rank per optimizer step
    epochs: float  # epochs of the training split the run's steps read


def open_data(cfg: Config, proc: Process) -> Data:
    """The data, checked before the first step. A training split smaller than the run is read again, epoch after
    epoch (DistributedLoader); one too small for a single step stops the run here. A validation split smaller than
    val_tokens is read whole, in shorter sequences where it holds less than one of val_seq_len per rank. Logs the
    data set, how many epochs the steps make and what validation reads."""
    t = cfg.train
    train_files, val_files = (shard_files(t.data, t.data_dir, split) for split in ("train", "val"))
    packed = cfg.dataset.get("packed", 0)  # conversations, packed whole into windows of this many tokens
    loader = DistributedLoader(train_files, t.seq_len, proc.rank, proc.world, seed=t.seed, epochs=True, packed=packed)
    held = [len(read_shard(f)) for f in val_files]
    val_seq_len = packed or min(t.val_seq_len, max(held) // proc.world)
    if val_seq_len < 1:
        raise DataError(f"{t.data_dir}: the validation split holds {sum(held)} tokens, fewer than one per rank")
    wanted = max(1, t.val_tokens // (proc.world * val_seq_len))
    val_steps = min(wanted, DistributedLoader(val_files, val_seq_len, proc.rank, proc.world,
                                              packed=packed).steps_per_epoch())
    accum = t.micro_steps // proc.world
    epochs = t.steps * accum / loader.steps_per_epoch()
    proc.log(f"data: {t.data} ({t.data_dir}; {cfg.dataset['description']}; tokenizer {cfg.dataset['tokenizer']}): "
             f"{loader.steps_per_epoch() * proc.world * t.seq_len:,} training tokens in sequences of {t.seq_len}, "
             f"which {t.steps} steps read {epochs:.2f} times" + (" (each epoch after the first in an order of its "
                                                                  "own)" if epochs > 1 else ""))
    if val_steps * val_seq_len < t.val_tokens // proc.world:
        proc.log(f"validation: the split holds {sum(held):,} tokens, fewer than val_tokens={t.val_tokens:,}: each "
                 f"validation reads {val_steps * proc.world} sequence(s) of {val_seq_len} tokens, all it holds")
    if t.data != "finewebedu":
        proc.log(f"unigram entropy of the training corpus: {unigram_entropy(train_files, cfg.model.vocab_size):.4f} "
                 "nats")
    return Data(loader, train_files, val_files, val_seq_len, val_steps, accum, epochs)


# ---- model --------------------------------------------------------------------------------------------------

def rng_device(cfg: Config, proc: Process) -> torch.device:
    """Where the model's init and the noise are drawn: the run's device, or the CPU's (TrainConfig.cpu_rng)."""
    return torch.device("cpu") if cfg.train.cpu_rng else proc.device


def build_model(cfg: Config, proc: Process, meta: bool) -> tuple[BlockDiffusionModel, dict]:
    """The model (on the meta device for --dry_run), after logging versions, hardware, config and the record
    rules it meets. Returns it and those rules. A model from --init is the pretrained one (bdiff/models/adapted.py),
    its network's fields and transformers config recorded in `cfg`."""
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init:
        from bdiff.models.adapted import AdaptedLM

        model = (AdaptedLM.on_meta(cfg.model.init, cfg.model) if meta else
                 AdaptedLM.from_base(cfg.model.init, cfg.model, log=proc.log).to(proc.device))
        cfg.model, cfg.hf = model.cfg, model.lm.config.to_dict()
    else:
        with torch.device("meta" if meta else rng_device(cfg, proc)):
            model = BlockDiffusionLM(cfg.model).to("meta" if meta else proc.device)
    num_params = sum(p.numel() for p in model.parameters())
    rules = {
        f"parameters {num_params:,} <= {RECORD_PARAMS:,}": num_params <= RECORD_PARAMS,
        f"block_size {cfg.model.block_size} == 16": cfg.model.block_size == 16,
        f"data {cfg.train.data} == finewebedu": cfg.train.data == "finewebedu",
        f"separator {cfg.model.separator} == opens": cfg.model.separator == "opens",  # the seed's objective
        "the nano architecture": not cfg.model.init,
    }
    proc.log(f"bdiff {bdiff.__version__} | python {platform.python_version()} | torch {torch.__version__} | "
             f"numpy {np.__version__} | triton {_version('triton')}")
    proc.log(f"hardware: {_hardware(proc.device)} | world size {proc.world} | dtype {proc.dtype}")
    code = cfg.code
    version = code["commit"] + (" with uncommitted changes" if code["dirty"] else "") if code else "no git checkout"
    proc.log(f"code: {version} | {os.path.dirname(os.path.abspath(__file__))}")
    proc.log(f"config: {json.dumps(cfg.to_dict())}")
    proc.log(f"parameters: {num_params:,}")
    proc.log("record rules: " + "; ".join(f"{k} {'OK' if ok else 'NO'}" for k, ok in rules.items()))
    return model, rules


def prepare_model(model: BlockDiffusionModel, proc: Process, compile_flag: bool | None, ema: float,
                  checkpointing: bool, shard: bool):
    """The activation dtype (the nano model's embedding's, as the seed keeps it in bf16), activation checkpointing,
    compilation on a GPU, DDP across ranks, or FSDP2 with `shard` (--fsdp). Returns the model to call."""
    model.set_activation_checkpointing(checkpointing)
    if checkpointing:
        proc.log("activation checkpointing: each transformer block's activations recomputed in the backward")
    if shard and proc.ddp:
        if not model.cfg.init:  # the fp32 embedding is gathered in the run's dtype with every other weight
            model.set_dtype("float32")
        else:
            model.set_dtype(proc.dtype)
        fsdp.shard(model, getattr(torch, proc.dtype))
        proc.log(f"fsdp: parameters, gradients and optimizer state sharded over {proc.world} ranks (each block and "
                 f"the root), gathered in {proc.dtype}, gradients reduced in float32; compile: off under FSDP")
        return model
    if shard:
        proc.log("fsdp: one process, nothing to shard: the model is trained whole")
    model.set_dtype(proc.dtype)
    compile_model = proc.device.type == "cuda" if compile_flag is None else compile_flag
    if compile_model:
        model.compile_objective()
    proc.log(f"compile: {'on (torch.compile, fullgraph)' if compile_model else 'off (eager)'}")
    if ema:
        proc.log(f"weights: validation, the saved model and its sample use their average (decay {ema})")
    if proc.ddp:
        return DDP(model, device_ids=[proc.local_rank] if proc.device.type == "cuda" else None)
    return model


# ---- data ---------------------------------------------------------------------------------------------------

def batch(loader: DistributedLoader, model_cfg, device) -> tuple[torch.Tensor, object, torch.Tensor | None]:
    """The next sequence, its layout and its answer flags (conversations; None for text), built on the host from the
    loader's CPU tokens: no device sync. A window of packed conversations opens with one (offset 0)."""
    tokens, answers = loader.next_with_answers()
    layout = document_layout(tokens, model_cfg.bos_id, model_cfg.block_size, 0 if loader.packed else None,
                             model_cfg.separator)
    return (tokens.to(device, non_blocking=True), layout.to(device, non_blocking=True),
            None if answers is None else answers.to(device, non_blocking=True))


# ---- optimizers: Adam for embedding, head and scalars; Muon for every hidden matrix ---------------------------

def build_optimizers(model: BlockDiffusionModel, train_cfg, adapted: bool) -> tuple[torch.optim.Optimizer, Muon]:
    """(the Adam-family optimizer, Muon), by TrainConfig.optimizer. "muon": the seed's split for the nano model
    (Adam for the head, the embedding and the scalars at their own rates), for an adapted model AdamW at `lr` for all
    but the hidden matrices; Muon for those. "adamw": AdamW at `lr` on every parameter, and a Muon with nothing to
    do (the checkpoint's layout stays one). Weight decay on matrices only, never on norms, biases and scalars."""
    groups, t = model.optimizer_groups(), train_cfg
    decay = dict(weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        matrices, muon_params = groups["head"] + groups["embed"] + groups["matrices"], []
        adam = torch.optim.AdamW([dict(params=matrices, lr=t.lr, **decay),
                                  dict(params=groups["scalars"], lr=t.lr, weight_decay=0.0)],
                                 betas=t.adam_betas, eps=t.adam_eps)
    elif adapted:
        muon_params = groups["matrices"]
        adam = torch.optim.AdamW([dict(params=groups["head"] + groups["embed"], lr=t.lr, **decay),
                                  dict(params=groups["scalars"], lr=t.lr, weight_decay=0.0)],
                                 betas=t.adam_betas, eps=t.adam_eps)
    else:
        muon_params = groups["matrices"]
        adam = torch.optim.Adam([dict(params=groups["head"], lr=t.lr_head),
                                 dict(params=groups["embed"], lr=t.lr_embed),
                                 dict(params=groups["scalars"], lr=t.lr_scalar)],
                                betas=t.adam_betas, eps=t.adam_eps)
    muon = Muon([dict(params=muon_params)], lr=t.lr_muon, momentum=t.muon_momentum_start, schedule=t.muon_schedule,
                weight_decay=t.muon_weight_decay)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adam, muon


def set_schedules(adam, muon, step: int, train_cfg) -> float:
    """Learning rates (a linear warm-up where asked, constant, then linear decay) and Muon's momentum warm-up for
    `step`; returns the LR multiplier."""
    frac = step / train_cfg.steps
    decay = max(frac - train_cfg.lr_constant_frac, 0.0) / max(1.0 - train_cfg.lr_constant_frac, 1e-9)
    mult = 1.0 if frac < train_cfg.lr_constant_frac else 1.0 - decay * (1.0 - train_cfg.lr_final_frac)
    if step < train_cfg.lr_warmup:
        mult *= (step + 1) / train_cfg.lr_warmup
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
    warm = min(step / train_cfg.muon_momentum_warmup, 1.0)
    for group in muon.param_groups:
        group["momentum"] = (1 - warm) * train_cfg.muon_momentum_start + warm * train_cfg.muon_momentum_end
    return mult


# ---- run directory, checkpoints --------------------------------------------------------------------------------

def open_run(args, cfg: Config, proc: Process) -> tuple[str, str]:
    """(run directory, JSONL log path), under rank 0's run name."""
    if args.resume == "auto" and not args.run_name:
        raise CheckpointError("--resume auto needs the --run_name of the run to continue")
    names = [args.run_name or uuid.uuid4().hex[:8]]
    if proc.ddp:
        dist.broadcast_object_list(names)  # every rank writes under rank 0's name
    return os.path.join(cfg.train.out_dir, names[0]), os.path.join(cfg.train.out_dir, f"{names[0]}.jsonl")


def start_log(log_path: str, run_dir: str, cfg: Config, proc: Process, model, resumed_at: int | None, args):
    """Open the run's JSONL log (appended to on resume) with a header line. Returns record(entry), which also sends
    the entry to the trackers --wandb and --tensorboard ask for (bdiff/training/tracking.py), and those trackers (None
    without them)."""
    trackers = None
    if proc.master and (args.wandb is not None or args.tensorboard is not None):
        os.makedirs(run_dir, exist_ok=True)
        trackers = tracking.Trackers(args.wandb, args.tensorboard, run_dir, cfg.to_dict(), resumed_at, log_path,
                                     proc.log)
    if proc.master:
        os.makedirs(run_dir, exist_ok=True)
        with open(log_path, "a" if resumed_at is not None else "w") as f:
            f.write(json.dumps({"config": cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
                                "world_size": proc.world, "resumed_at": resumed_at}) + "\n")
    proc.log(f"log: {log_path} (plot it: python -m bdiff.plot {log_path})")

    def record(entry: dict) -> None:
        if proc.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if trackers is not None:
                trackers.log(entry)

    return record, trackers


def resume(path: str, state: checkpoint.TrainState, cfg: Config, proc: Process) -> None:
    """Every piece of state back where it lives (checkpoint.restore), and a line saying how."""
    writers = checkpoint.restore(path, state, proc.rank, proc.world, cfg.to_dict())
    if writers != proc.world:
        proc.log(f"resumed from {path} at step {state.step} on {proc.world} rank(s), written by {writers}: Muon's "
                 f"state is re-sharded and the data continue at the next unread token, but the noise streams differ, "
                 f"so the run is no longer bit-identical to an uninterrupted one")
    else:
        proc.log(f"resumed from {path} at step {state.step}")


# ---- evaluation and one training step ----------------------------------------------------------------------

def averaged(ema: WeightAverage | None, model: BlockDiffusionModel):
    """The model holds the weights' average inside the block where the run keeps one (TrainConfig.ema)."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


@torch.no_grad()
def evaluate(model, raw_model: BlockDiffusionModel, data: Data, cfg: Config, proc: Process) -> float:
    """The record's validation loss: t ~ U[0, 1], the same noise draw at every evaluation."""
    train_cfg = cfg.train
    model.eval()
    loader = DistributedLoader(data.val_files, data.val_seq_len, proc.rank, proc.world,
                               packed=cfg.dataset.get("packed", 0))
    gen = torch.Generator(rng_device(cfg, proc)).manual_seed(noise_seed(train_cfg.seed, proc.rank, validation=True))
    batches = (batch(loader, cfg.model, proc.device) for _ in range(data.val_steps))
    total = validation_total(raw_model, batches, (0.0, 1.0), gen, proc.device)
    if proc.ddp:
        dist.all_reduce(total)
    model.train()
    return total.item() / (data.val_steps * proc.world)


def accumulate_gradients(model, loader, cfg: Config, proc: Process, noise_gen, accum: int, step: int):
    """Forward and backward of this rank's micro-steps (gradients all-reduced on the last). Returns the summed
    loss over all ranks and the (epoch, shard, start, end) token ranges consumed; says when an epoch begins."""
    train_cfg = cfg.train
    loss_sum = torch.zeros((), device=proc.device)
    consumed = []
    for micro in range(accum):
        epoch = loader.epoch
        tokens, layout, answers = batch(loader, cfg.model, proc.device)
        consumed += loader.last_step
        if loader.epoch > epoch:
            proc.log(f"epoch {loader.epoch + 1} begins at step {step + 1}: the training data again, in another order")
        last = micro == accum - 1
        if fsdp.is_sharded(model):  # gradients reduce-scattered on the last micro-step only, as DDP's no_sync
            model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if not proc.ddp or last or fsdp.is_sharded(model) else model.no_sync()
        with sync:
            loss = model(tokens, noise_range=(train_cfg.noise_low, train_cfg.noise_high), generator=noise_gen,
                         layout=layout, stratified=train_cfg.noise_stratified, complementary=train_cfg.complementary,
                         answers=answers)
            (loss / accum).backward()
        loss_sum += loss.detach().float()
    if proc.ddp:
        dist.all_reduce(loss_sum)
    return loss_sum, consumed


def optimizer_step(model: BlockDiffusionModel, adam, muon, ema, loss_sum, step: int, train_cfg, last_checkpoint):
    """Check the loss and gradient norm (a non-finite one stops the run before the step, naming the last good
    checkpoint), set the schedules, step both optimizers (and the weights' average), clear the gradients. Returns
    (gradient norm, LR multiplier)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the norm; no clipping
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    for what, value in (("loss", loss_sum), ("gradient", grad_norm)):
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite {what} at step {step + 1}: stopped before the optimizer step; "
                                     f"last good checkpoint: {last_checkpoint or 'none'}")
    mult = set_schedules(adam, muon, step, train_cfg)
    adam.step()
    muon.step()
    if ema is not None:
        ema.update(model)
    model.zero_grad(set_to_none=True)
    return grad_norm, mult


# ---- the run ----------------------------------------------------------------------------------------------

def main(argv=None) -> BlockDiffusionModel | None:
    """Train; returns the trained model (None for --dry_run)."""
    try:
        cfg, args = parse_args(argv)
    except BdiffError as e:
        e.every_rank = True  # from the command line and the files it names: every rank fails alike, rank 0 says it
        raise
    proc = setup_process(cfg.train.collective_timeout_s, args.device, args.dtype)
    proc.log(preset_note(args.preset, cfg.model.init))
    fit_micro_steps(cfg.train, proc, given=args.micro_steps is not None)
    raw_model, rules = build_model(cfg, proc, meta=args.dry_run)
    if args.dry_run:
        return None
    model = prepare_model(raw_model, proc, args.compile, cfg.train.ema, cfg.train.activation_checkpointing,
                          cfg.train.fsdp)
    data = open_data(cfg, proc)
    rules[f"each training token read once ({data.epochs:.2f} epochs)"] = data.epochs <= 1
    noise = torch.Generator(rng_device(cfg, proc)).manual_seed(noise_seed(cfg.train.seed, proc.rank))  # one per rank
    state = checkpoint.TrainState(raw_model, *build_optimizers(raw_model, cfg.train, bool(cfg.model.init)), data.loader,
                                  noise,
                                  ema=WeightAverage(raw_model, cfg.train.ema) if cfg.train.ema else None)
    run_dir, log_path = open_run(args, cfg, proc)
    last_checkpoint = checkpoint.resolve(args.resume, run_dir, log=proc.log) if args.resume else None
    if last_checkpoint:
        resume(last_checkpoint, state, cfg, proc)
    record, trackers = start_log(log_path, run_dir, cfg, proc, raw_model, state.step if args.resume else None, args)

    def save(step: int) -> str:
        state.step = step
        return checkpoint.save(run_dir, state, proc.rank, proc.world, cfg.train.ckpt_keep, cfg.to_dict(),
                               all_ok=lambda ok: agree(proc, ok, every=True))

    def validate(step: int) -> float:
        clock.pause()
        with averaged(state.ema, raw_model):
            val_loss = evaluate(model, raw_model, data, cfg, proc)
        log_validation(step, val_loss, clock, cfg.train, proc, record)
        clock.resume()
        return val_loss

    clock = Clock(cfg.train, state.step)
    profiler = step_profiler(args.profile, run_dir, proc)
    with stop_signals() as stopped, profiler:  # SIGTERM/SIGINT: finish the step, checkpoint, exit
        for step in range(state.step, cfg.train.steps):
            if cfg.train.val_every and step > 0 and step % cfg.train.val_every == 0:
                validate(step)
            loss_sum, consumed = accumulate_gradients(model, state.loader, cfg, proc, noise, data.accum, step)
            grad_norm, mult = optimizer_step(raw_model, state.adam, state.muon, state.ema, loss_sum, step, cfg.train,
                                             last_checkpoint)
            log_step(step, loss_sum.item() / cfg.train.micro_steps, grad_norm.item(), mult, consumed,
                     clock.lap(proc.device), clock, cfg.train, proc, record)
            profiler.step()
            if cfg.train.ckpt_every and (step + 1) % cfg.train.ckpt_every == 0 and step + 1 < cfg.train.steps:
                last_checkpoint = save(step + 1)
            if agree(proc, bool(stopped), every=False) and step + 1 < cfg.train.steps:  # every rank stops here
                if last_checkpoint != checkpoint.checkpoint_dir(run_dir, step + 1):
                    last_checkpoint = save(step + 1)
                stop(stopped, step + 1, last_checkpoint, run_dir, cfg.train, proc)
    save(cfg.train.steps)  # the trained model on disk first: nothing after the last step can lose it
    val_loss = validate(cfg.train.steps)
    whole = unsharded(raw_model, cfg, proc)  # FSDP: the whole model on rank 0, a plain one (a collective)
    if proc.master:
        with averaged(state.ema, whole):  # the saved model and its sample: what validation measured
            end_of_run(whole, cfg, rules, val_loss, clock.train_time, data.train_files, run_dir, log_path, proc,
                       argv)
    leave(proc, trackers)
    return raw_model


def unsharded(model: BlockDiffusionModel, cfg: Config, proc: Process) -> BlockDiffusionModel | None:
    """The model to save and sample: itself, or under FSDP a plain model of its config holding the whole weights,
    on rank 0 (None elsewhere). Every rank calls it."""
    if not fsdp.is_sharded(model):
        return model
    weights = fsdp.full_state_dict(model)
    if not proc.master:
        return None
    if cfg.model.init:
        from bdiff.models.adapted import AdaptedLM

        whole = AdaptedLM.from_config(cfg.to_dict(), cfg.hf)
    else:
        whole = BlockDiffusionLM(cfg.model)
    whole.load_state_dict(weights)
    return whole.to(proc.device).set_dtype(proc.dtype)


# ---- the loop's bookkeeping: time, log lines, stopping -------------------------------------------------------

class Clock:
    """Training time (validation excluded), the last step's time and the ETA."""

    def __init__(self, train_cfg: TrainConfig, start_step: int):
        self.steps, self.start_step = train_cfg.steps, start_step
        self.train_time, self.t0 = 0.0, time.perf_counter()
        self.started = self.t0

    def pause(self) -> None:
        self.train_time += time.perf_counter() - self.t0

    def resume(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self, device: torch.device) -> float:
        """Seconds of the step just taken (the GPU's queue drained first)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s, self.t0 = time.perf_counter() - self.t0, time.perf_counter()
        self.train_time += step_s
        return step_s

    def eta(self, done: int) -> float:
        return self.train_time / (done - self.start_step) * (self.steps - done)


def log_validation(step: int, val_loss: float, clock: Clock, train_cfg: TrainConfig, proc: Process, record) -> None:
    tokens = step * train_cfg.micro_steps * train_cfg.seq_len
    proc.log(f"step {step}/{train_cfg.steps} | val loss {val_loss:.4f} | tokens {tokens:,} | "
             f"train time {clock.train_time:.1f}s")
    record({"step": step, "val_loss": val_loss, "tokens": tokens, "train_time_s": clock.train_time})


def log_step(step: int, train_loss: float, grad_norm: float, mult: float, consumed, step_s: float, clock: Clock,
             train_cfg: TrainConfig, proc: Process, record) -> None:
    """The step's line, every log_every steps (and the last), and its JSONL entry, every step."""
    tokens_per_step = train_cfg.micro_steps * train_cfg.seq_len
    done = step + 1
    log_every = train_cfg.log_every or auto_log_every(train_cfg.steps)
    if done % log_every == 0 or done == train_cfg.steps:
        proc.log(f"step {done}/{train_cfg.steps} | loss {train_loss:.4f} | tokens {done * tokens_per_step:,} | "
                 f"step {1000 * step_s:.0f}ms | {tokens_per_step / step_s:,.0f} tok/s | "
                 f"elapsed {duration(time.perf_counter() - clock.started)} | eta {duration(clock.eta(done))}")
    record({"step": done, "train_loss": train_loss, "tokens": done * tokens_per_step, "step_ms": 1000 * step_s,
            "tokens_per_s": tokens_per_step / step_s, "lr_mult": mult, "grad_norm": grad_norm, "data": consumed})


def leave(proc: Process, trackers=None) -> None:
    """The run's end: trackers closed; the ranks leave together, once rank 0's work is written (none tears its
    group down while another still works)."""
    if trackers is not None:
        trackers.close()
    if proc.ddp:
        dist.barrier()
        dist.destroy_process_group()


def stop(stopped: list, step: int, last_checkpoint: str, run_dir: str, train_cfg: TrainConfig, proc: Process):
    """After SIGTERM/SIGINT, once the checkpoint of `step` is written: say how to continue, leave the job."""
    proc.log(f"stopped by {stopped[0] if stopped else 'a signal'} after step {step}/{train_cfg.steps}: "
             f"checkpoint {last_checkpoint}; to continue, run the same command with --run_name "
             f"{os.path.basename(run_dir)} --resume auto")
    leave(proc)  # as at the end of a run
    raise Preempted(last_checkpoint)


# ---- the end ----------------------------------------------------------------------------------------------

def end_of_run(model: BlockDiffusionModel, cfg: Config, rules: dict, val_loss: float, train_time: float, train_files,
               run_dir: str, log_path: str, proc: Process, argv) -> None:
    """Rank 0, once the final checkpoint is written: final.pt and the model directory, then the extras (summary,
    sample, model card), none of which can lose what is saved."""
    steps = cfg.train.steps
    tokens = steps * cfg.train.micro_steps * cfg.train.seq_len
    checkpoint.save_model(os.path.join(run_dir, "final.pt"), model, cfg.to_dict(), steps, val_loss)
    model_dir = hub.save_pretrained(model, os.path.join(run_dir, "model"), cfg.to_dict(), steps, tokens, val_loss)
    model.run_config = dict(cfg.to_dict(), step=steps, tokens=tokens, val_loss=val_loss)  # model.save_pretrained's
    proc.log(f"checkpoint: {os.path.join(run_dir, 'final.pt')} | model: {model_dir} | total train time "
             f"{train_time:.1f}s")
    sample = finish(model, cfg, rules, val_loss, train_files, tokens, proc.log)
    launcher = f"torchrun --standalone --nproc_per_node={proc.world}" if proc.ddp else "python"
    extra("model card", lambda: model_card(model_dir, sample, log_path, launcher, argv))
    proc.log(f"next: python -m bdiff.eval --model {model_dir} --draws 4 | python sample.py --ckpt {model_dir} "
             f"--prompt {shlex.quote(default_prompt(cfg.to_dict()) or 'TEXT')} | "
             f"python -m bdiff.hub push {model_dir} USER/NAME")


def finish(model: BlockDiffusionModel, cfg: Config, rules: dict, val_loss: float, train_files, tokens: int,
           log) -> str | None:
    """The summary and a sample (returned), once the model is saved."""
    if cfg.train.data != "finewebedu":
        extra("summary", lambda: log(f"val loss {val_loss:.4f} nats vs unigram entropy "
                                     f"{unigram_entropy(train_files, cfg.model.vocab_size):.4f} nats (the loss of a "
                                     f"model that ignores context)"))
    else:
        ok = all(rules.values()) and val_loss <= RECORD_VAL_LOSS
        log(f"record: val loss {val_loss:.4f} {'<=' if val_loss <= RECORD_VAL_LOSS else '>'} {RECORD_VAL_LOSS} "
            f"with {tokens:,} tokens; {'meets' if ok else 'does not meet'} the record rules")
    return extra("sample", lambda: end_of_run_sample(model, cfg, train_files, log))


def end_of_run_sample(model: BlockDiffusionModel, cfg: Config, train_files, log) -> str:
    """200 tokens from the model just trained, in the tokenizer of the data it was trained on, with the fraction of
    its words that are words of the training text (a readable measure: letter soup scores low); returns the text."""
    model.eval()
    tokenizer = tokenizer_of(cfg.to_dict())
    prompt = default_prompt(cfg.to_dict())
    ids = prompt_ids(prompt, tokenizer, cfg.model)
    sampling = SamplingConfig(max_new_tokens=200)
    if cfg.dataset.get("chat"):  # conversations: the first held-out question, answered greedily
        ids = first_question(cfg)
        prompt, sampling = decode(ids, tokenizer), SamplingConfig(max_new_tokens=64, temperature=0.0,
                                                                  strategy="confidence")
    elif not ids and cfg.model.token_shift:  # a model that predicts from the token before needs one: a document's start
        ids = document_start(train_files, cfg.model.bos_id)
        prompt = decode(ids, tokenizer)
    out = generate(model, [ids], sampling)
    new = decode(out.tokens[0], tokenizer)
    known = known_word_fraction(new, corpus_words(train_files, tokenizer))
    words = "no words" if known is None else f"{known:.0%} of its words occur in the training text"
    graphs = f", {out.compile_seconds:.1f} s of it compiling the model call" if out.compile_seconds else ""
    log(f"sample ({out.new_tokens / out.seconds:,.0f} tok/s with the KV cache{graphs}; {words}):\n{prompt + new}")
    return prompt + new


def first_question(cfg: Config) -> list[int]:
    """The prompt of the validation split's first conversation: its tokens before its first answer."""
    from bdiff.data.formats import answer_bits, answers_path, read_answers

    path = shard_files(cfg.train.data, cfg.train.data_dir, "val")[0]
    tokens = read_shard(path)
    flags = answer_bits(read_answers(answers_path(path), len(tokens)), 0, cfg.dataset["packed"])
    return tokens[:int(flags.argmax())].tolist()


def document_start(files: list[str], separator: int, tokens: int = 8) -> list[int]:
    """The first `tokens` ids of the first whole document of `files` (after the first separator that closes one)."""
    ids = read_shard(files[0])[:65536].tolist()
    after = ids.index(separator) + 1 if separator in ids[:-tokens] else 0
    return [t for t in ids[after:after + tokens] if t != separator] or ids[:1]


def model_card(model_dir: str, sample: str | None, log_path: str, launcher: str, argv) -> None:
    """The model directory's card gets the loss plot (where matplotlib is installed), the sample and the command
    that reproduces the run."""
    from bdiff.plot import plot

    with contextlib.suppress(ImportError):  # no matplotlib: a card without the plot
        plot([log_path], os.path.join(model_dir, hub.PLOT))
    args = sys.argv[1:] if argv is None else argv
    hub.write_card(model_dir, sample=sample, command=f"{launcher} train.py {' '.join(map(shlex.quote, args))}".strip())


def auto_log_every(steps: int) -> int:
    """About 50 lines a run, at a round step count: 600 steps log every 10th."""
    target = max(1, steps // 50)
    return max(n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if n <= target)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def extra(what: str, fn):
    """Run an extra of the end of a run (summary, sample, model card) and return its result. The model is already
    on disk, so a failure costs one line saying what was skipped and why (and returns None), never the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (any failure of an extra is reported the same way)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{what} skipped: {reason}", flush=True)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    try:
        main()
    except BdiffError as e:  # bad input or data, a checkpoint that cannot be resumed: one line (bdiff/errors.py)
        if os.environ.get("RANK", "0") == "0" or not (isinstance(e, ConfigError) or getattr(e, "every_rank", False)):
            print(f"error: {e}", file=sys.stderr)  # an error every rank meets alike is said once, by rank 0
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except OSError as e:  # a disk error outside a checkpoint (final.pt, the model directory, the log)
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except Preempted:  # the line saying where and how to resume is logged
        sys.exit(PREEMPTED)
    except RuntimeError as e:  # under torchrun: a collective failed because another rank died or hung
        # gloo's messages do not all name gloo: a peer's timeout reaches an async collective's wait() as "Application
        # timeout caused pair closure" (seen when the other rank hung under load)
        lost = isinstance(e, dist.DistError) or any(k in str(e) for k in ("gloo", "NCCL", "Connection closed",
                                                                           "pair closure"))
        if "RANK" not in os.environ or not lost:
            raise
        print(f"error: rank {os.environ['RANK']}: a collective with the other ranks failed ({str(e).strip()[:160]}): a "
              "rank died, or hung longer than --collective_timeout_s; the newest complete checkpoint is intact: "
              "resume with --resume auto", file=sys.stderr)
        sys.exit(1)
