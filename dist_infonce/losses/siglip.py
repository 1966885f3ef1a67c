"""SigLIP's sigmoid loss, local or over a global pool, memory linear in N + M.

With ``z_ij = t * <x_i, y_j> + b`` and ``s_ij = +1`` for a positive pair (``i == j``; with
``labels``, equal labels) else ``-1``, row i's loss is ``sum_j -log sigmoid(s_ij z_ij)`` over
the pool. Written as ``sum_j softplus(z_ij) - sum_{j in P(i)} z_ij``, the first term goes
through a kernel of :mod:`dist_infonce.kernels.sigmoid` (dense, chunked tiles, or the
fused Triton kernel) and the second is an O(N * D) dot product: with the pair, or with
per-class sums of the pool (:mod:`dist_infonce.losses.labels`), so no N x M mask exists.

Normalisation is SigLIP's (and OpenCLIP's ``SigLipLoss``): ``"mean"`` divides the sum of
the row losses by the number of rows. With ``gather=True`` the pool is the ``y`` of every
rank (one gather forward, one reduce-scatter backward), each rank computes its own rows
against it, and ``"mean"`` returns ``sum(local row losses) * world_size / global_rows``:
the gradient convention of DESIGN.md, for x, y, t and b, also for uneven local batches.
OpenCLIP's distributed variants divide by the local batch, which is the same number when
the local batches are equal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from dist_infonce.dist import gather_labels, gather_with_info, get_world_size, is_distributed
from dist_infonce.kernels import DEFAULT_CHUNK, compute_dtype, no_autocast
from dist_infonce.kernels.sigmoid import chunked_sigmoid_sums, dense_sigmoid_sums
from dist_infonce.losses.checks import check_kernel_inputs, check_labels, check_pair
from dist_infonce.losses.common import reduce_losses
from dist_infonce.losses.dispatch import resolve_kernel
from dist_infonce.losses.labels import class_sums, label_classes
from dist_infonce.losses.learnable import AveragesOwnGradients
from dist_infonce.losses.options import LossOptions, OptionField
from dist_infonce.losses.temperature import MAX_LOGIT_SCALE, clamped_scale, scalar_value

__all__ = ["MAX_SCALE", "SigLIP", "siglip_loss"]

#: Scale or bias: a real number or a one-element floating-point tensor.
Scalar = float | torch.Tensor
#: Cap on the learnable scale t (CLIP's cap on its logit scale, OpenCLIP's clamp).
MAX_SCALE = MAX_LOGIT_SCALE


# ----------------------------------------------------------------------- internals


def _as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A scale or bias as a 0-dim tensor in ``like``'s accumulation dtype and device.

    A tensor stays in the graph (its gradient comes back in its own shape). Shape: ().
    """
    dt = compute_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=like.device, dtype=dt)
    return torch.tensor(float(value), dtype=dt, device=like.device)


def _softplus_sums(
    x: torch.Tensor, pool: torch.Tensor, t: torch.Tensor, b: torch.Tensor, options: LossOptions
) -> torch.Tensor:
    """``sum_j softplus(t <x_i, pool_j> + b)`` by the chosen kernel. Shape: (N,)."""
    kernel = resolve_kernel(x.shape[0], pool.shape[0], options)
    if kernel == "triton":
        from dist_infonce.kernels.triton_sigmoid import triton_sigmoid_sums

        return triton_sigmoid_sums(x, pool, t, b, chunk_size=options.chunk_size)
    if kernel == "dense":
        return dense_sigmoid_sums(x, pool, t, b)
    return chunked_sigmoid_sums(x, pool, t, b, chunk_size=options.chunk_size or DEFAULT_CHUNK)


