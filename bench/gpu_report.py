"""Everything that needs a GPU, in one command that fits a time budget, and one markdown report:

    python bench/gpu_report.py                    # within 600 s: writes gpu_report.md, prints each part as it ends
    python bench/gpu_report.py --plan             # the parts, their expected seconds, what fits; runs nothing
    python bench/gpu_report.py --parts tune,attention,tests,step300 --budget_s 540 --out out/report.md

The parts run in order of value (or in the order --parts names them), each under its own timeout (never past the
budget's end): the attention kernels' tiles tuned for this GPU (bench/tune_attention.py, whose winners are written
into kernels/bd_attention_tiles.json for the parts after it, and kept beside the report), the attention against
FlexAttention, the ops natively against their references and a compiled training run (tests/test_gpu.py), a compiled
record-size training step against the seed's formulation, the other kernel benches, sampling, the demo (its wall
time, seeds 0-2, float32, the CPU's random streams), then the longer extras (the second document mix, the benchmark
suite). With two or more GPUs a torchrun run that checkpoints and resumes on one GPU is added. The compile check
needs no GPU (it runs on any CPU) and is last, only with --compile_check. A part that does not fit what is left of
the budget is skipped and listed as such; compilation and autotuning count, since a lent GPU's time counts from its
start. A part that fails or times out is reported with its output, and the rest still run; the exit code is 1 if any
part failed.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


@dataclass
class Part:
    name: str  # what --parts calls it
    title: str
    command: list[str]
    expected_s: int  # measured on one H200 (2026-11-30, a fresh machine), compilation and autotuning included
    timeout_s: int  # the part is stopped after this long (or at the budget's end, whichever is first)
    min_gpus: int = 1


def parts(gpus: int, compile_check: bool, out_dir: str = ".") -> list[Part]:
    """The report's parts in order of value."""
    found = [
        Part("tune", "Attention tiles tuned for this GPU (winners written into kernels/bd_attention_tiles.json)",
             [PY, "bench/tune_attention.py", "--budget_s", "220", "--out", os.path.join(out_dir, "tune_attention"),
              "--apply"], 230, 260),
        Part("attention", "Attention: speed vs FlexAttention and SDPA", [PY, "bench/bench_bd_attention.py", "--gpu"],
             60, 150),
        Part("tests", "Each op natively against its reference (bf16/fp16, fp32 IEEE and TF32), compiled training, "
             "evaluation and sampling on the GPU", [PY, "-m", "pytest", "tests/test_gpu.py", "-q", "-p",
                                                    "no:cacheprovider"], 160, 300),
        Part("gqa", "Attention with grouped-query heads (Qwen2.5-1.5B's 12 on 2, L=8192) vs FlexAttention's "
             "enable_gqa and SDPA", [PY, "bench/bench_bd_attention.py", "--gpu", "--gqa"], 60, 150),  # 60: a guess
        Part("step300", "A compiled record-size training step: ours vs the seed's formulation, documents ~300 tokens",
             [PY, "bench/bench_step.py", "--gpu", "--mean-doc", "300"], 150, 300),
        Part("loss", "Masked-weighted linear cross-entropy vs eager, compiled and Liger",
             [PY, "bench/bench_masked_ce.py", "--gpu"], 30, 120),
        Part("ns", "Newton–Schulz vs torch matmuls", [PY, "bench/bench_newton_schulz.py", "--gpu"], 50, 120),
        # The sampling and demo parts' times are estimates (they have not run on a GPU yet).
        Part("sampling", "Sampling: the decode loop eager, captured as CUDA graphs and the loop before it, batch 1, 8 "
             "and 32 (the median of 2 runs each)", [PY, "bench/bench_sampling.py", "--gpu", "--repeats", "2"],
             150, 300),
        Part("demo", "python train.py, the demo on the GPU: wall time (this part's seconds) and final validation loss",
             [PY, "train.py", "--out_dir", os.path.join(out_dir, "demo"), "--run_name", "seed0"], 60, 150),
        Part("demo-eager", "The demo on the GPU without torch.compile (--no-compile): its wall time against the "
             "compiled demo's", [PY, "train.py", "--no-compile", "--out_dir", os.path.join(out_dir, "demo"),
                                 "--run_name", "eager_seed0"], 60, 150),
        Part("demo-profile", "Where a demo step's time goes on the GPU: device busy time, launches and syncs a step, "
             "the ops (train.py --profile)", [PY, "train.py", "--steps", "300", "--profile", "200", "--val_every", "0",
                                              "--out_dir", os.path.join(out_dir, "demo"), "--run_name", "profile"],
             40, 120),
        Part("demo-seeds", "The demo on the GPU over seeds 0, 1, 2 (compare the CPU's 2.036 ± 0.012)",
             [PY, "bench/bench_training.py", "demo", "--seeds", "3", "--out", os.path.join(out_dir, "demo_gpu.json"),
              "--", "--device", "cuda"], 180, 360),
        Part("demo-fp32", "The demo on the GPU in float32 (against bf16: where the GPU's loss goes)",
             [PY, "train.py", "--dtype", "float32", "--out_dir", os.path.join(out_dir, "demo"), "--run_name",
              "fp32_seed0"], 90, 200),
        Part("demo-cpu-rng", "The demo on the GPU with the CPU run's weights and noise (--cpu_rng: against bf16, what "
             "CUDA's random stream does)", [PY, "train.py", "--cpu_rng", "--out_dir", os.path.join(out_dir, "demo"),
                                           "--run_name", "cpu_rng_seed0"], 60, 150),
        Part("step1000", "A compiled record-size training step: ours vs the seed's formulation, documents ~1000 "
             "tokens", [PY, "bench/bench_step.py", "--gpu", "--mean-doc", "1000"], 240, 360),
        Part("suite", "Benchmark suite: every op against its baseline (saved under .benchmarks/)",
             [PY, "-m", "pytest", "bench", "--benchmark-only", "--benchmark-autosave", "-q", "-p", "no:cacheprovider"],
             400, 900),
        Part("resume", "torchrun on 2 GPUs: checkpoint, then resume on 1 GPU", [PY, "bench/gpu_report.py",
                                                                               "--resume-check"], 120, 300, min_gpus=2),
    ]
    if compile_check:
        found.append(Part("compile", "Kernel resources (compile check, sm_80/86/89/90; needs no GPU)",
                          [PY, "-m", "bdiff.kernels.compile_check"], 240, 600))
    return [p for p in found if gpus >= p.min_gpus]


