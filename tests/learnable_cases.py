"""A learnable temperature on every rank of a real gloo world (see tests/_world.py).

Three ways to train an encoder with ``InfoNCE`` / ``NTXent(learn_temperature=True)``:
``beside`` (a DDP encoder, the loss module outside it: the README's CLIP example),
``inside`` (encoder and loss in one DDP module, as the trainer's ``Learner``) and
``cached`` (a DDP encoder through ``cached_backward``). Each rank runs several SGD
steps on its slice of a global batch that the test rebuilds for its one-process
float64 reference (:func:`train_reference`), and reports what it saw per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce import InfoNCE, NTXent, cached_backward
from tests.dist_cases import _count_collectives

D_IN, D_EMB, LR, TEMPERATURE = 6, 5, 0.5, 0.3


class Encoder(nn.Module):
    """Two small towers (CLIP), or one tower for both views (SimCLR)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.q = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_EMB))
        self.k = self.q if shared else nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_EMB))  # fmt: skip

    def forward(self, xq: torch.Tensor, xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(xq), self.k(xk)


class Learner(nn.Module):
    """Encoder and loss in one module (DDP then owns the temperature)."""

    def __init__(self, encoder: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.encoder, self.loss = encoder, loss

    def forward(self, xq: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        return self.loss(*self.encoder(xq, xk))


class Weighted(nn.Module):
    """A user's loss module: our InfoNCE (which averages its own temperature) times a
    learnable weight of the user's (which cached_backward averages)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.log_weight = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.gather = inner.gather

    def forward(self, zq: torch.Tensor, zk: torch.Tensor) -> torch.Tensor:
        return self.inner(zq, zk) * self.log_weight.exp()


def make(loss_kind: str, gather: bool, seed: int) -> tuple[Encoder, nn.Module]:
    """The encoder and the loss module, the same on every rank and in the reference."""
    torch.manual_seed(seed)
    encoder = Encoder(shared=loss_kind == "ntxent").double()
    if loss_kind == "ntxent":
        loss: nn.Module = NTXent(TEMPERATURE, gather=gather, learn_temperature=True)
    elif loss_kind == "param":
        # A user's nn.Parameter as the fixed temperature: registered, so the module's own.
        t = nn.Parameter(torch.tensor(TEMPERATURE, dtype=torch.float64))
        loss = InfoNCE(t, symmetric=True, gather=gather)
    else:
        loss = InfoNCE(
            TEMPERATURE, symmetric=loss_kind in ("clip", "weighted"), gather=gather,
            learn_temperature=True,
        )  # fmt: skip
    loss = loss.double()
    if loss_kind == "weighted":
        loss = Weighted(loss)
    return encoder, loss


def batch(seed: int, step: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one step: queries and noisy copies (a loss that learns)."""
    g = torch.Generator().manual_seed(seed * 100 + step)
    xq = torch.randn(sum(sizes), D_IN, generator=g, dtype=torch.float64)
    return xq, xq + 0.5 * torch.randn(sum(sizes), D_IN, generator=g, dtype=torch.float64)


def rows_of(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _snapshot(encoder: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    named = [*encoder.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())]
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


@contextmanager
def _marker_hidden(hide: bool) -> Iterator[None]:
    """As on a torch without DDP's active-module marker (the module cannot tell)."""
    if not hide:
        yield
        return
    from dist_infonce.losses import learnable

    saved = learnable._DDP_MARKER
    learnable._DDP_MARKER = "_no_such_attribute"
    try:
        yield
    finally:
        learnable._DDP_MARKER = saved


def train_case(
    pattern: str,
    loss_kind: str,
    gather: bool,
    sizes: list[int],
    seed: int,
    steps: int,
    micro: int = 2,
    hide_marker: bool = False,
) -> dict[str, Any]:
    """``steps`` SGD steps on this rank's slice; per step the returned loss, the
    gradients, the parameters after the step and the sizes of the small all-reduces
    (the temperature's averages: 1 or 2 numbers) this rank issued."""
    rank = dist.get_rank()
    encoder, loss = make(loss_kind, gather, seed)
    if pattern == "inside":
        model: nn.Module = DistributedDataParallel(Learner(encoder, loss))
    else:
        model = DistributedDataParallel(encoder)
    opt = torch.optim.SGD([*encoder.parameters(), *loss.parameters()], lr=LR)
    out: dict[str, list[Any]] = {"loss": [], "grads": [], "params": [], "small_all_reduces": []}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        xq, xk = batch(seed, step, sizes)
        xq, xk = xq[rows_of(sizes, rank)], xk[rows_of(sizes, rank)]
        with _count_collectives() as calls, _marker_hidden(hide_marker):
            if pattern == "inside":
                value = model(xq, xk)
                value.backward()
            elif pattern == "beside":
                value = loss(*model(xq, xk))
                value.backward()
            else:
                value = cached_backward(model, loss, (xq, xk), micro)
        out["loss"].append(float(value.detach()))
        out["grads"].append(_snapshot(encoder, loss))
        out["small_all_reduces"].append([n for name, n in calls if name == "all_reduce" and n <= 2])
        opt.step()
        out["params"].append({n: p.detach().clone() for n, p in loss.named_parameters()})
    return out


def train_reference(
    loss_kind: str, gather: bool, sizes: list[int], seed: int, steps: int
) -> dict[str, Any]:
    """One process, float64: the same steps on the global batch. With ``gather`` the
    global loss; without, the mean over ranks of each rank's local loss (what DDP's
    average of the local gradients descends)."""
    encoder, loss = make(loss_kind, False, seed)
    opt = torch.optim.SGD([*encoder.parameters(), *loss.parameters()], lr=LR)
    out: dict[str, list[Any]] = {"loss": [], "grads": [], "params": []}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        xq, xk = batch(seed, step, sizes)
        if gather:
            value = loss(*encoder(xq, xk))
        else:
            parts = [loss(*encoder(xq[rows_of(sizes, r)], xk[rows_of(sizes, r)])) for r in range(len(sizes))]  # fmt: skip
            value = sum(parts) / len(sizes)
        value.backward()
        out["loss"].append(float(value.detach()))
        out["grads"].append(_snapshot(encoder, loss))
        opt.step()
        out["params"].append({n: p.detach().clone() for n, p in loss.named_parameters()})
    return out


def bad_input_plain_model_case() -> str:
    """No DDP, a non-gathering loss with a learnable temperature (its backward averages
    over the world), rank 1's inputs malformed: every rank must raise, none may wait."""
    rank = dist.get_rank()
    encoder, loss = make("one", False, 0)
    xq, xk = batch(0, 0, [4])
    if rank == 1:
        xk = xk[:3]
    try:
        cached_backward(encoder, loss, (xq, xk), 2)
    except ValueError as e:
        return str(e)
    return "no error"
