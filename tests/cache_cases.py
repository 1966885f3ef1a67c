"""cached_backward on every rank of a real gloo world (see tests/_world.py).

Every rank builds the same model from a seed and takes its slice of a global batch
that the test process rebuilds for its single-process float64 reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from dist_infonce import InfoNCE, cached_backward, info_nce


class Centering(nn.Module):
    """Subtracts a running mean that its forward reads and updates (MoCo-style state):
    both passes must see the same buffer, rank 0's under DDP's broadcast_buffers."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x - self.center
        if self.training:
            with torch.no_grad():
                self.center.mul_(0.5).add_(0.5 * x.mean(0))
        return y


class TwoTower(nn.Module):
    """Two MLP towers (LayerNorm, BatchNorm or Centering; dropout); optionally OpenCLIP's
    returned logit scale."""

    def __init__(self, norm: str = "layer", p: float = 0.25, scalar: bool = False) -> None:
        super().__init__()

        def tower(d_in: int) -> nn.Sequential:
            layer = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d, "center": Centering}[norm](8)
            return nn.Sequential(
                nn.Linear(d_in, 8), layer, nn.ReLU(), nn.Dropout(p), nn.Linear(8, 4)
            )

        self.a, self.b = tower(5), tower(3)
        self.logit_scale = nn.Parameter(torch.tensor(1.5)) if scalar else None
        self.double()

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.logit_scale is None:
            return self.a(x0), self.b(x1)
        return self.a(x0), self.b(x1), self.logit_scale.exp()


def global_batch(seed: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    return (
        torch.randn(n, 5, generator=g, dtype=torch.float64),
        torch.randn(n, 3, generator=g, dtype=torch.float64),
    )


def local_slice(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def make_model(seed: int, norm: str, p: float, scalar: bool) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(norm=norm, p=p, scalar=scalar)


def make_loss(scalar: bool) -> Any:
    if scalar:
        # The model returns exp(logit_scale); the loss uses it as 1 / temperature.
        return lambda za, zb, scale: info_nce(
            za, zb, temperature=1.0 / scale, symmetric=True, gather=True
        )
    return InfoNCE(0.3, symmetric=True, gather=True, learn_temperature=True).double()


def ddp_cache_case(
    sizes: list[int], micro: int, seed: int, norm: str, p: float, scalar: bool, calls: int
) -> dict[str, Any]:
    """``calls`` cached_backward calls (data seed + i); grads of the last, hook counts."""
    rank = dist.get_rank()
    model = make_model(seed, norm, p, scalar)
    ddp = DistributedDataParallel(model)  # broadcast_buffers=True, the default
    reduces = [0]

    # No annotations: DDP checks them, and this module's are strings.
    def counted(state, bucket):  # type: ignore[no-untyped-def]
        reduces[0] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counted)
    loss_fn = make_loss(scalar)
    per_call, losses = [], []
    for i in range(calls):
        ddp.zero_grad(set_to_none=True)
        if isinstance(loss_fn, nn.Module):
            loss_fn.zero_grad(set_to_none=True)
        x0, x1 = global_batch(seed + i, sizes)
        torch.manual_seed(seed * 100 + 10 * i + rank)  # this rank's dropout stream
        before = reduces[0]
        loss = cached_backward(
            ddp, loss_fn, (local_slice(x0, sizes, rank), local_slice(x1, sizes, rank)), micro
        )
        per_call.append(reduces[0] - before)
        losses.append(float(loss))
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    if isinstance(loss_fn, nn.Module):
        grads.update({f"loss.{n}": q.grad.clone() for n, q in loss_fn.named_parameters()})
    return {
        "grads": grads,
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "reduces_per_call": per_call,
        "losses": losses,
    }


def empty_rank_case(sizes: list[int], wrap: bool) -> str:
    """A rank without rows; the model DDP-wrapped or plain (the loss gathers)."""
    rank = dist.get_rank()
    model = make_model(0, "layer", 0.0, False)
    ddp = DistributedDataParallel(model) if wrap else model
    x0, x1 = global_batch(0, sizes)
    try:
        cached_backward(
            ddp, make_loss(False), (local_slice(x0, sizes, rank), local_slice(x1, sizes, rank)), 2
        )
    except ValueError as e:
        return str(e)
    return "no error"


def shared_ddp_case(sizes: list[int], micro: int, seed: int) -> dict[str, Any]:
    """The same DDP model as two towers (each rank's batch split in halves), with a
    layer whose forward reads and updates a buffer: one all-reduce per call, and pass 2
    must see the buffers pass 1 saw although DDP synced after the first tower."""
    rank = dist.get_rank()
    model = make_model(seed, "center", 0.25, False)
    ddp = DistributedDataParallel(model)
    reduces = [0]

    def counted(state, bucket):  # type: ignore[no-untyped-def]
        reduces[0] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counted)
    clip = InfoNCE(0.3, symmetric=True, gather=True)
    loss_fn = lambda a0, b0, a1, b1: clip(torch.cat([a0, a1]), torch.cat([b0, b1]))
    x0, x1 = global_batch(seed, sizes)
    x0, x1 = local_slice(x0, sizes, rank), local_slice(x1, sizes, rank)
    half = len(x0) // 2
    torch.manual_seed(seed * 100 + rank)
    cached_backward([ddp, ddp], loss_fn, [(x0[:half], x1[:half]), (x0[half:], x1[half:])], micro)
    return {
        "grads": {n: q.grad.clone() for n, q in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "reduces": reduces[0],
    }


def closure_tower_case(sizes: list[int], micro: int, seed: int) -> dict[str, torch.Tensor]:
    """The trainer's explicit negatives: a plain callable over the DDP model's own module
    (its BatchNorm buffers invisible to cached_backward) beside the DDP tower. Pass 1 must
    leave those shared buffers as it found them, so each micro-batch updates them once."""
    rank = dist.get_rank()
    model = make_model(seed, "batch", 0.0, False)
    ddp = DistributedDataParallel(model)
    x0, x1 = global_batch(seed, sizes)
    x0, x1 = local_slice(x0, sizes, rank), local_slice(x1, sizes, rank)
    negatives = x0.flip(0) + 0.5  # any rows through tower a
    loss_fn = InfoNCE(0.3, gather=True)
    cached_backward([ddp, lambda x: model.a(x)], loss_fn, [(x0, x1), negatives], micro)
    return {n: b.clone() for n, b in model.named_buffers()}


def bad_input_on_one_rank_case() -> str:
    """Rank 1 passes inputs with different first dimensions: every rank raises."""
    rank = dist.get_rank()
    ddp = DistributedDataParallel(make_model(0, "layer", 0.0, False))
    x0, x1 = global_batch(0, [4])
    if rank == 1:
        x1 = x1[:3]
    try:
        cached_backward(ddp, make_loss(False), (x0, x1), 2)
    except ValueError as e:
        return str(e)
    return "no error"
