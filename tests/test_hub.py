"""bdiff/hub.py and bdiff/eval.py: a model saved as final.pt, as a model directory and through the Hub's cache
layout loads back to the same evaluation, to the last digit; the card and config say what a reader needs; push
refuses without a token and uploads through huggingface_hub's API (a local stand-in here: no network); damaged
or foreign weights fail in one line. Reference: the model in memory, evaluated by bdiff.eval.evaluate."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from bdiff import hub
from bdiff.config import get_preset
from bdiff.data import shard_files
from bdiff.eval import evaluate, validation_sequences
from bdiff.models.nano import BlockDiffusionLM
from bdiff.training import checkpoint
from helpers import user_env

pytestmark = pytest.mark.usefixtures("reference_ops")  # the CPU path: the PyTorch references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "someone/tiny-bdiff"


@pytest.fixture
def trained(stdlib_dir, tmp_path):
    """A tiny model with random weights everywhere (the head too: the loss then depends on every weight), its
    config dict, its run directory with final.pt and model/, and the stdlib validation sequences."""
    cfg = get_preset("tiny")
    cfg.train.data_dir = stdlib_dir
    torch.manual_seed(torch.seed() % 2**31)
    model = BlockDiffusionLM(cfg.model)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    run = tmp_path / "run"
    run.mkdir()
    config = cfg.to_dict()
    checkpoint.save_model(str(run / "final.pt"), model, config, step=7, val_loss=3.21)
    hub.save_pretrained(model, str(run / "model"), config, step=7, tokens=1792, val_loss=3.21)
    sequences = validation_sequences(shard_files("stdlib", stdlib_dir, "val"), 256, 1024, cfg.model)
    return model.eval(), config, run, sequences


def hub_cache(tmp_path, model_dir) -> str:
    """huggingface_hub's cache layout holding `model_dir` as the main revision of REPO: what a download leaves."""
    cache = tmp_path / "hf_cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return str(cache)


def test_every_saved_form_evaluates_like_the_model_in_memory(trained, tmp_path, monkeypatch):
    model, _, run, sequences = trained
    expected = evaluate(model, sequences, draws=2, levels=(0.25, 0.75))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", hub_cache(tmp_path, run / "model"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for name in (str(run / "final.pt"), str(run / "model"), str(run), REPO):
        loaded = BlockDiffusionLM.from_pretrained(name)
        config = loaded.run_config
        as_json = json.loads(json.dumps(trained[1]))  # config.json holds lists where the config has tuples
        assert json.loads(json.dumps({k: config[k] for k in ("model", "train")})) == \
            {k: as_json[k] for k in ("model", "train")}, name
        got = evaluate(loaded, sequences, draws=2, levels=(0.25, 0.75))
        assert got == expected, f"{name}: {got} != the model in memory's {expected}"
    assert BlockDiffusionLM.from_pretrained(REPO).state_dict().keys() == model.state_dict().keys()


