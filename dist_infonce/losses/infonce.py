"""InfoNCE and CLIP (symmetric InfoNCE), local or over a global pool.

Every loss here is, per row, ``logsumexp(logits of the row) - positive logit``. The
log-sum-exp goes through :mod:`dist_infonce.losses.dispatch` (``kernel="auto"``: dense
for small problems, chunked with memory O(N + M) otherwise; ``"triton"``, the fused
kernel, on request); the positive logit is an O(N * D) dot product.

The gradient convention (DESIGN.md): with ``gather=True`` each rank computes the
loss of its own rows against the global pool, and ``reduction="mean"`` returns
``sum(local row losses) * world_size / global_rows``. The mean over ranks of the
returned values is then the global mean, and after DDP averages gradients over
ranks every parameter gradient, the temperature's included, equals that of one
process computing the mean over the concatenated global batch, also when local
batch sizes differ. The functions all-reduce no parameter gradient; the module's own
learnable temperature is averaged by the module where no DDP does it
(:mod:`dist_infonce.losses.learnable`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from dist_infonce.dist import (
    all_reduce_logsumexp,
    gather_labels,
    gather_with_info,
    get_world_size,
    is_distributed,
)
from dist_infonce.kernels import compute_dtype, no_autocast
from dist_infonce.kernels.bounds import unit_vector_bound
from dist_infonce.losses.checks import (
    check_hard_negatives,
    check_info_nce_inputs,
    check_kernel_inputs,
    check_labels,
)
from dist_infonce.losses.common import global_count, pair_logit, reduce_losses
from dist_infonce.losses.dispatch import pool_lse
from dist_infonce.losses.labels import class_sums, label_classes, mean_positive_logit
from dist_infonce.losses.options import LossOptions, OptionField
from dist_infonce.losses.temperature import (
    Temperature,
    TemperatureModule,
    inverse_temperature,
    temperature_value,
)

__all__ = ["InfoNCE", "info_nce"]


# ----------------------------------------------------------------------- internals


def _info_nce_loss(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: torch.Tensor | None,
    *,
    inv_temp: torch.Tensor,
    labels: torch.Tensor | None,
    options: LossOptions,
    hard: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss on checked inputs. Shape: as :func:`info_nce`; inv_temp (); hard (M, D)."""
    with no_autocast(query.device):
        q, k, neg = query, positive_key, negative_keys
        if options.normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            neg = None if neg is None else F.normalize(neg, dim=-1)
            hard = None if hard is None else F.normalize(hard, dim=-1)
        distributed = options.gather and is_distributed(options.group)
        world = get_world_size(options.group) if distributed else 1
        if neg is not None and options.negative_mode == "paired":
            losses = _paired(q, k, neg, inv_temp=inv_temp)
            n = q.shape[0]
            global_rows = global_count(n, q.device, options.group) if distributed else n
        elif neg is not None:
            losses, global_rows = _unpaired(
                q, k, neg, inv_temp=inv_temp, options=options, distributed=distributed
            )
        elif options.symmetric:
            losses, global_rows = _symmetric(
                q, k, inv_temp=inv_temp, labels=labels, options=options,
                distributed=distributed, hard=hard,
            )  # fmt: skip
        else:
            losses, global_rows = _in_batch(
                q, k, inv_temp=inv_temp, labels=labels, options=options,
                distributed=distributed, hard=hard,
            )  # fmt: skip
        return reduce_losses(
            losses, reduction=options.reduction, global_rows=global_rows, world=world
        )


def _paired(
    q: torch.Tensor, k: torch.Tensor, neg: torch.Tensor, *, inv_temp: torch.Tensor
) -> torch.Tensor:
    """Row losses with one set of negatives per query. Shape: neg (N, M, D) -> (N,)."""
    # The positive is always the local pair: the same value as its copy in the
    # gathered pool, and its gradient stays on this rank.
    pos = pair_logit(q, k, inv_temp)
    # Paired negatives stay with their query; the logits (N, M) are D times
    # smaller than the negatives themselves, so there is nothing to tile.
    dt = compute_dtype(q.dtype)
    neg_logits = torch.einsum("nd,nmd->nm", q.to(dt), neg.to(dt)) * inv_temp
    return torch.logsumexp(torch.cat([pos[:, None], neg_logits], 1), 1) - pos


def _unpaired(
    q: torch.Tensor,
    k: torch.Tensor,
    neg: torch.Tensor,
    *,
    inv_temp: torch.Tensor,
    options: LossOptions,
    distributed: bool,
) -> tuple[torch.Tensor, int]:
    """Row losses against shared negatives (pooled over ranks), and the global row count."""
    n = q.shape[0]
    pos = pair_logit(q, k, inv_temp)
    if distributed:
        # The exchange of the negatives' sizes carries the loss rows too.
        neg, info = gather_with_info(neg, options.group, count=n)
        global_rows = sum(info.counts)
    else:
        global_rows = n
    lse, _ = pool_lse(q, neg, inv_temp, options=options, extra=pos)
    return lse - pos, global_rows


