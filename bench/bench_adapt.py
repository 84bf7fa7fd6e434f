"""Does starting from a pretrained autoregressive model pay, and does token shift help? Measured on this machine's CPU
with a model small enough to pretrain here.

    python bench/bench_adapt.py                      # 3 seeds: ~20 minutes on 2 CPU cores
    python bench/bench_adapt.py --seeds 1 --steps 200 --pretrain_steps 400     # a quick look

What it does, all of it here (no download):
1. A byte-level BPE tokenizer (--vocab ids) trained on the embedded corpus (Python's standard library), and the
   corpus prepared with it (`python -m bdiff.data prepare`, one document per source file).
2. A Qwen3-shaped causal LM (--layers x --width, grouped-query heads, a few million parameters) pretrained
   autoregressively for --pretrain_steps on the training split (next-token cross-entropy, documents packed with
   their own positions and causal masks), once per seed: the "pretrained" model.
3. Three block-diffusion runs of --steps each (train.py --init, the adapt preset's AdamW with warm-up and decay,
   block size 16, t ~ U[0.3, 0.8]) per seed: the pretrained model adapted with token shift, adapted without it,
   and the same architecture from random weights ("scratch", its learning rate --scratch_lr, as a fresh small
   model wants a larger one). The record's validation loss (t ~ U[0, 1]) every --steps / 8 steps.

It prints each arm's final validation loss (mean ± standard error over seeds), the validation curves' means, and
the first step at which each adapted arm reaches the scratch arm's final loss (the expectation: a quarter of the
steps or fewer); --out saves everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EOS = "<|endoftext|>"


def build_tokenizer(directory: str, vocab: int, corpus_bytes: int) -> None:
    """A byte-level BPE with `vocab` ids trained on the first `corpus_bytes` of the standard library's sources,
    saved as transformers saves a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bdiff.data import stdlib_sources

    def texts():
        seen = 0
        for path in stdlib_sources():
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
            yield text
            seen += len(text)
            if seen > corpus_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(directory)


def prepare_corpus(tokenizer_dir: str, out: str) -> None:
    """The standard library's sources, one document each, prepared with the tokenizer (validation: every 100th)."""
    from bdiff.data import stdlib_sources
    from bdiff.data.prepare import prepare

    jsonl = os.path.join(os.path.dirname(out), "stdlib.jsonl")
    with open(jsonl, "w") as f:
        for path in stdlib_sources():
            with open(path, "rb") as src:
                f.write(json.dumps({"text": src.read().decode("utf-8", errors="replace")}) + "\n")
    prepare(jsonl, tokenizer_dir, out, progress=False, log=lambda *_: None)


def causal_lm(args, vocab: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=args.width, intermediate_size=3 * args.width,
                                      num_hidden_layers=args.layers, num_attention_heads=args.width // 32,
                                      num_key_value_heads=args.width // 64, head_dim=32, tie_word_embeddings=False,
                                      max_position_embeddings=8192)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def pretrain(args, data_dir: str, tokenizer_dir: str, out: str, seed: int) -> float:
    """Next-token pretraining of a fresh causal LM on the training split; saved into `out` with the tokenizer.
    Returns its final training loss."""
    from bdiff.data import DistributedLoader, read_manifest, shard_files
    from bdiff.models.objective import document_layout

    data = read_manifest(data_dir)
    model = causal_lm(args, data.num_ids, seed).train()
    loader = DistributedLoader(shard_files(data.name, data_dir, "train"), args.seq_len, seed=seed, epochs=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    loss = torch.tensor(float("nan"))
    for step in range(args.pretrain_steps):
        for group in opt.param_groups:  # warm-up, then cosine to a tenth
            frac = step / args.pretrain_steps
            group["lr"] = args.pretrain_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        tokens = loader.next()
        layout = document_layout(tokens, data.bos_id, 1, separator="closes")  # positions restart per document
        logits = model(input_ids=tokens[None], position_ids=layout.positions[None]).logits[0]
        same_doc = layout.positions[1:] > 0  # no prediction across a document boundary
        loss = F.cross_entropy(logits[:-1][same_doc], tokens[1:][same_doc])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    return loss.item()


def copy_tokenizer(tokenizer_dir: str, out: str) -> None:
    for name in os.listdir(tokenizer_dir):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, name))


