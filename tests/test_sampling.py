"""Sampling (bdiff/generation/sampling.py, sample.py): the KV cache is exact, seeds reproduce, batches equal single
prompts, stopping rules hold, and bad input ends in one error line."""
import functools
import os
import subprocess
import sys

import pytest
import torch

import train
from bdiff.config import SamplingConfig, tiny
from bdiff.generation.sampling import SamplingError, generate
from bdiff.models.nano import BlockDiffusionLM
from helpers import user_env

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def model(gen):
    """A tiny model with random weights everywhere (the zero-initialised head would give flat logits)."""
    m = BlockDiffusionLM(tiny().model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return m.eval()


def random_prompts(gen, lengths):
    return [[256] + torch.randint(0, 256, (n - 1,), generator=gen).tolist() for n in lengths]


def test_cache_is_exact(model, gen):
    """At every denoising step, the logits through the cache equal a full recomputation over x_t ⊕ x_0."""
    prompts = random_prompts(gen, [5, 21, 16])  # odd lengths: partial and exact blocks
    # Greedy: a multinomial draw at temperature 1 can flip between two near-equal probabilities on the 1e-6
    # rounding differences of the two paths (CI saw it once), and every later step would then differ.
    kw = dict(max_new_tokens=40, steps_per_block=4, temperature=0, strategy="confidence", keep_logits=True)
    cached, full = generate(model, prompts, **kw), generate(model, prompts, cache=False, **kw)
    assert cached.tokens == full.tokens
    assert len(cached.step_logits) == len(full.step_logits) >= 3 * 4, "several blocks of several steps"
    for step, (a, b) in enumerate(zip(cached.step_logits, full.step_logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")


def test_same_seed_same_text(model, gen):
    prompts = random_prompts(gen, [7])
    kw = dict(max_new_tokens=30, strategy="random", temperature=1.0, top_p=1.0)
    a, b = (generate(model, prompts, seed=11, **kw).tokens for _ in range(2))
    c = generate(model, prompts, seed=12, **kw).tokens
    assert a == b, "same seed must give the same text"
    assert a != c, "another seed should give another text"


@pytest.mark.parametrize("strategy", ["confidence", "threshold", "random"])
def test_batch_equals_each_prompt_alone(model, gen, strategy):
    prompts = random_prompts(gen, [3, 18, 33])
    config = SamplingConfig(max_new_tokens=25, steps_per_block=8, temperature=0, strategy=strategy)
    both = generate(model, prompts, config).tokens
    alone = [generate(model, [p], config).tokens[0] for p in prompts]
    assert both == alone


def test_stopping_rules(model, gen, monkeypatch):
    prompts = random_prompts(gen, [4, 9])
    out = generate(model, prompts, max_new_tokens=23, temperature=0, strategy="confidence")
    assert all(len(t) <= 23 for t in out.tokens)
    assert all(len(t) == 23 or t[-1] == model.cfg.bos_id for t in out.tokens), "stop at max tokens or at BOS"
    logits = model.logits

    def bos_everywhere(hidden):  # end of text is the only likely token
        out = logits(hidden)
        out[..., model.cfg.bos_id] += 1e4
        return out

    monkeypatch.setattr(model, "logits", bos_everywhere)
    stopped = generate(model, prompts, max_new_tokens=50, temperature=0, strategy="confidence")
    assert stopped.tokens == [[model.cfg.bos_id]] * 2, "a sequence ends with its first BOS"


def test_steps_and_calls(model, gen):
    out = generate(model, random_prompts(gen, [16]), max_new_tokens=32, steps_per_block=4, strategy="confidence",
                   temperature=1.0, top_p=1.0)
    blocks = -(-len(out.tokens[0]) // 16)  # 2, or 1 when the random model samples BOS (end of text) in the first
    assert out.model_calls == 1 + blocks * (4 + 1), "1 prefill block, then each block's 4 steps + 1 clean pass"
    assert out.cache_bytes > 0 and len(out.tokens[0]) <= 32


class HostReads:
    """Counts every way Python code reads a tensor's values back (on a GPU, each waits for the device)."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original):
                self.count += 1
                return _original(tensor, *args)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("strategy", ["random", "confidence", "threshold"])
def test_no_host_reads_inside_a_block(model, gen, monkeypatch, strategy):
    """One read per block (which sequences stopped) and one at the end (the tokens); the threshold strategy alone
    also asks after each step whether its block is complete. Prompts of different lengths, several blocks."""
    prompts = random_prompts(gen, [5, 21, 16])
    reads = HostReads(monkeypatch)
    out = generate(model, prompts, max_new_tokens=40, steps_per_block=4, strategy=strategy, temperature=1.0,
                   top_p=1.0)
    monkeypatch.undo()
    blocks = -(-max(len(p) + 40 for p in prompts) // 16)  # rounds the longest sequence can take, at most
    assert reads.count == out.host_reads + 1, f"{reads.count} reads of tensors, {out.host_reads} counted + the tokens"
    if strategy == "threshold":
        assert out.host_reads <= blocks * 4, "at most one read per step"
    else:
        assert out.host_reads <= blocks, f"{out.host_reads} reads: no read may happen inside a block"


def test_a_stop_rule_ends_a_sequence_after_its_block(model, gen, monkeypatch):
    """stop_when(prompt, its new tokens) ends a sequence after the block where it says True, the text so far the same
    as without the rule; the block's tokens come back in the block's one read."""
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda hidden: logits(hidden).index_fill(-1, torch.tensor([256]), -1e4))
    prompts = random_prompts(gen, [5, 21])  # no BOS ever: every text runs to max_new_tokens without the rule
    kw = dict(max_new_tokens=64, temperature=0, strategy="confidence")
    full = generate(model, prompts, **kw).tokens
    reads = HostReads(monkeypatch)
    out = generate(model, prompts, stop_when=lambda i, ids: i == 0 and len(ids) >= 20, **kw)
    assert reads.count == out.host_reads + 1, "no read beyond the block's one and the end's"
    monkeypatch.undo()
    n = len(out.tokens[0])
    assert 20 <= n < 20 + 16 and out.tokens[0] == full[0][:n], "stopped after the block that reached 20 tokens"
    assert out.tokens[1] == full[1] and len(full[1]) == 64


def test_compiled_step_gives_the_eager_tokens(model, gen):
    prompts = random_prompts(gen, [5, 21])
    kw = dict(max_new_tokens=40, steps_per_block=8, temperature=0, strategy="confidence")
    eager, compiled = generate(model, prompts, **kw), generate(model, prompts, compile="default", **kw)
    assert compiled.tokens == eager.tokens, "torch.compile of the model call must not change the text"
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0


@pytest.fixture
def counted(monkeypatch):
    """The compiled decode step traced by dynamo and run as traced (no inductor: seconds, not minutes), with every
    graph it compiles counted."""
    from torch._dynamo.testing import CompileCounter

    import bdiff.generation.sampling as sampling

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(sampling, "_compiled_call", functools.lru_cache(maxsize=None)(
        lambda mode: torch.compile(sampling.cached_call, backend=counter, dynamic=False)))
    yield counter
    torch._dynamo.reset()


@pytest.mark.parametrize("strategy,temperature", [("confidence", 0), ("threshold", 0), ("random", 1.0)])
def test_compiled_decode_step_has_one_shape(model, gen, counted, strategy, temperature):
    """Compiled, one graph serves every step of every block and one the clean pass, however the prompts' lengths
    differ and whenever their sequences stop (a stopped sequence rides along, frozen); a second generation of the same
    batch and length compiles nothing. The text is the eager loop's, which drops stopped sequences from its batch."""
    prompts = random_prompts(gen, [16, 5, 40])  # the first reaches max_new_tokens a block before the others
    kw = dict(max_new_tokens=64, steps_per_block=4, strategy=strategy, temperature=temperature, top_p=1.0,
              keep_logits=True)
    compiled = generate(model, prompts, compile="default", **kw)
    assert counted.frame_count == 2, f"{counted.frame_count} graphs compiled: one for the steps, one for the clean pass"
    again = generate(model, prompts, compile="default", seed=5, **kw)
    assert counted.frame_count == 2, "a second generation of the same shape recompiles nothing"
    eager = generate(model, prompts, **kw)
    assert compiled.tokens == eager.tokens, "the fixed-shape step gives the eager loop's text"
    assert any(a.shape != b.shape for a, b in zip(compiled.step_logits, eager.step_logits)), "a sequence stopped early"
    for step, (a, b) in enumerate(zip(compiled.step_logits, eager.step_logits)):
        if a.shape == b.shape:  # eager drops stopped sequences: compare the steps where the batch was whole
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
    assert again.tokens != compiled.tokens or temperature == 0


def test_threshold_asks_while_the_next_step_runs(model, gen, monkeypatch):
    """On a GPU the threshold strategy reads whether its block is complete after queueing the next step: the same
    text, no more than one read per step, and at most one call more per block than asking at once."""
    import bdiff.generation.sampling as sampling

    prompts = random_prompts(gen, [5, 21])
    kw = dict(max_new_tokens=48, strategy="threshold", threshold=0.2, temperature=0)
    at_once = generate(model, prompts, **kw)
    monkeypatch.setattr(sampling, "_overlap_reads", lambda device: True)
    overlapped = generate(model, prompts, **kw)
    blocks = -(-max(len(p) + 48 for p in prompts) // 16)
    assert overlapped.tokens == at_once.tokens
    assert at_once.model_calls <= overlapped.model_calls <= at_once.model_calls + blocks
    assert overlapped.host_reads <= blocks * 16


def test_entropy_stop(model, gen, monkeypatch):
    """A text that repeats one token stops once its last entropy_window tokens are read; without the bound it goes
    on to max_new_tokens."""
    logits = model.logits

    def one_token(hidden):  # the same byte is always by far the likeliest
        out = logits(hidden)
        out[..., 97] += 1e4
        return out

    monkeypatch.setattr(model, "logits", one_token)
    prompts = random_prompts(gen, [16])  # a full block: every later block is generated
    kw = dict(max_new_tokens=96, temperature=0)
    assert len(generate(model, prompts, **kw).tokens[0]) == 96
    stopped = generate(model, prompts, stop_entropy=0.5, entropy_window=32, **kw).tokens[0]
    assert stopped == [97] * 32, f"stops at the end of the block where 32 repeated tokens were read, got {stopped}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[256, 257]]), "MASK"),
    (dict(steps_per_block=0), "steps_per_block"),
    (dict(strategy="greedy"), "strategy"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop_entropy=-1.0), "stop_entropy"),
    (dict(compile="fast"), "compile must be one of auto, none"),
])
def test_bad_input(model, kwargs, match):
    args = dict(prompts=[[256, 10]], max_new_tokens=8)
    args.update(kwargs)
    with pytest.raises(SamplingError, match=match):
        generate(model, **args)


def run_sample(*args):
    env = user_env()
    return subprocess.run([sys.executable, "sample.py", "--device", "cpu", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


def test_sample_script(model, tmp_path):
    ckpt = tmp_path / "final.pt"
    cfg = tiny()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, ckpt)
    ok = run_sample("--ckpt", str(ckpt), "--prompt", "def f(", "--prompt", "x", "--max_new_tokens", "20")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("--- ") == 3 and "tok/s" in ok.stdout and "KV cache" in ok.stdout
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    cases = {
        "missing": (["--ckpt", str(tmp_path / "none.pt"), "--prompt", "a"], "no such checkpoint"),
        "foreign": (["--ckpt", str(tmp_path / "foreign.pt"), "--prompt", "a"], "not a bdiff checkpoint"),
        "other": (["--ckpt", str(tmp_path / "other.pt"), "--prompt", "a"], "not a bdiff checkpoint"),
        "block size": (["--ckpt", str(ckpt), "--prompt", "a", "--block_size", "8"], "does not match"),
        "too long": (["--ckpt", str(ckpt), "--prompt", "a" * 200], "exceeds"),
        "empty": (["--ckpt", str(ckpt), "--prompt", ""], None),
    }
    for case, (args, message) in cases.items():
        result = run_sample(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), f"{case}: {lines}"
        assert message is None or message in lines[0], f"{case}: {lines}"


MEMORISE = ["def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n", "The dog sleeps.\n",
            "x = [i * i for i in range(10)]\n", "Hello, world! Goodbye.\n"]


def test_what_the_trainer_teaches_is_what_the_sampler_reads(tmp_path, capsys):
    """End to end, with the defaults a user gets: `prepare` (its default validation fraction) on four short documents
    repeated, then train.py (tiny preset: documents that end, the separator closing each) for more steps than the data
    holds. Greedy sampling from each document's first four
    characters gives it back exactly and then stops at the separator, with the cache and without, one token per call
    and with threshold decoding."""
    from bdiff.data.prepare import prepare
    from bdiff.data.tokenizer import decode
    from bdiff.generation.sampling import prompt_ids

    docs = tmp_path / "docs"
    docs.mkdir()
    for copy in range(600):
        for i, text in enumerate(MEMORISE):
            (docs / f"{copy:03d}_{i}.txt").write_text(text)
    prepare(str(docs), "bytes", str(tmp_path / "data"), jobs=1, progress=False, log=lambda *_: None)
    # The tiny preset at width 128, 400 steps. Exact recall is a knife edge for a model this small: at width 64 one
    # character flips with float rounding or 50 steps more or less; at width 128 it holds.
    train.main(["--device", "cpu", "--preset", "tiny", "--data_dir", str(tmp_path / "data"), "--steps", "400",
                "--model_dim", "128", "--num_heads", "4", "--val_every", "0", "--out_dir", str(tmp_path / "logs"),
                "--run_name", "m"])
    printed = capsys.readouterr().out
    assert "which 400 steps read 1." in printed and "epoch 2 begins at step" in printed, printed[:3000]
    model = BlockDiffusionLM.from_pretrained(str(tmp_path / "logs" / "m" / "model"))
    assert model.cfg.separator == "closes", "prepared data and the tiny preset train documents that end"
    for text in MEMORISE:
        prompt = prompt_ids(text[:4], "bytes", model.cfg)
        assert model.cfg.bos_id not in prompt, "a document starts at position 0 with its first token"
        for cache in (True, False):
            for strategy, steps in (("random", None), ("threshold", 16)):
                out = generate(model, [prompt], max_new_tokens=80, temperature=0, cache=cache, strategy=strategy,
                               steps_per_block=steps)
                tokens = out.tokens[0]
                assert text[:4] + decode(tokens, "bytes") == text and tokens[-1] == model.cfg.bos_id, \
                    f"{text!r} ({strategy}, cache {cache}): got {text[:4] + decode(tokens, 'bytes')!r}, {tokens[-3:]}"
