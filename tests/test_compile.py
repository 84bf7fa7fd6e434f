"""Every shipped kernel configuration (attention, cross-entropy, Newton–Schulz) compiles for sm_80, sm_86, sm_89
and sm_90 without a GPU, with no register spills, shared memory within each target's per-block limit, and Hopper
MMA (HGMMA) on sm_90 where the operands are 16-bit (kernels/compile_check.py).

The suite runs `compile_check --reuse`: sm_86 and sm_89 (Ampere's instruction set, as sm_80) compile only the
configurations that differ from sm_80's and check sm_80's figures for the rest against their smaller shared memory;
compiling everything four times took four of the suite's twenty minutes. `python -m bdiff.kernels.compile_check`
compiles every configuration for every target."""
import json
import os
import subprocess
import sys

import pytest

from bdiff.kernels import tiles
from bdiff.kernels.compile_check import TARGETS, problems
from helpers import user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    env = user_env()  # compile the real kernels
    result = subprocess.run([sys.executable, "-m", "bdiff.kernels.compile_check", "--json", "--reuse"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_reused_rows_are_configurations_sm80_compiled(monkeypatch):
    """--reuse reports sm_80's figures for sm_86/89 only where the configuration is sm_80's exactly, and compiles
    the others (Newton–Schulz's shallower pipelines there)."""
    from bdiff.kernels import compile_check

    compiled = []

    def record(work):
        compiled.append(work)
        return dict(name=str(work), sm=work[1], shared_limit=TARGETS[work[1]])

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(compile_check, "_compile", record)
    monkeypatch.setattr(compile_check, "ProcessPoolExecutor", lambda max_workers: Inline())
    rows = compile_check.check_all(archs=(80, 86), reuse=True)
    own = [w for w in compiled if w[1] == 86]
    assert own and len(own) < len(compile_check.shipped_configs(86)), "sm_86 compiles only what differs"
    reused = [r for r in rows if r.get("reused")]
    assert len(reused) + len(own) == len(compile_check.shipped_configs(86))
    assert all(r["sm"] == 86 and r["shared_limit"] == TARGETS[86] for r in reused)


class Inline:
    """A ProcessPoolExecutor stand-in that maps in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return list(map(fn, items))


def test_every_configuration_is_clean(report):
    bad = [f"{r['name']} sm_{r['sm']}: {'; '.join(problems(r))}" for r in report if problems(r)]
    assert not bad, "\n".join(bad)


def test_every_target_and_kernel_is_covered(report):
    """Each attention kernel's default at each head dim the kernels ship for, in 16-bit and in fp32 with both dot
    precisions (PyTorch's TF32 setting decides which runs), in bf16 at head dims 64 and 128 also with grouped-query
    heads, and each entry of the committed tile table."""
    for sm in TARGETS:
        names = {r["name"] for r in report if r["sm"] == sm}
        for D in (32, 64, 128):
            for dtype in ("bfloat16", "float16", "float32-tf32"):
                assert f"bd_attention delta {dtype} D={D}" in names, f"sm_{sm} misses delta {dtype} D={D}"
            for kernel in ("forward", "dq", "dkdv"):
                for dtype in ("bfloat16", "float16", "float32-tf32", "float32-ieee"):
                    assert f"bd_attention {kernel} {dtype} D={D}" in names, f"sm_{sm} misses {kernel} {dtype} D={D}"
                if D >= 64:
                    assert f"bd_attention {kernel} bfloat16 D={D} GQA 12/2" in names, f"sm_{sm} misses GQA {kernel}"
        for key in tiles.table("bd_attention").get(f"sm_{sm}", {}):
            kernel, dtype, D, size = key.split()
            assert f"bd_attention {kernel} {dtype} {D} (table {size})" in names, f"sm_{sm} misses the table's {key}"


def test_every_kernel_module_is_covered(report):
    for prefix, kernels in (("newton_schulz", ("sym X·Xᵀ wide", "sym X·Xᵀ tall", "sym b·A+c·A·A", "update wide",
                                                "update tall")),
                            ("masked_ce", ("loss bf16", "loss+grad bf16", "loss+grad fp16", "loss+grad fp32"))):
        for sm in TARGETS:
            names = {r["name"] for r in report if r["sm"] == sm}
            for kernel in kernels:
                assert any(n.startswith(f"{prefix} {kernel}") for n in names), f"sm_{sm} misses {prefix} {kernel}"


def test_hopper_uses_hgmma_in_forward_and_backward(report):
    for r in report:
        if r["sm"] == 90 and r["wants_hgmma"]:
            assert r["hgmma"], f"{r['name']}: no HGMMA in the sm_90 SASS"


@pytest.mark.parametrize("name, sm, fails", [("bd_attention dkdv bfloat16 D=128 (space 3)", 80, False),
                                              ("bd_attention dkdv bfloat16 D=128 (space 3)", 90, True),
                                              ("bd_attention dkdv bfloat16 D=128", 80, True)])
def test_only_a_tuning_candidate_away_from_hopper_may_spill(monkeypatch, capsys, name, sm, fails):
    """The tuning space is Hopper's: a candidate that spills on sm_80 is reported and dropped by the tuner there,
    but a shipped configuration that spills anywhere, or a candidate that spills on sm_90, fails the check."""
    from bdiff.kernels import compile_check

    row = dict(name=name, sm=sm, tiles="64x64 w4 s2", registers=255, stack=96, local=0, shared=1024,
               shared_limit=TARGETS[sm], hgmma=False, wants_hgmma=False)
    monkeypatch.setattr(compile_check, "check_all", lambda **kwargs: [row])
    monkeypatch.setattr(sys, "argv", ["compile_check", "--space"])
    assert compile_check.main() == int(fails), capsys.readouterr().out
    assert "spills (stack 96 B" in capsys.readouterr().out, "the spill is reported either way"
