"""Where a kernel's tiles come from (kernels/tiles.py): the committed table on the GPUs it knows, nothing timed there;
on others a one-time autotune whose answer the disk cache keeps, so the second run starts at once."""
import json
import os

import pytest

from bdiff.kernels import tiles

KEY = tiles.shape_class("forward", "bfloat16", 128, 16384)
SPACE = [dict(BM=128, BN=64), dict(BM=64, BN=32), dict(BM=64, BN=64)]  # the default first


@pytest.fixture
def table(monkeypatch, tmp_path):
    """A committed table of our own (sm_90 measured for one size class, sm_80 known but empty) and an empty cache."""
    monkeypatch.setenv("BDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BDIFF_AUTOTUNE", raising=False)
    monkeypatch.setattr(tiles, "_CHOSEN", {})
    entries = {"sm_90": {KEY: dict(BM=64, BN=64, measured=dict(gpu="NVIDIA H200", ms={"300": 0.2}))}, "sm_80": {}}
    (tmp_path / "test_op_tiles.json").write_text(json.dumps({"archs": entries}))
    monkeypatch.setattr(tiles, "TABLE_DIR", str(tmp_path))
    tiles.table.cache_clear()
    yield entries
    tiles.table.cache_clear()


def timer(times):
    """A fake time_ms: the configurations' times by BN, and a record of what was timed."""
    timed = []

    def time_ms(cfg):
        timed.append(cfg)
        if times[cfg["BN"]] is None:
            raise RuntimeError("out of shared memory")
        return times[cfg["BN"]]
    return time_ms, timed


def test_shape_class_rounds_L_up_to_a_power_of_two():
    assert tiles.shape_class("dq", "float32-ieee", 64, 16384) == "dq float32-ieee D=64 L<=16384"
    assert tiles.shape_class("dq", "bfloat16", 64, 16385) == "dq bfloat16 D=64 L<=32768"
    assert tiles.shape_class("dq", "bfloat16", 64, 512) == "dq bfloat16 D=64 L<=512"


def test_a_known_gpu_takes_the_table_and_times_nothing(table):
    time_ms, timed = timer({64: 1.0, 32: 1.0})
    assert tiles.choose("test_op", 90, KEY, SPACE, time_ms) == dict(BM=64, BN=64), "the entry, without its record"
    other_size = tiles.shape_class("forward", "bfloat16", 128, 4096)
    tiles._CHOSEN.clear()
    assert tiles.choose("test_op", 90, other_size, SPACE, time_ms) == dict(BM=64, BN=64), "the nearest size class"
    assert tiles.choose("test_op", 80, KEY, SPACE, time_ms) == SPACE[0], "a known GPU without an entry: the default"
    assert not timed, "nothing is timed on a GPU the table knows"
    assert "measured on NVIDIA H200" in tiles.lookup("test_op", 90, KEY)[1]


def test_an_unknown_gpu_autotunes_once_then_reads_the_cache(table):
    time_ms, timed = timer({64: 2.0, 32: 1.5})
    assert tiles.choose("test_op", 89, KEY, SPACE, time_ms) == dict(BM=64, BN=32), "the fastest of the space"
    assert len(timed) == 3
    tiles._CHOSEN.clear()  # a second run: a fresh process
    time_ms, timed = timer({64: 1.0, 32: 9.0})
    assert tiles.choose("test_op", 89, KEY, SPACE, time_ms) == dict(BM=64, BN=32), "the cache's answer"
    assert not timed, "the second run starts at once"
    assert "tile cache" in tiles.lookup("test_op", 89, KEY)[1]


def test_a_configuration_that_fails_never_wins(table, capsys):
    time_ms, timed = timer({64: None, 32: 3.0})
    assert tiles.choose("test_op", 86, KEY, SPACE, time_ms) == dict(BM=64, BN=32)
    assert "does not run here" in capsys.readouterr().err


def test_autotune_off_takes_the_default_and_writes_nothing(table, monkeypatch):
    monkeypatch.setenv("BDIFF_AUTOTUNE", "0")
    time_ms, timed = timer({64: 2.0, 32: 1.0})
    assert tiles.choose("test_op", 89, KEY, SPACE, time_ms) == SPACE[0]
    assert not timed and not os.path.exists(tiles.cache_path())


def test_a_damaged_cache_costs_one_autotune(table, capsys):
    path = tiles.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{not json")
    time_ms, timed = timer({64: 2.0, 32: 1.0})
    assert tiles.choose("test_op", 89, KEY, SPACE, time_ms) == dict(BM=64, BN=32)
    assert "ignoring the tile cache" in capsys.readouterr().err
    with open(path) as f:
        assert json.load(f)["test_op"]["sm_89"][KEY] == dict(BM=64, BN=32), "rewritten whole"
