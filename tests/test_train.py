"""train.py end to end on CPU: the embedded corpus trains and its loss falls, two gloo ranks stay in
lockstep, and bad input ends in one error line."""
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.multiprocessing as mp

import train
from bdiff.data import write_shard
from helpers import free_port, user_env

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(out_dir, run):
    with open(os.path.join(out_dir, f"{run}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_run_loss_falls(stdlib_dir, tmp_path):
    out = str(tmp_path)
    model = train.main(["--device", "cpu", "--preset", "tiny", "--steps", "40", "--data_dir", stdlib_dir,
                        "--out_dir", out,
                        "--run_name", "t", "--log_every", "10"])
    log = read_log(out, "t")
    losses = [e["train_loss"] for e in log if "train_loss" in e]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"train loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    val = [e["val_loss"] for e in log if "val_loss" in e]
    assert val[-1] < 0.8 * math.log(258), f"val loss {val[-1]:.3f} not below 80% of ln(vocab), the zero-head loss"
    ckpt = torch.load(os.path.join(out, "t", "final.pt"))
    assert ckpt["step"] == 40 and ckpt["config"]["model"]["vocab_size"] == 258
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][name], p, msg=f"checkpoint differs at {name}")


def test_cpu_rng_is_the_cpu_runs_own_stream(stdlib_dir, tmp_path):
    """On a CPU, --cpu_rng draws from the generators the run uses anyway: the same run, step for step (on a GPU it
    gives the CPU's weights and noise: tests/test_gpu.py)."""
    args = ["--device", "cpu", "--preset", "tiny", "--steps", "3", "--val_every", "0", "--data_dir", stdlib_dir,
            "--out_dir", str(tmp_path), "--log_every", "1"]
    train.main(args + ["--run_name", "plain"])
    train.main(args + ["--run_name", "cpu_rng", "--cpu_rng"])
    plain, cpu_rng = ([e["train_loss"] for e in read_log(str(tmp_path), run) if "train_loss" in e]
                      for run in ("plain", "cpu_rng"))
    assert plain == cpu_rng, f"--cpu_rng changed a CPU run: {plain} against {cpu_rng}"


def test_profile_says_where_the_steps_go(stdlib_dir, tmp_path, capsys):
    """--profile N: after N+1 steps, ten steps recorded; the log gives their wall time and the ops' table, and the
    trace is written beside it."""
    train.main(["--device", "cpu", "--preset", "tiny", "--steps", "13", "--profile", "1", "--val_every", "0",
                "--data_dir", stdlib_dir, "--out_dir", str(tmp_path), "--run_name", "p"])
    printed = capsys.readouterr().out
    wall = re.search(r"profile of 10 steps from step 3: wall ([\d.]+) ms/step", printed)
    assert wall and float(wall.group(1)) > 0, printed[-2000:]
    assert "aten::mm" in printed, "the table names the ops"
    with open(tmp_path / "p" / "profile" / "trace.json") as f:
        assert json.load(f)["traceEvents"], "the trace holds the steps' events"


