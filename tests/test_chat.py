"""Conversations (bdiff/data/chat.py, prepare's conversations path, the answers in the loss, python -m bdiff.chat): bad
lines fail in one line, answers are exactly the assistants' tokens padded to their blocks, the loss counts answers
only (reference: the objective written out with full logits), the sampler never changes a prompt token, and a
small model learns an instruction task and answers held-out questions through the chat command."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train
from bdiff.data.chat import END_OF_TURN, Renderer
from bdiff.data.prepare import prepare
from bdiff.generation import sampling
from bdiff.models.nano import BlockDiffusionLM
from bdiff.models.objective import document_layout, loss_weights, noise_blocks
from helpers import user_env

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def upper_task(rng: random.Random, count: int) -> list[dict]:
    """The test's instruction: a word, then the same word in capitals."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(count)]
    return [{"prompt": f"upper: {w}", "response": w.upper()} for w in words]


@pytest.mark.parametrize("line,words", [
    ("{not json", "not JSON"),
    ({"text": "hello"}, 'expected "messages"'),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user"}]}, 'message 0 must be an object with "role" and "content"'),
])
def test_a_bad_line_fails_in_one_line_naming_it_and_nothing_is_written(tmp_path, line, words):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "response": "b"}] * 3 + [line])
    result = subprocess.run([sys.executable, "-m", "bdiff.data", "prepare", path, "--tokenizer", "bytes", "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}:4: ") and words in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial"), "nothing written"


def test_answers_are_the_assistants_tokens_padded_to_their_blocks(tmp_path):
    """Plain template, bytes: the answer flags cover exactly each assistant's content and end of turn, then pads to
    the block's end; with alignment the prompt before is padded to a block boundary; the chat prompt is the
    conversation so far rendered the same way. Shards hold whole conversations in windows, the answers beside."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    for align in (False, True):
        r = Renderer("bytes", "plain", 8, align, pad_id=ord(" "))
        ids, flags = r.encode(messages)
        text = bytes(ids).decode()
        answers = "".join(c for c, f in zip(text, flags) if f)
        assert answers.replace(" ", "") == f"hello{END_OF_TURN}ciao{END_OF_TURN}", answers  # spaces: the pads'
        ends = [i + 1 for i in range(len(flags)) if flags[i] and (i + 1 == len(flags) or not flags[i + 1])]
        assert all(e % 8 == 0 for e in ends), "every answer ends at a block boundary"
        if align:
            starts = [i for i in range(len(flags)) if flags[i] and (i == 0 or not flags[i - 1])]
            assert all(s % 8 == 0 for s in starts), "every answer starts at a block boundary"
        prompt = r.prompt(messages[:4])
        assert prompt == ids[:len(prompt)], "asked as trained: the conversation's own prefix"
        assert flags[len(prompt)] and not flags[len(prompt) - 1], "the next token starts the answer"
        assert bytes(prompt).decode().rstrip().endswith("Assistant:")
    rows = [{"messages": messages}] * 30
    record = prepare(write_jsonl(tmp_path / "c.jsonl", rows), "bytes", str(tmp_path / "data"), seq_len=128,
                     block_size=8, log=lambda *_: None)
    assert (record.chat, record.packed, record.block_size, record.align_answers) == ("plain", 128, 8, True)
    from bdiff.data import DistributedLoader, shard_files

    loader = DistributedLoader(shard_files(record.name, str(tmp_path / "data"), "train"), 128, packed=128)
    tokens, answers = loader.next_with_answers()
    assert tokens[0] == ord("S") and answers is not None and answers.any(), "a window opens with a conversation"


def test_a_template_tokenizer_renders_and_flags_its_answers(tmp_path):
    """A tokenizer with a chat template (ChatML): the answers are the assistant's content and <|im_end|> and the
    newline after it, the end of turn is <|im_end|>, the prompt ends with the template's generation prompt."""
    pytest.importorskip("transformers")
    from helpers import tiny_tokenizer

    tiny_tokenizer(str(tmp_path / "tok"), chat=True)
    r = Renderer(str(tmp_path / "tok"), "template", 4, True, pad_id=1)
    assert r.end_of_turn == "<|im_end|>"
    messages = [{"role": "user", "content": "add 2 and 2"}, {"role": "assistant", "content": "4"}]
    ids, flags = r.encode(messages)
    answer = r.tok.decode([i for i, f in zip(ids, flags) if f and i != 1])
    assert answer.replace(" ", "") == "4<|im_end|>\n".replace(" ", ""), answer
    assert r.tok.decode(r.prompt(messages[:1])).rstrip(r.tok.decode([1])).endswith("<|im_start|>assistant\n")


def test_a_long_conversation_is_split_at_turns_and_the_count_said(tmp_path):
    turns = [m for i in range(12) for m in ({"role": "user", "content": f"question {i} " * 3},
                                            {"role": "assistant", "content": f"answer {i} " * 3})]
    rows = [{"messages": turns}] + [{"prompt": "short", "response": "yes"}] * 10 + [
        {"prompt": "x" * 400, "response": "too long"}]
    said = []
    prepare(write_jsonl(tmp_path / "c.jsonl", rows), "bytes", str(tmp_path / "data"), seq_len=256, block_size=16,
            log=said.append)
    assert said[0] == "2 conversation(s) longer than --seq_len 256 tokens: 1 split at turn boundaries, 1 truncated"


def test_the_loss_counts_answers_only(gen):
    """With answer flags the prompt is never noised and carries no loss, and the loss is normalised over answer
    tokens; reference: full logits, cross-entropy on masked answer tokens times 1/t, over the answers' count."""
    cfg = train.get_preset("tiny").model
    torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=gen)))
    model = BlockDiffusionLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    L = 96
    tokens = torch.randint(0, 256, (L,), generator=gen)
    tokens[[40, 95]] = cfg.bos_id
    answers = torch.zeros(L, dtype=torch.bool)
    answers[20:40] = answers[70:90] = True
    layout = document_layout(tokens, cfg.bos_id, cfg.block_size, 0, cfg.separator)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    loss = model(tokens, noise_range=(0.3, 0.8), generator=torch.Generator().manual_seed(seed), layout=layout,
                 answers=answers)
    x_t, masked, t = noise_blocks(tokens, layout.blocks, cfg.mask_id, 0.3, 0.8,
                                  generator=torch.Generator().manual_seed(seed), num_blocks=layout.num_blocks)
    masked &= answers
    x_t = torch.where(masked, cfg.mask_id, tokens)
    assert (x_t[~answers] == tokens[~answers]).all(), "the prompt is never noised"
    logits = model.logits(model.hidden_states(torch.cat([x_t, tokens]), layout.positions, layout.cu_seqlens)[:L])
    want = (F.cross_entropy(logits, tokens, reduction="none") * loss_weights(masked, t)).sum() / answers.sum()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", sampling.STRATEGIES)
