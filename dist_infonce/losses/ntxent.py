"""SimCLR's NT-Xent over 2N views, local or over a global pool.

Row (view) i's loss is its log-sum-exp over every other view of the pool minus the
logit of its pair. Locally the 2N x 2N matrix is symmetric and the chunked kernel
walks half its tiles (:func:`dist_infonce.kernels.symmetric.self_lse`); over ranks each
view's own column is masked in the pool (``mask_idx``). The gradient convention is
:func:`~dist_infonce.info_nce`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from dist_infonce.dist import gather_labels, gather_with_info, get_world_size, is_distributed
from dist_infonce.kernels import compute_dtype, no_autocast
from dist_infonce.losses.checks import check_kernel_inputs, check_labels, check_nt_xent_inputs
from dist_infonce.losses.common import pair_logit, reduce_losses
from dist_infonce.losses.dispatch import pool_lse, self_similarity_lse
from dist_infonce.losses.labels import class_sums, label_classes
from dist_infonce.losses.options import LossOptions, OptionField
from dist_infonce.losses.temperature import (
    Temperature,
    TemperatureModule,
    inverse_temperature,
    temperature_value,
)

__all__ = ["NTXent", "nt_xent"]


def _nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    inv_temp: torch.Tensor,
    labels: torch.Tensor | None,
    options: LossOptions,
) -> torch.Tensor:
    """The loss on checked views. Shape: as :func:`nt_xent`; inv_temp ()."""
    with no_autocast(z1.device):
        if options.normalize:
            z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        distributed = options.gather and is_distributed(options.group)
        world = get_world_size(options.group) if distributed else 1
        n = z1.shape[0]
        rows = torch.cat([z1, z2])
        if distributed:
            pairs, info = gather_with_info(torch.stack([z1, z2], 1), options.group)
            total, offset = info.total, info.offset
            # Pool layout: every rank's first views, then every rank's second views.
            pool = torch.cat([pairs[:, 0], pairs[:, 1]])
        else:
            total, offset, pool = n, 0, rows
        # Each view leaves out its own column (self-similarity); its pair stays in.
        # Distinct views mask distinct columns: the mask is injective.
        own = torch.arange(offset, offset + n, device=z1.device)
        own = torch.cat([own, own + total])
        lse = None if distributed else self_similarity_lse(rows, inv_temp, options=options)
        if lse is None:
            lse, _ = pool_lse(rows, pool, inv_temp, options=options, mask_idx=own)
        if labels is None:
            pos = pair_logit(z1, z2, inv_temp).repeat(2)
        else:
            # SupCon over 2N views: the positives of a view are the views with its
            # label (its pair included) but not itself, so take the view out of its
            # class sum.
            pool_labels = gather_labels(labels, info) if distributed else labels
            inverse, counts = label_classes(torch.cat([pool_labels, pool_labels]))
            sums = class_sums(pool, inverse, len(counts))
            cls = inverse[own]
            dt = compute_dtype(rows.dtype)
            others = sums[cls] - rows.to(dt)
            pos = (rows.to(dt) * others).sum(-1) * inv_temp / (counts[cls] - 1).to(dt)
        return reduce_losses(
            lse - pos, reduction=options.reduction, global_rows=2 * total, world=world
        )


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Temperature = 0.5,
    *,
    reduction: str = "mean",
    normalize: bool = True,
    chunk_size: int | None = None,
    kernel: str = "auto",
    gather: bool = False,
    group: ProcessGroup | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent loss over 2N views.

    View ``z1[i]``'s positive is ``z2[i]`` and vice versa; its negatives are the
    other 2N - 2 views (with ``gather=True``: every view of every rank but itself
    and its pair).

    Args:
        z1: first views. Shape: (N, D).
        z2: second views. Shape: (N, D).
        temperature: as in :func:`~dist_infonce.info_nce` (a positive number or a
            one-element tensor; a tensor receives a gradient).
        reduction: "mean" (over the 2N views), "sum" or "none" (Shape: (2N,), the
            z1 rows then the z2 rows).
        normalize: L2-normalise the views first (cosine similarity, as in SimCLR).
        chunk_size: as in :func:`~dist_infonce.info_nce`.
        kernel: as in :func:`~dist_infonce.info_nce`.
        gather: pool the views of every rank; same gradient convention as
            :func:`~dist_infonce.info_nce`.
        group: process group for ``gather``.
        labels: None, or one int64 class label per pair, Shape: (N,): SupCon over
            the 2N views. A view's positives are every view of the pool with its
            label except itself (its pair included); the denominator is unchanged.

    Returns:
        A 0-dim tensor, or Shape: (2N,) for ``reduction="none"``.

    Raises:
        ValueError: naming the argument, for bad shapes, mismatched D, dtype or
            device, an empty batch, a bad temperature, reduction, chunk_size or
            kernel, inputs ``kernel="triton"`` cannot take, or ``labels`` that are
            not an int64 tensor of shape (N,) on z1's device.
        ImportError: ``kernel="triton"`` without triton installed.

    Example:
        >>> loss = nt_xent(proj(aug1(x)), proj(aug2(x)), temperature=0.5, gather=True)
    """
    options = LossOptions(
        reduction=reduction, normalize=normalize, chunk_size=chunk_size, kernel=kernel,
        gather=gather, group=group,
    )  # fmt: skip
    check_nt_xent_inputs(z1, z2, gather=gather)
    check_labels(labels, z1, "z1", None)
    check_kernel_inputs(kernel, z1)
    temperature_value(temperature)
    return _nt_xent_loss(
        z1, z2, inv_temp=inverse_temperature(temperature, z1), labels=labels, options=options
    )


