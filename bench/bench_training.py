"""Training runs that can be told apart: one setting over several seeds, and the noise estimator's variance.

    python bench/bench_training.py demo --seeds 3                          # the demo preset, seeds 0, 1, 2
    python bench/bench_training.py demo --seeds 3 -- --noise_stratified    # any train.py flags after --
    python bench/bench_training.py --compare a.json b.json                # settings saved by earlier runs
    python bench/bench_training.py demo --variance --ckpt logs/demo/model  # iid vs stratified noise, fixed weights

A setting's runs go one after another (each `python train.py` on the whole machine); the bench prints each
seed's final validation loss and training time, the mean ± standard error over seeds and the spread (max − min),
and saves them as JSON (--out) with each run's validation curve (step, loss, training seconds). Two settings
differ when their means differ by more than about twice the standard error of the difference,
sqrt(se_a² + se_b²).

--variance: the training loss and its gradient at fixed weights on one batch, over many noise draws, with
each block's level drawn independently and as one stratified set (bdiff/models/objective.py, noise_blocks): the
mean, the standard deviation of the loss, and the mean squared distance of the gradient from its mean over the draws.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def summary(losses: list[float]) -> dict:
    mean = sum(losses) / len(losses)
    se = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1) / len(losses)) if len(losses) > 1 else None
    return dict(mean=mean, stderr=se, spread=max(losses) - min(losses))


def validation_records(log_path: str) -> list[dict]:
    """The validation lines of a run's JSONL log, each {"step", "val_loss", "tokens", "train_time_s"}; the last is
    the run's final validation."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if '"val_loss"' in line]
    if not records:
        raise SystemExit(f"error: {log_path} holds no validation loss: did the run finish?")
    return records


def run_seeds(preset: str, seeds: list[int], flags: list[str], out_dir: str) -> dict:
    rows = []
    for seed in seeds:
        name = f"seed{seed}"
        command = [sys.executable, "train.py", "--preset", preset, "--seed", str(seed), "--out_dir", out_dir,
                   "--run_name", name, *flags]
        print(f"$ {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: seed {seed} failed:\n{result.stderr[-3000:]}")
        records = validation_records(os.path.join(out_dir, f"{name}.jsonl"))
        last = records[-1]
        rows.append(dict(seed=seed, val_loss=last["val_loss"], train_time_s=last["train_time_s"],
                         wall_s=time.perf_counter() - t0,
                         curve=[(r["step"], r["val_loss"], r["train_time_s"]) for r in records]))
        print(f"seed {seed}: val loss {last['val_loss']:.4f}, training {last['train_time_s']:.0f} s", flush=True)
    return dict(preset=preset, flags=flags, runs=rows, **summary([r["val_loss"] for r in rows]),
                mean_train_time_s=sum(r["train_time_s"] for r in rows) / len(rows))


def table(results: list[dict]) -> str:
    lines = ["| setting | seeds | val losses | mean ± s.e. | spread | training s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        setting = f"{r['preset']} {' '.join(r['flags'])}".strip()
        losses = ", ".join(f"{x['val_loss']:.3f}" for x in r["runs"])
        se = f" ± {r['stderr']:.3f}" if r["stderr"] is not None else ""
        lines.append(f"| {setting} | {len(r['runs'])} | {losses} | {r['mean']:.3f}{se} | {r['spread']:.3f} | "
                     f"{r['mean_train_time_s']:.0f} |")
    return "\n".join(lines)


def variance(preset: str, ckpt: str | None, draws: int, seed: int) -> list[dict]:
    """Loss and gradient over `draws` noise draws at fixed weights on one training batch, iid and stratified."""
    from bdiff.config import get_preset
    from bdiff.data import DistributedLoader, find_dataset, shard_files
    from bdiff.models.nano import BlockDiffusionLM
    from bdiff.models.objective import document_layout

    cfg = get_preset(preset)
    if ckpt:
        model = BlockDiffusionLM.from_pretrained(ckpt)
        cfg.model = model.cfg
    else:
        torch.manual_seed(seed)
        model = BlockDiffusionLM(cfg.model)
    model.train()
    dataset, data_dir = find_dataset(cfg.train.data, cfg.train.data_dir)
    tokens = DistributedLoader(shard_files(dataset.name, data_dir, "train"), cfg.train.seq_len).next()
    layout = document_layout(tokens, cfg.model.bos_id, cfg.model.block_size, separator=cfg.model.separator)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for stratified in (False, True):
        gen = torch.Generator().manual_seed(seed)
        losses, grads = [], []
        for _ in range(draws):
            loss = model(tokens, noise_range=(cfg.train.noise_low, cfg.train.noise_high), generator=gen,
                         layout=layout, stratified=stratified)
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
            losses.append(float(loss))
        g = torch.stack(grads)  # (draws, parameters)
        mean = sum(losses) / draws
        sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / (draws - 1))
        out.append(dict(noise="stratified" if stratified else "iid", mean=mean, stderr=sd / math.sqrt(draws), sd=sd,
                        grad_var=float((g - g.mean(0)).square().sum(1).mean()),
                        grad_norm2=float(g.mean(0).square().sum())))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", default="demo")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. K-1")
    parser.add_argument("--out", help="JSON of the setting's runs (default: bench_training_<preset>.json)")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="print saved settings side by side")
    parser.add_argument("--variance", action="store_true", help="iid vs stratified noise at fixed weights")
    parser.add_argument("--ckpt", help="--variance: a trained model (default: the preset's model at init)")
    parser.add_argument("--draws", type=int, default=200, help="--variance: noise draws per estimator")
    parser.add_argument("--runs_dir", help="keep the runs (logs, models) in RUNS_DIR/seedK (default: a temporary "
                                           "directory, removed at the end)")
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]
    if args.compare:
        results = []
        for path in args.compare:
            with open(path) as f:
                results.append(json.load(f))
        print(table(results))
        return
    if args.variance:
        rows = variance(args.preset, args.ckpt, args.draws, 0)
        print(f"{args.draws} noise draws on one {args.preset} training batch, fixed weights "
              f"({args.ckpt or 'at init'}):")
        print("| noise | loss mean ± s.e. | loss s.d. | gradient variance | squared norm of the mean gradient |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['noise']} | {r['mean']:.4f} ± {r['stderr']:.4f} | {r['sd']:.4f} | {r['grad_var']:.4g} | "
                  f"{r['grad_norm2']:.4g} |")
        return
    with contextlib.nullcontext(args.runs_dir) if args.runs_dir else tempfile.TemporaryDirectory() as out_dir:
        result = run_seeds(args.preset, list(range(args.seeds)), flags, out_dir)
    path = args.out or f"bench_training_{args.preset}.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table([result]))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
