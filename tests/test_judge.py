"""Judges of samples (bdiff/generation/judge.py): a block-size-1 bdiff model is an autoregressive model (reference: the
same model run token by token under a causal mask), Gen PPL of text is exp of the judge's loss on it, a Hugging Face
judge scores as its own logits say, and judges that cannot read the model's text are refused in one line."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bdiff.config import tiny
from bdiff.generation.judge import BdiffJudge, JudgeError, gen_ppl, load_judge, token_entropy
from bdiff.models.nano import BlockDiffusionLM
from bdiff.models.objective import document_layout

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references


def judge_model(gen, separator="closes"):
    cfg = tiny().model
    cfg.block_size, cfg.separator = 1, separator
    model = BlockDiffusionLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)  # random weights everywhere, the head too
    return model.eval()


def autoregressive_nll(model, ids: list[int]) -> torch.Tensor:
    """The reference: token i predicted from tokens 0..i-1 and a MASK at position i, by the model's layers under a
    plain causal mask, one forward pass per token."""
    out = []
    for i in range(len(ids)):
        tokens = torch.tensor(ids[:i] + [model.cfg.mask_id])

        def causal(layer, q, k, v):
            return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                  is_causal=True).transpose(0, 1)

        logits = model.logits(model.run_layers(tokens, torch.arange(i + 1), causal))[-1]
        out.append(F.cross_entropy(logits, torch.tensor(ids[i])))
    return torch.stack(out)


@pytest.mark.parametrize("separator", ["closes", "opens"])
def test_block_size_one_is_autoregressive(gen, separator):
    model = judge_model(gen, separator)
    ids = torch.randint(0, 256, (23,), generator=gen).tolist()
    judge = BdiffJudge(model, "bytes")
    got = judge.document_nll(ids)
    want = autoregressive_nll(model, [256] + ids)[1:] if separator == "opens" else autoregressive_nll(model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"the judge's NLL must be the autoregressive NLL: {m}")


def test_gen_ppl_of_text_is_exp_of_the_judge_loss(gen):
    """Gen PPL of a document under the judge = exp(the judge's block-diffusion loss on it with every token masked)."""
    model = judge_model(gen)
    ids = torch.randint(0, 256, (40,), generator=gen).tolist() + [256]  # one document, closed by the separator
    tokens = torch.tensor(ids)
    loss = model(tokens, noise_range=(1.0, 1.0), layout=document_layout(tokens, 256, 1, 0, "closes"))
    got = gen_ppl(BdiffJudge(model, "bytes"), [ids[:8]], [ids[8:]])
    nll = BdiffJudge(model, "bytes").document_nll(ids)
    loss = float(loss) * (1 + 1e-3)  # every token masked at t = 1 weighs 1/(t + 1e-3) in the objective
    assert math.isclose(float(nll.mean()), loss, rel_tol=1e-5), "per-token NLL averages to the loss"
    assert math.isclose(got, math.exp(float(nll[8:].mean())), rel_tol=1e-5), "Gen PPL scores the sample only"


def test_a_judge_must_be_autoregressive_and_read_the_same_tokens(gen, tmp_path):
    with pytest.raises(JudgeError, match="block size is 16.*--block_size 1"):
        BdiffJudge(BlockDiffusionLM(tiny().model), "bytes")
    model = judge_model(gen)
    config = {**tiny().to_dict(), "model": dataclasses.asdict(model.cfg)}
    torch.save({"model": model.state_dict(), "config": config, "step": 0}, tmp_path / "judge.pt")
    assert load_judge(str(tmp_path / "judge.pt"), tokenizer="bytes").tokenizer == "bytes"
    with pytest.raises(JudgeError, match="share the model's tokenizer"):
        load_judge(str(tmp_path / "judge.pt"), tokenizer="gpt2")


def test_hugging_face_judge(gen, tmp_path):
    """A tiny GPT-2 built here: the judge scores each token from the logits of the position before it, after
    <|endoftext|> as GPT-2 reads the start of a text."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-tiny")
    judge = load_judge(f"hf:{tmp_path / 'gpt2-tiny'}", tokenizer="gpt2")
    ids = torch.randint(0, 50257, (12,), generator=gen).tolist()
    logits = judge.model(torch.tensor([[50256] + ids])).logits[0, :-1]
    torch.testing.assert_close(judge.document_nll(ids), F.cross_entropy(logits, torch.tensor(ids), reduction="none"))
    with pytest.raises(JudgeError, match="share the model's tokenizer"):
        load_judge(f"hf:{tmp_path / 'gpt2-tiny'}", tokenizer="bytes")
    with pytest.raises(JudgeError, match="cannot load"):
        load_judge(f"hf:{tmp_path / 'none'}")


def test_token_entropy():
    assert token_entropy([7] * 50) == 0.0, "a repeated token has no entropy"
    assert math.isclose(token_entropy([1, 2, 3, 4] * 8), math.log(4), rel_tol=1e-6), "4 equally frequent: ln 4"


def test_known_word_fraction(tmp_path):
    from bdiff.data.formats import write_shard
    from bdiff.generation.judge import corpus_words, known_word_fraction

    write_shard(str(tmp_path / "train_000.bin"), list(b"def main():\n    return value_1 + other\n"))
    words = corpus_words([str(tmp_path / "train_000.bin")], "bytes")
    assert words == {"def", "main", "return", "value_1", "other"}
    assert known_word_fraction("def main(): return 2", words) == 0.75, "3 of 4 words: '2' is not in the corpus"
    assert known_word_fraction("  ()  ", words) is None, "no words, no fraction"