class NTXent(TemperatureModule):
    """Module form of :func:`nt_xent` (SimCLR), optionally with a learnable temperature.

    Args:
        temperature: initial (``learn_temperature``) or fixed temperature;
            ``module.temperature = value`` sets it later.
        reduction, normalize, chunk_size, kernel, gather, group: as in
            :func:`nt_xent`; also attributes, checked when assigned.
        learn_temperature: as in :class:`~dist_infonce.InfoNCE` (its gradient is
            averaged over ``group`` by the module when no DDP forward owns it).

    Shape:
        z1: (N, D); z2: (N, D). Output: () or (2N,) for ``reduction="none"``.

    Raises:
        ValueError: as :func:`nt_xent`, at construction for the options and the
            temperature, at the call for the views.

    Example:
        >>> loss = NTXent(temperature=0.5, gather=True)(z1, z2)
    """

    reduction = OptionField()
    normalize = OptionField()
    chunk_size = OptionField()
    kernel = OptionField()
    gather = OptionField()
    group = OptionField()

    def __init__(
        self,
        temperature: Temperature = 0.5,
        *,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: int | None = None,
        kernel: str = "auto",
        gather: bool = False,
        group: ProcessGroup | None = None,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__(temperature, learn_temperature=learn_temperature)
        self.options = LossOptions(
            reduction=reduction, normalize=normalize, chunk_size=chunk_size, kernel=kernel,
            gather=gather, group=group,
        )  # fmt: skip

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """NT-Xent of the views (see :func:`nt_xent`).

        Shape: z1 (N, D); z2 (N, D); labels None or (N,) int64, one per pair.
        """
        options = self.options
        check_nt_xent_inputs(z1, z2, gather=options.gather)
        check_labels(labels, z1, "z1", None)
        check_kernel_inputs(options.kernel, z1)
        return _nt_xent_loss(
            z1, z2, inv_temp=self.inverse_temperature(z1), labels=labels, options=options
        )

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"{self._temperature_repr()}, reduction={o.reduction!r}, "
            f"chunk_size={o.chunk_size}, kernel={o.kernel!r}, gather={o.gather}"
        )
