"""Find the attention kernels' best tiles on this GPU, within a time budget, and write them in the committed table's
format (kernels/bd_attention_tiles.json).

    python bench/tune_attention.py --plan                 # anywhere: the candidates, their work ratios, what fits
    python bench/tune_attention.py                        # on a GPU, within 480 s: -> tune_attention/{json,md}
    python bench/tune_attention.py --budget_s 300 --out DIR --apply   # and write the winners into the table
    python bench/tune_attention.py --apply DIR/tune_attention.json    # later, anywhere: merge a run's winners

It sweeps TUNING_SPACE (kernels/bd_attention.py) at the record's attention (L = 16,384, 6 heads of 128, block 16,
bf16) on both document mixes of bench/bench_bd_attention.py (log-normal lengths, means 300 and 1000), each kernel on
its own: the forward, dQ, dK/dV, and dK/dV with an atomic dQ (which replaces the dQ kernel). In order:
1. compile every candidate in parallel worker processes (one launch each on the real shapes fills Triton's cache),
   recording registers and spills; a candidate that spills or fails is out;
2. check each candidate's output against the float32 reference on an awkward layout (documents of 1 to 2,000
   tokens, a block size of 5); one that disagrees is out;
3. time each (triton.testing.do_bench) on both mixes, the heuristic default first, then the default with its tiles in
   their own order (LPT off: what tile_order gains), then by work ratio; the winner of each kernel has the least total
   time over the two mixes, and dK/dV with an atomic dQ wins only if it beats the best dQ plus the best dK/dV.
Each row: milliseconds, TFLOP/s of allowed entries (4·D FLOPs an entry forward, 6·D dQ, 8·D dK/dV, 10·D with the
atomic dQ: what the kernel must do, not what it computes), work ratio (entries computed / allowed), registers,
spills. The JSON and markdown are rewritten after each phase, so a stopped run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

L, HEADS, HEAD_DIM, BLOCK = 16384, 6, 128, 16  # the record model's attention per micro-step
MEANS = (300, 1000)  # document mixes (bench/bench_bd_attention.py)
KERNELS = ("forward", "dq", "dkdv", "dkdv+dq")  # dkdv+dq: the dK/dV kernel with ATOMIC_DQ
FLOPS_PER_ENTRY = {"forward": 4, "dq": 6, "dkdv": 8, "dkdv+dq": 10}  # times the head dim, per allowed entry
COMPILE_S, TIME_S, CHECK_S = 6.0, 0.25, 0.1  # expected seconds per candidate (one H200's host: compile, both
# mixes timed, the check): estimates for --plan until a run on a GPU measures them


def candidates() -> list[tuple[str, dict]]:
    """(kernel, configuration) for every candidate: the tuning space, the heuristic default first."""
    import torch

    from bdiff.kernels.bd_attention import TUNING_SPACE, kernel_config

    out = []
    for kernel in KERNELS:
        base = kernel.split("+")[0]
        default = dict(kernel_config(base, HEAD_DIM, torch.bfloat16, 90), **({"ATOMIC_DQ": kernel != "dkdv"}
                                                                            if base == "dkdv" else {}))
        space = [c for c in TUNING_SPACE[base] if base != "dkdv" or c["ATOMIC_DQ"] == (kernel == "dkdv+dq")]
        # the default with its tiles in their own order too: what LPT (tile_order) gains on this GPU
        out += [(kernel, cfg) for cfg in [default, dict(default, LPT=False)] + [c for c in space if c != default]]
    return out


def layouts():
    """{mean: (cu_seqlens, schedule, allowed entries of all heads)} on the CPU."""
    from bdiff.kernels.accounting import allowed_entries, fineweb_like_cu_seqlens
    from bdiff.kernels.bd_attention import schedule_bounds

    found = {}
    for mean in MEANS:
        cu = fineweb_like_cu_seqlens(L, mean)
        found[mean] = (cu, schedule_bounds(cu, L, BLOCK), allowed_entries(cu, BLOCK) * HEADS)
    return found


def work_ratio(kernel: str, cfg: dict, layout) -> float:
    from bdiff.kernels.bd_attention import computed_entries

    cu, schedule, allowed = layout
    return computed_entries(schedule, kernel.split("+")[0], cfg) * HEADS / allowed


class Case:
    """The record's attention on one document layout: inputs, a forward and backward by the default tiles (what dQ
    and dK/dV read), and `launch`, which runs one kernel under one configuration through the launchers the operator
    uses and returns Triton's compiled kernel (its registers and spills). CUDA, or CPU under the interpreter (tests)."""

    def __init__(self, cu, L_, heads=HEADS, dim=HEAD_DIM, block=BLOCK, device="cuda", dtype=None, seed=0):
        import torch

        from bdiff.kernels import bd_attention as bda

        self.bda, self.block = bda, block
        gen = torch.Generator(device).manual_seed(seed)
        self.q, self.k, self.v, self.do = (torch.randn(2 * L_, heads, dim, generator=gen, device=device)
                                           .to(dtype or torch.bfloat16) for _ in range(4))
        self.cu = cu.to(device)
        self.q_bounds, self.k_bounds = bda.schedule_bounds(self.cu, L_, block)
        self.scale, self.prec = dim ** -0.5, bda.precision(self.q.dtype)
        self.o, self.lse = bda._launch_forward(self.q, self.k, self.v, self.q_bounds, self.scale)
        self.delta = bda._delta_kernel(self.o, self.do)
        self.out = {name: torch.empty_like(self.q) for name in ("o", "dq", "dk", "dv")}
        self.lse_out = torch.empty_like(self.lse)
        self.dq_sum = torch.zeros(self.q.shape, dtype=torch.float32, device=device)
        self.orders = {}  # the tile orders, sorted once as a training step does (bda.orders_of), not in every timing

    def launch(self, kernel: str, cfg: dict):
        bda, out = self.bda, self.out
        if kernel == "forward":
            return bda._query_kernel(self.q, self.k, self.v, self.q_bounds, self.scale, cfg, self.prec, out["o"],
                                     self.lse_out, orders=self.orders)
        if kernel == "dq":
            return bda._query_kernel(self.q, self.k, self.v, self.q_bounds, self.scale, cfg, self.prec, self.o,
                                     self.lse, self.do, self.delta, out["dq"], orders=self.orders)
        atomic = kernel == "dkdv+dq"
        if atomic:
            self.dq_sum.zero_()  # what the backward pays for an atomic dQ: a zeroed buffer, then a scaled copy
        compiled = bda._dkdv_kernel(self.q, self.k, self.v, self.do, self.lse, self.delta, out["dk"], out["dv"],
                                    self.dq_sum, self.k_bounds, self.scale, dict(cfg, ATOMIC_DQ=atomic), self.prec,
                                    orders=self.orders)
        if atomic:
            out["dq"].copy_(self.dq_sum * self.scale)
        return compiled

    def outputs(self, kernel: str):
        return {"forward": ("o",), "dq": ("dq",), "dkdv": ("dk", "dv"), "dkdv+dq": ("dq", "dk", "dv")}[kernel]


