"""Everything that needs a GPU, in one command and one markdown report:

    python bench/gpu_report.py                    # writes gpu_report.md (and prints each part as it finishes)
    python bench/gpu_report.py --out report.md

It runs the GPU tests (tests/test_gpu.py: the kernels natively in bf16/fp16 against the references, a compiled
training run), the benchmark suite (python -m pytest bench --benchmark-only, saved for --benchmark-compare), every
bench with --gpu, the full-step comparison with the seed's formulation
(bench/bench_step.py --gpu) and the compile check of every shipped kernel configuration. A part that fails is
reported with its output and the rest still run; the exit code is 1 if any part failed.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARTS = [  # (title, command)
    ("GPU tests", [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"]),
    ("Benchmark suite: every op against its baseline (saved under .benchmarks/)",
     [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--benchmark-autosave", "-q", "-p",
      "no:cacheprovider"]),
    ("Attention: speed vs FlexAttention and SDPA", [sys.executable, "bench/bench_bd_attention.py", "--gpu"]),
    ("Masked-weighted linear cross-entropy", [sys.executable, "bench/bench_masked_ce.py", "--gpu"]),
    ("Newton–Schulz", [sys.executable, "bench/bench_newton_schulz.py", "--gpu"]),
    ("Sampling", [sys.executable, "bench/bench_sampling.py", "--gpu"]),
    ("One training step: ours vs the seed's formulation, documents ~1000 tokens",
     [sys.executable, "bench/bench_step.py", "--gpu", "--mean-doc", "1000"]),
    ("One training step: ours vs the seed's formulation, documents ~300 tokens",
     [sys.executable, "bench/bench_step.py", "--gpu", "--mean-doc", "300"]),
    ("Kernel resources (compile check, sm_80/86/89/90)", [sys.executable, "-m", "bdiff.kernels.compile_check"]),
]


def header() -> str:
    import torch
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (f"# bdiff GPU report\n\n{time.strftime('%Y-%m-%d %H:%M')} | {device} | python {platform.python_version()} | "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_report.md", help="where to write the markdown report")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False); this report needs one",
              file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # native kernels everywhere
    sections, failed = [header()], []
    for i, (title, cmd) in enumerate(PARTS, 1):
        print(f"[{i}/{len(PARTS)}] {title}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        if result.returncode:
            failed.append(title)
        output = (result.stdout + ("\n" + result.stderr[-4000:] if result.returncode else "")).strip()
        sections.append(f"## {title}\n\n`{' '.join(cmd[1:])}`: {status}, {seconds:.0f} s\n\n```\n{output}\n```\n")
        print(f"    {status} in {seconds:.0f} s", flush=True)
        with open(args.out, "w") as f:  # rewritten after every part: an interrupted run keeps what it measured
            f.write("\n".join(sections))
    print(f"report: {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
