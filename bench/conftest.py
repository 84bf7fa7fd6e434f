"""The benchmark suite: every op timed against its baseline on the device present, with pytest-benchmark.

    python -m pytest bench --benchmark-only                          # time, print the table of ratios
    python -m pytest bench --benchmark-only --benchmark-autosave     # ... and save the run under .benchmarks/
    python -m pytest bench --benchmark-only --benchmark-compare      # ... and compare with the last saved run

The plain `python -m pytest` never collects it (pytest.ini's testpaths is tests/). The tests live beside the
scripts' own code in each bench/bench_<op>.py (the inputs and the candidates are defined once, for the script and
for the suite). Shapes: the record model's on a GPU, small ones on a CPU. Interpreter runs are never timed: with
TRITON_INTERPRET=1 every benchmark skips.

Each candidate's time is the minimum over its rounds (the least disturbed one: on a busy machine noise only ever
adds time). A regression check that survives noisy machines compares ratios, not seconds: ours / baseline,
both measured in the same run, must stay under the op's limit in LIMITS (enforced where a limit is given; a run
that selects one side only skips the check; --ratio-limit-scale widens them on a busy machine). Cross-run
comparisons (another commit, another GPU) are pytest-benchmark's: --benchmark-compare,
--benchmark-compare-fail=min:10%.
"""
from __future__ import annotations

import os
import platform
import time

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (op, candidate) -> largest allowed time ratio candidate / the candidate it is compared with, per device. Set
# from measured CPU runs (2 cores, `python -m pytest bench --benchmark-only`, several runs: the range measured is
# beside each) with room for noise. No GPU limits yet: none has been measured on one, so a GPU run prints its
# ratios unchecked.
LIMITS = {
    "cpu": {
        # Documents of ~300 tokens in 2L = 8192 rows: one document at a time skips ~95% of the dense mask's
        # work (measured 0.18-0.26 forward, 0.19-0.21 forward+backward; 0.12 and 0.09 since each document is cut
        # into chunks that see only the keys before their end).
        ("attention forward", "bdiff"): 0.5,
        ("attention forward+backward", "bdiff"): 0.5,
        # The demo's one 512-token document: the chunks compute 1.4 n² entries of the dense (2n)² (measured 0.76
        # forward, 0.55 forward+backward: short calls, whose fixed cost the dense call pays once).
        ("attention forward, demo", "bdiff"): 0.95,
        ("attention forward+backward, demo", "bdiff"): 0.75,
        # The CPU loss is the reference written out (all rows, its gradients formed in the forward): the same
        # FLOPs as eager autograd (measured 0.76-0.94); the limit catches overhead added around it.
        ("loss forward+backward", "bdiff"): 1.3,
        # The CPU Newton–Schulz is the reference itself (measured 0.77-1.10): the operator must add no cost.
        ("newton-schulz square", "bdiff"): 1.3,
        ("newton-schulz tall", "bdiff"): 1.3,
        # The step with per-document attention and loss rows only, against the seed's dense mask and full logits
        # at L=1024 (measured 0.48-0.71; 0.44 with the chunked CPU attention), and compiled against eager at the
        # demo's L=512 (measured 0.68-0.83).
        ("training step L=1024", "bdiff eager"): 0.9,
        ("training step L=512", "bdiff compiled"): 0.95,
        # Without the cache every denoising step recomputes the whole sequence (measured 0.21, 256 tokens, 4 steps
        # per block). The loop without host reads against the loop before it, eager (measured 0.92-0.94 at batch 1
        # and 8): on a CPU a read costs nothing, so this guards against the loop growing slower, not the GPU's gain.
        ("sampling cache", "KV cache"): 0.4,
        ("sampling batch 1", "now"): 1.05,
        ("sampling batch 8", "now"): 1.05,
    },
}

_results: dict[str, dict[str, dict]] = {}  # op -> candidate -> {seconds, compared_with, ratio, limit, rate}


