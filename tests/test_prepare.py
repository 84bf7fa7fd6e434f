"""Your own text as a data set (bdiff/data/prepare.py, `python -m bdiff.data prepare`), offline: a folder of text files
prepared with bytes and with a BPE tokenizer built here, trained on and sampled from; a tokenizer past 65,536 ids
stored as uint32 and read back; version-1 shards still read; a stopped prepare resumed gives the same bytes; bad
input fails in one line with nothing left under the final name. Reference: the tokenizer's own encoding of the
documents, BOS before each."""
import filecmp
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

import train
from bdiff import data
from bdiff.data import prepare
from bdiff.data.tokenizer import decode, encode, load_tokenizer
from bdiff.generation.sampling import generate

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references

WORDS = ["def", "return", "class", "self", "value", "print", "import", "for", "in", "range", "if", "else", "list"]


@pytest.fixture
def corpus(tmp_path):
    """A folder of 40 small text files (a random program-like text each) and a hidden file that is skipped."""
    rng = random.Random(0)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(40):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(5, 30))]
        (folder / ("sub" if i % 3 else "") / f"file{i:02d}.txt").write_text("\n".join(lines) + "\n")
    (folder / ".hidden").write_bytes(b"\0binary")
    return folder


def bpe_tokenizer(folder, path, vocab_size=300):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    tok.train([str(p) for p in sorted(folder.rglob("*.txt"))], trainer)
    tok.save(str(path))
    return str(path)


def shard_tokens(directory, name, split):
    return np.concatenate([data.read_shard(p) for p in data.shard_files(name, str(directory), split)])


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_prepare_train_and_sample(corpus, tmp_path, kind):
    spec = "bytes" if kind == "bytes" else bpe_tokenizer(corpus, tmp_path / "tok.json")
    out = tmp_path / "mine"
    record = prepare.prepare(str(corpus), spec, str(out), val_fraction=0.1, shard_tokens=2000, jobs=2,
                             progress=False, log=lambda *_: None)
    tok = load_tokenizer(spec)
    assert record.bos_id == tok.bos_id and record.mask_id == record.num_ids == tok.num_ids
    manifest = json.loads((out / data.MANIFEST).read_text())
    assert manifest["train"]["documents"] + manifest["val"]["documents"] == 40, "the hidden file is no document"
    assert manifest["val"]["documents"] == 4, "every 10th document is held out, whole, from the first"
    files = sorted(p for p in corpus.rglob("*.txt"))
    want = np.concatenate([[tok.bos_id] + tok.encode(p.read_text()) for i, p in enumerate(files) if i % 10])
    np.testing.assert_array_equal(shard_tokens(out, "mine", "train"), want)
    assert len(data.shard_files("mine", str(out), "train")) > 1, "shards are written as they fill"
    assert not os.path.exists(str(out) + ".partial")
    # Train on it: the model's vocabulary, BOS and MASK follow the data set.
    model = train.main(["--device", "cpu", "--preset", "tiny", "--steps", "3", "--data_dir", str(out), "--out_dir",
                        str(tmp_path / "logs"), "--run_name", kind, "--seq_len", "64", "--val_tokens", "256",
                        "--val_seq_len", "64"])
    assert (model.cfg.bos_id, model.cfg.mask_id) == (tok.bos_id, tok.num_ids)
    assert model.cfg.vocab_size == tok.num_ids + 1
    config = json.loads((tmp_path / "logs" / kind / "model" / "config.json").read_text())
    assert config["dataset"]["name"] == "mine" and config["tokenizer"] == ("bytes" if kind == "bytes" else
                                                                           "tokenizer.json")
    if kind == "bpe":
        assert (tmp_path / "logs" / kind / "model" / "tokenizer.json").exists(), "the model carries its tokenizer"
    out_ids = generate(model.eval(), [encode("def value", spec, model.cfg.bos_id)], max_new_tokens=8).tokens[0]
    assert isinstance(decode(out_ids, spec), str)


def test_the_defaults_hold_out_a_document_of_a_small_folder(corpus, tmp_path):
    """40 files with the default --val_fraction (0.01): the first document is held out, the 39 others train."""
    assert data.main(["prepare", str(corpus), "--tokenizer", "bytes", "--out", str(tmp_path / "d"), "--jobs", "1"]) == 0
    manifest = json.loads((tmp_path / "d" / data.MANIFEST).read_text())
    assert (manifest["val"]["documents"], manifest["train"]["documents"]) == (1, 39)
    two = tmp_path / "two"
    two.mkdir()
    for i in range(2):
        (two / f"{i}.txt").write_text(f"document {i}\n")
    assert data.main(["prepare", str(two), "--tokenizer", "bytes", "--out", str(tmp_path / "d2"), "--jobs", "1"]) == 0


