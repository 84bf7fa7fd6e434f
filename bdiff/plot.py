"""Plot training runs from their JSONL logs: one run's train and validation loss against tokens seen, or several
runs' validation losses side by side, against tokens and against training time.

    python -m bdiff.plot logs/RUN.jsonl                        # writes logs/RUN.png
    python -m bdiff.plot logs/A.jsonl logs/B.jsonl -o ab.png    # compare runs (default: logs/compare.png)

Runs on FineWeb-Edu get the record's target line (validation loss 3.44). matplotlib is an optional dependency:
pip install -e ".[plot]".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from bdiff.config import RECORD_VAL_LOSS, ArgumentParser
from bdiff.errors import BdiffError, command


def read_log(path: str) -> tuple[dict, dict]:
    """{step: (tokens, train loss)} and {step: (tokens, val loss)}; a resumed run's replayed steps keep
    their last record."""
    run = read_run(path)
    return run["train"], {step: (tokens, loss) for step, (tokens, loss, _) in run["val"].items()}


def read_run(path: str) -> dict:
    """{"config": the run's config dict (or None), "train": {step: (tokens, loss)},
    "val": {step: (tokens, loss, training seconds)}}."""
    run = {"config": None, "train": {}, "val": {}}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a JSONL log of train.py (a line is not JSON)") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{number}: not a JSONL log of train.py")
            if "config" in entry:
                run["config"] = entry["config"]
            elif "train_loss" in entry:
                run["train"][entry["step"]] = (entry["tokens"], entry["train_loss"])
            elif "val_loss" in entry:
                run["val"][entry["step"]] = (entry["tokens"], entry["val_loss"], entry.get("train_time_s"))
    if not run["train"] and not run["val"]:
        raise ValueError(f"{path}: no train or validation losses in this log")
    return run


def _series(points: dict, columns: tuple[int, int]) -> tuple[list, list]:
    rows = [points[s] for s in sorted(points) if points[s][columns[0]] is not None]
    return [r[columns[0]] for r in rows], [r[columns[1]] for r in rows]


def plot(logs: list[str], out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = {path: read_run(path) for path in logs}
    record = any((r["config"] or {}).get("train", {}).get("data") == "finewebedu" for r in runs.values())
    if len(runs) == 1:
        (path, run), = runs.items()
        fig, axes = plt.subplots(figsize=(8, 5))
        axes = [axes]
        for series, label, style in ((run["train"], "train", "-"), (run["val"], "validation", "o-")):
            if series:
                axes[0].plot(*_series(series, (0, 1)), style, label=label, markersize=4)
        axes[0].set_xlabel("tokens seen")
        axes[0].set_title(path)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for path, run in runs.items():
            label = os.path.basename(path).removesuffix(".jsonl")
            axes[0].plot(*_series(run["val"], (0, 1)), "o-", label=label, markersize=4)
            axes[1].plot(*_series(run["val"], (2, 1)), "o-", label=label, markersize=4)
        axes[0].set_xlabel("tokens seen")
        axes[1].set_xlabel("training time (s, validation excluded)")
        axes[0].set_title("validation loss against tokens")
        axes[1].set_title("validation loss against time")
    for ax in axes:
        if record:
            ax.axhline(RECORD_VAL_LOSS, color="gray", linestyle="--", label=f"record target {RECORD_VAL_LOSS}")
        ax.set_ylabel("loss (nats, weighted BD3-LM objective)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


@command
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bdiff.plot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="JSONL logs written by train.py (several: a comparison)")
    parser.add_argument("-o", "--out", help="PNG path (default: the log's path with .png; for several logs, "
                                            "compare.png beside the first)")
    args = parser.parse_args(argv)
    out = args.out or (args.logs[0].removesuffix(".jsonl") + ".png" if len(args.logs) == 1 else
                       os.path.join(os.path.dirname(args.logs[0]), "compare.png"))
    try:
        plot(args.logs, out)
    except ImportError:
        raise BdiffError("matplotlib is needed: pip install -e \".[plot]\"") from None
    except (OSError, ValueError) as e:  # an unreadable or foreign log
        raise BdiffError(str(e)) from None
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