def _with_hard_negatives(
    lse: torch.Tensor,
    q: torch.Tensor,
    hard: torch.Tensor | None,
    *,
    inv_temp: torch.Tensor,
    options: LossOptions,
    distributed: bool,
) -> torch.Tensor:
    """Row log-sum-exps over the pool joined by the (pooled) hard negatives.

    The hard negatives get their own pass of the kernel, and the two log-sum-exps are
    merged with ``logaddexp``: the same value as one pass over the concatenated pool
    without copying the pool, memory still linear in N + M. Every rank gathers them
    (autograd-aware: each rank's negatives receive the gradients of every rank's rows).

    Shape: lse (N,); q (N, D); hard None or (M_r, D). Returns (N,).
    """
    if hard is None:
        return lse
    if distributed:
        hard, info = gather_with_info(hard, options.group)
        if info.total == 0:  # no rank has any: the pool is the positives alone
            return lse
    elif hard.shape[0] == 0:
        return lse
    lse_hard, _ = pool_lse(q, hard, inv_temp, options=options)
    return torch.logaddexp(lse, lse_hard)


def _in_batch(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    inv_temp: torch.Tensor,
    labels: torch.Tensor | None,
    options: LossOptions,
    distributed: bool,
    hard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Row losses against the (pooled) positive keys and hard negatives, one direction;
    the global row count."""
    n = q.shape[0]
    if distributed:
        kp, info = gather_with_info(k, options.group)
        global_rows, offset = info.total, info.offset
    else:
        kp, global_rows, offset = k, n, 0
    lse, _ = pool_lse(q, kp, inv_temp, options=options)
    lse = _with_hard_negatives(
        lse, q, hard, inv_temp=inv_temp, options=options, distributed=distributed
    )
    if labels is None:
        pos = pair_logit(q, k, inv_temp)
    else:
        # SupCon: the mean logit over every pool key with row i's label.
        pool_labels = gather_labels(labels, info) if distributed else labels
        inverse, counts = label_classes(pool_labels)
        sums = class_sums(kp, inverse, len(counts))
        pos = mean_positive_logit(q, sums, inverse[offset : offset + n], counts, inv_temp)
    return lse - pos, global_rows


def _symmetric(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    inv_temp: torch.Tensor,
    labels: torch.Tensor | None,
    options: LossOptions,
    distributed: bool,
    hard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Row losses of the CLIP loss (both directions) and the global row count.

    One block row per rank: ``q_local @ K_pool^T`` gives the query->key row
    statistics and, per key column, a partial key->query log-sum-exp over the
    local queries; :func:`all_reduce_logsumexp` completes the columns over the
    ranks (O(global rows) numbers; one all-reduce with normalised inputs and
    temperature >= 1/300, else two). Only the key tower is gathered (the query tower
    too when ``labels`` need its per-class sums), and every similarity is
    computed once in the world. Hard negatives join the query->key direction only
    (they are keys, not queries).
    """
    n, group = q.shape[0], options.group
    if distributed and labels is not None:
        # The key->query positives average queries of the whole pool per class.
        pairs, info = gather_with_info(torch.stack([q, k], 1), group)
        qp, kp = pairs[:, 0], pairs[:, 1]
    elif distributed:
        kp, info = gather_with_info(k, group)
        qp = None
    else:
        qp, kp, info = q, k, None
    offset = info.offset if info is not None else 0
    lse_q, col_lse = pool_lse(q, kp, inv_temp, options=options, cols=True)
    if info is not None:
        # Unit vectors bound every logit by t: one all-reduce of plain sums.
        bound = unit_vector_bound(inv_temp) if options.normalize else None
        col_lse = all_reduce_logsumexp(col_lse, group, bound=bound)
    lse_k = col_lse[offset : offset + n]
    lse_q = _with_hard_negatives(
        lse_q, q, hard, inv_temp=inv_temp, options=options, distributed=distributed
    )
    global_rows = info.total if info is not None else n
    if labels is None:
        return 0.5 * (lse_q + lse_k) - pair_logit(q, k, inv_temp), global_rows
    pool_labels = gather_labels(labels, info) if info is not None else labels
    inverse, counts = label_classes(pool_labels)
    cls = inverse[offset : offset + n]
    pos_q = mean_positive_logit(q, class_sums(kp, inverse, len(counts)), cls, counts, inv_temp)
    pos_k = mean_positive_logit(k, class_sums(qp, inverse, len(counts)), cls, counts, inv_temp)
    return 0.5 * ((lse_q - pos_q) + (lse_k - pos_k)), global_rows


# ----------------------------------------------------------------------- public API


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: torch.Tensor | None = None,
    temperature: Temperature = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    *,
    symmetric: bool = False,
    normalize: bool = True,
    chunk_size: int | None = None,
    kernel: str = "auto",
    gather: bool = False,
    group: ProcessGroup | None = None,
    labels: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE loss; a drop-in for info-nce-pytorch's ``info_nce`` with more options.

    Row i's logits are ``<q_i, k_j> / temperature`` over its candidates; its loss is
    the cross-entropy with its positive ``k_i``. Candidates are:
    the positive keys of the batch (``negative_keys=None``, in-batch negatives); or
    ``k_i`` plus the shared ``negative_keys`` (unpaired); or ``k_i`` plus its own
    ``negative_keys[i]`` (paired). With ``hard_negatives``, the in-batch keys and every
    hard negative of the batch (text retrieval's "multiple negatives ranking" loss).

    Args:
        query: Shape: (N, D).
        positive_key: Shape: (N, D); row i is the positive of ``query[i]``.
        negative_keys: None, Shape: (M, D) for ``negative_mode="unpaired"``, or
            (N, M, D) for ``"paired"``.
        temperature: a positive number (Python or NumPy), or a floating-point tensor
            with one element, Shape: () or (1,) (it receives a gradient, in its shape).
        reduction: "mean", "sum" or "none" (per-row losses, Shape: (N,)).
        negative_mode: "unpaired" or "paired".
        symmetric: CLIP's loss, the mean of the query->key and key->query
            cross-entropies (in-batch negatives only). With "none", row i holds the
            mean of its two directions.
        normalize: L2-normalise the inputs first (info-nce-pytorch always does).
        chunk_size: None picks the chunked kernel when the logits would not fit a
            small budget; an int forces tiles of that edge (memory O(chunk^2)).
        kernel: the log-sum-exp over the pool. "auto" (dense when small, chunked
            otherwise; an int ``chunk_size`` forces chunked), "dense" (the full
            logits, autograd), "chunked" (pure-torch tiles) or "triton" (fused
            Triton kernels; CUDA tensors of float32/bfloat16/float16, or CPU
            tensors under ``TRITON_INTERPRET=1``; ``chunk_size`` a power of two
            >= 16). All give the same result within float rounding. Paired
            negatives need no pool and ignore it.
        gather: build the pool from every rank with :func:`all_gather_with_grad`:
            positive keys (and, symmetric, queries) or unpaired negatives of all
            ranks; paired negatives stay local. Each rank returns the loss of its
            own rows; ``"mean"`` is ``sum * world_size / global_rows`` and ``"sum"``
            is ``sum * world_size`` so that DDP-averaged gradients are exact. A
            rank may hold 0 rows. At world size 1 it is the local loss.
        group: process group for ``gather`` (default the world).
        labels: None, or one int64 class label per row, Shape: (N,) (any int64
            values, hashes included, compared exactly): supervised contrastive
            loss (SupCon's L_out). Row i's loss is its log-sum-exp minus the mean
            logit over P(i), every key of the pool with label ``labels[i]`` (``k_i``
            included; with ``symmetric`` the key->query direction likewise over the
            queries). With ``gather`` the labels are pooled with their rows. Costs
            O((N + M) * D) beyond the unlabelled loss: no N x M mask.
        hard_negatives: None, or extra candidate keys that join the in-batch keys,
            Shape: (M, D), or (N, H, D) (H per query, e.g. mined for it). Every row's
            candidates are then every positive key AND every hard negative of the
            batch (with ``gather``, of the global batch: both are pooled over the
            ranks, any M per rank, 0 included); a hard negative is never a positive,
            also with ``labels``. With ``symmetric`` they join the query->key
            direction only. Memory stays linear in N + M (a second kernel pass).
            Not with ``negative_keys`` (which replace the in-batch keys).

    Returns:
        A 0-dim tensor, or Shape: (N,) for ``reduction="none"``. float32 for
        float16/bfloat16 inputs (the loss is accumulated in float32).

    Raises:
        ValueError: naming the argument, for wrong shapes or ranks, mismatched D,
            dtype or device, an empty batch, a temperature that is not a positive
            finite number or one-element tensor, an unknown ``reduction``,
            ``negative_mode`` or ``kernel``, a bad ``chunk_size``, ``symmetric=True``
            with ``negative_keys``, inputs ``kernel="triton"`` cannot take, or
            ``labels`` that are not an int64 tensor of shape (N,) on the query's
            device, or given with ``negative_keys``, or ``hard_negatives`` that are
            not (M, D) / (N, H, D) like ``query``, or given with ``negative_keys``.
        ImportError: ``kernel="triton"`` without triton installed.

    Example:
        >>> loss = info_nce(img_emb, txt_emb, temperature=0.07, symmetric=True, gather=True)
    """
    options = LossOptions(
        reduction=reduction, negative_mode=negative_mode, symmetric=symmetric,
        normalize=normalize, chunk_size=chunk_size, kernel=kernel, gather=gather, group=group,
    )  # fmt: skip
    check_info_nce_inputs(query, positive_key, negative_keys, options=options)
    check_labels(labels, query, "query", negative_keys)
    hard = check_hard_negatives(hard_negatives, query, negative_keys)
    check_kernel_inputs(kernel, query)
    temperature_value(temperature)
    return _info_nce_loss(
        query, positive_key, negative_keys,
        inv_temp=inverse_temperature(temperature, query), labels=labels, options=options,
        hard=hard,
    )  # fmt: skip


class InfoNCE(TemperatureModule):
    """Module form of :func:`info_nce`; drop-in for info-nce-pytorch's ``InfoNCE``.

    Args:
        temperature: initial (``learn_temperature``) or fixed temperature; any
            value :func:`info_nce` takes. ``module.temperature = value`` sets it
            later (see :class:`~dist_infonce.losses.temperature.TemperatureModule`).
        reduction, negative_mode, symmetric, normalize, chunk_size, kernel, gather,
            group: as in :func:`info_nce`; also attributes, checked when assigned.
        learn_temperature: own a learnable temperature, parametrised as
            ``logit_scale = log(1 / temperature)`` and clamped to 1/temperature <= 100
            (CLIP). Inside a DDP module DDP averages its gradient; beside one (or
            under :func:`~dist_infonce.cached_backward`) the module averages it over
            the ranks of ``group`` in its backward, so every rank keeps the same
            temperature and the gradient follows the convention of every other
            parameter: no extra world-size factor. Outside DDP, with torch.distributed
            initialised, every rank of ``group`` (the world by default, also with
            ``gather=False``) must then run the backward; ranks that train on their
            own pass a one-rank group.

    Shape:
        query: (N, D); positive_key: (N, D); negative_keys: None, (M, D) or (N, M, D).
        Output: () or (N,) for ``reduction="none"``.

    Raises:
        ValueError: as :func:`info_nce`, at construction for the options and the
            temperature, at the call for the inputs.

    Example:
        >>> loss_fn = InfoNCE(temperature=0.07, symmetric=True, gather=True, learn_temperature=True)
        >>> loss = loss_fn(image_features, text_features)
    """

    reduction = OptionField()
    negative_mode = OptionField()
    symmetric = OptionField()
    normalize = OptionField()
    chunk_size = OptionField()
    kernel = OptionField()
    gather = OptionField()
    group = OptionField()

    def __init__(
        self,
        temperature: Temperature = 0.1,
        reduction: str = "mean",
        negative_mode: str = "unpaired",
        *,
        symmetric: bool = False,
        normalize: bool = True,
        chunk_size: int | None = None,
        kernel: str = "auto",
        gather: bool = False,
        group: ProcessGroup | None = None,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__(temperature, learn_temperature=learn_temperature)
        self.options = LossOptions(
            reduction=reduction, negative_mode=negative_mode, symmetric=symmetric,
            normalize=normalize, chunk_size=chunk_size, kernel=kernel, gather=gather,
            group=group,
        )  # fmt: skip

    def forward(
        self,
        query: torch.Tensor,
        positive_key: torch.Tensor,
        negative_keys: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``query`` against ``positive_key`` (see :func:`info_nce`).

        Shape: query (N, D); positive_key (N, D); negative_keys None, (M, D) or
        (N, M, D); labels None or (N,) int64; hard_negatives None, (M, D) or (N, H, D).
        """
        options = self.options
        check_info_nce_inputs(query, positive_key, negative_keys, options=options)
        check_labels(labels, query, "query", negative_keys)
        hard = check_hard_negatives(hard_negatives, query, negative_keys)
        check_kernel_inputs(options.kernel, query)
        return _info_nce_loss(
            query, positive_key, negative_keys,
            inv_temp=self.inverse_temperature(query), labels=labels, options=options,
            hard=hard,
        )  # fmt: skip

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"{self._temperature_repr()}, reduction={o.reduction!r}, "
            f"negative_mode={o.negative_mode!r}, symmetric={o.symmetric}, "
            f"chunk_size={o.chunk_size}, kernel={o.kernel!r}, gather={o.gather}"
        )
