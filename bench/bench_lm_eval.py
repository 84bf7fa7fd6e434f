"""A bdiff model in the LM Evaluation Harness on tasks built from its own validation data: what a user sees.

    python bench/bench_lm_eval.py --model logs/demo/model                 # both tasks, then the variance table
    python bench/bench_lm_eval.py --model logs/demo/model --docs 50 -- --limit 20   # flags after -- go to lm-eval

Two local tasks are written (YAML over a JSONL file, in --out) from the model's validation documents, and
`python -m bdiff.lm_eval` runs them:
- `bdiff_next_line` (multiple choice, acc and acc_norm): a document's first lines, then which of four lines comes
  next: its own next line, or a line of the same length class drawn from another document;
- `bdiff_ppl` (perplexity, loglikelihood_rolling): the documents whole (word and byte perplexity, bits per byte).
Then the log-likelihood estimator's spread against mc_samples K: the standard deviation, over noise seeds, of
one document's estimate (loglikelihood_rolling) at each K (it falls as 1/sqrt(K)).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = {
    "bdiff_next_line": """task: bdiff_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "bdiff_ppl": """task: bdiff_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


def validation_documents(config: dict, count: int, max_chars: int) -> list[str]:
    """The text of the first `count` validation documents of the model's data, each cut to max_chars."""
    from bdiff.data import find_dataset, shard_files, tokenizer_of
    from bdiff.data.formats import read_shard
    from bdiff.data.tokenizer import decode

    train = config["train"]
    dataset, data_dir = find_dataset(train["data"], train["data_dir"])
    tokens = np.concatenate([read_shard(f) for f in shard_files(dataset.name, data_dir, "val")]).astype(np.int64)
    bos = config["model"]["bos_id"]
    docs = []
    for doc in np.split(tokens, np.flatnonzero(tokens == bos)):
        text = decode([t for t in doc.tolist() if t != bos], tokenizer_of(config))[:max_chars]
        if text.count("\n") >= 4:
            docs.append(text)
        if len(docs) == count:
            break
    return docs


def next_line_questions(docs: list[str], seed: int = 0) -> list[dict]:
    """For each document with a non-blank line after its third: the lines before it as the context, that line
    and three non-blank lines of other documents as the choices (shuffled)."""
    rng = random.Random(seed)
    pool = [(i, line) for i, doc in enumerate(docs) for line in doc.split("\n") if line.strip()]
    questions = []
    for i, doc in enumerate(docs):
        lines = doc.split("\n")
        k = next((k for k in range(3, len(lines) - 1) if lines[k].strip()), None)
        if k is None:
            continue
        others = [line for j, line in pool if j != i and line != lines[k]]
        choices = [lines[k] + "\n"] + [line + "\n" for line in rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        questions.append(dict(context="\n".join(lines[:k]) + "\n", choices=[choices[o] for o in order],
                              answer=order.index(0), text=doc))
    return questions


def write_tasks(out: str, docs: list[str]) -> str:
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "docs.jsonl")
    with open(data, "w") as f:
        for question in next_line_questions(docs):
            f.write(json.dumps(question) + "\n")
    for name, yaml in TASKS.items():
        with open(os.path.join(out, f"{name}.yaml"), "w") as f:
            f.write(yaml.format(data=data))
    return data


def variance_table(model_path: str, text: str, ks: list[int], seeds: int, device: str) -> list[tuple]:
    """(K, mean log-likelihood, its standard deviation over `seeds` noise seeds, seconds per estimate)."""
    from bdiff.lm_eval import BdiffLM

    rows = []
    request = [argparse.Namespace(args=(text,))]
    for k in ks:
        values, t0 = [], time.perf_counter()
        for seed in range(seeds):
            values.append(BdiffLM(model_path, mc_samples=k, seed=seed, device=device).loglikelihood_rolling(request)[0])
        values = torch.tensor(values)
        rows.append((k, values.mean().item(), values.std().item(), (time.perf_counter() - t0) / seeds))
    return rows


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory, run directory, final.pt or Hub id")
    parser.add_argument("--docs", type=int, default=100, help="validation documents (questions) to use")
    parser.add_argument("--max_chars", type=int, default=1024, help="each document cut to this many characters")
    parser.add_argument("--mc_samples", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_lm_eval", help="where the tasks and lm-eval's results go")
    parser.add_argument("--variance_k", default="1,4,16", help="mc_samples values of the variance table ('' skips)")
    parser.add_argument("--variance_seeds", type=int, default=8)
    args = parser.parse_args(argv)

    from bdiff.models import from_pretrained

    config = from_pretrained(args.model).run_config
    docs = validation_documents(config, args.docs, args.max_chars)
    data = write_tasks(args.out, docs)
    print(f"tasks: {os.path.abspath(args.out)} ({len(docs)} validation documents, {data})", flush=True)
    command = [sys.executable, "-m", "bdiff.lm_eval", "--model", "bdiff", "--model_args",
               f"pretrained={args.model},mc_samples={args.mc_samples}", "--device", args.device,
               "--tasks", ",".join(TASKS), "--include_path", args.out, "--batch_size", str(args.batch_size),
               "--output_path", os.path.join(args.out, "results"), *extra]
    print("$ " + " ".join(command[1:]), flush=True)
    t0 = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT)
    print(f"lm-eval took {time.perf_counter() - t0:.0f} s on {args.device}", flush=True)
    if result.returncode:
        return result.returncode
    if args.variance_k:
        ks = [int(k) for k in args.variance_k.split(",")]
        print(f"\nlog-likelihood of one validation document ({len(docs[0])} characters) over "
              f"{args.variance_seeds} noise seeds:")
        print("| mc_samples K | mean log-likelihood | std over seeds | s per estimate |\n| ---: | ---: | ---: | ---: |")
        for k, mean, std, seconds in variance_table(args.model, docs[0], ks, args.variance_seeds, args.device):
            print(f"| {k} | {mean:.2f} | {std:.2f} | {seconds:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
