"""Checkpoint files: atomic writes, keep-last-K, weights-only loading, corrupt-file fallback.

A checkpoint is one file ``checkpoints/step_XXXXXXXX.pt`` written by rank 0. It
holds only tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it (no pickled code runs on load). RNG states are stored as tensors and
lists: python's ``random`` state, numpy's legacy state, torch's CPU (and CUDA)
state, one entry per rank.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "checkpoint_path",
    "get_rng_state",
    "list_checkpoints",
    "load_latest",
    "prune",
    "save_atomic",
    "set_rng_state",
]

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    """``directory/step_<step, 8 digits>.pt``."""
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path, name: re.Pattern[str] = _NAME) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``directory``, oldest first: the entries
    whose name matches ``name`` (group 1: the step; default ``step_<step>.pt``)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := name.match(p.name))]
    return sorted(found)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that ``path`` is always either absent or complete.

    The bytes go to a temporary file in the same directory, are fsynced, and the
    file is renamed over ``path`` (atomic on POSIX); a crash mid-write leaves only
    a stray ``.tmp`` file, never a truncated checkpoint under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename is durable only once the directory entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the deleted paths."""
    old = [p for _, p in list_checkpoints(directory)[:-keep]] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def load_latest(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """Load the newest checkpoint that reads back; report and skip unreadable ones.

    Returns:
        ``(state, path)``, or None when there is no readable checkpoint.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("step") != step:
                raise ValueError(f"expected a dict with step={step}")
        except Exception as e:  # any failure to read means: try the previous one
            print(
                f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                "falling back to the previous one",
                file=sys.stderr,
                flush=True,
            )
            continue
        return state, path
    return None


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
