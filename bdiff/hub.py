"""Models in the format the Hugging Face ecosystem shares: a directory, or a Hub repository. A nano model's holds

    model.safetensors   the weights (safetensors: no code runs when it is read)
    config.json         {"bdiff_version", "tokenizer", "block_size", "model": ModelConfig, "train": TrainConfig,
                         "step", "tokens", "val_loss"}, and for transformers "model_type" and "auto_map"
    configuration_bdiff.py, modeling_bdiff.py, layout_bdiff.py
                        the model for transformers, PyTorch alone (bdiff/models/remote/):
                        AutoModelForMaskedLM.from_pretrained(dir or Hub id, trust_remote_code=True)
    README.md           the model card: data, tokens, final validation loss, the loss plot, a sample, and the
                        command that reproduces the run
    loss.png            the loss plot, where matplotlib was there to draw it

A model adapted from a causal LM (--init, bdiff/models/adapted.py) is the base model's directory as transformers
writes it (its config.json, with bdiff's run config under "bdiff" and an auto_map; model.safetensors), the base
family's block-diffusion class (modeling_bdiff_adapted.py, layout_bdiff.py: AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)), the tokenizer's files with MASK, the card and the plot.

train.py writes one at the end of every run (logs/RUN/model/). From the command line:

    python -m bdiff.hub push logs/RUN user/name       # upload a run's model directory (or any model directory)

From Python, huggingface_hub's mixin convention: `bdiff.models.from_pretrained("user/name")` (or a directory, a
run directory, a final.pt; the run's config is `model.run_config`), `model.save_pretrained(dir)`,
`model.push_to_hub("user/name")`: one loader (over `read_pretrained`) and one writer (`save_pretrained` here).
A Hub id is fetched through huggingface_hub's cache (HF_HUB_CACHE), so once fetched it loads offline
(HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import bdiff
from bdiff.config import ArgumentParser
from bdiff.data import DATASETS, default_prompt, tokenizer_of
from bdiff.errors import BdiffError, command
from bdiff.models import remote
from bdiff.training import checkpoint

WEIGHTS, CONFIG, CARD, PLOT = "model.safetensors", "config.json", "README.md", "loss.png"
SHARDED = "model.safetensors.index.json"  # transformers' index of a model saved in several files
TOKENIZER = "tokenizer.json"  # a prepared data set's tokenizer file, copied into the model directory
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # user/name, as the Hub spells repository ids


class HubError(BdiffError):
    """A model that cannot be saved, found, read or pushed; the message says which and why."""


def _atomic_write(path: str, write) -> None:
    """write(tmp_path), then rename over `path`: a failure never leaves half a file under the real name."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_pretrained(model, directory: str, config: dict, step: int | None = None, tokens: int | None = None,
                    val_loss: float | None = None) -> str:
    """Write weights, config.json and a model card into `directory` (created). `config` is the run's config dict
    (Config.to_dict(): "model" and "train"). Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    if config["model"].get("init"):  # an adapted causal LM: the directory transformers reads
        from bdiff.models.adapted import save_directory

        dataset = dict(config.get("dataset") or {})
        spec = dataset.get("tokenizer")
        if spec:
            dataset["tokenizer"] = TOKENIZER  # the copy in the directory, MASK added
        meta = {"bdiff_version": bdiff.__version__, "tokenizer": TOKENIZER if spec else None,
                "model": config["model"], "train": config["train"], "dataset": dataset,
                "code": config.get("code") or {}, "step": step, "tokens": tokens, "val_loss": val_loss}
        save_directory(model, directory, meta, spec)
        write_card(directory)
        return directory
    weights = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    _atomic_write(os.path.join(directory, WEIGHTS), lambda p: save_file(weights, p, metadata={"format": "pt"}))
    dataset = dict(config.get("dataset") or {})
    tokenizer = tokenizer_of(config) if dataset or config["train"].get("data") else None  # None: a model never trained
    if tokenizer and os.path.isfile(tokenizer):  # a tokenizer.json travels with the model: it decodes on its own
        _atomic_write(os.path.join(directory, TOKENIZER), lambda p: shutil.copyfile(tokenizer, p))
        tokenizer = dataset["tokenizer"] = TOKENIZER
    meta = {"bdiff_version": bdiff.__version__, "tokenizer": tokenizer,
            "block_size": config["model"]["block_size"], "model": config["model"], "train": config["train"],
            "dataset": dataset, "code": config.get("code") or {}, "step": step, "tokens": tokens, "val_loss": val_loss,
            "model_type": "bdiff", "architectures": ["BdiffForMaskedLM"], "auto_map": remote.AUTO_MAP}
    for name in remote.REMOTE_CODE:  # the model for transformers (trust_remote_code), beside the weights
        source = os.path.join(remote.DIRECTORY, name)
        _atomic_write(os.path.join(directory, name), lambda p, source=source: shutil.copyfile(source, p))
    _atomic_write(os.path.join(directory, CONFIG), lambda p: _write_text(p, json.dumps(meta, indent=2) + "\n"))
    write_card(directory)
    return directory


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise HubError(f"{directory}: no {CONFIG}; a bdiff model directory holds {WEIGHTS} and {CONFIG}") from None
    except (OSError, ValueError) as e:
        raise HubError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
    if isinstance(meta, dict) and isinstance(meta.get("bdiff"), dict):  # an adapted model: transformers' config
        meta = dict(meta["bdiff"], hf={k: v for k, v in meta.items() if k != "bdiff"})
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "train" not in meta:
        raise HubError(f"{path}: not a bdiff model config (no \"model\" and \"train\" entries)")
    return meta


def write_card(directory: str, sample: str | None = None, command: str | None = None) -> None:
    """README.md of a model directory from its config.json (and the sample and the reproducing command, when
    given; a card rewritten without them keeps the ones it had)."""
    meta = read_config(directory)
    old = _card_fields(directory)
    sample = sample if sample is not None else old.get("sample")
    command = command or old.get("command") or "python train.py " + " ".join(
        f"--{k} {v}" for k, v in meta["train"].items() if k in ("data", "steps", "seq_len"))
    name = meta["train"].get("data")
    dataset = meta.get("dataset") or (asdict(DATASETS[name]) if name in DATASETS else {})
    data = dataset.get("description", name or "nothing yet (a model saved untrained)")
    m = meta["model"]
    adapted = f" (adapted from {m['init']})" if m.get("init") else ""
    heads = f"{m['num_heads']} heads" + (f" on {m['num_kv_heads']} key/value heads" if m.get("num_kv_heads") and
                                        m["num_kv_heads"] != m["num_heads"] else "")
    use = ("`AutoModelForCausalLM.from_pretrained(\"THIS_REPO_OR_DIR\", trust_remote_code=True)`: "
           "`model.generate(prompt_ids, max_new_tokens=64)`, `model(x_t, clean_ids=x_0).logits`" if adapted else
           "`AutoModelForMaskedLM.from_pretrained(\"THIS_REPO_OR_DIR\", trust_remote_code=True)`: `model(x_t, "
           "clean_ids=x_0).logits`, `model.generate(prompt_ids)`")
    lines = [
        "---", "library_name: bdiff", "tags:", "- block-diffusion", "- bd3-lm", "- text-generation", "- custom_code",
        *(["datasets:", f"- {dataset['source']}"] if dataset.get("source") else []), "---", "",
        "# A block-diffusion language model trained with bdiff", "",
        f"- Architecture{adapted}: {m['num_layers']} layers, width {m['model_dim']}, {heads} of {m['head_dim']}, "
        f"vocabulary {m['vocab_size']} (MASK {m['mask_id']}, BOS {m['bos_id']}), block size {m['block_size']}"
        + (", token shift" if m.get("token_shift") else ""),
        f"- Trained on: {data}; tokenizer `{meta['tokenizer']}`",
        f"- Steps: {meta.get('step')}, tokens: {meta['tokens']:,}" if meta.get("tokens") else
        f"- Steps: {meta.get('step')}",
        f"- Final validation loss (t ~ U[0, 1], the objective's bound on the NLL per token): "
        f"{meta['val_loss']:.4f} nats" if meta.get("val_loss") is not None else "- Final validation loss: not measured",
        f"- bdiff {meta['bdiff_version']}" + (f", commit {meta['code']['commit'][:12]}" + (
            " with uncommitted changes" if meta["code"]["dirty"] else "") if meta.get("code") else ""), "",
        "## Use", "", "```bash",
        "python -m bdiff.eval --model THIS_REPO_OR_DIR --draws 4",
        f"python sample.py --ckpt THIS_REPO_OR_DIR --prompt {shlex.quote(default_prompt(meta) or 'TEXT')}",
        "```", "", f"With bdiff, `bdiff.models.from_pretrained(\"THIS_REPO_OR_DIR\")`; with transformers alone, {use}.",
        "",
        "## Reproduce", "", "<!-- command -->", "```bash", command, "```", "",
    ]
    if os.path.exists(os.path.join(directory, PLOT)):
        lines += ["## Loss", "", f"![loss]({PLOT})", ""]
    if sample:
        lines += ["## A sample", "", "<!-- sample -->", "```text", sample, "```", ""]
    _atomic_write(os.path.join(directory, CARD), lambda p: _write_text(p, "\n".join(lines)))


def _card_fields(directory: str) -> dict:
    """The command and the sample of an existing card, to keep them when it is rewritten."""
    try:
        with open(os.path.join(directory, CARD)) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    found = {}
    for key in ("command", "sample"):
        match = re.search(rf"<!-- {key} -->\n```\w*\n(.*?)\n```", text, re.S)
        if match:
            found[key] = match.group(1)
    return found


def resolve(name: str) -> str:
    """A local model directory for `name`: a model directory, a run directory (its model/), or a Hub id
    (downloaded into, or found in, huggingface_hub's cache)."""
    if os.path.isdir(name):
        for candidate in (name, os.path.join(name, "model")):
            if any(os.path.exists(os.path.join(candidate, f)) for f in (WEIGHTS, SHARDED)):
                return candidate
        raise HubError(f"{name}: a directory without {WEIGHTS} (nor a model/ holding one)")
    if os.path.exists(name):
        raise HubError(f"{name}: not a model directory, run directory or Hub id (user/name)")
    if not REPO_ID.match(name):
        raise HubError(f"{name}: no such checkpoint file or directory, and no Hub id (user/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(name, allow_patterns=["*.safetensors", "*.json", "*.py", CARD, PLOT, "merges.txt",
                                                       "tokenizer.model", "chat_template.jinja"])
    except RepositoryNotFoundError:
        raise HubError(f"{name}: no such model on the Hub (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{name}: no such local directory, not in the local Hugging Face cache, and the Hub cannot "
                       "be reached (offline?): download it once with network access") from None
    except (HfHubHTTPError, OSError) as e:
        raise HubError(f"{name}: could not download ({str(e).splitlines()[0]})") from None


