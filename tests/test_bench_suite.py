"""The benchmark suite (bench/conftest.py) is collected only when asked for, covers every op, records what makes
its numbers meaningful, and never times the interpreter. Each check runs pytest in a subprocess, as a user would."""
import json
import os
import subprocess
import sys

from helpers import user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("test_bd_attention", "test_masked_ce", "test_newton_schulz", "test_step", "test_sampling")


def pytest_run(*args, interpret=False):
    env = user_env()
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


def gpu_report_plan(*args):
    result = subprocess.run([sys.executable, "bench/gpu_report.py", "--plan", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    parts = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("runs", "skipped"))]
    return result, parts


def test_gpu_report_plan_fits_ten_minutes_in_order_of_value():
    """`python bench/gpu_report.py --plan` (no GPU needed): the attention's tuning comes first (the parts after it run
    its winners), then the attention against FlexAttention and the ops against their references; the compile check
    (which needs no GPU) is last, and what is planned fits the default budget of ten minutes."""
    result, parts = gpu_report_plan("--compile_check")
    assert result.returncode == 0, result.stderr[-2000:]
    planned = sum(int(p[1]) for p in parts if p[0] == "runs")
    assert [p[6] for p in parts[:3]] == ["tune", "attention", "tests"] and parts[0][0] == "runs", result.stdout
    assert parts[-1][6] == "compile", "the compile check is the last part"
    assert planned <= 600, f"{planned} s planned in a 600 s budget"
    assert f"{planned} s planned of 600 s" in result.stdout


def test_gpu_report_runs_the_parts_asked_for_in_their_order():
    result, parts = gpu_report_plan("--parts", "sampling,tune", "--budget_s", "250")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [(p[0], p[6]) for p in parts] == [("runs", "sampling"), ("skipped", "tune")], result.stdout
    result, _ = gpu_report_plan("--parts", "tune,nothing")
    assert result.returncode != 0 and "no part nothing" in result.stderr, result.stderr


