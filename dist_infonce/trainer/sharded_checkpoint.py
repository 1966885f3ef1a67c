"""Sharded checkpoints (``dist.strategy: fsdp``) with ``torch.distributed.checkpoint``.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX.dcp/``: every rank writes its
shards of the model and the optimizer state (DCP's files and ``.metadata``), and rank 0
adds ``trainer.pt``, the rest of the state as in a DDP checkpoint (step, schedule,
every rank's RNG state, W&B run id, config; weights-only loadable). Nobody gathers
the full model: each rank writes what it holds.

Atomic like the single-file checkpoints: everything goes to a hidden
``.step_XXXXXXXX.dcp.tmp/`` first; rank 0 renames it once DCP has finished on every
rank and ``trainer.pt`` is on disk, so a directory under the real name is complete.
Keep-last-K prunes directories the same way.

Loading reshards: DCP's metadata records each tensor's global shape and which slice
each file holds, so a run with another number of ranks reads the slices it needs (the
batches then differ from the old world's; the trainer says so and reseeds).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_infonce.trainer.checkpoint import list_checkpoints, save_atomic

__all__ = [
    "list_sharded",
    "load_sharded",
    "newest_sharded",
    "prune_sharded",
    "save_sharded",
    "sharded_path",
]

_NAME = re.compile(r"^step_(\d+)\.dcp$")
#: The file of rank 0's non-tensor state inside a checkpoint directory.
TRAINER_STATE = "trainer.pt"


def sharded_path(directory: Path, step: int) -> Path:
    """``directory/step_<step, 8 digits>.dcp``."""
    return directory / f"step_{step:08d}.dcp"


def list_sharded(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every sharded checkpoint directory in ``directory``, oldest first."""
    return list_checkpoints(directory, _NAME)


def prune_sharded(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` sharded checkpoints; return the deleted paths."""
    old = [p for _, p in list_sharded(directory)[:-keep]] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def _optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's wrapper (DCP reads its param groups)."""
    return getattr(optimizer, "optimizer", optimizer)


def _agreed(error: str) -> str:
    """The first non-empty error over all ranks (every rank gets the same verdict)."""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def save_sharded(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any] | None,
    keep: int,
) -> str:
    """Write the sharded checkpoint of ``step`` (a collective); what went wrong, or ``""``.

    Args:
        directory: ``output_dir/checkpoints``.
        step: the optimizer steps done.
        model: the trainer's learner (sharded model and replicated loss).
        optimizer: over ``model``'s parameters (accelerate's wrapper or torch's).
        trainer_state: rank 0: the non-tensor state (``trainer.pt``); others: None.
        keep: keep-last-K.

    Returns:
        The same message on every rank: ``""``, or why the checkpoint is not written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    final = sharded_path(directory, step)
    tmp = directory / f".{final.name}.tmp"
    error = ""
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed run's half-written attempt
            tmp.mkdir(parents=True)
        except OSError as e:
            error = f"cannot create {tmp}: {e.strerror}"
    error = _agreed(error)
    if error:
        return error
    model_state, optim_state = get_state_dict(model, _optimizer(optimizer))
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    except Exception as e:  # DCP raises on every rank when one rank's write failed
        error = f"torch.distributed.checkpoint.save failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    error = _agreed(error)
    if not error and rank == 0:
        try:
            save_atomic(trainer_state or {}, tmp / TRAINER_STATE)
            if final.exists():  # the same step saved again (a stop right after a save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            dir_fd = os.open(directory, os.O_RDONLY)  # the rename is durable once this is
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            prune_sharded(directory, keep)
        except Exception as e:  # torch.save wraps a failed write (ENOSPC) in a RuntimeError
            cause = e if isinstance(e, OSError) else e.__context__
            error = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e)
    return error


def _trainer_state(path: Path, step: int) -> dict[str, Any]:
    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("step") != step:
        raise ValueError(f"expected a dict with step={step}")
    if not (path / ".metadata").is_file():
        raise ValueError("no .metadata (DCP did not finish)")
    return state


def newest_sharded(directory: Path) -> Path | None:
    """The newest complete sharded checkpoint (``.metadata`` and a readable ``trainer.pt``
    of its step); unreadable ones are reported and skipped. Rank 0 calls it."""
    for step, path in reversed(list_sharded(directory)):
        try:
            _trainer_state(path, step)
        except Exception as e:
            print(
                f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                "falling back to the previous one",
                file=sys.stderr,
                flush=True,
            )
            continue
        return path
    return None


def load_sharded(path: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Load the sharded checkpoint ``path`` into ``model`` and ``optimizer`` (a collective;
    any world size); return its ``trainer.pt`` state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    step = int(_NAME.match(path.name).group(1))  # type: ignore[union-attr]
    state = _trainer_state(path, step)
    opt = _optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, opt)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return state
