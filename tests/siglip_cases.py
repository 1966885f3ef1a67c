"""SigLIP on every rank of a real gloo world (see tests/_world.py).

Every rank draws the same global batch from a seed and takes its slice, so the test
process can rebuild it for its one-process float64 reference.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce import SigLIP, cached_backward, siglip_loss
from tests.dist_cases import _count_collectives

D_IN_X, D_IN_Y, D_EMB = 6, 4, 5


def global_pairs(
    n: int, d: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) features of both towers; y a noisy copy of x (a loss that is not flat)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), (x + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


def global_labels(n: int, seed: int) -> torch.Tensor:
    """Few classes, int64 values only an exact comparison tells apart."""
    classes = torch.tensor([2**62, 2**62 + 1, -(2**63), 7], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed + 2)
    return classes[torch.randint(0, 4, (n,), generator=g)]


def rows_of(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [out.detach(), *torch.autograd.grad(out, leaves)]


def open_clip_case(
    dist_impl: str, n: int, d: int, seed: int, kernel: str, chunk: int | None, dtype: str
) -> dict[str, list[torch.Tensor]]:
    """OpenCLIP's ``SigLipLoss(dist_impl)`` and ours (gather=True) on equal local batches:
    each rank's value and the gradients of its x, y and of t, b (no DDP averaging)."""
    from open_clip.loss import SigLipLoss

    rank, world = dist.get_rank(), dist.get_world_size()
    dt = getattr(torch, dtype)
    xg, yg = global_pairs(world * n, d, seed, dt)
    rows = slice(rank * n, (rank + 1) * n)
    out: dict[str, list[torch.Tensor]] = {}
    for who in ("open_clip", "ours"):
        x, y = xg[rows].clone().requires_grad_(), yg[rows].clone().requires_grad_()
        t = torch.tensor(10.0, dtype=dt, requires_grad=True)
        b = torch.tensor(-10.0, dtype=dt, requires_grad=True)
        if who == "open_clip":
            peer = SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
            value = peer(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t, b)
        else:
            value = siglip_loss(x, y, t, b, gather=True, kernel=kernel, chunk_size=chunk)
        out[who] = _grads(value, [x, y, t, b])
    return out


def reduction_case(
    sizes: list[int], d: int, seed: int, reduction: str, kernel: str, chunk: int | None,
    labeled: bool,
) -> dict[str, Any]:  # fmt: skip
    """``siglip_loss(gather=True)`` on this rank's slice, backpropagated with this rank's
    slice of a global per-row cotangent (``"none"``) or 1: output and gradients."""
    rank = dist.get_rank()
    xg, yg = global_pairs(sum(sizes), d, seed)
    rows = rows_of(sizes, rank)
    x, y = xg[rows].clone().requires_grad_(), yg[rows].clone().requires_grad_()
    t = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    labels = global_labels(sum(sizes), seed)[rows] if labeled else None
    out = siglip_loss(
        x, y, t, b, labels=labels, reduction=reduction, gather=True, kernel=kernel,
        chunk_size=chunk,
    )  # fmt: skip
    w = cotangent(sum(sizes))[rows] if reduction == "none" else 1.0
    (out * w).sum().backward()
    return {"out": out.detach(), "dx": x.grad, "dy": y.grad, "dt": t.grad, "db": b.grad}


def cotangent(n: int) -> torch.Tensor:
    """Per-row weights of the global batch for ``reduction="none"``."""
    return torch.linspace(0.5, 1.5, n, dtype=torch.float64)


class Towers(nn.Module):
    """Two small towers (images, texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Sequential(nn.Linear(D_IN_X, 8), nn.Tanh(), nn.Linear(8, D_EMB))
        self.y = nn.Sequential(nn.Linear(D_IN_Y, 8), nn.Tanh(), nn.Linear(8, D_EMB))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x(a), self.y(b)


class Learner(nn.Module):
    """Towers and loss in one module (DDP then owns log t and b)."""

    def __init__(self, towers: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.towers, self.loss = towers, loss

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        return self.loss(*self.towers(a, b), labels=labels)


def make(kernel: str, chunk: int | None, gather: bool, seed: int) -> tuple[Towers, SigLIP]:
    """The towers and the loss, the same on every rank and in the reference."""
    torch.manual_seed(seed)
    towers = Towers().double()
    # t = 5, b = -2: a loss whose positives and negatives both matter at init.
    loss = SigLIP(5.0, -2.0, gather=gather, kernel=kernel, chunk_size=chunk).double()
    return towers, loss


def inputs(sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(sum(sizes), D_IN_X, generator=g, dtype=torch.float64)
    # The second tower sees part of the first's input, noisy: pairs that can be learned.
    b = a[:, :D_IN_Y] + 0.3 * torch.randn(sum(sizes), D_IN_Y, generator=g, dtype=torch.float64)
    return a, b


def named_grads(towers: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    named = [*towers.named_parameters(), *(("loss." + k, p) for k, p in loss.named_parameters())]
    return {k: p.grad.detach().clone() for k, p in named if p.grad is not None}


def ddp_case(
    pattern: str, sizes: list[int], kernel: str, chunk: int | None, labeled: bool, seed: int,
    micro: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """One step on this rank's slice: the returned loss, every gradient after DDP (and the
    module's own average), and the small all-reduces this rank issued."""
    rank = dist.get_rank()
    towers, loss = make(kernel, chunk, gather=True, seed=seed)
    a, b = inputs(sizes, seed)
    rows = rows_of(sizes, rank)
    labels = global_labels(sum(sizes), seed)[rows] if labeled else None
    with _count_collectives() as calls:
        if pattern == "inside":
            model = DistributedDataParallel(Learner(towers, loss))
            value = model(a[rows], b[rows], labels)
            value.backward()
        elif pattern == "beside":
            model = DistributedDataParallel(towers)
            value = loss(*model(a[rows], b[rows]), labels=labels)
            value.backward()
        else:
            model = DistributedDataParallel(towers)
            fn = functools.partial(loss, labels=labels)
            value = cached_backward(model, fn, (a[rows], b[rows]), micro)
    return {
        "loss": float(value.detach()),
        "grads": named_grads(towers, loss),
        "small_all_reduces": [n for name, n in calls if name == "all_reduce" and n <= 2],
    }


