"""Tokenizers (bdiff/data/tokenizer.py): bytes round-trip, a tokenizer.json built here, and what cannot load fails
in one line naming what to install or pass."""
import sys

import pytest

from bdiff.data.tokenizer import TokenizerError, decode, encode, load_tokenizer


def test_byte_text_round_trip():
    tokens = encode("héllo\n", "bytes", 256)
    assert tokens[0] == 256 and decode(tokens + [257, 300], "bytes") == "héllo\n", "BOS, MASK, non-bytes dropped"


def test_a_tokenizer_json_finds_its_end_of_text_as_bos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"hello": 0, "world": 1, "[UNK]": 2, "</s>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "t.json"))
    loaded = load_tokenizer(str(tmp_path / "t.json"))
    assert (loaded.bos_id, loaded.num_ids) == (3, 4), "</s> separates documents; no new id is needed"
    assert encode("hello world", str(tmp_path / "t.json"), 3) == [3, 0, 1]
    assert decode([3, 0, 1, 4, 99], str(tmp_path / "t.json")) == "hello world", "BOS and ids past it dropped"


def test_what_cannot_load_fails_in_one_line(monkeypatch):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer("missing/tokenizer.json")
    load_tokenizer.cache_clear()
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` raises ImportError
    with pytest.raises(TokenizerError, match="pip install tiktoken"):
        load_tokenizer("cl100k_base")