def pytest_addoption(parser):
    parser.addoption("--ratio-limit-scale", type=float, default=1.0, metavar="FACTOR",
                     help="multiply every ratio limit by FACTOR (a busy machine: 1.5; inf: report ratios, check none)")


def pytest_collection_modifyitems(config, items):
    if not INTERPRET:
        return
    skip = pytest.mark.skip(reason="TRITON_INTERPRET=1: interpreter runs are never timed")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(skip)


def _versions() -> dict:
    import triton

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"{platform.processor() or platform.machine()}, " \
                                                                  f"{torch.get_num_threads()} threads"
    return dict(device=DEVICE, device_name=name, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())


@pytest.fixture
def measure(benchmark, request):
    """measure(op, candidate, fn, compare_with=None, work=None, unit=None, warmup=1, **info): time fn() with the
    benchmark fixture (CUDA synchronized) after `warmup` untimed calls, record `info`, the throughput work/s and
    (on a GPU) the peak memory of the timed calls in extra_info, and check the ratio against `compare_with` (timed
    earlier in this run) with LIMITS. Returns fn's last result."""

    def run(op: str, candidate: str, fn, compare_with: str | None = None, work: float | None = None,
            unit: str | None = None, warmup: int = 1, **info):
        sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

        def call():
            out = fn()
            sync()
            return out

        for _ in range(warmup):  # compilation (and recompilation for each input it will see), autotuning, caches
            t0 = time.perf_counter()
            call()
            last = time.perf_counter() - t0
        rounds = max(3, min(50, int(2.0 / max(last, 1e-4))))  # about 2 s of timing, never fewer than 3 rounds
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # One more warm-up round where it is cheap (the allocator, CPU caches).
        result = benchmark.pedantic(call, rounds=rounds, warmup_rounds=int(last < 0.5))
        benchmark.extra_info.update(op=op, candidate=candidate, **_versions(), **info)
        if DEVICE == "cuda":  # the CPU allocator keeps no peak statistics
            benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if benchmark.stats is None:  # --benchmark-disable: run once, nothing timed
            return result
        seconds = benchmark.stats.stats.min
        row = dict(seconds=seconds, compared_with=compare_with, ratio=None, limit=None, rate=None, unit=unit)
        if work:
            row["rate"] = work / seconds
            benchmark.extra_info[f"{unit}/s"] = row["rate"]
        _results.setdefault(op, {})[candidate] = row
        base = _results[op].get(compare_with) if compare_with else None
        if base:
            row["ratio"] = seconds / base["seconds"]
            limit = LIMITS.get(DEVICE, {}).get((op, candidate))
            row["limit"] = limit * request.config.getoption("--ratio-limit-scale") if limit else None
            benchmark.extra_info.update(compared_with=compare_with, ratio=row["ratio"])
            assert row["limit"] is None or row["ratio"] <= row["limit"], (
                f"{op}: {candidate} took {row['ratio']:.2f}x the time of {compare_with} in this run; "
                f"the limit is {row['limit']:.3g}x")
        return result

    return run


def _si(value: float, unit: str) -> str:
    """1.2e12, "FLOP" -> "1.20 TFLOP/s"."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1)):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}{unit}/s"
    return f"{value:.3g} {unit}/s"


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    v = _versions()
    w = terminalreporter.write_line
    w("")
    w(f"bdiff benchmark suite | {v['device_name']} | torch {v['torch']} | triton {v['triton']} "
      "| min over rounds; ratio = time / time of the candidate compared with")
    w(f"{'op':<28} {'candidate':<18} {'ms':>10} {'throughput':>20} {'compared with':<18} {'ratio':>6} {'limit':>6}")
    for op, candidates in _results.items():
        for name, r in candidates.items():
            rate = _si(r["rate"], r["unit"]) if r["rate"] else ""
            ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
            limit = f"{r['limit']:.2f}" if r["limit"] is not None else ""
            w(f"{op:<28} {name:<18} {1000 * r['seconds']:10.2f} {rate:>20} {r['compared_with'] or '':<18} "
              f"{ratio:>6} {limit:>6}")
