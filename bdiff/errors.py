"""One error path for every command. bdiff's errors share one base class, and `command` turns one into a single
`error: ...` line on stderr and exit code 2 (train.py, sample.py, python -m bdiff.data, .eval, .hub, .plot)."""
from __future__ import annotations

import functools
import sys


class BdiffError(ValueError):
    """Bad input, or a state a command cannot go on from; the message names what is wrong and what to do."""


def command(main):
    """Decorate a command's main(argv) -> exit code: a BdiffError ends it with one stderr line and exit code 2."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except BdiffError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run