def reference(
    sizes: list[int], kernel: str, chunk: int | None, labeled: bool, seed: int
) -> dict[str, Any]:
    """The same step in one process on the concatenated global batch (float64)."""
    towers, loss = make("dense", None, gather=False, seed=seed)
    a, b = inputs(sizes, seed)
    labels = global_labels(sum(sizes), seed) if labeled else None
    value = loss(*towers(a, b), labels=labels)
    value.backward()
    return {"loss": float(value.detach()), "grads": named_grads(towers, loss)}


def collectives_case(n: int, d: int, kernel: str, chunk: int | None, labeled: bool) -> dict:
    """Collectives of one forward and one backward of ``SigLIP(gather=True)`` beside DDP."""
    torch.manual_seed(dist.get_rank())
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randn(n, d, requires_grad=True)
    labels = torch.randint(0, 3, (n,)) if labeled else None
    loss_fn = SigLIP(gather=True, kernel=kernel, chunk_size=chunk)
    with _count_collectives() as fwd:
        loss = loss_fn(x, y, labels=labels)
    with _count_collectives() as bwd:
        loss.backward()
    return {"forward": list(fwd), "backward": list(bwd)}


# ------------------------------------------------- the fused kernel (one process)


def triton_compare(
    dtype: str,
    n: int,
    d: int,
    chunk_size: int | None,
    seed: int,
    *,
    reduction: str = "mean",
    labeled: bool = False,
    scale: float = 1.0,
    t: float = 10.0,
    b: float = -10.0,
    device: str = "cpu",
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``siglip_loss(kernel="triton")`` vs the float64 reference of tests/reference.py.

    The inputs are L2-normalised (times ``scale``) and rounded to ``dtype`` first and the
    loss runs with ``normalize=False``: the reference sees exactly the kernel's numbers.
    Returns ``[(name, got, expected)]`` for the loss and the gradients of x, y, t, b.
    """
    from tests.reference import ref_siglip

    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    other = F.normalize(base + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    dt = getattr(torch, dtype)
    xs = [(scale * v).to(dt).to(device).requires_grad_() for v in (base, other)]
    labels = global_labels(n, seed) if labeled else None
    out = []
    for reference in (False, True):
        if reference:
            x, y = (v.detach().cpu().double().requires_grad_() for v in xs)
            dev, kw = "cpu", {}
        else:
            (x, y), dev = xs, device
            kw = {"kernel": "triton", "chunk_size": chunk_size, "normalize": False}
        ts = torch.tensor(t, dtype=torch.float64 if reference else torch.float32, device=dev)
        bs = torch.tensor(b, dtype=ts.dtype, device=dev)
        ts.requires_grad_()
        bs.requires_grad_()
        lab = None if labels is None else labels.to(dev)
        if reference:
            value = ref_siglip(x, y, ts, bs, lab, reduction, normalize=False)
        else:
            value = siglip_loss(x, y, ts, bs, labels=lab, reduction=reduction, **kw)
        w = torch.linspace(0.5, 1.5, value.numel(), dtype=torch.float64, device=dev)
        grads = torch.autograd.grad((value.double() * w.reshape(value.shape)).sum(), [x, y, ts, bs])
        out.append([value.detach().cpu(), *(v.cpu() for v in grads)])
    names = ["loss", "grad x", "grad y", "grad t", "grad b"]
    return [(nm, a, e) for nm, a, e in zip(names, *out, strict=True)]


def triton_uneven_sides(n: int, m: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The kernel itself with M != N (a gathered pool), 0 rows or an empty pool: Triton vs
    the chunked kernel in float64, values and the gradients of a, b, t, c."""
    from dist_infonce.kernels.sigmoid import chunked_sigmoid_sums
    from dist_infonce.kernels.triton_sigmoid import triton_sigmoid_sums

    g = torch.Generator().manual_seed(5)
    base = [
        F.normalize(torch.randn(n, 20, generator=g), dim=-1),
        F.normalize(torch.randn(m, 20, generator=g), dim=-1),
    ]
    w = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    out = []
    for fn, dtype in ((triton_sigmoid_sums, torch.float32), (chunked_sigmoid_sums, torch.float64)):
        a, bb = (v.to(dtype).requires_grad_() for v in base)
        t = torch.tensor(10.0, dtype=dtype, requires_grad=True)
        c = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
        sums = fn(a, bb, t, c, chunk_size=16)
        grads = torch.autograd.grad((sums.double() * w).sum(), [a, bb, t, c])
        out.append([sums.detach(), *grads])
    names = ["row sums", "grad a", "grad b", "grad t", "grad c"]
    return [(nm, x, y) for nm, x, y in zip(names, *out, strict=True)]
