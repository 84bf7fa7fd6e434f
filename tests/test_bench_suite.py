"""The benchmark suite (bench/conftest.py) is collected only when asked for, covers every op, records what makes
its numbers meaningful, and never times the interpreter. Each check runs pytest in a subprocess, as a user would."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("test_bd_attention", "test_masked_ce", "test_newton_schulz", "test_step", "test_sampling")


def pytest_run(*args, interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_default_run_leaves_the_suite_out_and_bench_collects_every_op():
    default = pytest_run("--collect-only", "-q")
    assert default.returncode == 0, default.stdout[-2000:]
    assert "bench/" not in default.stdout, "python -m pytest must not collect the benchmark suite"
    suite = pytest_run("bench", "--collect-only", "-q")
    assert suite.returncode == 0, suite.stdout[-2000:]
    for op in OPS:
        assert f"::{op}[" in suite.stdout, f"the suite has no benchmark {op}"


def test_a_suite_run_prints_ratios_and_saves_extra_info(tmp_path):
    """The mechanics, not this machine's speed (CI shares its cores): limits scaled to infinity check nothing."""
    out = tmp_path / "run.json"
    result = pytest_run("bench/bench_newton_schulz.py", "--benchmark-only", "-k", "square",
                        f"--benchmark-json={out}", "--ratio-limit-scale", "inf")
    assert result.returncode == 0, result.stdout[-3000:]
    line = next(row for row in result.stdout.splitlines() if row.startswith("newton-schulz square") and "bdiff" in row)
    ratio, limit = line.split()[-2:]
    assert float(ratio) > 0 and limit == "inf", line
    ratio = float(ratio)
    runs = {b["params"]["candidate"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert set(runs) == {"torch matmuls", "bdiff"}
    for name, info in runs.items():
        for key in ("op", "device", "torch", "triton", "shape", "FLOP/s"):
            assert key in info, f"{name}: extra_info lacks {key}"
    assert runs["bdiff"]["compared_with"] == "torch matmuls"
    assert abs(runs["bdiff"]["ratio"] - ratio) <= 5e-4, "the printed ratio (3 decimals) is the saved one"


def test_a_ratio_over_its_limit_fails_the_run_and_says_which():
    result = pytest_run("bench/bench_newton_schulz.py", "--benchmark-only", "-k", "square",
                        "--ratio-limit-scale", "1e-6")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "newton-schulz square: bdiff took" in result.stdout and "the limit is 1.3e-06x" in result.stdout, \
        result.stdout[-3000:]


def test_the_interpreter_is_never_timed():
    result = pytest_run("bench/bench_newton_schulz.py", "--benchmark-only", "-rs", interpret=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "4 skipped" in result.stdout and "interpreter runs are never timed" in result.stdout, result.stdout[-2000:]


def test_gpu_report_plan_fits_ten_minutes_in_order_of_value():
    """`python bench/gpu_report.py --plan` (no GPU needed): the ops against their references come first, the
    compile check (which needs no GPU) last, and what is planned fits the default budget of ten minutes."""
    result = subprocess.run([sys.executable, "bench/gpu_report.py", "--plan", "--compile_check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("runs", "skipped"))]
    planned = sum(int(p[1]) for p in parts if p[0] == "runs")
    assert parts[0][0] == "runs" and "reference" in result.stdout.splitlines()[1], result.stdout
    assert "compile check" in result.stdout.splitlines()[len(parts)], "the compile check is the last part"
    assert planned <= 600, f"{planned} s planned in a 600 s budget"
    assert f"{planned} s planned of 600 s" in result.stdout
