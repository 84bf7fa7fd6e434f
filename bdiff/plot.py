"""Plot a run's train and validation loss against tokens seen.

    python -m bdiff.plot logs/RUN.jsonl            # writes logs/RUN.png
    python -m bdiff.plot logs/RUN.jsonl -o loss.png

matplotlib is an optional dependency: pip install -e ".[plot]".
"""
from __future__ import annotations

import argparse
import json
import sys

from bdiff.config import ArgumentParser


def read_log(path: str) -> tuple[dict, dict]:
    """{step: (tokens, train loss)} and {step: (tokens, val loss)}; a resumed run's replayed steps keep
    their last record."""
    train, val = {}, {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            if "train_loss" in entry:
                train[entry["step"]] = (entry["tokens"], entry["train_loss"])
            elif "val_loss" in entry:
                val[entry["step"]] = (entry["tokens"], entry["val_loss"])
    return train, val


def plot(log_path: str, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train, val = read_log(log_path)
    if not train and not val:
        raise ValueError(f"{log_path}: no train or validation losses in this log")
    fig, ax = plt.subplots(figsize=(8, 5))
    for series, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if series:
            tokens, loss = zip(*(series[s] for s in sorted(series)))
            ax.plot(tokens, loss, style, label=label, markersize=4)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats, weighted BD3-LM objective)")
    ax.set_title(log_path)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bdiff.plot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a JSONL log written by train.py")
    parser.add_argument("-o", "--out", help="PNG path (default: the log's path with .png)")
    args = parser.parse_args(argv)
    out = args.out or args.log.removesuffix(".jsonl") + ".png"
    try:
        plot(args.log, out)
    except ImportError:
        print("error: matplotlib is needed: pip install -e \".[plot]\"", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
