"""StepGuard cases that run on every rank of a real gloo world (see tests/_world.py).

The model is a float64 ``Linear(4, 1)`` under DDP; rank r's batch is a function of
(seed, step, r), so the test process rebuilds the global batch for its reference:
one process, plain SGD on the mean loss over the concatenated batch, the skipped
step left out.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce.trainer.resilience import NonFiniteError, Preempted, SignalFlag, StepGuard

LR = 0.1


def batch(step: int, rank: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of 1-based step ``step``."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)


def initial_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 1).double()


def reference_params(steps: int, skip: set[int], world: int) -> list[torch.Tensor]:
    """One process: SGD on the mean loss over all ranks' rows, steps in ``skip`` left out."""
    model = initial_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(1, steps + 1):
        if step in skip:
            continue
        xs, ys = zip(*(batch(step, r) for r in range(world)), strict=True)
        loss = ((model(torch.cat(xs)) - torch.cat(ys)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _guard(policy: str, saved: list[int]) -> StepGuard:
    flag = SignalFlag(requeue=signal.SIGUSR1, stop=[signal.SIGTERM]).install()
    return StepGuard(on_nonfinite=policy, flag=flag, save=saved.append, env={})


def nonfinite_case(policy: str, nan_step: int, nan_rank: int, steps: int) -> dict[str, Any]:
    """Train ``steps`` DDP steps; rank ``nan_rank``'s loss is NaN at ``nan_step``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(initial_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    saved: list[int] = []
    guard = _guard(policy, saved)
    taken, error = [], None
    try:
        for step in range(1, steps + 1):
            x, y = batch(step, rank)
            loss = ((model(x) - y) ** 2).mean()
            if step == nan_step and rank == nan_rank:
                loss = loss * float("nan")
            loss.backward()
            if guard.check(loss, model.parameters(), step):
                opt.step()
                taken.append(step)
            opt.zero_grad(set_to_none=True)
            guard.after_step(step)
    except NonFiniteError as e:
        error = (e.step, str(e), e.exit_code)
    finally:
        guard.flag.restore()
    params = [p.detach().clone() for p in model.module.parameters()]
    # Every rank's parameters, to check that they are identical across ranks.
    flat = torch.cat([p.reshape(-1) for p in params])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    return {
        "params": params,
        "all_ranks": everyone,
        "taken": taken,
        "saved": saved,
        "error": error,
        "skipped": guard.skipped,
    }


def signal_case(signal_rank: int, signals: list[int], at_step: int, steps: int) -> dict[str, Any]:
    """Rank ``signal_rank`` sends itself ``signals`` (real signals) during step ``at_step``."""
    rank = dist.get_rank()
    saved: list[int] = []
    guard = _guard("stop", saved)
    stopped = None
    try:
        for step in range(1, steps + 1):
            if step == at_step and rank == signal_rank:
                for sig in signals:
                    os.kill(os.getpid(), sig)  # delivered before kill() returns here
            loss = torch.tensor(float(step))
            guard.check(loss, [], step)
            guard.after_step(step)
    except Preempted as e:
        stopped = (e.step, str(e), e.exit_code)
    finally:
        guard.flag.restore()
    return {"saved": saved, "stopped": stopped, "received": guard.flag.received}
