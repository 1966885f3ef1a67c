"""Run the benchmark's command line in a fresh interpreter, as a user does.

The tests never import ``dist_infonce.bench``: it is an application, and its tests
check what its command line writes (rows, JSON, tables, plots).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_bench(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``python -m dist_infonce.bench ARGS`` in ``cwd`` with this checkout importable.

    ``cwd`` is a test's temporary folder, so a benchmark that read the repository's
    files by relative path would fail here.
    """
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    cmd = [sys.executable, "-m", "dist_infonce.bench", *args]
    return subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def read_json(path: Path) -> dict[str, Any]:
    """The JSON a run wrote."""
    return json.loads(path.read_text())
