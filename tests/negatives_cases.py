"""NegativeQueue cases that run on every rank of a real gloo world (see tests/_world.py).

Rank r's keys of push p are a pure function of (seed, p, r) (:func:`push_keys`), so
the test process replays every push in one process for its reference.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce import NegativeQueue, cached_backward, info_nce
from dist_infonce.testing import record_collectives

#: Dtype each rank pushes in (cycled): the queue casts before it gathers, so ranks
#: may disagree on the keys' dtype and still store the same bytes.
PUSH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def push_keys(seed: int, push: int, rank: int, n: int, dim: int) -> torch.Tensor:
    """Rank ``rank``'s keys of push ``push`` (0-based), in the dtype that rank pushes."""
    g = torch.Generator().manual_seed(seed * 100_003 + push * 1009 + rank)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x.to(PUSH_DTYPES[rank % len(PUSH_DTYPES)])


def replay_case(size: int, dim: int, layout: list[list[int]], seed: int) -> list[dict[str, Any]]:
    """Push ``layout[p][rank]`` rows at push p; after every push, this rank's view of the
    queue (rows as raw bytes too) and the state it reports."""
    rank = dist.get_rank()
    queue = NegativeQueue(size, dim)
    out = []
    for p, sizes in enumerate(layout):
        queue.push(push_keys(seed, p, rank, sizes[rank], dim))
        neg = queue.negatives()
        out.append(
            {
                "negatives": neg,
                "bytes": neg.numpy().tobytes(),
                "filled": queue.filled,
                "position": queue.position,
                "pushes": queue.pushes,
                "age": queue.age,
                "requires_grad": neg.requires_grad,
            }
        )
    return out


def bad_push_case(bad_rank: int, kind: str) -> dict[str, Any]:
    """Rank ``bad_rank`` pushes bad keys: every rank must raise, the queue is untouched,
    and the group still works."""
    rank = dist.get_rank()
    queue = NegativeQueue(4, 3)
    queue.push(torch.ones(1, 3))
    keys: Any = torch.zeros(2, 3)
    if rank == bad_rank:
        keys = {
            "dim": torch.zeros(2, 5),
            "ndim": torch.zeros(3),
            "int": torch.zeros(2, 3, dtype=torch.int64),
            "list": [[0.0, 0.0, 0.0]],
        }[kind]
    try:
        queue.push(keys)
        message = "no error"
    except ValueError as e:
        message = f"ValueError: {e}"
    t = torch.ones(1)
    dist.all_reduce(t)
    return {"message": message, "filled": queue.filled, "pushes": queue.pushes, "sum": t.item()}


def round_trip_case(size: int, dim: int, seed: int) -> dict[str, Any]:
    """Push, save through torch.save/torch.load(weights_only=True), load into a fresh
    queue, push again into both: the two must stay identical."""
    rank, world = dist.get_rank(), dist.get_world_size()
    a = NegativeQueue(size, dim)
    for p in range(3):
        a.push(push_keys(seed, p, rank, 2 + rank, dim))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = NegativeQueue(size, dim)
    b.load_state_dict(torch.load(buf, weights_only=True))
    same_after_load = torch.equal(a.negatives(), b.negatives()) and a.age == b.age
    for p in range(3, 6):
        keys = push_keys(seed, p, rank, 1 + (p + rank) % world, dim)
        a.push(keys)
        b.push(keys)
    return {
        "same_after_load": same_after_load,
        "same_after_pushes": torch.equal(a.negatives(), b.negatives()),
        "state": (a.position, a.filled, a.pushes, a.age),
        "loaded_state": (b.position, b.filled, b.pushes, b.age),
    }


# ------------------------------------------------------------------ DDP and the queue


class WithQueue(nn.Module):
    """A model that owns a queue (MoCo keeps its queue in the model) or, for the control,
    a registered buffer of the same size."""

    def __init__(self, size: int, dim: int, as_buffer: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Linear(dim, dim))
        if as_buffer:
            self.register_buffer("queue_rows", torch.zeros(size, dim))
        else:
            self.queue = NegativeQueue(size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@contextmanager
def _all_collectives() -> Iterator[list[tuple[str, int]]]:
    """``(collective, numel)`` of every collective issued: those of
    :func:`~dist_infonce.testing.record_collectives`, plus ``dist._broadcast_coalesced``,
    through which DDP sends its parameters at construction and its buffers before a
    forward (record_collectives does not intercept it)."""

    def numel(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return max((a.numel() for a in args if isinstance(a, torch.Tensor)), default=0)

    original = dist._broadcast_coalesced
    with record_collectives(numel) as calls:

        def counted(group: Any, tensors: list[torch.Tensor], *rest: Any) -> Any:
            calls.append(("_broadcast_coalesced", sum(t.numel() for t in tensors)))
            return original(group, tensors, *rest)

        dist._broadcast_coalesced = counted
        try:
            yield calls
        finally:
            dist._broadcast_coalesced = original


def ddp_broadcast_case(size: int, dim: int, as_buffer: bool, cached: bool) -> dict[str, Any]:
    """Collectives (name, numel) of DDP's construction and of two training steps (plain
    or through cached_backward) of a model holding a queue; pushes in between."""
    rank = dist.get_rank()
    model = WithQueue(size, dim, as_buffer)
    with _all_collectives() as init_calls:
        ddp = DistributedDataParallel(model)
    step_calls = []
    for step in range(2):
        x = torch.randn(6, dim, generator=torch.Generator().manual_seed(10 * step + rank))
        with _all_collectives() as calls:
            if cached:
                cached_backward(ddp, lambda z: info_nce(z, z.flip(0), gather=True), x, 2)
            else:
                info_nce(ddp(x), x, gather=True).backward()
        step_calls.append(list(calls))
        if not as_buffer:
            model.queue.push(x)
    return {"init": list(init_calls), "steps": step_calls}


def moco_loss_case(
    sizes: list[int], queue_size: int, dim: int, seed: int, chunk: int | None
) -> dict[str, Any]:
    """Fill a queue from every rank, then this rank's MoCo loss with its own rows."""
    rank = dist.get_rank()
    queue = NegativeQueue(queue_size, dim, dtype=torch.float64)
    for p in range(3):
        queue.push(push_keys(seed, p, rank, sizes[rank] + 1, dim))
    g = torch.Generator().manual_seed(seed)
    q_all = torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64)
    k_all = q_all + 0.3 * torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    q = q_all[rows].clone().requires_grad_()
    k = k_all[rows].clone().requires_grad_()
    loss = info_nce(q, k, queue.negatives(), temperature=0.2, chunk_size=chunk)
    loss.backward()
    return {"loss": loss.item(), "dq": q.grad, "dk": k.grad, "negatives": queue.negatives()}
