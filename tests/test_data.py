"""Shards and the distributed loader: round trip, corrupt files, never a token twice, the embedded
corpus, and the FineWeb-Edu download path (against a stand-in for the hub)."""
import os

import numpy as np
import pytest

from bdiff import data
from bdiff.data import DataError, DistributedLoader, read_shard, write_shard


def test_round_trip(tmp_path, gen):
    tokens = np.random.default_rng(int(gen.seed() % 2**32)).integers(0, 2**16, size=1234)
    write_shard(str(tmp_path / "a.bin"), tokens)
    assert np.array_equal(read_shard(str(tmp_path / "a.bin")), tokens)


def corrupt(path, how):
    raw = bytearray(open(path, "rb").read())
    if how == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif how == "version":
        raw[4:8] = np.int32(7).tobytes()
    else:
        raw = raw[:-3]
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("how,match", [("magic", "bad magic"), ("version", "version"), ("truncated", "truncated")])
def test_corrupt_shard_names_file(tmp_path, how, match):
    path = str(tmp_path / "s.bin")
    write_shard(path, np.arange(100))
    corrupt(path, how)
    with pytest.raises(DataError, match=match) as e:
        read_shard(path)
    assert path in str(e.value), "the error must name the file"


def test_tiny_file_and_missing_file(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="short.bin"):
        read_shard(str(tmp_path / "short.bin"))
    with pytest.raises(DataError, match="missing.bin"):
        read_shard(str(tmp_path / "missing.bin"))


@pytest.mark.parametrize("world,seq_len", [(1, 64), (2, 50), (3, 17)])
def test_no_token_twice_across_ranks_and_steps(tmp_path, world, seq_len):
    files = []
    for i, n in enumerate([1000, 333, 700]):  # shard tails that do not hold a whole step
        files.append(str(tmp_path / f"s{i}.bin"))
        write_shard(files[-1], 10_000 * i + np.arange(n))  # every token unique
    loaders = [DistributedLoader(files, seq_len, r, world) for r in range(world)]
    seen = []
    with pytest.raises(DataError, match="out of data"):
        while True:
            step = [ld.next() for ld in loaders]
            seen += [tok for seq in step for tok in seq.tolist()]
    assert len(seen) == len(set(seen)), "a token was used twice"
    per_shard = [(n // (world * seq_len)) * world * seq_len for n in [1000, 333, 700]]
    assert len(seen) == sum(per_shard), "every whole step of every shard must be used"
    assert seen == sorted(seen), "tokens must come in file order"


def test_stdlib_corpus(tmp_path):
    data.build_stdlib_corpus(str(tmp_path))
    train = data.shard_files("stdlib", str(tmp_path), "train")
    val = data.shard_files("stdlib", str(tmp_path), "val")
    tokens, bos = read_shard(train[0]), data.DATASETS["stdlib"].bos_id
    assert len(tokens) > 1_000_000 and tokens.max() <= bos and tokens[0] == bos
    assert (tokens == bos).sum() > 100, "one document per source file"
    assert 2.0 < data.unigram_entropy(train, 258) < 5.0, "byte entropy of source code, in nats"
    assert bytes(read_shard(val[0])[1:40].astype(np.uint8)).isascii(), "real text"


def test_missing_shards_message(tmp_path):
    with pytest.raises(DataError, match="python -m bdiff.data finewebedu"):
        data.shard_files("finewebedu", str(tmp_path), "train")


def test_download_finewebedu_with_stand_in_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir):  # writes small shards instead of 200 MB ones
        calls.append((repo_id, filename, repo_type))
        path = os.path.join(local_dir, filename)
        os.makedirs(local_dir, exist_ok=True)
        write_shard(path, np.arange(64))
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    paths = data.download_finewebedu(2, str(tmp_path))
    assert [c[1] for c in calls] == ["finewebedu_val_000000.bin", "finewebedu_train_000001.bin",
                                     "finewebedu_train_000002.bin"]
    assert all(c[0] == data.FINEWEB_REPO and c[2] == "dataset" for c in calls)
    assert data.shard_files("finewebedu", str(tmp_path), "train") == sorted(paths[1:])

    def broken_download(repo_id, filename, repo_type, local_dir):
        os.makedirs(local_dir, exist_ok=True)
        path = os.path.join(local_dir, filename)
        open(path, "wb").write(b"<html>not a shard</html>")
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken_download)
    assert data.main(["finewebedu", "1", "--dir", str(tmp_path / "x")]) == 2, "a damaged download must fail"
    assert data.main(["finewebedu", "0", "--dir", str(tmp_path)]) == 2, "0 shards is refused"
