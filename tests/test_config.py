"""Typed configuration (bdiff/config.py): every field is a flag, a bad value is refused naming its field, the
presets are valid, devices are checked before anything runs, and a run knows its code version."""
import argparse
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from bdiff.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
    add_flags,
    apply_flags,
    code_version,
    get_preset,
    parse_device,
)


def test_every_field_is_a_flag_and_only_given_flags_apply():
    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig)
    add_flags(parser, ModelConfig)
    args = parser.parse_args(["--steps", "7", "--adam_betas", "0.9", "0.99", "--block_size", "8"])
    train, model = TrainConfig(), ModelConfig()
    apply_flags(args, train)
    apply_flags(args, model)
    assert (train.steps, train.adam_betas, model.block_size) == (7, (0.9, 0.99), 8)
    assert train.seq_len == TrainConfig().seq_len, "a flag not given leaves its field as it was"
    switches = parser.parse_args(["--noise_stratified"])
    apply_flags(switches, train)
    assert train.noise_stratified, "a boolean field that defaults to False is switched on by --<name>"
    sampling = argparse.ArgumentParser()
    add_flags(sampling, SamplingConfig)
    config = SamplingConfig()
    apply_flags(sampling.parse_args(["--no_cache"]), config)
    assert config.cache is False, "... and one that defaults to True is switched off by --no_<name>"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid(preset):
    """Each preset validates, its model fits its built-in data set (`adapt` has none: its data are prepared with the
    model's tokenizer), and only `record` keeps the seed's layout."""
    from bdiff.data import DATASETS, check_model_fits_data

    cfg = get_preset(preset)
    cfg.validate()
    model = cfg.model
    if preset != "adapt":
        check_model_fits_data(DATASETS[cfg.train.data], model.vocab_size, model.bos_id, model.mask_id)
    assert model.separator == ("opens" if preset == "record" else "closes"), f"{preset}: separator {model.separator}"


@pytest.mark.parametrize("section,field,value,words", [
    ("model", "num_layers", 3, "num_layers must be even"),
    ("model", "head_dim", 30, "head_dim must be a multiple of 4"),
    ("model", "mask_id", 300, "mask_id must lie in"),
    ("train", "steps", 0, "steps must be >= 1"),
    ("train", "noise_low", 0.9, "noise_low <= noise_high"),
    ("train", "muon_schedule", "cubic", "muon_schedule must be"),
])
def test_a_bad_value_is_refused_naming_its_field(section, field, value, words):
    cfg = get_preset("tiny")
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=re.escape(words)):
        cfg.validate()
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_devices_are_checked_in_one_line():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device name"):
        parse_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here"):
            parse_device("cuda")


def test_a_run_records_its_code_version():
    code = code_version()  # this checkout is a git repository
    assert re.fullmatch(r"[0-9a-f]{40}", code["commit"]) and isinstance(code["dirty"], bool), code
    assert dataclasses.asdict(get_preset("tiny"))["code"] == {}, "filled in by train.py, not by the preset"


def test_help_says_what_each_flag_means_and_its_default_in_the_preset():
    """train.py --help: every field's comment and its value in the chosen preset (the demo's by default); sample.py
    --help likewise for the sampling fields."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def help_of(*args):
        result = subprocess.run([sys.executable, *args, "--help"], cwd=root, capture_output=True, text=True,
                                timeout=120, env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 0, result.stderr
        return result.stdout

    demo, record = help_of("train.py"), help_of("train.py", "--preset", "record")
    line = re.compile(r"--seq_len SEQ_LEN\s+tokens per micro-step per rank \(one packed sequence\) \(default: (\d+)\)")
    assert line.search(demo).group(1) == "512" and line.search(record).group(1) == "16384"
    assert re.search(r"--separator SEPARATOR\s+Where the document separator \(BOS\) sits", demo), "a comment above"
    assert "--noise_stratified" in demo and "(default: off)" in demo
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n  (?=--)", demo.split("training (the")[1])}
    for f in dataclasses.fields(TrainConfig):
        entry = entries.get(f"--{f.name}") or entries.get(f"--no_{f.name}") or ""
        assert len(entry.split("(default: ")[0].split()) > 2 and "(default: " in entry, f"--{f.name}: {entry!r}"
    assert "temperature; 0 is greedy (default: 0.8)" in help_of("sample.py")