def test_the_sampler_never_changes_a_known_token(gen, strategy):
    """Whatever the logits, a step reveals masked positions only: a prompt's tokens in its last block stay."""
    masked = torch.rand(4, 16, generator=gen) < 0.5
    masked[:, 0] = True
    logits = torch.randn(4, 16, 50, generator=gen) * 5
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    for steps_left in (1, 3, 16):
        _, reveal = sampling._choose(logits, masked, steps_left, strategy, 0.5, 1.0, 0.9, gens)
        assert not (reveal & ~masked).any(), f"{strategy}: a known token was rewritten"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The demo model trained by train.py on the instruction task: 3,000 conversations, plain template, bytes."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    path = write_jsonl(root / "train.jsonl", upper_task(rng, 3000))
    prepare(path, "bytes", str(root / "data"), seq_len=256, block_size=16, log=lambda *_: None)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        train.main(["--device", "cpu", "--data_dir", str(root / "data"), "--steps", "250", "--val_every", "0",
                    "--out_dir", str(root), "--run_name", "chat"])
    return str(root / "chat" / "model")


def test_a_small_model_learns_an_instruction_task_and_answers_through_the_chat_command(chat_model):
    """Held-out words (none in training), one question a line through `python -m bdiff.chat`: one answer a line,
    at least 18 of 20 exactly right; `sample.py --chat` answers one."""
    rng = random.Random(123)
    questions = [row["prompt"] for row in upper_task(rng, 20)]
    env = user_env()
    result = subprocess.run([sys.executable, "-m", "bdiff.chat", "--device", "cpu", "--model", chat_model],
                            input="\n".join(questions) + "\n", cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = result.stdout.rstrip("\n").split("\n")  # one line an answer (an untrained one may hold \x1e and co)
    assert len(answers) == len(questions), result.stdout
    right = sum(a == q.split(": ")[1].upper() for q, a in zip(questions, answers))
    assert right >= 18, list(zip(questions, answers))
    one = subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--ckpt", chat_model, "--chat",
                          "upper: kiwi"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and one.stdout.strip() == "KIWI", one.stdout + one.stderr[-1000:]


def test_an_adapted_model_trains_on_template_conversations(tmp_path):
    """The same path for a transformers model: a tiny Qwen3 with a ChatML tokenizer, conversations rendered by its
    template, a few steps of train.py --init, and the chat command's scripted answer."""
    pytest.importorskip("transformers")
    from helpers import tiny_causal_lm, tiny_tokenizer

    base = str(tmp_path / "base")
    size = tiny_tokenizer(base, chat=True)
    tiny_causal_lm(base, "qwen3", size, spare_rows=3)
    rows = upper_task(random.Random(1), 60)
    record = prepare(write_jsonl(tmp_path / "c.jsonl", rows), base, str(tmp_path / "data"), seq_len=128,
                     block_size=16, log=lambda *_: None)
    assert record.chat == "template" and record.end_of_turn == "<|im_end|>"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        model = train.main(["--device", "cpu", "--init", base, "--data_dir", str(tmp_path / "data"), "--steps", "4",
                            "--micro_steps", "1", "--out_dir", str(tmp_path), "--run_name", "a"])
    assert model.cfg.init == base
    env = user_env()
    result = subprocess.run([sys.executable, "-m", "bdiff.chat", "--device", "cpu", "--model",
                             str(tmp_path / "a" / "model"), "--max_new_tokens", "16"], input="upper: abc\n",
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count("\n") == 1, result.stderr[-2000:]


def test_conversation_data_fixes_the_sequence_length(tmp_path):
    """A conversation data set's windows are its sequences: another --seq_len is one error line naming both."""
    prepare(write_jsonl(tmp_path / "c.jsonl", upper_task(random.Random(2), 40)), "bytes", str(tmp_path / "data"),
            seq_len=128, block_size=16, log=lambda *_: None)
    with pytest.raises(train.ConfigError, match="--seq_len 256: .* windows of 128 tokens"):
        train.parse_args(["--device", "cpu", "--data_dir", str(tmp_path / "data"), "--seq_len", "256"])
