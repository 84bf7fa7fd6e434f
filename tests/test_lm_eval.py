"""bdiff in the LM Evaluation Harness (bdiff/lm_eval.py): the log-likelihood is minus bdiff.eval's loss on the same
text and draws (reference: bdiff.eval.evaluate), packing changes no score, the estimate's variance falls with
mc_samples, and lm-eval's own command line runs local tasks of all three request kinds offline."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import train
from bdiff.eval import evaluate
from bdiff.models.objective import document_layout

pytestmark = pytest.mark.usefixtures("reference_ops")

pytest.importorskip("lm_eval")
from bdiff.lm_eval import BdiffLM, EvalHarnessError, continuation_nelbo, cut_at_stops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"


@pytest.fixture(scope="module", params=["closes", "opens"])
def model_dir(request, stdlib_dir, tmp_path_factory):
    """A tiny model trained a few steps by train.py, with documents that close or open with BOS."""
    out = str(tmp_path_factory.mktemp(f"lm_eval_{request.param}"))
    with pytest.MonkeyPatch.context() as patch:  # the references, as `reference_ops` (set up after this fixture)
        patch.delenv("TRITON_INTERPRET", raising=False)
        train.main(["--device", "cpu", "--preset", "tiny", "--steps", "8", "--data_dir", stdlib_dir, "--out_dir",
                    out, "--run_name", "r", "--separator", request.param, "--seed",
                    str(torch.randint(0, 1000, ()).item())])
    return os.path.join(out, "r", "model")


def requests(*pairs):
    return [types.SimpleNamespace(args=pair) for pair in pairs]


def test_loglikelihood_is_minus_the_eval_loss_on_the_same_text_and_draws(model_dir):
    lm = BdiffLM(model_dir, mc_samples=3, seed=5, device="cpu")
    cfg = lm.cfg
    opens = [cfg.bos_id] if cfg.separator == "opens" else []
    ids = opens + list(TEXT.encode())
    tokens = torch.tensor(ids)
    layout = document_layout(tokens, cfg.bos_id, cfg.block_size, first_offset=0, separator=cfg.separator)
    reference = evaluate(lm.model, [(tokens, layout)], draws=3, seed=5, levels=())  # mean loss per token, per draw
    nelbo, _ = continuation_nelbo(lm.model, [([], ids)], 3, seed=5)
    torch.testing.assert_close(nelbo[0], torch.tensor(reference["draws"]) * len(ids), rtol=1e-5, atol=1e-4,
                               msg="an empty context scores the whole document as bdiff.eval does, draw for draw")
    (ll, _), = lm.loglikelihood(requests(("", TEXT)))
    nelbo, _ = continuation_nelbo(lm.model, [(opens, list(TEXT.encode()))], 3, seed=5)  # BOS opens, clean
    assert ll == pytest.approx(-nelbo.mean().item(), rel=1e-6)


def test_packing_changes_no_score_and_the_context_is_never_noised(model_dir):
    lm = BdiffLM(model_dir, mc_samples=2, device="cpu")
    text = list(TEXT.encode())
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    pairs = []
    for _ in range(4):
        cut = int(torch.randint(1, len(text) - 1, (), generator=gen))  # continuations that start mid-block
        pairs.append((text[:cut], text[cut:]))
    alone = [continuation_nelbo(lm.model, [pair], 2)[0] for pair in pairs]
    packed, _ = continuation_nelbo(lm.model, pairs, 2, max_tokens=300)  # several entries per call, several calls
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-4)
    context, continuation = pairs[0]
    changed = [(t + 1) % 256 for t in context]  # another context, the same continuation and draws
    a, _ = continuation_nelbo(lm.model, [(context, continuation)], 2)
    b, _ = continuation_nelbo(lm.model, [(changed, continuation)], 2)
    assert not torch.equal(a, b), "the continuation must be scored given the context"
    empty, _ = continuation_nelbo(lm.model, [(context, [])], 2)
    assert torch.equal(empty, torch.zeros(1, 2)), "context tokens carry no loss: they are never noised"


def test_estimate_variance_falls_with_mc_samples(model_dir):
    """K draws are K independent single-draw estimates averaged, so the variance falls as 1/K. Checked both ways:
    the K = 8 score is the mean of its 8 distinct draws, and over 64 seeds its standard deviation is below that of
    one draw by more than 1.5x (sqrt(8) = 2.8x in expectation; the 1/t weights give the draws heavy tails, so the
    bar leaves room)."""
    lm = BdiffLM(model_dir, mc_samples=8, device="cpu")
    opens = [lm.cfg.bos_id] if lm.cfg.separator == "opens" else []
    context, continuation = opens + list(b"def add(a, b):"), list(b"\n    return a + b\n")
    nelbo, _ = continuation_nelbo(lm.model, [(context, continuation)], 8)
    assert len(set(nelbo[0].tolist())) == 8, "every draw is a different noise draw"
    (ll, _), = lm.loglikelihood(requests(("def add(a, b):", "\n    return a + b\n")))
    assert ll == pytest.approx(-nelbo.mean().item(), rel=1e-6)
    spread = {k: torch.stack([continuation_nelbo(lm.model, [(context, continuation)], k, seed=s)[0].mean()
                              for s in range(64)]).std().item() for k in (1, 8)}
    assert spread[8] < spread[1] / 1.5, f"standard deviation with 1 draw {spread[1]:.3f}, with 8 {spread[8]:.3f}"


def test_bad_model_arguments_fail_in_one_line(model_dir):
    with pytest.raises(EvalHarnessError, match="model argument mc_samples must be an integer >= 1, got 0"):
        BdiffLM(model_dir, mc_samples=0, device="cpu")


def test_cut_at_stops():
    assert cut_at_stops("abc\ndef", ["\n"]) == "abc"
    assert cut_at_stops("abc\ndef;", [";", "c\n"]) == "ab"
    assert cut_at_stops("abc", ["x", ""]) == "abc"


def test_generation_stops_at_a_stop_string_within_its_block(model_dir, monkeypatch):
    """generate_until: a sequence stops after the block where a stop string appears (the sampler's one read of the
    block carries its tokens to the host), not after max_gen_toks; the text is cut at the string."""
    import bdiff.generation.sampling

    lm = BdiffLM(model_dir, device="cpu")
    calls = []
    generate = bdiff.generation.sampling.generate
    monkeypatch.setattr(bdiff.generation.sampling, "generate",
                        lambda *args, **kwargs: calls.append(generate(*args, **kwargs)) or calls[-1])
    logits = lm.model.logits
    space = lm.tokenizer.encode(" ")[0]

    def spaces_after_a_while(hidden):  # a space is by far the likeliest token
        out = logits(hidden)
        out[..., space] += 1e4
        return out

    monkeypatch.setattr(lm.model, "logits", spaces_after_a_while)
    texts = lm.generate_until(requests(("def f(", {"until": [" "], "max_gen_toks": 200})), disable_tqdm=True)
    assert texts == [""], texts
    block = lm.cfg.block_size
    assert len(calls[0].tokens[0]) <= 2 * block, f"stopped within a block or two, not at 200: {calls[0].tokens[0]}"


TASKS = {
    "bdiff_mc": """task: bdiff_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""",
    "bdiff_ppl": """task: bdiff_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "bdiff_gen": """task: bdiff_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["(", " "]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def test_lm_eval_command_line_runs_local_tasks_offline(model_dir, tmp_path):
    docs = [dict(context="def add(a, b):\n    return", choices=[" a + b\n", " 7 + (\n"], answer=0,
                 text=TEXT, )] + [dict(context="import o", choices=["s\n", "((\n"], answer=0, text=TEXT[:30])]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, yaml in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.format(data=data))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "bdiff.lm_eval", "--model", "bdiff", "--model_args",
         f"pretrained={model_dir},mc_samples=2", "--device", "cpu", "--tasks", ",".join(TASKS), "--include_path",
         str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples", "--batch_size", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bdiff_mc" in result.stdout and "bits_per_byte" in result.stdout, result.stdout
    results = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files]
    samples = [json.loads(line) for path in results if "samples_bdiff_gen" in path for line in open(path)]
    assert len(samples) == len(docs)
    for sample in samples:
        text = sample["resps"][0][0]
        assert "(" not in text and " " not in text, f"generation must stop before its stop strings: {text!r}"


def test_missing_lm_eval_fails_in_one_line(monkeypatch, capsys):
    import bdiff.lm_eval as module

    monkeypatch.setattr(module, "register_model", None)
    assert module.main(["--tasks", "x"]) == 2
    assert capsys.readouterr().err == 'error: python -m bdiff.lm_eval needs lm-eval: pip install -e ".[eval]"\n'


def test_bfloat16_scores_near_float32(model_dir):
    """The GPU's default dtype on the CPU: the same draws score within bf16's rounding of the float32 scores."""
    pair = requests(("def add(a, b):", "\n    return a + b\n"))
    exact = BdiffLM(model_dir, mc_samples=2, device="cpu", dtype="float32").loglikelihood(pair)[0][0]
    half = BdiffLM(model_dir, mc_samples=2, device="cpu", dtype="bfloat16").loglikelihood(pair)[0][0]
    assert half == pytest.approx(exact, rel=0.03), "bf16 activations, fp32 loss accumulation: ~1% apart"
