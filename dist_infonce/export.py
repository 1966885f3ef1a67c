"""Write a run's trained towers in their libraries' formats.

Usage::

    python -m dist_infonce.export RUN_DIR_OR_CHECKPOINT --out DIR

``DIR/encoder/`` (one model for both views) or ``DIR/tower0/`` + ``DIR/tower1/``, and
``DIR/export.json``; see :mod:`dist_infonce.trainer.export` and docs/models.md.
Exit codes: 0 written; 2 nothing to export there (the reason is printed).
"""

from __future__ import annotations

import sys

from dist_infonce.trainer.export import main

if __name__ == "__main__":
    sys.exit(main())