def _siglip_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor | None,
    options: LossOptions,
) -> torch.Tensor:
    """The loss on checked inputs. Shape: as :func:`siglip_loss`; scale, bias ()."""
    with no_autocast(x.device):
        if options.normalize:
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        distributed = options.gather and is_distributed(options.group)
        world = get_world_size(options.group) if distributed else 1
        n = x.shape[0]
        if distributed:
            pool, info = gather_with_info(y, options.group)
            global_rows, offset = info.total, info.offset
        else:
            pool, global_rows, offset = y, n, 0
        losses = _softplus_sums(x, pool, scale, bias, options)
        dt = compute_dtype(x.dtype)
        xd = x.to(dt)
        if labels is None:
            # The positive is the local pair: its copy in the pool has the same value,
            # and its gradient stays on this rank.
            positive = (xd * y.to(dt)).sum(-1) * scale + bias
        else:
            # sum over P(i) of z_ip = t <x_i, sum of P(i)> + b |P(i)|: per-class sums of
            # the pool, O((N + M) D), no N x M mask.
            pool_labels = gather_labels(labels, info) if distributed else labels
            inverse, counts = label_classes(pool_labels)
            sums = class_sums(pool, inverse, len(counts))
            cls = inverse[offset : offset + n]
            positive = (xd * sums[cls]).sum(-1) * scale + bias * counts[cls].to(dt)
        return reduce_losses(
            losses - positive, reduction=options.reduction, global_rows=global_rows, world=world
        )


def _check_inputs(x: object, y: object, labels: object, options: LossOptions) -> None:
    check_pair("x", x, "y", y, gather=options.gather)
    check_labels(labels, x, "x", None)  # type: ignore[arg-type]
    check_kernel_inputs(options.kernel, x)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- public API