def select(found: list[Part], names: str | None) -> list[Part]:
    """The parts --parts names, in its order (all of them, in order of value, without it)."""
    if not names:
        return found
    by_name = {p.name: p for p in found}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"error: --parts: no part {', '.join(unknown)} (parts: {', '.join(by_name)})")
    return [by_name[n] for n in names.split(",")]


def plan(selected: list[Part], budget_s: float) -> list[tuple[Part, bool]]:
    """Which parts fit the budget if each takes its expected time: (part, fits)."""
    left, out = budget_s, []
    for p in selected:
        fits = p.expected_s <= left
        left -= p.expected_s if fits else 0
        out.append((p, fits))
    return out


def run_part(part: Part, timeout_s: float, env: dict) -> tuple[str, str, float]:
    """(status, output, seconds). The part runs in its own process group, so a timeout stops all of it."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
            status = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"TIMED OUT after {timeout_s:.0f} s"
        log.seek(0)
        output = log.read()
    return status, output, time.perf_counter() - t0


def resume_check() -> int:
    """With two GPUs: a tiny run on 2 ranks writes a checkpoint; the same run resumes it on 1 GPU and finishes."""
    import shutil

    data = tempfile.mkdtemp()
    try:
        from bdiff.data import build_stdlib_corpus

        build_stdlib_corpus(os.path.join(data, "stdlib"))
        base = ["train.py", "--preset", "tiny", "--device", "cuda", "--data_dir", os.path.join(data, "stdlib"),
                "--out_dir", os.path.join(data, "logs"), "--run_name", "r", "--ckpt_every", "2"]
        first = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base, "--steps", "4"]
        subprocess.run(first, cwd=ROOT, check=True)
        shutil.rmtree(os.path.join(data, "logs", "r", "ckpt_000004"))  # continue from step 2
        subprocess.run([PY, *base, "--steps", "4", "--resume", "auto"], cwd=ROOT, check=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return 0


def write(path: str, sections: list[str], failed: list[str], skipped: list[str], elapsed: float, budget: float):
    """The report so far; rewritten after every part, so an interrupted run keeps what it measured."""
    summary = [f"## Summary\n\n{elapsed:.0f} s of a {budget:.0f} s budget."]
    summary += [f"- failed: {t}" for t in failed] + [f"- skipped for lack of time: {t}" for t in skipped]
    with open(path, "w") as f:
        f.write("\n".join(sections + ["\n".join(summary) + "\n"]))


def header() -> str:
    import torch
    import triton

    device = (f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}" if torch.cuda.is_available()
              else "no CUDA device")
    return (f"# bdiff GPU report\n\n{time.strftime('%Y-%m-%d %H:%M')} | {device} | "
            f"python {platform.python_version()} | "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_report.md", help="where to write the markdown report")
    parser.add_argument("--budget_s", type=float, default=600, help="seconds for all parts together (default 600: "
                                                                    "ten minutes on one GPU)")
    parser.add_argument("--plan", action="store_true", help="print the parts and their expected seconds; run nothing")
    parser.add_argument("--compile_check", action="store_true",
                        help="add the compile check (it needs no GPU) as the last part")
    parser.add_argument("--parts", help="comma-separated part names to run, in that order (--plan lists them)")
    parser.add_argument("--resume-check", action="store_true", help=argparse.SUPPRESS)  # the 2-GPU part itself
    args = parser.parse_args()
    if args.resume_check:
        return resume_check()
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.plan:
        print(f"budget {args.budget_s:.0f} s, {gpus} GPU(s) visible here; expected seconds on one H100/H200:")
        left = args.budget_s
        chosen = select(parts(max(gpus, 1), args.compile_check, os.path.dirname(args.out)), args.parts)
        for p, fits in plan(chosen, args.budget_s):
            left -= p.expected_s if fits else 0
            print(f"  {'runs   ' if fits else 'skipped'} {p.expected_s:4d} s (timeout {p.timeout_s:4d} s)  "
                  f"{p.name:13} {p.title}")
        print(f"  {args.budget_s - left:.0f} s planned of {args.budget_s:.0f} s")
        return 0
    if not gpus:
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False); this report needs one "
              "(--plan works anywhere)", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # native kernels everywhere
    env["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    sections, failed, skipped = [header()], [], []
    selected = select(parts(gpus, args.compile_check, os.path.dirname(os.path.abspath(args.out))), args.parts)
    for i, part in enumerate(selected, 1):
        left = args.budget_s - (time.perf_counter() - start)
        if part.expected_s > left:
            skipped.append(f"{part.title} (expects {part.expected_s} s, {max(left, 0):.0f} s left)")
            print(f"[{i}/{len(selected)}] skipped, {max(left, 0):.0f} s left: {part.title}", flush=True)
            continue
        timeout = min(part.timeout_s, left)
        print(f"[{i}/{len(selected)}] {part.title}: {' '.join(part.command[1:])} (timeout {timeout:.0f} s)",
              flush=True)
        status, output, seconds = run_part(part, timeout, env)
        if status != "ok":
            failed.append(part.title)
        text = output.strip() if status == "ok" else output.strip()[-6000:]
        sections.append(f"## {part.title}\n\n`{' '.join(part.command[1:])}`: {status}, {seconds:.0f} s "
                        f"(expected {part.expected_s} s)\n\n```\n{text}\n```\n")
        print(f"    {status} in {seconds:.0f} s", flush=True)
        write(args.out, sections, failed, skipped, time.perf_counter() - start, args.budget_s)
    write(args.out, sections, failed, skipped, time.perf_counter() - start, args.budget_s)
    print(f"report: {args.out} ({time.perf_counter() - start:.0f} s)" + (f"; failed: {', '.join(failed)}" if failed
                                                                         else "") +
          (f"; skipped: {len(skipped)} part(s)" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