def test_profile_summary_on_cuda_counts_kernels_launches_and_syncs():
    """The CUDA line of --profile from key_averages()-like events: busy time from the kernels' own events only (their
    launching ops carry the same time again), launches and syncs counted per step."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(key, device_type=cpu, count=1, cpu_us=0.0, device_us=0.0):
        return types.SimpleNamespace(key=key, device_type=device_type, count=count, cpu_time_total=cpu_us,
                                     self_device_time_total=device_us)

    events = [event("ProfilerStep*", count=10, cpu_us=200_000.0), event("aten::mm", device_us=30_000.0),
              event("ampere_sgemm", cuda, count=40, device_us=30_000.0), event("triton_fused", cuda, device_us=5_000.0),
              event("cudaLaunchKernel", count=900), event("cuLaunchKernel", count=100),
              event("cudaStreamSynchronize", count=30)]
    line = train.profile_summary(events, start=5, cuda=True)
    assert line == ("profile of 10 steps from step 7: wall 20.00 ms/step, device busy 3.50 ms/step (the rest is the "
                    "host's), 100 kernel launches and 3 host syncs a step"), line


def ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = train.main(argv)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_two_gloo_ranks_end_identical(stdlib_dir, tmp_path):
    out = str(tmp_path)
    argv = ["--device", "cpu", "--preset", "tiny", "--steps", "6", "--data_dir", stdlib_dir, "--out_dir", out,
            "--run_name", "ddp"]
    mp.spawn(ddp_worker, args=(2, free_port(), argv, out), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2))
    init = train.BlockDiffusionLM(train.get_preset("tiny").model).state_dict()  # same seed as the run
    moved = [n for n in r0 if not torch.equal(r0[n], init[n])]
    assert moved, "training did not change any parameter"
    for name in r0:
        torch.testing.assert_close(r0[name], r1[name], atol=0, rtol=0, msg=f"ranks differ at {name}")
    tokens = [e["tokens"] for e in read_log(out, "ddp") if "train_loss" in e]
    assert tokens[-1] == 6 * 2 * 128, "tokens per step count both ranks"


def torchrun(*args, timeout=300):
    """train.py under torchrun on two CPU processes, as a user types it (the environment of this test's process
    holds no torchrun variables)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", "--device", "cpu", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=user_env(OMP_NUM_THREADS="1"))


def test_torchrun_runs_the_demo_on_two_processes(stdlib_dir, tmp_path):
    """`torchrun --standalone --nproc_per_node=2 train.py --steps 20`: the demo's one micro-step is rounded up to the
    world size, said in one line, and the run ends with its model saved; an explicit --micro_steps that does not
    divide is one error line, said once."""
    ran = torchrun("--steps", "20", "--data_dir", stdlib_dir, "--out_dir", str(tmp_path), "--run_name", "tr")
    assert ran.returncode == 0, ran.stderr[-2000:]
    rounded = [line for line in ran.stdout.splitlines() if line.startswith("micro_steps:")]
    assert rounded == ["micro_steps: the preset's 1 rounded up to 2, a multiple of the world size 2 (one micro-step "
                       "of 512 tokens per rank per step; --micro_steps sets it)"], rounded
    assert os.path.exists(os.path.join(str(tmp_path), "tr", "model", "model.safetensors"))
    assert [e["tokens"] for e in read_log(str(tmp_path), "tr") if "train_loss" in e][-1] == 20 * 2 * 512
    bad = torchrun("--steps", "2", "--micro_steps", "3", "--data_dir", stdlib_dir, "--out_dir", str(tmp_path),
                   timeout=120)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and errors == ["error: --micro_steps 3 must be divisible by the world size 2 (each rank "
                                              "runs micro_steps / world of every step); try --micro_steps 4"], errors


def test_a_mistyped_data_dir_is_an_error(stdlib_dir, tmp_path):
    """`--data_dir data/owm` (a typo) holds no data set: one line naming the path and the prepare command, nothing
    built there; --data stdlib with the same path builds the embedded corpus there, as asked."""
    typo = tmp_path / "owm"
    result = run_train("--steps", "2", "--data_dir", str(typo), "--out_dir", str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-1000:]
    assert f"--data_dir {typo}: no such directory" in lines[0] and "python -m bdiff.data prepare" in lines[0], lines
    assert not typo.exists(), "nothing is written into a mistyped path"
    typo.mkdir()
    assert "no bdiff.json and no stdlib shards" in run_train("--steps", "2", "--data_dir", str(typo)).stderr
    train.main(["--device", "cpu", "--preset", "tiny", "--steps", "1", "--data", "stdlib", "--data_dir", str(typo),
                "--out_dir", str(tmp_path)])
    assert (typo / "stdlib_train_000000.bin").exists(), "--data stdlib builds the corpus where --data_dir says"