def block_diffusion_run(args, init: str, data_dir: str, out_dir: str, name: str, seed: int, lr: float,
                        shift: bool) -> list[dict]:
    """train.py --init on the prepared corpus; the run's validation records."""
    import contextlib
    import io

    from bench_training import validation_records

    import train

    argv = ["--device", "cpu", "--init", init, "--data_dir", data_dir, "--steps", str(args.steps), "--seq_len",
            str(args.seq_len), "--micro_steps", "1", "--val_every", str(max(1, args.steps // 8)), "--val_seq_len",
            str(args.seq_len), "--val_tokens", str(args.val_tokens), "--lr", str(lr), "--lr_warmup",
            str(max(1, args.steps // 20)), "--seed", str(seed), "--out_dir", out_dir, "--run_name", name,
            "--token_shift" if shift else "--no_token_shift"]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    return validation_records(os.path.join(out_dir, f"{name}.jsonl"))


def first_reaching(curve: list[dict], target: float) -> int | None:
    return next((r["step"] for r in curve if r["val_loss"] <= target), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800, help="block-diffusion steps of every arm")
    parser.add_argument("--pretrain_steps", type=int, default=1500, help="autoregressive pretraining steps")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per step")
    parser.add_argument("--val_tokens", type=int, default=8192, help="validation tokens (the split's first)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--pretrain_lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=5e-4, help="the adapted arms' AdamW rate")
    parser.add_argument("--scratch_lr", type=float, default=2e-3, help="the scratch arm's AdamW rate")
    parser.add_argument("--out", help="save the results as JSON")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(os.cpu_count() or 1)
    work = tempfile.mkdtemp(prefix="bench_adapt_")
    tokenizer_dir, data_dir = os.path.join(work, "tokenizer"), os.path.join(work, "data")
    t0 = time.time()
    build_tokenizer(tokenizer_dir, args.vocab, corpus_bytes=4_000_000)
    prepare_corpus(tokenizer_dir, data_dir)
    print(f"tokenizer ({args.vocab} ids) and data prepared in {time.time() - t0:.0f} s ({work})", flush=True)
    arms = {"adapted, token shift": [], "adapted, no shift": [], "scratch": []}
    pretrain_losses = []
    for seed in range(args.seeds):
        t = time.time()
        base, fresh = os.path.join(work, f"pretrained{seed}"), os.path.join(work, f"fresh{seed}")
        pretrain_losses.append(pretrain(args, data_dir, tokenizer_dir, base, seed))
        causal_lm(args, _vocab(data_dir), 1000 + seed).save_pretrained(fresh)  # the scratch arm's random weights
        copy_tokenizer(tokenizer_dir, fresh)
        print(f"seed {seed}: pretrained ({args.pretrain_steps} steps, final AR loss {pretrain_losses[-1]:.3f}) in "
              f"{time.time() - t:.0f} s", flush=True)
        for arm, init, lr, shift in (("adapted, token shift", base, args.lr, True),
                                     ("adapted, no shift", base, args.lr, False),
                                     ("scratch", fresh, args.scratch_lr, True)):
            t = time.time()
            curve = block_diffusion_run(args, init, data_dir, work, f"{arm.split(',')[0]}{seed}{int(shift)}", seed,
                                        lr, shift)
            arms[arm].append(curve)
            print(f"seed {seed}: {arm}: final val loss {curve[-1]['val_loss']:.4f} ({time.time() - t:.0f} s)",
                  flush=True)
    report(args, arms, pretrain_losses)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "pretrain_losses": pretrain_losses, "arms": arms}, f, indent=1)
    return 0


def _vocab(data_dir: str) -> int:
    from bdiff.data import read_manifest

    return read_manifest(data_dir).num_ids


def report(args, arms: dict, pretrain_losses: list[float]) -> None:
    from bench_training import summary

    print(f"\n{args.seeds} seed(s), {args.steps} block-diffusion steps of {args.seq_len} tokens; pretraining "
          f"{args.pretrain_steps} steps (AR loss {sum(pretrain_losses) / len(pretrain_losses):.3f})")
    print("| arm | final val loss (t ~ U[0, 1]) | first step at scratch's final loss |")
    print("| --- | ---: | ---: |")
    scratch_final = summary([c[-1]["val_loss"] for c in arms["scratch"]])["mean"]
    for arm, curves in arms.items():
        s = summary([c[-1]["val_loss"] for c in curves])
        reach = [first_reaching(c, scratch_final) for c in curves]
        reached = "" if arm == "scratch" else ", ".join("never" if r is None else str(r) for r in reach)
        se = f" ± {s['stderr']:.4f}" if s["stderr"] is not None else ""
        print(f"| {arm} | {s['mean']:.4f}{se} | {reached} |")
    steps = [r["step"] for r in arms["scratch"][0]]
    print("\nvalidation curves (mean over seeds): step " + " ".join(f"{s:>6}" for s in steps))
    for arm, curves in arms.items():
        means = [sum(c[i]["val_loss"] for c in curves) / len(curves) for i in range(len(steps))]
        print(f"{arm:>22}: " + " ".join(f"{m:6.3f}" for m in means))


if __name__ == "__main__":
    sys.exit(main())
