"""Collectives for contrastive losses: an autograd-aware all_gather.

Every rank contributes its local rows (first dimension, sizes may differ between
ranks, 0 included) and receives the rows of every rank in rank order: the global
negative pool. Backward hands each rank the *sum over all ranks* of the gradients
computed for its rows. That sum is what makes the gradients exact: rank r's loss
uses rank s's rows as negatives, so d(loss_r)/d(rows_s) must reach rank s. The
common SimCLR-port GatherLayer returns only ``grad[rank]`` (rank s's own terms) and
silently drops the rest.

Everything here is a no-op at world size 1 or when ``torch.distributed`` is not
initialised, so the same code runs in a single process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dist_infonce.kernels.bounds import shift_if_safe

__all__ = [
    "GatherLayer",
    "all_gather_with_grad",
    "all_reduce_logsumexp",
    "all_reduce_mean",
    "gather_labels",
    "get_rank",
    "get_world_size",
    "is_distributed",
]

# Dtypes whose gradients the gather supports; also the wire code of the metadata
# exchange. Codes must be identical on every rank.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.bfloat16: 3,
    torch.float16: 4,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# Longest shape the metadata exchange carries. A fixed-length message keeps the
# exchange a single all_gather even when ranks disagree on the number of dims.
_MAX_DIMS = 8
_META_LEN = 3 + _MAX_DIMS  # ndim, dtype code, count, shape


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised and ``group`` has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


def get_world_size(group: ProcessGroup | None = None) -> int:
    """Number of ranks in ``group``; 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _comm_device(x: torch.Tensor, group: ProcessGroup | None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and would copy CUDA
    # ones through the host anyway). The metadata message follows the backend.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device if x.device.type == "cpu" else torch.device("cpu")


@dataclass(frozen=True)
class GatherInfo:
    """What every rank knows after the size exchange.

    Attributes:
        sizes: rows held by each rank, in rank order.
        counts: the ``count`` each rank passed (by default its rows); the losses use
            it to learn the global number of loss rows without another collective.
        rank: this process's rank in the group.
        group: the process group used.
    """

    sizes: tuple[int, ...]
    counts: tuple[int, ...]
    rank: int
    group: ProcessGroup | None

    @property
    def offset(self) -> int:
        """Index of this rank's first row in the gathered tensor."""
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        """Rows in the gathered tensor (the global batch)."""
        return sum(self.sizes)


def _exchange_meta(
    x: torch.Tensor, group: ProcessGroup | None, count: int | None = None
) -> GatherInfo:
    """All-gather (shape, dtype, count) and check that ranks agree on trailing shape and dtype.

    Every rank receives every rank's metadata, so a disagreement raises the same
    ``ValueError`` on every rank instead of one rank failing and the others
    blocking in the next collective (or gloo aborting on mismatched buffers).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    meta = torch.zeros(_META_LEN, dtype=torch.int64)
    meta[0] = x.dim()
    meta[1] = _DTYPE_CODES.get(x.dtype, -1)
    meta[2] = count if count is not None else (x.shape[0] if x.dim() else 0)
    if 1 <= x.dim() <= _MAX_DIMS:
        meta[3 : 3 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    device = _comm_device(x, group)
    gathered = torch.empty(world * _META_LEN, dtype=torch.int64, device=device)
    dist.all_gather_single(gathered, meta.to(device), group=group)
    table = gathered.view(world, _META_LEN).cpu().tolist()

    def describe(row: list[int]) -> str:
        ndim, code = row[0], row[1]
        if not 1 <= ndim <= _MAX_DIMS:
            return f"a {ndim}-dim tensor"
        dtype = _CODE_DTYPES.get(code, "an unsupported dtype")
        return f"shape {tuple(row[3 : 3 + ndim])} of {dtype}"

    for r, row in enumerate(table):
        if not 1 <= row[0] <= _MAX_DIMS or row[1] not in _CODE_DTYPES:
            raise ValueError(
                f"all_gather_with_grad: input on rank {r} is {describe(row)}; expected a "
                f"tensor with 1 to {_MAX_DIMS} dims of float32, float64, bfloat16 or float16"
            )
    ref = table[0]
    for r, row in enumerate(table):
        if row[0] != ref[0] or row[1] != ref[1] or row[4 : 3 + row[0]] != ref[4 : 3 + ref[0]]:
            raise ValueError(
                "all_gather_with_grad: ranks disagree on trailing shape or dtype: "
                f"rank 0 has {describe(ref)}, rank {r} has {describe(row)}; every rank "
                "must pass the same dtype and the same shape except the first dimension"
            )
    return GatherInfo(
        sizes=tuple(row[3] for row in table),
        counts=tuple(row[2] for row in table),
        rank=rank,
        group=group,
    )


def _gather_forward(x: torch.Tensor, info: GatherInfo) -> torch.Tensor:
    """Concatenate every rank's rows in rank order. Shape: (sum(sizes), *x.shape[1:])."""
    world = len(info.sizes)
    pad_rows = max(info.sizes)
    x = x.contiguous()
    if x.shape[0] < pad_rows:
        # all_gather_single needs equal-sized buffers; pad, then drop the padding.
        x = torch.cat([x, x.new_zeros((pad_rows - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((world * pad_rows, *x.shape[1:]))
    dist.all_gather_single(out, x, group=info.group)
    if all(n == pad_rows for n in info.sizes):
        return out
    return torch.cat([out[r * pad_rows : r * pad_rows + n] for r, n in enumerate(info.sizes)])


def _gather_backward(grad: torch.Tensor, info: GatherInfo) -> torch.Tensor:
    """Sum the gradients of all ranks and return this rank's rows.

    ``grad`` has the gathered shape (sum(sizes), ...) on every rank; rank s receives
    sum over r of grad_r[rows of s]. One reduce-scatter: each rank sends and
    receives (world - 1) / world of the gathered gradient, half of an all-reduce.
    """
    world = len(info.sizes)
    pad_rows = max(info.sizes)
    grad = grad.contiguous()
    if any(n != pad_rows for n in info.sizes):
        padded = grad.new_zeros((world, pad_rows, *grad.shape[1:]))
        start = 0
        for r, n in enumerate(info.sizes):
            padded[r, :n] = grad[start : start + n]
            start += n
        grad = padded.view(world * pad_rows, *grad.shape[1:])
    out = grad.new_empty((pad_rows, *grad.shape[1:]))
    dist.reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM, group=info.group)
    return out[: info.sizes[info.rank]]


class _AllGatherCat(torch.autograd.Function):
    """all_gather with a summing backward, returning the concatenation (one buffer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, info: GatherInfo) -> torch.Tensor:  # type: ignore[override]
        ctx.info = info
        return _gather_forward(x, info)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _gather_backward(grad, ctx.info), None


class GatherLayer(torch.autograd.Function):
    """All-gather ``x`` from every rank of ``group``, with exact gradients.

    Forward returns a tuple of ``world_size`` tensors in rank order; tensor ``r`` is
    rank r's ``x``. First dimensions may differ between ranks (0 rows included);
    trailing shape and dtype must agree (checked on every rank, a mismatch raises
    ``ValueError`` everywhere instead of hanging).

    Backward returns to each rank the sum over all ranks of the gradients of its
    rows (one reduce-scatter), so after DDP averages parameter gradients they equal
    those of one process on the concatenated batch, given a loss normalised by the
    global batch (see ``info_nce``).

    At world size 1, or when torch.distributed is not initialised, returns ``(x,)``.

    Example:
        >>> feats = torch.cat(GatherLayer.apply(local_feats))  # (sum of N_r, D)

    Note:
        Every rank must backpropagate through its output (the backward is a
        collective). Use the gathered tensor in the loss on every rank, also on a
        rank that holds 0 rows.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, group: ProcessGroup | None = None
    ) -> tuple[torch.Tensor, ...]:
        if not is_distributed(group):
            ctx.info = None
            return (x.view_as(x),)
        info = _exchange_meta(x, group)
        ctx.info = info
        return tuple(_gather_forward(x, info).split(list(info.sizes)))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.info is None:
            return grads[0], None
        return _gather_backward(torch.cat(grads), ctx.info), None


def gather_with_info(
    x: torch.Tensor, group: ProcessGroup | None = None, count: int | None = None
) -> tuple[torch.Tensor, GatherInfo]:
    """``all_gather_with_grad`` that also returns what every rank agreed on.

    Args:
        x: local rows. Shape: (N_r, *S).
        group: process group; default the world.
        count: an int to share with every rank in the same exchange (default N_r);
            the losses pass their number of loss rows here.

    Returns:
        The concatenation over ranks, shape (sum of N_r, *S), and the
        :class:`GatherInfo`. At world size 1: ``x`` itself and a one-rank info.
    """
    if not is_distributed(group):
        n = x.shape[0] if x.dim() else 1
        return x, GatherInfo(
            sizes=(n,), counts=(n if count is None else count,), rank=0, group=group
        )
    info = _exchange_meta(x, group, count)
    return _AllGatherCat.apply(x, info), info


def all_gather_with_grad(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """All-gather ``x`` over ``group`` and concatenate along dim 0, with exact gradients.

    Same semantics as ``torch.cat(GatherLayer.apply(x, group))`` but gathers into
    one buffer (no second copy for the concatenation).

    Args:
        x: local rows. Shape: (N_r, *S); N_r may differ between ranks (0 allowed),
            S and dtype must agree.
        group: process group; default the world.

    Returns:
        Shape: (sum over ranks of N_r, *S), rank 0's rows first.

    Raises:
        ValueError: on every rank, if ranks disagree on S or dtype, or the dtype is
            not float32, float64, bfloat16 or float16.
    """
    return gather_with_info(x, group)[0]


def gather_labels(labels: torch.Tensor, info: GatherInfo) -> torch.Tensor:
    """All-gather integer labels (no gradient) with the row layout of ``info``.

    ``info`` comes from the gather of the rows these labels belong to, so no second
    size exchange is needed: one all_gather of the (padded) labels.

    Args:
        labels: this rank's labels. Shape: (info.sizes[info.rank],), any integer dtype.
        info: from :func:`gather_with_info` of the rows.

    Returns:
        The labels of every rank in rank order. Shape: (info.total,).
    """
    if len(info.sizes) == 1:
        return labels
    device = _comm_device(labels, info.group)
    return _gather_forward(labels.to(device), info).to(labels.device)


class _AllReduceLSE(torch.autograd.Function):
    """log(sum over ranks of exp(x_r)), elementwise, with its exact gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, group: ProcessGroup | None, shift: float | None
    ) -> torch.Tensor:
        device = _comm_device(x, group)
        xd = x.detach().to(device)
        if shift is not None:
            # A shift every rank knows: the partial sums are plain float64 sums,
            # one all-reduce.
            s = (xd.double() - shift).exp()
            dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
            out = (s.log() + shift).to(device=x.device, dtype=x.dtype)
        else:
            # Two all-reduces (max, then the shifted sums): no assumption on the
            # range of x, so no overflow and no underflow of the dominant terms.
            m = xd.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            s = (xd - m).exp()
            dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
            out = (s.log() + m).to(x.device)
        ctx.group = group
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        x, out = ctx.saved_tensors
        # out_j depends on every rank's x_j, and every rank's loss may use out_j:
        # rank r's gradient is exp(x_rj - out_j) * (sum over ranks of grad_j).
        device = _comm_device(x, ctx.group)
        g = grad.detach().to(device=device, dtype=x.dtype).contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        weight = torch.where(torch.isneginf(x), torch.zeros_like(x), (x - out).exp())
        return g.to(x.device) * weight, None, None


def all_reduce_logsumexp(
    x: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    bound: float | None = None,
) -> torch.Tensor:
    """``log(sum_r exp(x_r))`` over the ranks of ``group``, elementwise, differentiable.

    Combines per-rank partial log-sum-exps (e.g. the column statistics of one block
    row of a similarity matrix) into the global ones. Forward: one all-reduce of
    ``x.numel()`` float64 numbers when ``bound`` is given and at most 300, else two
    (max, then shifted sums); backward: one. Every rank must call it with the same
    shape (and ``bound``) and use the result in its loss (the backward is a
    collective).

    Args:
        x: this rank's partial log-sum-exps (``-inf`` for an empty part). Shape: any,
            equal on every rank.
        group: process group; default the world.
        bound: a number B, the same on every rank, such that each non-empty
            partial is a log-sum-exp of terms in [-B, B] (for similarities of
            unit vectors: the inverse temperature). Then ``exp(x - B)`` lies in
            [exp(-2B), count] and, for B <= 300, loses no precision in float64:
            one all-reduce of plain sums suffices.

    Returns:
        The combined log-sum-exps, same shape and dtype as ``x``. At world size 1,
        ``x`` itself.
    """
    if not is_distributed(group):
        return x
    # The partial sums travel in float64 (see _AllReduceLSE), so float64's safe range.
    shift = shift_if_safe(bound, torch.float64)
    return _AllReduceLSE.apply(x, group, shift)


def all_reduce_mean(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """The mean of ``x`` over the ranks of ``group``, as a new tensor (no autograd).

    Used for gradients that no DDP averages (a loss module's learnable temperature):
    one all-reduce of ``x.numel()`` numbers, summed, then divided by the group's size
    (as DDP does). Every rank of ``group`` must call it with the same shape.

    Args:
        x: this rank's value. Shape: any.
        group: process group; default the world.

    Returns:
        The mean, on ``x``'s device and in its dtype (under NCCL a CPU tensor makes
        the round trip through the current CUDA device). At world size 1 a copy of ``x``.
    """
    if not is_distributed(group):
        return x.detach().clone()
    buf = x.detach().to(_comm_device(x, group), copy=True)  # all_reduce works in place
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    buf /= dist.get_world_size(group)
    return buf.to(device=x.device, dtype=x.dtype)