def run_train(*args):
    env = user_env()
    return subprocess.run([sys.executable, "train.py", "--device", "cpu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_errors_are_one_line(stdlib_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "val"):
        write_shard(str(bad / f"stdlib_{split}_000000.bin"), torch.arange(4096).numpy())
    with open(bad / "stdlib_train_000000.bin", "r+b") as f:
        f.write(b"\x00" * 4)  # corrupt the magic
    cases = {
        "unknown preset": (["--preset", "nope"], "unknown preset 'nope'"),
        "missing data": (["--preset", "tiny", "--data", "finewebedu", "--data_dir", str(tmp_path / "none"),
                          "--vocab_size", "50258", "--bos_id", "50256", "--mask_id", "50257"],
                         "no finewebedu train shards"),
        "corrupt shard": (["--preset", "tiny", "--data_dir", str(bad), "--out_dir", str(tmp_path)], "bad magic"),
        "bad value": (["--preset", "tiny", "--block_size", "0"], "block_size must be >= 1"),
        "profile past the run": (["--preset", "tiny", "--steps", "10", "--profile", "0"], "--profile: expected"),
    }
    for case, (args, message) in cases.items():
        result = run_train(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, f"{case}: exit code {result.returncode}, stderr {result.stderr[-500:]}"
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], f"{case}: {lines}"


def test_dry_run_record(capsys):
    assert train.main(["--device", "cpu", "--preset", "record", "--dry_run"]) is None
    printed = capsys.readouterr().out
    assert "parameters: 162,166,314" in printed
    assert "block_size 16 == 16 OK" in printed
    assert "preset: record (--preset record)" in printed


def test_the_demo_is_the_default_on_every_machine(capsys):
    """`python train.py` runs the demo wherever it runs (on the GPU where there is one: --device's default), and says
    which preset it took and why; `cpu`, the demo's former name, still takes it."""
    assert train.main(["--device", "cpu", "--dry_run"]) is None
    printed = capsys.readouterr().out
    assert "preset: demo (the default" in printed and "--preset record" in printed
    demo = train.BlockDiffusionLM(train.get_preset("demo").model)
    assert f"parameters: {sum(p.numel() for p in demo.parameters()):,}" in printed
    assert train.main(["--device", "cpu", "--preset", "cpu", "--dry_run"]) is None
    assert "preset: demo (--preset cpu: its former name)" in capsys.readouterr().out


def test_compiled_tiny_run(stdlib_dir, tmp_path, capsys):
    """`train.py --preset tiny --steps 5 --compile`: the objective compiled with fullgraph=True on CPU."""
    torch._dynamo.reset()
    out = str(tmp_path)
    train.main(["--device", "cpu", "--preset", "tiny", "--steps", "5", "--compile", "--data_dir", stdlib_dir,
                "--out_dir", out,
                "--run_name", "c"])
    assert "compile: on" in capsys.readouterr().out
    losses = [e["train_loss"] for e in read_log(out, "c") if "train_loss" in e]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    torch._dynamo.reset()


def test_failed_sample_keeps_the_run(stdlib_dir, tmp_path, capsys, monkeypatch):
    """The model is on disk before the extras run; a failing sample costs one line, not the run."""
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while sampling")

    monkeypatch.setattr(train, "generate", broken)
    out = str(tmp_path)
    train.main(["--device", "cpu", "--preset", "tiny", "--steps", "2", "--data_dir", stdlib_dir, "--out_dir", out,
                "--run_name", "s"])
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert skipped == ["sample skipped: out of memory while sampling"]
    assert os.path.exists(os.path.join(out, "s", "final.pt")), "the model must be saved before the sample"
    assert os.path.exists(os.path.join(out, "s", "ckpt_000002", "COMPLETE")), "and the final checkpoint"


def test_data_smaller_than_the_run(tmp_path, capsys, monkeypatch):
    """A data set of 40 small documents: the training split is read again, epoch after epoch, as the run says at
    start; a validation split smaller than val_tokens, and than one val_seq_len sequence, is read whole, as the run
    says at start; the trained weights are on disk before the final validation, which cannot lose them."""
    from bdiff.data.prepare import prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(f"document {i}: " + "abc " * (i % 7 + 3) + "\n")
    prepare(str(docs), "bytes", str(tmp_path / "data"), jobs=1, progress=False, log=lambda *_: None)
    validations = []

    def failing_final_validation(model, raw_model, data, cfg, proc):
        validations.append(data.val_seq_len)
        raise RuntimeError("the disk vanished during validation")

    monkeypatch.setattr(train, "evaluate", failing_final_validation)
    with pytest.raises(RuntimeError, match="the disk vanished"):
        train.main(["--device", "cpu", "--preset", "tiny", "--steps", "30", "--seq_len", "64", "--val_every", "0",
                    "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path), "--run_name", "small"])
    printed = capsys.readouterr().out
    assert re.search(r"which 30 steps read \d+\.\d\d times \(each epoch after the first", printed), printed
    assert "epoch 2 begins at step" in printed and "epoch 3 begins at step" in printed
    assert re.search(r"fewer than val_tokens=1,024: each validation reads 1 sequence\(s\) of \d\d tokens", printed)
    assert validations and validations[0] < 256, "validation sequences as long as the split allows"
    assert os.path.exists(os.path.join(tmp_path, "small", "ckpt_000030", "COMPLETE")), "saved before validating"
    steps = [e for e in read_log(str(tmp_path), "small") if "data" in e]
    assert {r[0] for e in steps for r in e["data"]} >= {0, 1, 2}, "the log records each range's epoch"


def test_gpt2_run_without_tiktoken_keeps_the_run(tmp_path, capsys, monkeypatch):
    """A GPT-2-vocabulary model on GPT-2-tokenized shards, tiktoken absent: trained, saved, one line."""
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` raises ImportError
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "fineweb"
    data.mkdir()
    for split, name in (("train", "finewebedu_train_000001.bin"), ("val", "finewebedu_val_000000.bin")):
        tokens = torch.randint(0, 50256, (4096,), generator=gen)
        tokens[::300] = 50256
        write_shard(str(data / name), tokens.numpy())
    model_flags = ["--vocab_size", "50258", "--bos_id", "50256", "--mask_id", "50257", "--lm_head_multiple", "128"]
    train.main(["--device", "cpu", "--preset", "tiny", "--data", "finewebedu", "--data_dir", str(data), "--steps", "2",
                "--out_dir", str(tmp_path), "--run_name", "g", *model_flags])
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith("sample skipped: tokenizer 'gpt2' needs tiktoken"), skipped
    assert os.path.exists(os.path.join(str(tmp_path), "g", "final.pt"))


def test_data_and_model_must_agree(stdlib_dir, tmp_path):
    """The record architecture (BOS 50256) on the byte corpus (BOS 256) is refused before training with one
    line that names the settings that fit; with byte-level BOS and MASK given as flags it trains, saves and
    samples bytes, whatever the vocabulary size."""
    base = [sys.executable, "train.py", "--device", "cpu", "--preset", "record", "--data", "stdlib", "--data_dir",
            stdlib_dir,
            "--seq_len", "256", "--micro_steps", "1", "--steps", "1", "--val_tokens", "256", "--val_seq_len", "256",
            "--val_every", "0", "--out_dir", str(tmp_path), "--num_layers", "2", "--model_dim", "128",
            "--num_heads", "1", "--no-compile"]
    env = user_env()
    refused = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "BOS 256" in lines[0] and "--bos_id 256" in lines[0], lines[0]
    fits = subprocess.run(base + ["--bos_id", "256", "--mask_id", "50257", "--run_name", "b"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "sample (" in fits.stdout and "skipped" not in fits.stdout
    assert re.search(r"(\d+% of its words occur in the training text|no words)\):", fits.stdout), fits.stdout[-2000:]
    assert os.path.exists(os.path.join(str(tmp_path), "b", "final.pt"))


def test_long_runs_log_every_nth_step_with_elapsed_time_and_eta(stdlib_dir, tmp_path, capsys):
    assert (train.auto_log_every(4), train.auto_log_every(600), train.auto_log_every(10_000)) == (1, 10, 200)
    assert train.get_preset("record").train.log_every == 1, "the record logs every step, as its runs do"
    train.main(["--device", "cpu", "--preset", "tiny", "--steps", "100", "--val_every", "0", "--data_dir",
                stdlib_dir, "--out_dir",
                str(tmp_path), "--run_name", "n"])
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("step ") and "| loss " in line]
    assert [line.split()[1] for line in steps] == [f"{s}/100" for s in range(2, 101, 2)], steps[:3]
    assert all(" | elapsed " in line and " | eta " in line for line in steps), steps[0]
    assert steps[-1].endswith("eta 0m00s"), steps[-1]
    model_dir = os.path.join(str(tmp_path), "n", "model")
    assert f"python -m bdiff.eval --model {model_dir}" in out and f"sample.py --ckpt {model_dir}" in out, \
        "the end of a run names its model directory and the commands that evaluate, sample and push it"


def test_training_bench_runs_seeds_and_compares_settings(stdlib_dir, tmp_path):
    """bench/bench_training.py: K seeds of a setting, their losses (with each run's validation curve), mean ±
    standard error and spread, saved and compared side by side; --runs_dir keeps the runs."""
    env = user_env()
    out, runs = tmp_path / "a.json", tmp_path / "runs"
    result = subprocess.run([sys.executable, "bench/bench_training.py", "tiny", "--seeds", "2", "--out", str(out),
                             "--runs_dir", str(runs), "--", "--device", "cpu", "--steps", "3", "--val_every", "2",
                             "--data_dir", stdlib_dir], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1] and saved["flags"][-2:] == ["--data_dir", stdlib_dir]
    for r in saved["runs"]:
        assert [step for step, _, _ in r["curve"]] == [2, 3] and r["curve"][-1][1] == r["val_loss"], r["curve"]
        assert (runs / f"seed{r['seed']}" / "model").is_dir(), "--runs_dir keeps each run's model"
    losses = [r["val_loss"] for r in saved["runs"]]
    assert losses[0] != losses[1], "seeds must differ"
    assert abs(saved["mean"] - sum(losses) / 2) < 1e-9 and abs(saved["spread"] - abs(losses[0] - losses[1])) < 1e-9
    assert abs(saved["stderr"] - abs(losses[0] - losses[1]) / 2) < 1e-9, "s.e. of two values: half their distance"
    compare = subprocess.run([sys.executable, "bench/bench_training.py", "--compare", str(out), str(out)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0 and compare.stdout.count(f"{saved['mean']:.3f} ± ") == 2, compare.stdout


def test_learning_rate_schedule_warms_holds_and_decays():
    """train.set_schedules against its definition: a linear warm-up over lr_warmup steps, constant until
    lr_constant_frac of the run, then linear decay to lr_final_frac; every optimizer group follows."""
    cfg = train.get_preset("tiny").train
    cfg.steps, cfg.lr_warmup, cfg.lr_constant_frac, cfg.lr_final_frac = 100, 10, 0.5, 0.2
    model = train.BlockDiffusionLM(train.get_preset("tiny").model)
    adam, muon = train.build_optimizers(model, cfg, adapted=False)
    mults = [train.set_schedules(adam, muon, step, cfg) for step in range(cfg.steps)]
    assert mults[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]), "warm-up from 1/N to 1"
    assert mults[10:50] == pytest.approx([1.0] * 40), "constant after the warm-up, until lr_constant_frac"
    assert mults[75] == pytest.approx(1 - 0.5 * 0.8) and mults[99] == pytest.approx(1 - 0.98 * 0.8), "linear decay"
    for opt in (adam, muon):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(group["initial_lr"] * mults[-1])