_WORKER_CASE = []  # in a compile worker: its Case, built once


def _compile_one(job):
    """In a worker process: launch one (index, kernel, cfg) on the record's shapes (mix 300), which compiles it into
    Triton's on-disk cache. Returns (index, dict(ok, registers, spills, compile_s) or dict(ok, error, compile_s))."""
    import torch

    index, kernel, cfg = job
    if not _WORKER_CASE:
        os.environ.pop("TRITON_INTERPRET", None)
        _WORKER_CASE.append(Case(layouts()[MEANS[0]][0], L))
    t0 = time.perf_counter()
    try:
        compiled = _WORKER_CASE[0].launch(kernel, cfg)
        torch.cuda.synchronize()
        return index, dict(ok=True, registers=int(compiled.n_regs), spills=int(compiled.n_spills),
                           compile_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001  a candidate that does not compile or launch is out, with the reason
        return index, dict(ok=False, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
                           compile_s=time.perf_counter() - t0)


def compile_all(rows, workers: int, deadline: float) -> None:
    """Phase 1, in `workers` processes (spawned: each its own CUDA context); results go into `rows`. Stops the
    workers at `deadline`: what they did not reach compiles later, when it is timed."""
    pool = mp.get_context("spawn").Pool(workers)
    try:
        results = pool.imap_unordered(_compile_one, [(i, r["kernel"], r["config"]) for i, r in enumerate(rows)])
        for _ in rows:
            index, result = results.next(timeout=max(deadline - time.perf_counter(), 0.1))
            rows[index].update(result)
    finally:
        pool.terminate()


def check(case, ref, kernel: str, cfg: dict) -> str | None:
    """None if `cfg`'s outputs agree with the float32 reference on the case's layout, else what differs."""
    for name in case.outputs(kernel):
        case.out[name].fill_(float("nan"))  # what the candidate does not write fails
    case.launch(kernel, cfg)
    for name in case.outputs(kernel):
        got, want = case.out[name].float(), ref[name]
        err = float((got - want).abs().max() / want.abs().max())
        if not err <= 2e-2:  # bf16 operands and P, relative to the largest value (tests/test_gpu.py: 2e-2 elementwise)
            return f"{name}: max error {err:.2e} of the largest value"
    return None


def reference(case):
    import torch

    from bdiff.kernels.reference import bd_attention_ref

    inputs = [x.detach().float().requires_grad_() for x in (case.q, case.k, case.v)]
    out = bd_attention_ref(*inputs, case.cu, case.block)
    dq, dk, dv = torch.autograd.grad(out, inputs, case.do.float())
    return dict(o=out.detach(), dq=dq, dk=dk, dv=dv)


def winners(rows, gpu: str, versions: dict) -> dict:
    """The table's entries: per kernel the least total time over the mixes; the atomic dK/dV replaces dQ + dK/dV
    only when it is faster than both together."""
    from bdiff.kernels.tiles import shape_class

    best = {}
    for kernel in KERNELS:
        timed = [r for r in rows if r["kernel"] == kernel and len(r.get("ms", {})) == len(MEANS)]
        if timed:
            best[kernel] = min(timed, key=lambda r: sum(r["ms"].values()))
    if "dkdv+dq" in best and "dkdv" in best and "dq" in best:
        split = sum(best["dq"]["ms"].values()) + sum(best["dkdv"]["ms"].values())
        if sum(best["dkdv+dq"]["ms"].values()) < split:
            best["dkdv"] = best["dkdv+dq"]
    entries = {}
    for kernel in ("forward", "dq", "dkdv"):
        if kernel in best:
            r = best[kernel]
            entries[shape_class(kernel, "bfloat16", HEAD_DIM, L)] = dict(
                r["config"], measured=dict(gpu=gpu, date=time.strftime("%Y-%m-%d"), **versions,
                                           ms={str(m): round(t, 4) for m, t in r["ms"].items()},
                                           tflops={str(m): round(t, 1) for m, t in r["tflops"].items()}))
    return entries


def write(out_dir, rows, result, elapsed):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tune_attention.json"), "w") as f:
        json.dump(dict(result, rows=rows, seconds=round(elapsed, 1)), f, indent=1)
    lines = [f"# Attention tiles, {result['gpu']} ({result['arch']}), {elapsed:.0f} s", "",
             f"L={L}, {HEADS} heads of {HEAD_DIM}, block {BLOCK}, bf16; TFLOP/s of allowed entries; work ratio = "
             f"entries computed / allowed", "",
             "| kernel | tiles | ms 300 | ms 1000 | TFLOP/s 300 | TFLOP/s 1000 | work 300 | work 1000 | regs | "
             "spills | status |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (KERNELS.index(r["kernel"]), sum(r.get("ms", {}).values()) or 1e9)):
        ms, tf, wr = r.get("ms", {}), r.get("tflops", {}), r["work"]
        lines.append(f"| {r['kernel']} | {r['tiles']} | " + " | ".join(f"{ms[m]:.3f}" if m in ms else "" for m in MEANS)
                     + " | " + " | ".join(f"{tf[m]:.0f}" if m in tf else "" for m in MEANS) + " | "
                     + " | ".join(f"{wr[m]:.2f}" for m in MEANS) + f" | {r.get('registers', '')} | "
                     f"{r.get('spills', '')} | {r.get('status', 'not reached')} |")
    lines += ["", "Winners (kernels/bd_attention_tiles.json format):", "", "```json",
              json.dumps(result["winners"], indent=1), "```"]
    with open(os.path.join(out_dir, "tune_attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def apply(path: str) -> int:
    """Merge a run's winners into kernels/bd_attention_tiles.json."""
    from bdiff.kernels.tiles import TABLE_DIR

    with open(path) as f:
        result = json.load(f)
    table_path = os.path.join(TABLE_DIR, "bd_attention_tiles.json")
    with open(table_path) as f:
        table = json.load(f)
    table["archs"].setdefault(result["arch"], {}).update(result["winners"])
    with open(table_path, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{table_path}: {len(result['winners'])} entries for {result['arch']} ({result['gpu']})")
    return 0


def describe(cfg: dict) -> str:
    extra = "".join(f" {k}{cfg[k]}" for k in ("DN", "BMD") if k in cfg)
    order = " in tile order" if cfg.get("LPT") is False else ""  # LPT is on unless a configuration says otherwise
    return f"{cfg['BM']}x{cfg['BN']}{extra} w{cfg['num_warps']} s{cfg['num_stages']}{order}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_s", type=float, default=480, help="seconds for everything (default 480)")
    parser.add_argument("--out", default="tune_attention", help="directory for tune_attention.json and .md")
    parser.add_argument("--plan", action="store_true", help="list the candidates and what fits; run nothing")
    parser.add_argument("--workers", type=int, default=min(8, max((os.cpu_count() or 2) - 2, 1)),
                        help="processes compiling at once (default: up to 8, leaving two cores)")
    parser.add_argument("--apply", nargs="?", const="", metavar="JSON",
                        help="write the winners into kernels/bd_attention_tiles.json: this run's (no value), or a "
                             "finished run's JSON")
    args = parser.parse_args()
    if args.apply:
        return apply(args.apply)
    start = time.perf_counter()
    deadline = start + args.budget_s
    found = layouts()
    found_candidates = candidates()
    rows = [dict(kernel=kernel, config=cfg, tiles=describe(cfg), default=i == 0 or found_candidates[i - 1][0] != kernel,
                 work={m: work_ratio(kernel, cfg, found[m]) for m in MEANS})
            for i, (kernel, cfg) in enumerate(found_candidates)]
    if args.plan:
        counts = ", ".join(f"{k}: {sum(r['kernel'] == k for r in rows)}" for k in KERNELS)
        compile_s, check_s, time_s = (len(rows) * COMPILE_S / args.workers, len(rows) * CHECK_S, len(rows) * TIME_S)
        fits = ("fits" if compile_s + check_s + time_s < args.budget_s else
                "does not fit: timing stops at the budget, the defaults first, then the lowest work ratios")
        print(f"{len(rows)} candidates ({counts}); expected on a GPU: compiling on {args.workers} workers "
              f"~{compile_s:.0f} s, checking ~{check_s:.0f} s, timing ~{time_s:.0f} s, of a {args.budget_s:.0f} s "
              f"budget ({fits})")
        for r in rows:
            ratios = "  ".join(f"{m}: {r['work'][m]:.3f}" for m in MEANS)
            print(f"  {r['kernel']:8} {r['tiles']:28} work ratio {ratios}" + ("  (default)" if r["default"] else ""))
        return 0
    import torch
    import triton
    import triton.testing

    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; tune_attention needs one (--plan works anywhere)", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    major, minor = torch.cuda.get_device_capability()
    gpu = torch.cuda.get_device_name()
    versions = dict(torch=torch.__version__, triton=triton.__version__)
    result = dict(gpu=gpu, arch=f"sm_{10 * major + minor}", python=platform.python_version(), winners={}, **versions)
    print(f"{gpu} ({result['arch']}): {len(rows)} candidates, budget {args.budget_s:.0f} s", flush=True)

    t0 = time.perf_counter()  # phase 1: compile in parallel
    try:
        compile_all(rows, args.workers, start + 0.6 * args.budget_s)
    except Exception as e:  # noqa: BLE001  the pool failing costs its speed, not the run: phase 3 compiles in turn
        print(f"parallel compilation failed ({type(e).__name__}: {e}); candidates compile as they are timed",
              flush=True)
    compiled = [r for r in rows if r.get("ok")]
    print(f"compiled {len(compiled)} of {len(rows)} in {time.perf_counter() - t0:.0f} s; "
          f"{sum(r.get('spills', 0) > 0 for r in rows)} spill", flush=True)
    for r in rows:
        if r.get("ok") is False:
            r["status"] = f"error: {r['error']}"
        elif r.get("spills"):
            r["status"] = f"spills {r['spills']} B"
    write(args.out, rows, result, time.perf_counter() - start)

    # phases 2 and 3, candidate by candidate: the default first, then the default in tile order, then by work ratio
    check_case = Case(torch.tensor([0, 1, 8, 9, 2009, 2040, 2048], dtype=torch.int32), 2048, block=5)
    check_ref = reference(check_case)
    cases = {m: Case(found[m][0], L) for m in MEANS}
    for r in sorted(rows, key=lambda r: (not r["default"], r["config"].get("LPT", True), r["work"][MEANS[0]])):
        if "status" in r:
            continue
        if time.perf_counter() > deadline - 2:
            break
        try:
            problem = check(check_case, check_ref, r["kernel"], r["config"])
            if problem:
                r["status"] = f"wrong: {problem}"
                continue
            r["ms"], r["tflops"] = {}, {}
            for m in MEANS:
                ms = triton.testing.do_bench(lambda m=m: cases[m].launch(r["kernel"], r["config"]), warmup=10, rep=40)
                r["ms"][m] = ms
                r["tflops"][m] = FLOPS_PER_ENTRY[r["kernel"]] * HEAD_DIM * found[m][2] / ms / 1e9
            compiled_kernel = cases[MEANS[0]].launch(r["kernel"], r["config"])
            r.update(registers=int(compiled_kernel.n_regs), spills=int(compiled_kernel.n_spills))
            r["status"] = "ok" if not r["spills"] else f"spills {r['spills']} B"
        except Exception as e:  # noqa: BLE001  out of shared memory on this GPU, a launch error: recorded, not fatal
            r["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if r["status"] != "ok":
            r.pop("ms", None)
            r.pop("tflops", None)
        print(f"  {r['kernel']:8} {r['tiles']:28} " + (" ".join(f"{r['ms'][m]:7.3f} ms" for m in MEANS)
                                                      if "ms" in r else r["status"]), flush=True)
    result["winners"] = winners(rows, gpu, versions)
    write(args.out, rows, result, time.perf_counter() - start)
    skipped = sum("status" not in r for r in rows)
    print(f"{time.perf_counter() - start:.0f} s; {skipped} candidates not reached; winners -> "
          f"{os.path.join(args.out, 'tune_attention.json')}", flush=True)
    for key, entry in result["winners"].items():
        print(f"  {key}: {describe(entry)}" + (" atomic dQ" if entry.get("ATOMIC_DQ") else "") +
              f"  {entry['measured']['ms']} ms")
    if args.apply is not None:
        return apply(os.path.join(args.out, "tune_attention.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
