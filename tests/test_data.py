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


def unique_shards(tmp_path, sizes):
    files = []
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"s{i}.bin"))
        write_shard(files[-1], 10_000 * i + np.arange(n))  # every token unique
    return files


def read_steps(loaders, steps):
    """[(epoch, [rank r's sequence as a list, ...])] for `steps` steps of the loaders (one per rank)."""
    out = []
    for _ in range(steps):
        step = [ld.next().tolist() for ld in loaders]
        epochs = {ld.last_step[0][0] for ld in loaders}
        assert len(epochs) == 1 and all(ld.last_step == loaders[0].last_step for ld in loaders), "ranks disagree"
        out.append((epochs.pop(), step))
    return out


@pytest.mark.parametrize("world,seq_len", [(1, 64), (2, 50)])
def test_epochs_read_the_data_again_in_another_order(tmp_path, world, seq_len):
    """A run longer than its data: epoch 0 in file order, as without epochs; each later epoch reads every sequence it
    cuts at most once, in an order of its own, the same on every rank, with no token twice in a step."""
    files = unique_shards(tmp_path, [1000, 333, 700])
    first = [DistributedLoader(files, seq_len, r, world) for r in range(world)]
    loaders = [DistributedLoader(files, seq_len, r, world, seed=7, epochs=True) for r in range(world)]
    per_epoch = loaders[0].steps_per_epoch()
    steps = read_steps(loaders, 4 * per_epoch)
    assert [s for _, s in steps[:per_epoch]] == [s for _, s in read_steps(first, per_epoch)], "epoch 0: file order"
    by_epoch = {}
    for epoch, seqs in steps:
        by_epoch.setdefault(epoch, []).append(seqs)
        tokens = [t for seq in seqs for t in seq]
        assert len(tokens) == len(set(tokens)) == world * seq_len, "a token twice in one step"
    assert len(by_epoch) >= 4
    orders = []
    for epoch, epoch_steps in sorted(by_epoch.items())[1:-1]:  # whole later epochs
        starts = [seq[0] for seqs in epoch_steps for seq in seqs]
        assert len(starts) == len(set(starts)), f"epoch {epoch} read a sequence twice"
        orders.append(starts)
    assert orders[0] != orders[1], "each epoch has an order of its own"
    again = [DistributedLoader(files, seq_len, r, world, seed=7, epochs=True) for r in range(world)]
    assert read_steps(again, 4 * per_epoch) == steps, "the same seed, the same epochs"


def test_epochs_resume_mid_epoch_on_another_number_of_ranks(tmp_path):
    """The position after a step of epoch 2 on 2 ranks continues on 1 rank with the epoch's next sequences: nothing
    of the epoch read twice, nothing skipped."""
    files = unique_shards(tmp_path, [900, 500])
    two = [DistributedLoader(files, 40, r, 2, seed=1, epochs=True) for r in range(2)]
    while two[0].epoch < 2 or two[0].index < 6:
        read_steps(two, 1)
    state = two[0].state()
    rest_two = read_steps(two, 5)
    one = DistributedLoader(files, 40, 0, 1, seed=1, epochs=True)
    one.load_state(state)
    rest_one = read_steps([one], 10)
    assert [seq for _, seqs in rest_two for seq in seqs] == [seqs[0] for _, seqs in rest_one]
    assert {epoch for epoch, _ in rest_one} == {2}


def test_data_smaller_than_one_step_is_refused(tmp_path):
    files = unique_shards(tmp_path, [100, 120])
    with pytest.raises(DataError, match="hold no whole step of world size 2 x 64 tokens"):
        DistributedLoader(files, 64, 0, 2, epochs=True)


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