def siglip_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: Scalar,
    bias: Scalar,
    *,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
    gather: bool = False,
    group: ProcessGroup | None = None,
    kernel: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss; values and gradients of OpenCLIP's ``SigLipLoss``.

    With ``z_ij = scale * <x_i, y_j> + bias``, row i's loss is
    ``sum_j -log sigmoid(s_ij z_ij)``, ``s_ij = +1`` for the positive pair(s) and ``-1``
    for every other column of the pool.

    Args:
        x: one tower (images). Shape: (N, D).
        y: the other tower (texts); row i is the positive of ``x[i]``. Shape: (N, D).
        scale: the multiplier t (SigLIP's ``exp(t')``, OpenCLIP's ``logit_scale`` as its
            loss receives it): a positive number, or a one-element floating-point tensor
            (it receives a gradient, in its shape).
        bias: the bias b: a finite number or a one-element floating-point tensor (it
            receives a gradient).
        labels: None, or one int64 label per row, Shape: (N,) (any values, compared
            exactly): every pool column with row i's label is a positive of row i.
        reduction: "mean" (the sum of row losses over the number of rows, SigLIP's and
            OpenCLIP's normalisation), "sum" or "none" (per row, Shape: (N,)).
        normalize: L2-normalise x and y first (OpenCLIP's models do it before the loss).
        gather: the pool is the ``y`` of every rank of ``group``; each rank returns the
            loss of its own rows with the gradient convention (``"mean"``:
            ``sum * world_size / global_rows``; ``"sum"``: ``sum * world_size``).
            Local batches may differ, a rank may hold 0 rows.
        group: process group of ``gather`` (default the world).
        kernel: "auto" (dense while the N x M logits are small, chunked otherwise; an
            int ``chunk_size`` forces chunked), "dense", "chunked" (pure-torch tiles,
            memory O(N + M)) or "triton" (fused kernels; CUDA, or CPU under
            ``TRITON_INTERPRET=1``; ``chunk_size`` a power of two >= 16).
        chunk_size: tile edge of the tiled kernels.

    Returns:
        A 0-dim tensor, or Shape: (N,) for ``reduction="none"``; float32 for half
        inputs (accumulated in float32), float64 for float64.

    Raises:
        ValueError: naming the argument, for wrong shapes, mismatched rows, D, dtype or
            device, an empty batch, a scale that is not positive and finite, a bias
            that is not finite, labels that are not int64 of shape (N,), an unknown
            reduction or kernel, a bad chunk_size, or inputs the Triton kernel cannot take.
        ImportError: ``kernel="triton"`` without triton installed.

    Example:
        >>> loss = siglip_loss(img, txt, 10.0, -10.0, gather=True)
    """
    options = LossOptions(
        reduction=reduction, normalize=normalize, chunk_size=chunk_size, kernel=kernel,
        gather=gather, group=group,
    )  # fmt: skip
    _check_inputs(x, y, labels, options)
    scalar_value("scale", scale, positive=True)
    scalar_value("bias", bias, positive=False)
    return _siglip_loss(
        x, y, scale=_as_tensor(scale, x), bias=_as_tensor(bias, x), labels=labels,
        options=options,
    )  # fmt: skip


class SigLIP(AveragesOwnGradients):
    """Module form of :func:`siglip_loss`, owning SigLIP's learnable scale and bias.

    Args:
        init_scale: the initial (``learn``) or fixed multiplier t > 0 (SigLIP: 10).
        init_bias: the initial or fixed bias b (SigLIP: -10).
        learn: own ``logit_scale = log t`` and ``logit_bias = b`` as parameters (as
            SigLIP trains them); t is clamped to ``t <= 100`` in the forward (OpenCLIP's
            clamp). Inside a DDP module DDP averages their gradients; beside one (or under
            :func:`~dist_infonce.cached_backward`) the module averages them over the ranks
            of ``group`` in its backward, so that every rank keeps the same values and
            their gradients follow the convention of every other parameter.
        reduction, normalize, gather, group, kernel, chunk_size: as in
            :func:`siglip_loss`; also attributes, checked when assigned.

    Shape:
        x: (N, D); y: (N, D); labels: None or (N,) int64. Output: () or (N,) for
        ``reduction="none"``.

    Raises:
        ValueError: as :func:`siglip_loss`: at construction for the options, scale and
            bias, at the call for the inputs.

    Example:
        >>> loss_fn = SigLIP(gather=True)  # learnable t = 10, b = -10
        >>> loss = loss_fn(image_features, text_features)
    """

    reduction = OptionField()
    normalize = OptionField()
    chunk_size = OptionField()
    kernel = OptionField()
    gather = OptionField()
    group = OptionField()

    def __init__(
        self,
        init_scale: float = 10.0,
        init_bias: float = -10.0,
        learn: bool = True,
        *,
        reduction: str = "mean",
        normalize: bool = True,
        gather: bool = False,
        group: ProcessGroup | None = None,
        kernel: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        scale = scalar_value("init_scale", init_scale, positive=True)
        bias = scalar_value("init_bias", init_bias, positive=False)
        self.learn = learn
        if learn:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
            self.logit_bias = nn.Parameter(torch.tensor(bias))
        else:
            self._fixed = (scale, bias)
        self.options = LossOptions(
            reduction=reduction, normalize=normalize, chunk_size=chunk_size, kernel=kernel,
            gather=gather, group=group,
        )  # fmt: skip

    def self_averaged_parameters(self) -> list[nn.Parameter]:
        """``[logit_scale, logit_bias]`` when learnt: :func:`~dist_infonce.cached_backward`
        then leaves their average to this module (one all-reduce, not two)."""
        return [self.logit_scale, self.logit_bias] if self.learn else []

    @property
    def scale(self) -> torch.Tensor:
        """The multiplier t of the next forward (0-dim)."""
        if self.learn:
            return clamped_scale(self.logit_scale)
        return torch.tensor(self._fixed[0])

    @property
    def bias(self) -> torch.Tensor:
        """The bias b of the next forward (0-dim)."""
        if self.learn:
            return self.logit_bias
        return torch.tensor(self._fixed[1])

    @property
    def temperature(self) -> torch.Tensor:
        """``1 / t``: what the trainer logs as the temperature of every loss (0-dim)."""
        return 1.0 / self.scale

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The sigmoid loss of the pairs (see :func:`siglip_loss`).

        Shape: x (N, D); y (N, D); labels None or (N,) int64.
        """
        options = self.options
        _check_inputs(x, y, labels, options)
        dt = compute_dtype(x.dtype)
        if self.learn:
            log_scale, bias = self.rank_averaged(self.logit_scale, self.logit_bias, device=x.device)
            scale, bias = clamped_scale(log_scale).to(dt), bias.to(dt)
        else:
            scale, bias = _as_tensor(self._fixed[0], x), _as_tensor(self._fixed[1], x)
        return _siglip_loss(x, y, scale=scale, bias=bias, labels=labels, options=options)

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"scale={float(self.scale.detach()):.4g}, bias={float(self.bias.detach()):.4g}, "
            f"learn={self.learn}, reduction={o.reduction!r}, chunk_size={o.chunk_size}, "
            f"kernel={o.kernel!r}, gather={o.gather}"
        )