def read_pretrained(name: str) -> tuple[dict, dict, str]:
    """(weights, config dict with "model", "train" and "dataset", the file they came from) of whatever a user names:
    a checkpoint file (final.pt, written by train.py), a model directory, a run directory (its model/) or a Hub id
    (user/name, through huggingface_hub's cache). bdiff.models.from_pretrained, the loader of every command, builds
    the model from them; a damaged or foreign file is refused in one line. An adapted model's directory gives no
    weights (None) and itself as the place: transformers reads them there; its config has "hf", the transformers
    config."""
    if os.path.isfile(name):
        if os.path.basename(name) in (CARD, CONFIG, WEIGHTS, PLOT, TOKENIZER, *remote.REMOTE_CODE):
            raise HubError(f"{name}: not a model directory, run directory or Hub id; name the directory that holds it")
        return (*checkpoint.read_final(name), name)
    directory = resolve(name)
    meta = read_config(directory)
    if (meta.get("dataset") or {}).get("tokenizer") == TOKENIZER:  # the copy in this directory
        meta["dataset"]["tokenizer"] = os.path.join(directory, TOKENIZER)
    if meta["model"].get("init"):
        return None, meta, directory
    path = os.path.join(directory, WEIGHTS)
    try:
        return load_file(path, device="cpu"), meta, path  # moved by load_state_dict, as every load (checkpoint.py)
    except (SafetensorError, OSError, ValueError) as e:
        raise HubError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def push(name: str, repo_id: str, private: bool = False, token: str | None = None, api=None) -> str:
    """Upload a model directory (or a run directory's model/) to the Hub repository `repo_id`, created if needed.
    The token comes from `token`, HF_TOKEN or `hf auth login`. Returns the repository's URL."""
    from huggingface_hub import HfApi, get_token

    directory = resolve(name) if os.path.isdir(name) else None
    if directory is None:
        raise HubError(f"{name}: not a model directory or a run directory (train.py writes logs/RUN/model/)")
    read_config(directory)
    if not REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r}: a Hub repository id is user/name")
    token = token or get_token()
    if api is None:
        if not token:
            raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=directory, repo_id=repo_id, commit_message=f"bdiff {bdiff.__version__}: "
                          f"upload {os.path.basename(os.path.abspath(directory))}")
    except Exception as e:  # noqa: BLE001 (network, auth, quota: every failure of the upload is one line)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"push to {repo_id} failed: {reason}") from None
    return f"https://huggingface.co/{repo_id}"


@command
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bdiff.hub", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="upload a model directory to the Hugging Face Hub")
    p.add_argument("model", help="a run directory (logs/RUN) or a model directory (logs/RUN/model)")
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    args = parser.parse_args(argv)
    print(push(args.model, args.repo_id, private=args.private))
    return 0


if __name__ == "__main__":
    sys.exit(main())
