"""What every loss of the family shares: the positive logit, the row count, the reduction.

The reduction carries the gradient convention (DESIGN.md): with ``gather=True`` each
rank returns ``sum(local row losses) * world_size / global_rows`` for ``"mean"``, so
that the mean over ranks is the global mean and DDP-averaged gradients are exactly
those of one process over the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dist_infonce.kernels import compute_dtype

__all__ = ["global_count", "pair_logit", "reduce_losses"]


def pair_logit(a: torch.Tensor, b: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """Row-wise logit ``t * <a_i, b_i>`` in the accumulation dtype. Shape: (N, D) -> (N,)."""
    dt = compute_dtype(a.dtype)
    return (a.to(dt) * b.to(dt)).sum(-1) * inv_temp


def global_count(n: int, device: torch.device, group: ProcessGroup | None) -> int:
    """The sum of ``n`` over the ranks of ``group`` (one all-reduce of one int64)."""
    count = torch.tensor([n], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        count = count.to(device)
    dist.all_reduce(count, group=group)
    return int(count.item())


def reduce_losses(
    losses: torch.Tensor, *, reduction: str, global_rows: int, world: int
) -> torch.Tensor:
    """Apply ``reduction`` to this rank's row losses with the gradient convention.

    DDP averages gradients over the ``world`` ranks, so each rank scales its sum by
    ``world``: the average of the returned values (and of their gradients) is then
    the global mean (or sum).

    Shape: losses (N,) -> () or (N,) for ``"none"``.

    Raises:
        ValueError: the global batch is empty (every rank passed 0 rows).
    """
    if global_rows == 0:
        raise ValueError("the global batch is empty: every rank passed 0 rows")
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "mean":
        return total * (world / global_rows)
    return total * world
