"""train.py --fsdp (bdiff/training/fsdp.py): FSDP2 on CPU gloo ranks. Every block level of noise at t = 1 masks every
token, so a step's loss depends on its batch alone and runs on any number of processes can be compared step by step:
two FSDP ranks equal one process (both families; Muon's sharded update included), each rank holds its share of the
weights and optimizer state, and a sharded checkpoint (written on SIGTERM) resumes on three ranks and on one
process, continuing the uninterrupted run."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import train
from helpers import TEXT, free_port, user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE_FREE = ["--noise_low", "1", "--noise_high", "1"]  # t = 1: every token masked, no randomness in a step


def run(ranks: int, *args, check=True, timeout=600):
    cmd = [sys.executable, "train.py", "--device", "cpu", *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cmd[1:]]
    result = subprocess.run(cmd, cwd=ROOT, env=user_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(out: str, name: str) -> dict[int, float]:
    with open(os.path.join(out, f"{name}.jsonl")) as f:
        return {e["step"]: e["train_loss"] for e in map(json.loads, f) if "train_loss" in e}


def assert_same_losses(got: dict, want: dict, where: str) -> None:
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-5), f"{where}: step {step}: {loss} != {want[step]}"


@pytest.fixture(scope="module")
def adapted_base(tmp_path_factory):
    """A tiny Qwen3 and its tokenizer, and text prepared with it."""
    pytest.importorskip("transformers")
    from bdiff.data.prepare import prepare
    from helpers import tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("fsdp_base")
    base = str(root / "base")
    size = tiny_tokenizer(base)
    tiny_causal_lm(base, "qwen3", size, spare_rows=3)
    docs = root / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i}.txt").write_text(TEXT * (1 + i % 2))
    prepare(str(docs), base, str(root / "data"), jobs=1, progress=False, log=lambda *_: None)
    return base, str(root / "data")


@pytest.mark.parametrize("family", ["nano", "adapted"])
def test_two_fsdp_ranks_take_the_steps_of_one_process(family, stdlib_dir, adapted_base, tmp_path):
    """The same global batch (two micro-steps: one per rank, or both on one process): the same per-step losses (fp32,
    1e-5) and the same trained weights; the nano model trains its matrices with Muon, the sharded update."""
    out = str(tmp_path)
    if family == "nano":
        args = ["--preset", "tiny", "--steps", "4", "--data_dir", stdlib_dir]
    else:
        base, data = adapted_base
        args = ["--init", base, "--data_dir", data, "--steps", "4", "--seq_len", "64", "--val_seq_len", "64",
                "--val_tokens", "128", "--lr", "1e-3"]
    args += ["--micro_steps", "2", "--val_every", "0", "--out_dir", out, *NOISE_FREE]
    run(1, *args, "--run_name", "one")
    run(2, *args, "--run_name", "fsdp", "--fsdp")
    assert_same_losses(losses(out, "fsdp"), losses(out, "one"), family)
    from bdiff.models import from_pretrained

    one, sharded = (from_pretrained(os.path.join(out, name, "model")) for name in ("one", "fsdp"))
    for name, p in one.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], p, atol=2e-6, rtol=1e-5, msg=name)


def share_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from bdiff.training import fsdp

    dist.init_process_group("gloo")
    cfg = train.get_preset("tiny")
    model = fsdp.shard(train.BlockDiffusionLM(cfg.model), torch.float32)
    adam, muon = train.build_optimizers(model, cfg.train, adapted=False)
    tokens = torch.randint(0, 256, (128,))
    loss = model(tokens, noise_range=(1.0, 1.0))
    loss.backward()
    adam.step()
    muon.step()
    local = sum(p.to_local().numel() for p in model.parameters())
    state = sum(v.to_local().numel() for opt in (adam, muon) for s in opt.state.values() for v in s.values()
                if hasattr(v, "to_local") and v.ndim)
    total = sum(p.numel() for p in model.parameters())
    torch.save({"local": local, "state": state, "total": total}, os.path.join(out, f"share{rank}.pt"))
    dist.destroy_process_group()


def test_each_rank_holds_its_share_of_weights_and_optimizer_state(tmp_path):
    """Two ranks: each holds about half the parameters, and of Adam's and Muon's state (their sizes read from the
    local shards)."""
    mp.spawn(share_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    shares = [torch.load(os.path.join(tmp_path, f"share{r}.pt")) for r in range(2)]
    total = shares[0]["total"]
    assert sum(s["local"] for s in shares) == total
    for s in shares:
        assert 0.45 < s["local"] / total < 0.55, s
        assert 0.45 < s["state"] / (sum(x["state"] for x in shares)) < 0.55, s


def test_a_sharded_checkpoint_written_on_sigterm_resumes_on_three_ranks_and_on_one_process(stdlib_dir, tmp_path):
    """Two FSDP ranks stopped by SIGTERM write a sharded checkpoint (torch.distributed.checkpoint) and exit; it
    resumes on three FSDP ranks and on one process without torchrun, and both continue the uninterrupted run's
    losses (fp32, 1e-5)."""
    from test_checkpoint import run_and_signal

    out = str(tmp_path)
    args = ["--preset", "tiny", "--steps", "12", "--micro_steps", "6", "--val_every", "0", "--data_dir", stdlib_dir,
            "--out_dir", out, *NOISE_FREE]
    run(2, *args, "--run_name", "straight", "--fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--device", "cpu", *args, "--run_name", "stopped", "--fsdp"]
    code, output = run_and_signal(cmd, 3)
    stop = [line for line in output.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert code != 0 and len(stop) == 1, output[-3000:]
    at = int(stop[0].split("after step ")[1].split("/")[0])
    ckpt = os.path.join(out, "stopped", f"ckpt_{at:06d}")
    assert os.path.exists(os.path.join(ckpt, ".metadata")) and os.path.exists(os.path.join(ckpt, "COMPLETE"))
    straight = losses(out, "straight")
    run(3, *args, "--run_name", "three", "--fsdp", "--resume", ckpt)
    assert_same_losses(losses(out, "three"), straight, "resumed on 3 FSDP ranks")
    run(1, *args, "--run_name", "single", "--resume", ckpt)
    assert_same_losses(losses(out, "single"), straight, "resumed on one process")
    assert min(losses(out, "single")) == at + 1, "the resumed run starts after the checkpoint's step"


@pytest.mark.parametrize("family", ["nano", "adapted"])
def test_activation_checkpointing_changes_the_memory_not_the_gradients(family, adapted_base, gen, monkeypatch):
    """--activation_checkpointing recomputes each block in the backward: the same loss and gradients."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from bdiff.models.objective import document_layout

    if family == "nano":
        model = train.BlockDiffusionLM(train.get_preset("tiny").model)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    else:
        from bdiff.config import ModelConfig
        from bdiff.models.adapted import AdaptedLM

        base, _ = adapted_base
        model = AdaptedLM.from_base(base, ModelConfig(vocab_size=301, mask_id=300, bos_id=0, init=base,
                                                      separator="closes", token_shift=True), log=lambda *_: None)
    cfg = model.cfg
    tokens = torch.randint(1, 256, (96,), generator=gen)
    tokens[40] = cfg.bos_id
    layout = document_layout(tokens, cfg.bos_id, cfg.block_size, separator=cfg.separator)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    results = []
    for on in (False, True):
        model.set_activation_checkpointing(on)
        model.train()
        loss = model(tokens, noise_range=(0.3, 0.8), generator=torch.Generator().manual_seed(seed), layout=layout)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    (plain, plain_grads), (saved, saved_grads) = results
    torch.testing.assert_close(saved, plain)
    for a, b in zip(saved_grads, plain_grads):
        if b is not None:
            torch.testing.assert_close(a, b)
