"""``python -m dist_infonce.bench [loss | dist | cache | fsdp | data] [options]``: run one mode.

The first word names the mode; without one, ``--world N`` selects ``dist`` (as it
always has) and anything else is the loss sweep. Each mode parses its own options
(``--help`` after the mode word lists them).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: Mode word -> the module whose ``main(argv) -> int`` runs it.
MODES = {
    "loss": "dist_infonce.bench.loss",
    "dist": "dist_infonce.bench.dist",
    "cache": "dist_infonce.bench.cache",
    "fsdp": "dist_infonce.bench.fsdp",
    "data": "dist_infonce.bench.data",
}


def mode_of(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The mode ``argv`` asks for and the options left for it."""
    args = list(argv)
    if args and args[0] in MODES:
        return args[0], args[1:]
    if any(a == "--world" or a.startswith("--world=") for a in args):
        return "dist", args
    return "loss", args


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the mode's ``main``; returns its exit status."""
    mode, rest = mode_of(sys.argv[1:] if argv is None else argv)
    # Only the chosen mode is imported (the cache, fsdp and data modes pull in the trainer).
    return importlib.import_module(MODES[mode]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
