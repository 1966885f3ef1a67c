"""cached_backward with a dict of inputs (keyword arguments) under DDP, on every rank of
a real gloo world; the model, data and reference are those of tests/cache_cases.py."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_infonce import cached_backward
from tests import cache_cases


def ddp_dict_case(sizes: list[int], micro: int, seed: int, p: float) -> dict[str, Any]:
    """One call with ``{"x0": ..., "x1": ...}`` (TwoTower.forward's parameter names)."""
    rank = dist.get_rank()
    model = cache_cases.make_model(seed, "layer", p, False)
    ddp = DistributedDataParallel(model)
    loss_fn = cache_cases.make_loss(False)
    x0, x1 = cache_cases.global_batch(seed, sizes)
    inputs = {
        "x1": cache_cases.local_slice(x1, sizes, rank),  # by name, not by position
        "x0": cache_cases.local_slice(x0, sizes, rank),
    }
    torch.manual_seed(seed * 100 + rank)  # this rank's dropout stream (call 0)
    cached_backward(ddp, loss_fn, inputs, micro)
    grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    grads.update({f"loss.{n}": q.grad.clone() for n, q in loss_fn.named_parameters()})
    return grads