def test_tune_attention_plan_lists_every_candidate_with_its_work():
    """`python bench/tune_attention.py --plan` (no GPU needed): the tuning space of each kernel at the record's shape,
    the default first, with work ratios from the kernels' loop bounds."""
    from bdiff.kernels.bd_attention import TUNING_SPACE

    result = subprocess.run([sys.executable, "bench/tune_attention.py", "--plan", "--workers", "8"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    kernels = [r[0] for r in rows]
    space = {kernel: len(configs) for kernel, configs in TUNING_SPACE.items()}
    atomic = sum(cfg["ATOMIC_DQ"] for cfg in TUNING_SPACE["dkdv"])
    for kernel, n in (("forward", space["forward"]), ("dq", space["dq"]), ("dkdv", space["dkdv"] - atomic),
                      ("dkdv+dq", atomic)):  # and the default with LPT off, and the default where it is not one
        assert kernels.count(kernel) in (n + 1, n + 2), f"{kernel}: {kernels.count(kernel)} rows for {n} candidates"
    assert sum("in tile order" in line for line in result.stdout.splitlines()) == 4, "the defaults without LPT"
    assert all(1.0 <= float(r[r.index("300:") + 1]) < 2.5 for r in rows), "work ratios out of range"
    assert sum("(default)" in line for line in result.stdout.splitlines()) == 4, "one default per kernel"


def tune_attention():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import tune_attention as module

    return module


def test_tune_attention_winners_and_the_table_they_go_into(tmp_path, monkeypatch):
    """The winner of a kernel has the least time over both document mixes; dK/dV with an atomic dQ replaces dQ plus
    dK/dV only when it beats both together; --apply merges the winners, with what measured them, into the table."""
    ta = tune_attention()
    from bdiff.kernels import tiles

    def row(kernel, bm, ms):
        return dict(kernel=kernel, config=dict(BM=bm, BN=32, num_warps=8, num_stages=3), ms=dict(zip(ta.MEANS, ms)),
                    tflops=dict(zip(ta.MEANS, (400.0, 410.0))))

    rows = [row("forward", 64, (0.30, 0.40)), row("forward", 128, (0.25, 0.50)), row("dq", 128, (0.5, 0.6)),
            row("dkdv", 128, (0.7, 0.8)), row("dkdv+dq", 64, (1.2, 1.3))]
    versions = dict(torch="2.11", triton="3.6")
    found = ta.winners(rows, "NVIDIA H200", versions)
    key = tiles.shape_class("forward", "bfloat16", 128, 16384)
    assert found[key]["BM"] == 64, "0.70 ms in all beats 0.75"
    assert found[key]["measured"]["gpu"] == "NVIDIA H200" and found[key]["measured"]["ms"] == {"300": 0.3, "1000": 0.4}
    assert found[key.replace("forward", "dkdv")]["BM"] == 64, "2.5 ms atomic against 2.6 ms split: the atomic wins"
    assert found[key.replace("forward", "dq")]["BM"] == 128, "dQ's entry stays (deterministic runs use it)"
    rows[-1]["ms"] = dict(zip(ta.MEANS, (1.4, 1.3)))
    assert ta.winners(rows, "NVIDIA H200", versions)[key.replace("forward", "dkdv")]["BM"] == 128, "2.7 > 2.6: split"

    (tmp_path / "bd_attention_tiles.json").write_text(json.dumps({"about": "x", "archs": {"sm_90": {}}}))
    monkeypatch.setattr(tiles, "TABLE_DIR", str(tmp_path))
    run = tmp_path / "tune_attention.json"
    run.write_text(json.dumps(dict(arch="sm_90", gpu="NVIDIA H200", winners=found)))
    assert ta.apply(str(run)) == 0
    table = json.loads((tmp_path / "bd_attention_tiles.json").read_text())
    assert table["archs"]["sm_90"][key]["BM"] == 64 and table["about"] == "x"


def test_tune_attention_refuses_a_candidate_that_disagrees_with_the_reference(monkeypatch):
    """Phase 2 on the interpreter: the default tiles agree with the float32 reference; a candidate that leaves its
    output unwritten (NaN) is refused, naming the output."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        import pytest

        pytest.skip("needs the interpreter")
    import torch

    ta = tune_attention()
    from bdiff.kernels import bd_attention as bda

    case = ta.Case(torch.tensor([-2, 1, 40, 70], dtype=torch.int32), 70, heads=1, dim=16, block=5, device="cpu",
                   dtype=torch.float16)
    ref = ta.reference(case)
    for kernel in ta.KERNELS:
        cfg = [c for k, c in ta.candidates() if k == kernel][0]
        assert ta.check(case, ref, kernel, cfg) is None, kernel
    monkeypatch.setattr(bda, "_query_kernel", lambda *args, **kwargs: None)
    assert "o: max error nan" in ta.check(case, ref, "forward", dict(BM=64, BN=32, DN=16))


def test_sampling_bench_reports_medians_and_a_loop_whose_tokens_differ(monkeypatch, capsys):
    """bench/bench_sampling.py's table: a median over runs taken in turns with its spread, the same tokens checked on
    every run; a loop that generates other tokens is a "NO" in its row and the exit code, not a crash."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_sampling

    from bdiff.config import tiny
    from bdiff.models.nano import BlockDiffusionLM

    torch.manual_seed(0)
    model = BlockDiffusionLM(tiny().model).eval()
    prompt = [model.cfg.bos_id] + list(range(40, 60))
    assert not bench_sampling.run(model, prompt, 32, 4, [1, 2], None, repeats=2)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 4 and all(r[-1] == "yes" for r in rows), rows
    for r in rows:  # the ratio to the first loop's median; the slowest and fastest runs
        ratio, spread = [f for f in r if f.endswith("x")], [f.split("-") for f in r if "-" in f]
        assert len(ratio) == 1 and float(ratio[0][:-1]) > 0, r
        assert len(spread) == 1 and float(spread[0][0].replace(",", "")) <= float(spread[0][1].replace(",", "")), r

    loops = bench_sampling.loops(None)

    def other_tokens(model, prompts, **kw):
        out = loops["now, eager"](model, prompts, **kw)
        out.tokens = [[t + 1 for t in seq] for seq in out.tokens]
        return out

    monkeypatch.setattr(bench_sampling, "loops", lambda mode: dict(loops, wrong=other_tokens))
    assert bench_sampling.run(model, prompt, 32, 4, [1], None, repeats=1), "a mismatch sets the exit code"
    wrong = next(line for line in capsys.readouterr().out.splitlines() if "wrong" in line)
    assert wrong.split()[-1] == "NO", wrong


def test_configs_bench_replays_the_last_wave_with_and_without_lpt():
    """`python bench/bench_bd_attention.py --configs` (no GPU needed): after the work ratios, each default kernel's
    last wave replayed on 132 SMs; most work first (tile_order) must end nearer the work's bound than the tiles'
    own order, at both document mixes."""
    result = subprocess.run([sys.executable, "bench/bench_bd_attention.py", "--configs"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tail = result.stdout.split("The last wave")[1].splitlines()[2:]
    assert [line.split()[0] for line in tail] == ["forward", "dq", "dkdv"], tail
    for line in tail:
        own_300, lpt_300, own_1000, lpt_1000 = (float(x.rstrip("%")) for x in line.split()[-4:])
        assert lpt_300 <= own_300 and lpt_1000 <= own_1000 and max(lpt_300, lpt_1000) < 5, line