def test_eval_and_sample_commands_take_a_hub_id_from_the_cache(trained, tmp_path):
    model, _, run, sequences = trained
    env = {**os.environ, "HF_HUB_CACHE": hub_cache(tmp_path, run / "model"), "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "bdiff.eval", "--device", "cpu", "--model", REPO, "--tokens",
                             "1024", "--seq_len",
                             "256", "--draws", "2", "--levels", "0.25,0.75"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = evaluate(model, sequences, draws=2, levels=(0.25, 0.75))
    assert f"t ~ U[0, 1]: {expected['loss']:.4f} ± {expected['stderr']:.4f}" in result.stdout, result.stdout
    assert f"  0.75  {expected['levels'][0.75]:.4f}" in result.stdout, result.stdout
    sample = subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--ckpt", REPO, "--prompt", "def ",
                             "--max_new_tokens", "16"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    made = re.search(r"--- (\d+) tokens in", sample.stdout)
    assert made and 1 <= int(made.group(1)) <= 16, f"16 tokens at most (fewer if the text ends): {sample.stdout}"


def test_the_card_and_config_say_what_a_reader_needs(trained):
    _, config, run, _ = trained
    meta = json.loads((run / "model" / hub.CONFIG).read_text())
    for key, value in (("tokenizer", "bytes"), ("block_size", 16), ("step", 7), ("tokens", 1792), ("val_loss", 3.21)):
        assert meta[key] == value, f"config.json {key}: {meta.get(key)} != {value}"
    kept = ("model", "train", "dataset", "code")  # the run's config ("hf" is an adapted model's)
    assert {k: meta[k] for k in kept} == json.loads(json.dumps({k: config[k] for k in kept})) and meta["bdiff_version"]
    hub.write_card(str(run / "model"), sample="def f(): pass", command="python train.py --preset tiny")
    hub.write_card(str(run / "model"))  # rewritten later (e.g. after the plot): keeps the sample and the command
    card = (run / "model" / hub.CARD).read_text()
    for needed in ("library_name: bdiff", "standard library", "Steps: 7, tokens: 1,792", "3.2100 nats",
                   "python train.py --preset tiny", "def f(): pass", "python -m bdiff.eval", "sample.py --ckpt"):
        assert needed in card, f"the model card lacks {needed!r}"


def test_push_refuses_without_a_token_in_one_line(trained, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "no_login")  # no token saved by `hf auth login` either
    result = subprocess.run([sys.executable, "-m", "bdiff.hub", "push", str(trained[2]), REPO], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no Hugging Face token" in lines[0], result.stderr


class StandInApi:
    """huggingface_hub.HfApi's two calls that push makes, writing into a local directory instead of the Hub."""

    def __init__(self, remote):
        self.remote, self.calls = remote, []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, os.path.join(self.remote, repo_id), dirs_exist_ok=True)


def test_push_uploads_the_model_directory(trained, tmp_path, monkeypatch):
    model, _, run, sequences = trained
    api = StandInApi(str(tmp_path / "remote"))
    assert hub.push(str(run), REPO, private=True, api=api) == f"https://huggingface.co/{REPO}"
    assert api.calls == [("create_repo", REPO, True, True), ("upload_folder", REPO)]
    uploaded = tmp_path / "remote" / REPO
    assert sorted(os.listdir(uploaded)) == sorted(os.listdir(run / "model"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", hub_cache(tmp_path, uploaded))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert evaluate(BlockDiffusionLM.from_pretrained(REPO), sequences) == evaluate(model, sequences)
    with pytest.raises(hub.HubError, match="user/name"):
        hub.push(str(run), "not a repo id", api=api)
    with pytest.raises(hub.HubError, match="not a model directory"):
        hub.push(str(run / "final.pt"), REPO, api=api)


def test_damaged_or_foreign_weights_fail_in_one_line(trained, tmp_path):
    _, _, run, _ = trained
    weights = run / "model" / hub.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[4] ^= 0xFF  # the header's length: no longer a safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(hub.HubError, match="not a readable safetensors file"):
        BlockDiffusionLM.from_pretrained(str(run / "model"))
    from safetensors.torch import save_file

    save_file({"transformer.wte.weight": torch.randn(4, 4)}, str(weights))  # another library's model
    with pytest.raises(hub.HubError, match="not this model's weights"):
        BlockDiffusionLM.from_pretrained(str(run / "model"))
    env = user_env()
    result = subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--ckpt", str(run / "model"),
                             "--prompt", "x"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not this model's weights" in lines[0], result.stderr
    with pytest.raises(hub.HubError, match="no such checkpoint file or directory"):
        BlockDiffusionLM.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(hub.HubError, match="not a model directory, run directory or Hub id"):
        BlockDiffusionLM.from_pretrained(str(run / "model" / hub.CARD))


def test_the_model_class_loads_saves_and_pushes_as_the_hub_mixin_does(trained, tmp_path, monkeypatch):
    """BlockDiffusionLM.from_pretrained / .save_pretrained / .push_to_hub, huggingface_hub's PyTorchModelHubMixin
    convention, over the one loader and the one writer: the same evaluation after each round trip."""
    model, config, run, sequences = trained
    expected = evaluate(model, sequences)
    loaded = BlockDiffusionLM.from_pretrained(str(run / "model"))
    assert evaluate(loaded, sequences) == expected and loaded.run_config["val_loss"] == 3.21
    again = BlockDiffusionLM.from_pretrained(loaded.save_pretrained(str(tmp_path / "again")))
    assert evaluate(again, sequences) == expected and again.run_config["train"] == loaded.run_config["train"]
    fresh = BlockDiffusionLM(get_preset("tiny").model)  # never trained: its model config alone
    assert BlockDiffusionLM.from_pretrained(fresh.save_pretrained(str(tmp_path / "fresh"))).cfg == fresh.cfg
    api = StandInApi(str(tmp_path / "remote"))
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: api)
    assert loaded.push_to_hub(REPO, token="hf_test") == f"https://huggingface.co/{REPO}"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", hub_cache(tmp_path, tmp_path / "remote" / REPO))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert evaluate(BlockDiffusionLM.from_pretrained(REPO), sequences) == expected


TRANSFORMERS_CHECK = r"""
import json, sys
sys.modules["bdiff"] = None  # `import bdiff` fails: the model must load without it
sys.modules["triton"] = None
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

where, cases = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(where, trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(where, trust_remote_code=True, dtype=torch.float32).eval()
out = {"model_type": config.model_type, "block_size": config.block_size, "logits": []}
with torch.no_grad():
    for x_t, x_0 in cases:
        out["logits"].append(model(torch.tensor([x_t]), clean_ids=torch.tensor([x_0])).logits[0].tolist())
    out["generated"] = model.generate(torch.tensor([cases[0][1][:5]]), max_new_tokens=20).tolist()
print(json.dumps(out))
"""


def test_transformers_loads_a_model_directory_without_bdiff(trained, tmp_path):
    """AutoConfig / AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True) in a process where bdiff and
    Triton cannot be imported: bdiff's logits to 1e-5 (float32) on packed sequences of several documents, one that
    starts inside a document and one that opens with BOS, and a generate() that writes tokens. Reference: bdiff's
    model on the same x_t ⊕ x_0 layout (document_layout, the seed's offset rule)."""
    from bdiff.models.objective import document_layout

    model, config, run, _ = trained
    directory = run / "model"
    assert json.loads((directory / hub.CONFIG).read_text())["auto_map"]["AutoModelForMaskedLM"] == \
        "modeling_bdiff.BdiffForMaskedLM"
    gen = torch.Generator().manual_seed(0)
    cases, want = [], []
    bos, mask = model.cfg.bos_id, model.cfg.mask_id
    for first in (65, bos):  # a fragment first (positions from 1), then a sequence that opens with BOS
        x0 = torch.randint(0, 256, (75,), generator=gen)
        x0[0], x0[[20, 51]] = first, bos
        x_t = torch.where(torch.rand(75, generator=gen) < 0.5, mask, x0)
        layout = document_layout(x0, bos, model.cfg.block_size, separator=model.cfg.separator)
        with torch.no_grad():
            h = model.hidden_states(torch.cat([x_t, x0]), layout.positions, layout.cu_seqlens)[:75]
            want.append(model.logits(h))
        cases.append((x_t.tolist(), x0.tolist()))
    env = user_env()
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", TRANSFORMERS_CHECK, str(directory), json.dumps(cases)],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["model_type"] == "bdiff" and out["block_size"] == model.cfg.block_size
    for got, w in zip(out["logits"], want):
        torch.testing.assert_close(torch.tensor(got), w, atol=1e-5, rtol=1e-5)
    generated = out["generated"][0]
    assert 1 <= len(generated) <= 20 and all(0 <= t < model.cfg.vocab_size and t != mask for t in generated)
