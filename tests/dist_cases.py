"""Functions that run on every rank of a real gloo world (see tests/_world.py).

Data is generated from a seed for the *global* batch on every rank, and each rank
takes its slice, so the test process can rebuild exactly the same global batch
for its single-process float64 reference.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce import GatherLayer, InfoNCE, NTXent, all_gather_with_grad
from dist_infonce.losses import info_nce
from dist_infonce.testing import record_collectives

# ------------------------------------------------------------------- GatherLayer


def rank_rows(
    seed: int, rank: int, n: int, trailing: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn((n, *trailing), generator=g, dtype=torch.float64).to(dtype)


def rank_weights(seed: int, rank: int, total: int, trailing: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + 500 + rank)
    return torch.randn((total, *trailing), generator=g, dtype=torch.float64)


def gather_case(
    sizes: list[int], trailing: tuple[int, ...], dtype: torch.dtype, seed: int, use_layer: bool
) -> dict[str, Any]:
    """Gather rank-specific rows; loss_r = sum(w_r * gathered). Return output and grad."""
    rank = dist.get_rank()
    x = rank_rows(seed, rank, sizes[rank], trailing, dtype).requires_grad_()
    if use_layer:
        parts = GatherLayer.apply(x)
        assert len(parts) == len(sizes)
        assert [p.shape[0] for p in parts] == sizes
        out = torch.cat(parts)
    else:
        out = all_gather_with_grad(x)
    w = rank_weights(seed, rank, sum(sizes), trailing).to(dtype)
    (out * w).sum().backward()
    return {"out": out.detach(), "grad": x.grad.detach()}


def gather_mismatch_case(kind: str) -> str:
    """Rank 1 disagrees on trailing shape or dtype; every rank must raise ValueError."""
    rank = dist.get_rank()
    dtype = torch.float64 if (kind == "dtype" and rank == 1) else torch.float32
    dim = 5 if (kind == "shape" and rank == 1) else 4
    x = torch.zeros(3, dim, dtype=dtype)
    try:
        all_gather_with_grad(x)
    except ValueError as e:
        # The group must still be usable: a follow-up collective succeeds.
        t = torch.ones(1)
        dist.all_reduce(t)
        return f"ValueError: {e} | follow-up all_reduce={t.item()}"
    return "no error"


def _count_collectives() -> AbstractContextManager[list[tuple[str, int]]]:
    """Record ``(collective, largest tensor's numel)`` for every collective issued."""

    def numel(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return max((a.numel() for a in args if isinstance(a, torch.Tensor)), default=0)

    return record_collectives(numel)


def collectives_case(
    mode: str,
    n: int,
    d: int,
    chunk: int | None,
    labeled: bool = False,
    normalize: bool = True,
) -> dict[str, Any]:
    """Collectives issued by one forward and one backward with gather=True."""
    torch.manual_seed(dist.get_rank())
    q = torch.randn(n, d, requires_grad=True)
    k = torch.randn(n, d, requires_grad=True)
    neg = torch.randn(n + 1, d, requires_grad=True) if mode == "unpaired" else None
    labels = torch.randint(0, 3, (n,)) if labeled else None
    with _count_collectives() as fwd:
        if mode == "ntxent":
            from dist_infonce import nt_xent

            loss = nt_xent(q, k, gather=True, chunk_size=chunk, labels=labels)
        else:
            loss = info_nce(
                q, k, neg, symmetric=mode == "sym", gather=True, chunk_size=chunk,
                labels=labels, normalize=normalize,
            )  # fmt: skip
    with _count_collectives() as bwd:
        loss.backward()
    return {"forward": list(fwd), "backward": list(bwd)}


# ------------------------------------------------------------ DDP gradient checks

D_IN, D_EMB, PAIRED_NEGS = 6, 5, 3


class Towers(nn.Module):
    """Two small towers and a loss with a learnable temperature, as in CLIP."""

    def __init__(self, mode: str, loss: nn.Module) -> None:
        super().__init__()
        self.mode = mode
        self.q = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_EMB))
        if mode != "ntxent":  # NT-Xent: one encoder sees both views
            self.k = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_EMB))
        self.loss = loss

    def forward(
        self,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xn: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.mode == "ntxent":
            return self.loss(self.q(xq), self.q(xk), labels=labels)  # one encoder, two views
        neg = None if xn is None else self.k(xn)
        return self.loss(self.q(xq), self.k(xk), neg, labels=labels)


def make_model(mode: str, chunk: int | None, temperature: float, gather: bool, seed: int) -> Towers:
    if mode == "ntxent":
        loss: nn.Module = NTXent(
            temperature, chunk_size=chunk, gather=gather, learn_temperature=True
        )
    else:
        loss = InfoNCE(
            temperature,
            negative_mode="paired" if mode == "paired" else "unpaired",
            symmetric=mode == "sym",
            chunk_size=chunk,
            gather=gather,
            learn_temperature=True,
        )
    torch.manual_seed(seed)
    return Towers(mode, loss).double()


def make_data(
    mode: str, sizes: list[int], neg_sizes: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The global batch: queries, positives and (unpaired / paired) negatives."""
    g = torch.Generator().manual_seed(seed + 1)
    n = sum(sizes)
    xq = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    # Positives are a noisy copy of the query: a loss that is not saturated.
    xk = xq + 0.5 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    xn = None
    if mode == "unpaired":
        xn = torch.randn(sum(neg_sizes), D_IN, generator=g, dtype=torch.float64)
    elif mode == "paired":
        xn = torch.randn(n, PAIRED_NEGS, D_IN, generator=g, dtype=torch.float64)
    return xq, xk, xn


def make_labels(sizes: list[int], seed: int) -> torch.Tensor:
    """Global labels: few classes, int64 values only exact comparison tells apart."""
    classes = torch.tensor([2**62, 2**62 + 1, -(2**63), 2**63 - 1], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed + 2)
    return classes[torch.randint(0, len(classes), (sum(sizes),), generator=g)]


def ddp_case(
    mode: str,
    sizes: list[int],
    neg_sizes: list[int],
    chunk: int | None,
    temperature: float,
    seed: int,
    labeled: bool = False,
) -> dict[str, Any]:
    """One DDP step on this rank's slice; return the loss and the averaged gradients."""
    rank = dist.get_rank()
    xq, xk, xn = make_data(mode, sizes, neg_sizes, seed)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    labels = make_labels(sizes, seed)[rows] if labeled else None
    if mode == "unpaired":
        xn = xn[sum(neg_sizes[:rank]) : sum(neg_sizes[: rank + 1])]
    elif mode == "paired":
        xn = xn[rows]
    model = make_model(mode, chunk, temperature, gather=True, seed=seed)
    ddp = DistributedDataParallel(model)
    loss = ddp(xq[rows], xk[rows], xn, labels)
    loss.backward()
    return {
        "loss": loss.item(),
        "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
    }


def subgroup_case(sizes: list[int], seed: int) -> dict[str, Any]:
    """Ranks {0, 1} and {2, 3} gather within their own group (symmetric, chunked)."""
    rank = dist.get_rank()
    # new_group must be called by every rank, for every group, in the same order.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    xq, xk, _ = make_data("sym", sizes, [], seed)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    q = xq[rows].clone().requires_grad_()
    k = xk[rows].clone().requires_grad_()
    loss = info_nce(q, k, symmetric=True, gather=True, group=group, chunk_size=2)
    loss.backward()
    return {"loss": loss.item(), "dq": q.grad, "dk": k.grad}


def symmetric_case(
    sizes: list[int],
    seed: int,
    temperature: float,
    normalize: bool,
    scale: float,
    chunk: int | None,
) -> dict[str, Any]:
    """The gathered symmetric loss on this rank's slice: value and input gradients."""
    rank = dist.get_rank()
    xq, xk, _ = make_data("sym", sizes, [], seed)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    q = (scale * xq[rows]).requires_grad_()
    k = (scale * xk[rows]).requires_grad_()
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    loss = info_nce(
        q, k, temperature=t, symmetric=True, gather=True, normalize=normalize, chunk_size=chunk
    )
    loss.backward()
    return {"loss": loss.item(), "dq": q.grad, "dk": k.grad, "dt": t.grad}


def labels_reduction_case(
    mode: str, sizes: list[int], seed: int, reduction: str, chunk: int | None
) -> dict[str, Any]:
    """Labelled loss with ``reduction`` on this rank's slice, backpropagated with a
    rank-specific cotangent slice: the output and the input gradients."""
    from dist_infonce import nt_xent

    rank = dist.get_rank()
    xq, xk, _ = make_data("sym", sizes, [], seed)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    q, k = xq[rows].clone().requires_grad_(), xk[rows].clone().requires_grad_()
    labels = make_labels(sizes, seed)[rows]
    kw: dict[str, Any] = {"reduction": reduction, "gather": True, "chunk_size": chunk}
    if mode == "ntxent":
        out = nt_xent(q, k, 0.3, labels=labels, **kw)
        w = cotangent(sizes, seed)[rows].repeat(2) if reduction == "none" else 1.0
    else:
        out = info_nce(q, k, temperature=0.3, symmetric=mode == "sym", labels=labels, **kw)
        w = cotangent(sizes, seed)[rows] if reduction == "none" else 1.0
    (out * w).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad}


def cotangent(sizes: list[int], seed: int) -> torch.Tensor:
    """Per-row weights of the global batch for ``reduction="none"`` backward."""
    return torch.linspace(0.5, 1.5, sum(sizes), dtype=torch.float64)
