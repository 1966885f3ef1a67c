"""Learnable parameters of a loss module, averaged over the ranks when nothing else does it.

A learnable temperature (and later SigLIP's scale and bias) lives in the loss module.
Put inside the DDP module with the encoders (the trainer's ``Learner``), DDP averages
its gradient like any other. Kept beside a DDP encoder, nothing would: each rank would
step with its own share and the ranks' temperatures drift apart, silently. So the loss
modules average it themselves, and only then:

- outside a DDP forward that owns the parameter (inside one, DDP averages it);
- when torch.distributed is initialised and the module's ``group`` has > 1 rank;
- when grad is enabled and the parameter requires it.

The average is a tiny autograd Function on the parameter: identity forward, and a
backward that all-reduces (averages) the gradient over ``group``: one all-reduce of a
few numbers per backward, in the loss's backward, where every rank is anyway (also a
rank with 0 rows under ``gather=True``). Averaging is idempotent: where something else
averages as well (a torch without the DDP marker, DDP's python reducer), the result is
the same, at the price of one redundant all-reduce.

Protocol: a module class with ``averages_own_gradients = True`` names the parameters
it averages this way in ``self_averaged_parameters()``; :func:`dist_infonce.cached_backward`
leaves those alone and averages every other trainable parameter of a loss module itself.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

from dist_infonce.dist import all_reduce_mean, is_distributed

__all__ = ["AveragesOwnGradients", "inside_owning_ddp", "rank_averaged"]

# Set by torch during a DDP forward; read by name so that a torch without it degrades.
_DDP_MARKER = "_active_ddp_module"
# The parameters each DDP module reduces (by identity); a DDP module keeps its
# parameter list for its lifetime, and the entry goes with it.
_REDUCED: weakref.WeakKeyDictionary[DistributedDataParallel, frozenset[int]] = (
    weakref.WeakKeyDictionary()
)


def inside_owning_ddp(params: tuple[torch.Tensor, ...]) -> bool:
    """True inside the forward of a DDP module whose gradient reduction covers ``params``.

    torch (2.13 and 2.14, and the versions before them with TorchDynamo's DDP support)
    sets ``DistributedDataParallel._active_ddp_module`` during a DDP forward (not
    under DDP's python reducer). Where the marker or DDP's parameter list is missing
    this answers False: the module then averages, which gives the same gradient.
    """
    active = getattr(DistributedDataParallel, _DDP_MARKER, None)
    if not isinstance(active, DistributedDataParallel):
        return False
    reduced = _REDUCED.get(active)
    if reduced is None:
        listed = getattr(active, "_module_parameters", None)  # without ignored ones
        if listed is None:
            return False
        reduced = _REDUCED[active] = frozenset(id(p) for p in listed if p.requires_grad)
    return all(id(p) in reduced for p in params)


class _MeanGrad(torch.autograd.Function):
    """Identity forward; the backward averages the gradients over ``group`` (one all-reduce)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, group: ProcessGroup | None, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        return tuple(x.clone() for x in xs)  # a few numbers: a copy, not a view

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # Unused outputs arrive as zeros (materialised grads), so every rank sends
        # the same shape.
        flat = torch.cat([g.reshape(-1) for g in grads])
        mean = all_reduce_mean(flat, ctx.group)
        out, offset = [], 0
        for g in grads:
            out.append(mean[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return (None, *out)


def rank_averaged(
    params: tuple[torch.Tensor, ...],
    group: ProcessGroup | None,
    *,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, ...]:
    """``params`` on ``device``, with their gradient averaged over ``group`` when nothing
    else averages it.

    Args:
        params: the module's own learnable tensors (one all-reduce for all of them).
        group: the ranks holding replicas of them; None: the world.
        device: where the loss computes (None: where the parameters are). The average
            runs in the backward on this device, where the autograd engine orders it
            with the loss's other collectives and DDP's; a parameter left on the CPU
            beside CUDA inputs would run it on another thread, out of that order.

    Returns:
        The same values (moved to ``device``): the tensors themselves, or, when
        averaging applies (see the module docstring), copies whose backward averages
        the gradient.
    """
    moved = tuple(p if device is None else p.to(device) for p in params)
    if (
        not torch.is_grad_enabled()
        or not any(p.requires_grad for p in params)
        or not is_distributed(group)
        or inside_owning_ddp(params)
    ):
        return moved
    return _MeanGrad.apply(group, *moved)


class AveragesOwnGradients(nn.Module):
    """Base of loss modules with learnable parameters: they average their gradients themselves.

    Subclasses pass their parameters through :meth:`rank_averaged` in ``forward``; the
    average runs over ``self.group`` (None: the world).
    """

    #: The protocol flag :func:`dist_infonce.cached_backward` reads.
    averages_own_gradients: ClassVar[bool] = True

    def self_averaged_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradient this module averages itself (see the module doc)."""
        return []

    def rank_averaged(
        self, *params: torch.Tensor, device: torch.device | None = None
    ) -> tuple[torch.Tensor, ...]:
        """See :func:`rank_averaged`; the group is ``self.group``."""
        return rank_averaged(params, getattr(self, "group", None), device=device)