def test_uint32_shards_round_trip(tmp_path):
    """A word-level tokenizer of 70,000 ids (past uint16): version-2 shards of uint32, read back by the loader."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"], vocab["<|endoftext|>"] = 70_000, 70_001
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, 70_000, 50)) for _ in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    prepare.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "big.json"), str(tmp_path / "big"), val_tokens=51,
                    progress=False, jobs=1, log=lambda *_: None)
    assert json.loads((tmp_path / "big" / data.MANIFEST).read_text())["token_bytes"] == 4
    train_ids = shard_tokens(tmp_path / "big", "big", "train")
    assert train_ids.dtype == np.uint32 and train_ids.max() >= 2**16
    want = np.concatenate([[70_001] + [int(w[1:]) for w in t.split()] for t in lines[1:]])
    np.testing.assert_array_equal(train_ids, want)
    loader = data.DistributedLoader(data.shard_files("big", str(tmp_path / "big"), "train"), 100)
    np.testing.assert_array_equal(loader.next().numpy(), want[:100])


def test_version_1_and_2_shards_read(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, 1000)
    data.write_shard(str(tmp_path / "v1.bin"), tokens)
    data.write_shard(str(tmp_path / "v2.bin"), tokens, token_bytes=2)
    header = np.fromfile(tmp_path / "v1.bin", dtype=np.int32, count=4)
    assert header[1] == 1, "built-in data sets keep writing version 1"
    for name in ("v1.bin", "v2.bin"):
        np.testing.assert_array_equal(data.read_shard(str(tmp_path / name)), tokens)
    with pytest.raises(data.DataError, match="tokens must lie in"):
        data.write_shard(str(tmp_path / "no.bin"), [2**16])


def test_a_stopped_prepare_resumes_to_the_same_bytes(corpus, tmp_path, monkeypatch):
    kwargs = dict(name="mine", val_fraction=0.1, shard_tokens=1500, jobs=1, progress=False, log=lambda *_: None)
    prepare.prepare(str(corpus), "bytes", str(tmp_path / "straight"), **kwargs)
    write, written = data.write_shard, []

    def crash_after_three(path, tokens, token_bytes=None):
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a run
        written.append(path)
        write(path, tokens, token_bytes)

    monkeypatch.setattr(prepare, "write_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(str(corpus), "bytes", str(tmp_path / "stopped"), **kwargs)
    assert not (tmp_path / "stopped").exists(), "nothing under the final name before the end"
    monkeypatch.setattr(prepare, "write_shard", write)
    kept = {p: os.path.getmtime(p) for p in written}
    logs = []
    prepare.prepare(str(corpus), "bytes", str(tmp_path / "stopped"), **dict(kwargs, log=logs.append))
    assert any("resuming" in line for line in logs), logs
    moved = {p.replace("stopped.partial", "stopped"): t for p, t in kept.items()}
    assert all(os.path.getmtime(p) == t for p, t in moved.items()), "the shards written before are kept"
    names = sorted(f for f in os.listdir(tmp_path / "straight") if f.endswith(".bin"))
    assert names == sorted(f for f in os.listdir(tmp_path / "stopped") if f.endswith(".bin"))
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "straight", tmp_path / "stopped", names, shallow=False)
    assert not mismatch and not errors, f"resumed shards differ: {mismatch}"


@pytest.mark.parametrize("case", ["missing", "empty folder", "not text", "unknown tokenizer", "out exists",
                                  "validation larger than the data", "bad jsonl", "Hub dataset, no datasets"])
def test_bad_input_fails_in_one_line(corpus, tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "out"
    args = [str(corpus), "--tokenizer", "bytes", "--out", str(out)]
    words = []
    if case == "missing":
        args[0], words = str(tmp_path / "nothing"), ["no such file or folder"]
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        args[0], words = str(tmp_path / "empty"), ["no files to read"]
    elif case == "not text":
        (corpus / "image.png").write_bytes(b"\x89PNG\0\0\0")
        words = ["image.png", "not a text file"]
    elif case == "unknown tokenizer":
        args[2], words = "no-such-tokenizer.json", ["unknown tokenizer", "no-such-tokenizer.json"]
    elif case == "out exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        words = ["exists and holds other data"]
    elif case == "validation larger than the data":
        (tmp_path / "one.txt").write_text("a single document")
        args[0], words = str(tmp_path / "one.txt"), ["too few", "--doc_sep"]
    elif case == "Hub dataset, no datasets":
        monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
        args[0], words = "someone/corpus", ["someone/corpus", "pip install datasets"]
    else:
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
        args[0], words = str(tmp_path / "bad.jsonl"), ["bad.jsonl:2", "'text'"]
    assert data.main(["prepare", *args, "--jobs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and all(w in err[0] for w in words), err
    if case == "out exists":
        assert (out / "mine.txt").read_text() == "keep me"
    else:
        assert not out.exists(), "nothing is left under the final name"
        assert not os.path.exists(f"{out}.partial"), "a run that wrote no shard leaves nothing to resume"


def test_a_model_that_does_not_fit_the_data_is_refused(corpus, tmp_path):
    spec = bpe_tokenizer(corpus, tmp_path / "tok.json")
    prepare.prepare(str(corpus), spec, str(tmp_path / "mine"), progress=False, jobs=1, log=lambda *_: None,
                    val_fraction=0.1)
    fits = f"--vocab_size {load_tokenizer(spec).num_ids + 1} --bos_id 0"  # <|endoftext|> is the BPE's id 0
    with pytest.raises(data.DataError, match=f"does not fit the model.*{fits}"):
        train.main(["--device", "cpu", "--preset", "tiny", "--data_dir", str(tmp_path / "mine"), "--vocab_size",
                    "258", "--bos_id", "256", "--mask_id", "257", "--out_dir", str(tmp_path / "logs")])


def test_prepared_data_is_found_by_name(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare.prepare(str(corpus), "bytes", "data/mine", val_fraction=0.1, jobs=1, progress=False, log=lambda *_: None)
    found, directory = data.find_dataset("mine")
    assert found.name == "mine" and directory == os.path.join("data", "mine")
    with pytest.raises(data.DataError, match="unknown data set 'nope'"):
        data.find_dataset("nope")
    assert torch.equal(torch.tensor(data.read_shard(data.shard_files("mine", directory, "val")[0])[:1]),
                       torch.tensor([256], dtype=torch.uint16)), "documents open with BOS"
