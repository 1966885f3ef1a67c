"""A view of a batch: one tensor, or a dict of tensors with one common first dimension.

The built-in towers take one tensor per view. A Hugging Face text tower takes its
tokenizer's ``input_ids`` and ``attention_mask`` as keyword arguments, so its view is
a dict (the mask travels with the ids through the DataLoader workers, the device copy,
:func:`dist_infonce.cached_backward` and the evaluation). The helpers here do to
either form what the trainer does to a batch: count, slice, stack, concatenate, move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["View", "cat", "pin", "rows", "stack", "take", "to_device"]

#: One view of a batch: (B, ...) or ``{name: (B, ...)}``.
View = torch.Tensor | dict[str, torch.Tensor]


def rows(x: View) -> int:
    """The batch size B of ``x``."""
    if isinstance(x, dict):
        return next(iter(x.values())).shape[0]
    return x.shape[0]


def take(x: View, index: slice) -> View:
    """Rows ``index`` of ``x`` (every entry of a dict alike)."""
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def to_device(x: View, device: torch.device, *, non_blocking: bool = False) -> View:
    """``x`` on ``device``."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in x.items()}
    return x.to(device, non_blocking=non_blocking)


def pin(x: View) -> View:
    """A pinned copy of ``x`` (the DataLoader's pin-memory thread)."""
    if isinstance(x, dict):
        return {k: v.pin_memory() for k, v in x.items()}
    return x.pin_memory()


def stack(samples: Sequence[Any]) -> View:
    """One view from per-sample values: tensors stacked, or dicts stacked key by key.

    Shape: samples: S values of shape (*shape) (or dicts of them). Output: (S, *shape).
    """
    if samples and isinstance(samples[0], dict):
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    return torch.stack(list(samples))


def cat(views: Sequence[View]) -> View:
    """The rows of ``views`` one after the other (dicts key by key)."""
    if views and isinstance(views[0], dict):
        return {k: torch.cat([v[k] for v in views]) for k in views[0]}  # type: ignore[index]
    return torch.cat(list(views))  # type: ignore[arg-type]
