"""Train a block-diffusion LM (BD3-LM objective, nano-block-diffusion architecture).

    python train.py                                   # CPU: the `cpu` preset on the embedded corpus
    torchrun --standalone --nproc_per_node=8 train.py --preset record
    python train.py --preset record --dry-run         # parameter count and config, no training
    python train.py --run-name r1 --ckpt_every 100 ... then, after a crash:  --run-name r1 --resume auto

Any field of ModelConfig / TrainConfig can be overridden: --steps 100 --block_size 8 ...
"""
import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bdiff
from bdiff import checkpoint
from bdiff.checkpoint import CheckpointError
from bdiff.config import PRESETS, Config, ConfigError, get_preset
from bdiff.data import VOCABULARIES, DataError, DistributedLoader, check_model_fits_data, shard_files, unigram_entropy
from bdiff.model import BlockDiffusionLM
from bdiff.noise import document_layout
from bdiff.muon import Muon
from bdiff.sampling import generate
from bdiff.tokenizer import decode, encode

RECORD_PARAMS = 162_166_314  # the seed's parameter count: the record rules' ceiling
RECORD_VAL_LOSS = 3.44


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: record on a "
                                                        "GPU, cpu otherwise)")
    parser.add_argument("--dry-run", action="store_true", help="print the parameter count and config, then exit")
    parser.add_argument("--run-name", default=None, help="name of the log and checkpoints (default: random)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the model's step with torch.compile(fullgraph=True) (default: on with CUDA, "
                             "off on CPU, where compiling costs more than it saves in a short run)")
    parser.add_argument("--resume", default=None, help="a checkpoint directory, or 'auto' for the newest complete "
                                                        "one of --run-name")
    for section in ("model", "train"):
        for f in dataclasses.fields(Config.__dataclass_fields__[section].default_factory()):
            kind = f.type if isinstance(f.type, type) else eval(f.type)  # "from __future__" annotations
            if getattr(kind, "__origin__", None) is tuple:
                parser.add_argument(f"--{f.name}", type=float, nargs=2, default=None, help=f"{section}.{f.name}")
            else:
                parser.add_argument(f"--{f.name}", type=kind, default=None, help=f"{section}.{f.name}")
    args = parser.parse_args(argv)
    cfg = get_preset(args.preset or ("record" if torch.cuda.is_available() else "cpu"))
    for section in (cfg.model, cfg.train):
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(section)
                     if getattr(args, f.name) is not None}
        for name, value in overrides.items():
            setattr(section, name, tuple(value) if isinstance(value, list) else value)
    cfg.validate()
    return cfg, args


