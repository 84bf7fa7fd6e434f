"""Compile every shipped kernel configuration for real NVIDIA targets on a machine without a GPU, and
read the resource report of each cubin (registers, shared memory, spills, HGMMA) with the cuobjdump
that Triton's wheel ships.

    python -m bdiff.kernels.compile_check            # table: registers, shared memory, spills, HGMMA
    python -m bdiff.kernels.compile_check --json     # the same rows as JSON (tests/test_compile.py reads it)
    python -m bdiff.kernels.compile_check --space    # also every configuration bench/tune_attention.py sweeps
                                                     # (they must fit sm_90; elsewhere a spill is only reported)
    python -m bdiff.kernels.compile_check --space --arch 90,80    # ... for the GPUs of the committed table
    python -m bdiff.kernels.compile_check --reuse    # sm_86/89: only what differs from sm_80 compiled (the tests')

Run it without TRITON_INTERPRET: interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
TARGETS = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
NAMES = {80: "A100", 86: "RTX 3090", 89: "RTX 4090", 90: "H100"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# every module with Triton kernels
MODULES = ["bdiff.kernels.bd_attention", "bdiff.kernels.masked_ce", "bdiff.kernels.newton_schulz"]


def shipped_configs(arch: int, space: bool = False) -> list[dict]:
    """Each kernel module's `compile_configs(arch)`: dicts of name, fn, pointer and types (see `signature`),
    constexprs, options, hgmma, and optionally `divisible`, the int arguments that are multiples of 16 where the
    configuration is used. `space`: with the tuning spaces of the modules that have one."""
    found = []
    for name in MODULES:
        configs = importlib.import_module(name).compile_configs
        with_space = space and "space" in inspect.signature(configs).parameters
        found += configs(arch, space=True) if with_space else configs(arch)
    return found


def signature(cfg: dict) -> dict:
    """The kernel's own parameter list, typed: "constexpr" where the kernel declares one or the configuration
    fixes the value (unit strides), the type a configuration names in `types` (scalars, other pointers), and
    otherwise its `pointer` type (the operands' dtype)."""
    return {p.name: "constexpr" if p.is_constexpr or p.name in cfg["constexprs"] else
            cfg["types"].get(p.name, cfg["pointer"]) for p in cfg["fn"].params}


def _compile(args) -> dict:
    index, cc, space = args
    cfg = shipped_configs(cc, space)[index]
    sig = signature(cfg)
    # What Triton's launcher tells the compiler: torch allocations are 16-byte aligned, and the int arguments
    # a configuration names are multiples of 16 (the shapes it is shipped for).
    aligned = [n for n, t in sig.items() if t.startswith("*")] + list(cfg.get("divisible", ()))
    attrs = {(cfg["fn"].arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=cfg["fn"], signature=sig, constexprs=cfg["constexprs"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=cfg["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = "" if cc != 90 else subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True,
                                                  check=True).stdout  # HGMMA exists on sm_90 only
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return dict(name=cfg["name"], sm=cc, tiles=f"{cfg['constexprs'].get('BM', '-')}x{cfg['constexprs'].get('BN', '-')}"
                f" w{cfg['options']['num_warps']} s{cfg['options']['num_stages']}", registers=int(fields["REG"]),
                stack=int(fields["STACK"]),
                local=int(fields["LOCAL"]), shared=int(compiled.metadata.shared) + int(fields["SHARED"]),
                shared_limit=TARGETS[cc], hgmma="HGMMA" in sass, wants_hgmma=cfg["hgmma"] and cc == 90)


def _key(cfg: dict) -> tuple:
    return cfg["name"], tuple(sorted(cfg["constexprs"].items())), tuple(sorted(cfg["options"].items()))


def check_all(jobs: int = os.cpu_count() or 1, space: bool = False, archs=tuple(TARGETS), reuse: bool = False
              ) -> list[dict]:
    """One row per configuration and target. `reuse`: sm_86 and sm_89 (Ampere's instruction set, like sm_80) compile
    only the configurations that differ from sm_80's; for the others sm_80's row is reported under their own shared
    memory limit (marked "reused")."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    base = {_key(c): i for i, c in enumerate(shipped_configs(80, space))}
    work, reused = {}, []  # work: (configuration index, target, space) in order, each once (a dict as ordered set)
    for cc in archs:
        for i, cfg in enumerate(shipped_configs(cc, space)):
            twin = base.get(_key(cfg)) if reuse and cc in (86, 89) else None  # sm_80's index of the same config
            if twin is None:
                work[(i, cc, space)] = None
            else:
                reused.append((cc, twin))
                work[(twin, 80, space)] = None
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        rows = dict(zip(work, pool.map(_compile, work)))
    out = [row for (_, cc, _), row in rows.items() if cc in archs]
    return out + [dict(rows[(i, 80, space)], sm=cc, shared_limit=TARGETS[cc], reused="sm_80") for cc, i in reused]


def problems(row: dict) -> list[str]:
    found = []
    if row["stack"] or row["local"]:
        found.append(f"spills (stack {row['stack']} B, local {row['local']} B)")
    if row["shared"] > row["shared_limit"]:
        found.append(f"shared memory {row['shared']} B > {row['shared_limit']} B")
    if row["wants_hgmma"] and not row["hgmma"]:
        found.append("no HGMMA on sm_90")
    return found


def candidate(row: dict) -> bool:
    """A tuning space's configuration away from Hopper, where the spaces are tuned: one that spills there is a
    measurement for bench/tune_attention.py (it never wins), not a shipped configuration that fails."""
    return "(space " in row["name"] and row["sm"] != 90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--space", action="store_true", help="also the tuning spaces (minutes more)")
    parser.add_argument("--reuse", action="store_true", help="sm_86/89: compile only what differs from sm_80, "
                        "reporting sm_80's figures under their shared memory limit for the rest (about half the time)")
    parser.add_argument("--arch", default=",".join(map(str, TARGETS)),
                        help=f"compute capabilities, comma-separated (default: all, {','.join(map(str, TARGETS))})")
    args = parser.parse_args()
    archs = [int(a) for a in args.arch.split(",") if a.strip().isdigit()]
    if not archs or len(archs) != len(args.arch.split(",")) or any(a not in TARGETS for a in archs):
        parser.error(f"--arch: expected some of {','.join(map(str, TARGETS))}, got {args.arch!r}")
    rows = check_all(space=args.space, archs=archs, reuse=args.reuse)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'kernel configuration':36} {'tiles':14} {'target':14} {'regs':>4} {'shared B':>9} {'spill B':>7} "
          f"{'HGMMA':>5}  ok")
    for r in sorted(rows, key=lambda r: (r["name"], r["sm"])):
        bad = problems(r)
        note = " (a tuning candidate: the tuner drops it there)" if bad and candidate(r) else ""
        print(f"{r['name']:36} {r['tiles']:14} sm_{r['sm']} {NAMES[r['sm']]:8} {r['registers']:4} {r['shared']:9} "
              f"{r['stack'] + r['local']:7} {'yes' if r['hgmma'] else 'no':>5}  {'; '.join(bad) or 'ok'}{note}")
    return 1 if any(problems(r) and not candidate(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