def main(argv=None) -> BlockDiffusionLM | None:
    """Train; returns the trained model (None for --dry-run)."""
    cfg, args = parse_args(argv)
    mc, tc = cfg.model, cfg.train
    check_model_fits_data(tc.data, mc.vocab_size, mc.bos_id, mc.mask_id)  # before anything is built

    # ---- processes and devices ----
    ddp = "RANK" in os.environ
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if tc.micro_steps % world:
        raise ConfigError(f"micro_steps={tc.micro_steps} must be divisible by the world size {world}")
    accum = tc.micro_steps // world  # micro-steps per rank per optimizer step
    val_steps = tc.val_tokens // (world * tc.val_seq_len)
    if val_steps < 1:
        raise ConfigError(f"val_tokens={tc.val_tokens} is less than one validation step "
                          f"(world {world} x val_seq_len {tc.val_seq_len})")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def log(msg: str) -> None:
        if master:
            print(msg, flush=True)

    # ---- model ----
    torch.manual_seed(tc.seed)
    with torch.device("meta" if args.dry_run else device):
        model = BlockDiffusionLM(mc)
    num_params = sum(p.numel() for p in model.parameters())
    rules = {
        f"parameters {num_params:,} <= {RECORD_PARAMS:,}": num_params <= RECORD_PARAMS,
        f"block_size {mc.block_size} == 16": mc.block_size == 16,
        f"data {tc.data} == finewebedu": tc.data == "finewebedu",
    }
    log(f"bdiff {bdiff.__version__} | python {platform.python_version()} | torch {torch.__version__} | "
        f"numpy {np.__version__} | triton {_version('triton')}")
    log(f"hardware: {_hardware(device)} | world size {world}")
    log(f"config: {json.dumps(cfg.to_dict())}")
    log(f"parameters: {num_params:,}")
    log("record rules: " + "; ".join(f"{k} {'OK' if ok else 'NO'}" for k, ok in rules.items()))
    if args.dry_run:
        return None
    if device.type == "cuda":
        model.embed.bfloat16()  # the seed keeps the embedding in bf16
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    if compile_model:
        model.compile_objective()
    log(f"compile: {'on (torch.compile, fullgraph)' if compile_model else 'off (eager)'}")
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # ---- data ----
    train_files = shard_files(tc.data, tc.data_dir, "train")
    val_files = shard_files(tc.data, tc.data_dir, "val")
    train_loader = DistributedLoader(train_files, tc.seq_len, rank, world)
    if tc.data == "stdlib":
        log(f"unigram entropy of the training corpus: {unigram_entropy(train_files, mc.vocab_size):.4f} nats")

    # ---- optimizers: Adam for embedding, head and scalars; Muon for every hidden matrix ----
    hidden_matrices = [p for p in raw_model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in raw_model.parameters() if p.ndim < 2]
    adam = torch.optim.Adam([dict(params=[raw_model.lm_head.weight], lr=tc.lr_head),
                             dict(params=[raw_model.embed.weight], lr=tc.lr_embed),
                             dict(params=scalars, lr=tc.lr_scalar)],
                            betas=tc.adam_betas, eps=tc.adam_eps)
    muon = Muon(hidden_matrices, lr=tc.lr_muon, momentum=tc.muon_momentum_start, schedule=tc.muon_schedule,
                weight_decay=tc.muon_weight_decay)
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]

    def lr_mult(step: int) -> float:
        frac = step / tc.steps
        if frac < tc.lr_constant_frac:
            return 1.0
        decay = (frac - tc.lr_constant_frac) / max(1.0 - tc.lr_constant_frac, 1e-9)
        return 1.0 - decay * (1.0 - tc.lr_final_frac)

    # ---- run directory, resume ----
    if args.resume == "auto" and not args.run_name:
        raise CheckpointError("--resume auto needs the --run-name of the run to continue")
    names = [args.run_name or uuid.uuid4().hex[:8]]
    if ddp:
        dist.broadcast_object_list(names)  # every rank writes under rank 0's name
    run_name = names[0]
    run_dir = os.path.join(tc.out_dir, run_name)
    log_path = os.path.join(tc.out_dir, f"{run_name}.jsonl")
    noise_gen = torch.Generator(device).manual_seed(tc.seed * 1000 + 1 + rank)  # each rank its own noise
    start_step, last_checkpoint = 0, None
    if args.resume:
        path = last_checkpoint = checkpoint.resolve(args.resume, run_dir)
        shared, mine = checkpoint.load(path, rank, world, cfg.to_dict())
        raw_model.load_state_dict(shared["model"])
        adam.load_state_dict(shared["adam"])
        muon.load_state_dict(mine["muon"])
        noise_gen.set_state(mine["noise_rng"])
        torch.set_rng_state(mine["cpu_rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        train_loader.load_state(shared["data"])
        start_step = shared["step"]
        log(f"resumed from {path} at step {start_step}")
    if master:
        os.makedirs(run_dir, exist_ok=True)
        with open(log_path, "a" if args.resume else "w") as f:
            f.write(json.dumps({"config": cfg.to_dict(), "parameters": num_params, "world_size": world,
                                "resumed_at": start_step if args.resume else None}) + "\n")
    log(f"log: {log_path} (plot it: python -m bdiff.plot {log_path})")

    def save_checkpoint(step: int) -> str:
        path = checkpoint.checkpoint_dir(run_dir, step)
        os.makedirs(path, exist_ok=True)
        checkpoint.atomic_save({"muon": muon.state_dict(), "noise_rng": noise_gen.get_state(),
                                "cpu_rng": torch.get_rng_state(),
                                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
                               os.path.join(path, f"rank{rank}.pt"))
        if master:
            checkpoint.atomic_save({"model": raw_model.state_dict(), "adam": adam.state_dict(), "step": step,
                                    "config": cfg.to_dict(), "data": train_loader.state(), "world_size": world},
                                   os.path.join(path, "shared.pt"))
        if ddp:
            dist.barrier()  # every rank's file is on disk before the checkpoint counts
        if master:
            checkpoint.mark_complete(path, tc.ckpt_keep)
        return path

    def batch(loader: DistributedLoader) -> tuple[torch.Tensor, object]:
        """The next sequence and its layout, built on the host from the loader's CPU tokens: no device sync."""
        tokens = loader.next()
        layout = document_layout(tokens, mc.bos_id, mc.block_size)
        return tokens.to(device, non_blocking=True), layout.to(device, non_blocking=True)

    def record(entry: dict) -> None:
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        loader = DistributedLoader(val_files, tc.val_seq_len, rank, world)
        gen = torch.Generator(device).manual_seed(tc.seed * 1000 + 999 + rank)  # same t and masks every eval
        total = torch.zeros((), device=device)
        for _ in range(val_steps):
            with autocast:
                tokens, layout = batch(loader)
                total += raw_model(tokens, noise_range=(0.0, 1.0), generator=gen, layout=layout).float()
        if ddp:
            dist.all_reduce(total)
        model.train()
        return total.item() / (val_steps * world)

    # ---- training loop ----
    tokens_per_step = tc.micro_steps * tc.seq_len
    val_loss, train_time, t0 = float("nan"), 0.0, time.perf_counter()
    for step in range(start_step, tc.steps + 1):
        last = step == tc.steps
        if last or (tc.val_every and step > 0 and step % tc.val_every == 0):
            train_time += time.perf_counter() - t0
            val_loss = evaluate()
            log(f"step {step}/{tc.steps} | val loss {val_loss:.4f} | tokens {step * tokens_per_step:,} | "
                f"train time {train_time:.1f}s")
            record({"step": step, "val_loss": val_loss, "tokens": step * tokens_per_step, "train_time_s": train_time})
            t0 = time.perf_counter()
        if last:
            break
        loss_sum = torch.zeros((), device=device)
        consumed = []  # (shard, start, end) of every micro-step, across all ranks
        for micro in range(accum):
            tokens, layout = batch(train_loader)
            consumed.append(train_loader.last_step)
            sync = contextlib.nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
            with sync:
                with autocast:
                    loss = model(tokens, noise_range=(tc.noise_low, tc.noise_high), generator=noise_gen, layout=layout)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        if ddp:
            dist.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), float("inf"))  # the norm; no clipping
        for what, value in (("loss", loss_sum), ("gradient", grad_norm)):
            if not torch.isfinite(value):
                raise FloatingPointError(f"non-finite {what} at step {step + 1}: stopped before the optimizer step; "
                                         f"last good checkpoint: {last_checkpoint or 'none'}")
        mult = lr_mult(step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult
        warm = min(step / tc.muon_momentum_warmup, 1.0)
        for group in muon.param_groups:
            group["momentum"] = (1 - warm) * tc.muon_momentum_start + warm * tc.muon_momentum_end
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        train_time += step_s
        t0 = time.perf_counter()
        train_loss = loss_sum.item() / tc.micro_steps
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            log(f"step {step + 1}/{tc.steps} | loss {train_loss:.4f} | tokens {(step + 1) * tokens_per_step:,} | "
                f"step {1000 * step_s:.0f}ms | {tokens_per_step / step_s:,.0f} tok/s")
        record({"step": step + 1, "train_loss": train_loss, "tokens": (step + 1) * tokens_per_step,
                "step_ms": 1000 * step_s, "tokens_per_s": tokens_per_step / step_s, "lr_mult": mult,
                "grad_norm": grad_norm.item(), "data": consumed})
        if tc.ckpt_every and (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
            last_checkpoint = save_checkpoint(step + 1)

    # ---- the end: the model on disk first, then the extras, none of which can lose it ----
    save_checkpoint(tc.steps)
    if master:
        ckpt_path = os.path.join(run_dir, "final.pt")  # the model alone, for sample.py
        checkpoint.atomic_save({"model": raw_model.state_dict(), "config": cfg.to_dict(), "step": tc.steps,
                                "val_loss": val_loss}, ckpt_path)
        log(f"checkpoint: {ckpt_path} | total train time {train_time:.1f}s")
    if master and tc.data == "stdlib":
        extra("summary", lambda: log(f"val loss {val_loss:.4f} nats vs unigram entropy "
                                     f"{unigram_entropy(train_files, mc.vocab_size):.4f} nats (the loss of a model "
                                     f"that ignores context)"))
    elif master:
        ok = all(rules.values()) and val_loss <= RECORD_VAL_LOSS
        log(f"record: val loss {val_loss:.4f} {'<=' if val_loss <= RECORD_VAL_LOSS else '>'} {RECORD_VAL_LOSS} "
            f"with {tc.steps * tokens_per_step:,} tokens; {'meets' if ok else 'does not meet'} the record rules")
    if master:
        extra("sample", lambda: end_of_run_sample(raw_model, cfg, log))
    if ddp:
        dist.destroy_process_group()
    return raw_model


def end_of_run_sample(model: BlockDiffusionLM, cfg: Config, log) -> None:
    """200 tokens from the model just trained, in the tokenizer of the data it was trained on."""
    model.eval()
    tokenizer = VOCABULARIES[cfg.train.data].tokenizer
    prompt = "def " if tokenizer == "bytes" else "The"
    out = generate(model, [encode(prompt, tokenizer, cfg.model.bos_id)], 200, temperature=0.8, top_p=0.9,
                   strategy="random")
    log(f"sample ({out.new_tokens / out.seconds:,.0f} tok/s with the KV cache):\n{prompt}"
        f"{decode(out.tokens[0], tokenizer)}")


def extra(what: str, fn) -> None:
    """Run an extra of the end of a run (summary, sample). The model is already on disk, so a failure costs one
    line saying what was skipped and why, never the run."""
    try:
        fn()
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
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
