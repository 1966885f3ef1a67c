"""MoCo in the trainer: the momentum (EMA) key encoder and the loss against the queue.

``model.momentum > 0`` (:class:`MomentumEncoder`): view 1's keys come from an EMA copy
of the model, without gradient, updated once per optimizer step after the optimizer.
``loss.queue_size > 0`` (:class:`QueueLoss`): the negatives are the last
``queue_size`` keys of every rank (a :class:`~dist_infonce.NegativeQueue`), pushed once
per optimizer step with every micro-step's keys. Either works without the other: an
EMA key encoder alone uses the in-batch keys as negatives (MoCo v3); a queue alone
fills from the online model's keys (a cross-batch memory).

Choices, and why:

- The key encoder is MoCo's: the EMA covers the parameters (in float32 at least; float64
  stays float64), and its BatchNorm layers run as the learner runs (in training: the
  statistics of the key batch, and running statistics updated by its own forward). An
  eval-mode key encoder (running statistics EMA'd or copied from the online model) was
  tried first and measured worse on the digits (docs/moco.md): statistics gathered
  under the online weights do not fit the averaged weights, and the keys degrade.
- The running statistics of the key encoder differ between ranks (each normalises its
  own batch), so after every update rank 0's buffers are broadcast: every rank holds
  the same key encoder, and a checkpoint (rank 0's) restores exactly what every rank
  had. (In training they do not change the keys: batch statistics are used.)
- MoCo's "shuffling BN" is not done: the keys of this step share their batch's
  statistics, a signature the queue's older keys lack. On the digits this has not hurt
  (docs/moco.md); models without BatchNorm in the key path do not have it.
- The loss against the queue is computed without gathering (the queue is already the
  same on every rank; gathering it would send it world_size times) and normalised by
  the global number of rows (one all-reduce of one integer), so that the gradient
  convention of DESIGN.md holds with uneven local batches too.
- Until the first push the queue is empty: that one step uses the rank's own keys as
  in-batch negatives, so that the first step trains every parameter (a loss without
  negatives would be 0).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from dist_infonce import InfoNCE, NegativeQueue
from dist_infonce.dist import _comm_device, get_world_size, is_distributed
from dist_infonce.losses.common import global_count
from dist_infonce.trainer.config import ConfigError, LossConfig
from dist_infonce.trainer.models import PairModel

__all__ = ["MomentumEncoder", "QueryTower", "QueueLoss", "build_queue_loss"]


def _ema_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (an EMA in bfloat16 would lose the (1 - m) increments)."""
    if not t.is_floating_point():
        return t
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MomentumEncoder(nn.Module):
    """MoCo's key encoder: an EMA copy of a :class:`PairModel`, without gradient.

    Args:
        model: the online model; copied at construction (MoCo starts the key encoder as
            a copy of the query encoder).
        momentum: m in ``ema = m * ema + (1 - m) * online`` (parameters), in (0, 1).
        group: the ranks that share the model; None: the world (rank 0's buffers are
            broadcast to it after every update).

    Shape:
        x: (B, *input of view 1). Output: (B, D) keys, ``model.encode(x, 1)`` of the copy.

    Raises:
        ValueError: ``momentum`` not in (0, 1).
    """

    def __init__(
        self, model: PairModel, momentum: float, *, group: ProcessGroup | None = None
    ) -> None:
        super().__init__()
        if not 0 < momentum < 1:
            raise ValueError(f"MomentumEncoder: momentum must be in (0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.group = group
        self.model = copy.deepcopy(model)._apply(_ema_dtype).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode(x, 1)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """``ema = m * ema + (1 - m) * online`` for every parameter of ``online``, then
        rank 0's buffers (the key encoder's own running statistics) to every rank.

        Call it once per optimizer step, after ``optimizer.step()``, on every rank.

        Raises:
            ValueError: ``online`` does not have the copy's parameters.
        """
        weight = 1.0 - self.momentum
        ema, src = dict(self.model.named_parameters()), dict(online.named_parameters())
        if ema.keys() != src.keys():
            raise ValueError(
                "MomentumEncoder.update: the online model's parameters "
                f"{sorted(set(src) ^ set(ema))[:4]} do not match the key encoder's"
            )
        for name, e in ema.items():
            # lerp: e + w (p - e) = m e + (1 - m) p, in the EMA's dtype.
            e.lerp_(src[name].detach().to(e.dtype), weight)
        self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        if not is_distributed(self.group):
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in self.model.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for bufs in by_dtype.values():
            device = _comm_device(bufs[0], self.group)
            flat = torch.cat([b.reshape(-1) for b in bufs]).to(device)
            dist.broadcast(flat, src=src, group=self.group)
            offset = 0
            for b in bufs:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class QueryTower(nn.Module):
    """``model.encode(x, 0)`` as a module of its own: what DDP wraps under gradient
    caching when keys come from a :class:`MomentumEncoder` (the online model then
    encodes view 0 only). Shape: x (B, *input of view 0) -> (B, D)."""

    def __init__(self, model: PairModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, 0)


class QueueLoss(nn.Module):
    """InfoNCE of each query against its positive key and the queue's negatives (MoCo).

    Args:
        loss: an :class:`~dist_infonce.InfoNCE` with ``reduction="none"`` and
            ``gather=False`` (it holds the temperature, learnable or fixed, and the kernel).
        queue: the negatives; its group is the group the loss is normalised over.

    Shape:
        query: (N, D); positive_key: (N, D). Output: () the loss of this rank's rows,
        ``sum * world / global rows`` (DESIGN.md's gradient convention).

    Every call keeps its keys (detached) until :meth:`push`, which the trainer calls once
    per optimizer step, after the update, on every rank (:meth:`discard` for a skipped step).
    """

    def __init__(self, loss: InfoNCE, queue: NegativeQueue) -> None:
        super().__init__()
        if loss.reduction != "none" or loss.gather:
            raise ValueError("QueueLoss needs InfoNCE(reduction='none', gather=False)")
        self.loss = loss
        self.queue = queue
        self._pending: list[torch.Tensor] = []

    @property
    def temperature(self) -> torch.Tensor:
        """The loss's temperature (learnable or fixed)."""
        return self.loss.temperature

    def forward(
        self,
        query: torch.Tensor,
        positive_key: torch.Tensor,
        negative_keys: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if negative_keys is not None or labels is not None:
            raise ValueError("QueueLoss: the negatives are the queue's; no negative_keys or labels")
        if positive_key.dim() != 2 or positive_key.shape[1] != self.queue.dim:
            raise ConfigError(
                f"loss.queue_size: the keys have shape {tuple(positive_key.shape)}, the queue "
                f"holds D={self.queue.dim} (model.embedding_dim); set model.embedding_dim to "
                "the model's output dimension"
            )
        # Half-precision embeddings (autocast) meet float32 rows: the loss is float32 anyway.
        dt = torch.promote_types(query.dtype, torch.float32)
        negatives = self.queue.negatives()
        rows = self.loss(
            query.to(dt),
            positive_key.to(dt),
            negatives.to(device=query.device, dtype=dt) if len(negatives) else None,
        )
        self._pending.append(positive_key.detach())
        group = self.queue.group
        if is_distributed(group):
            world, total = get_world_size(group), global_count(len(rows), query.device, group)
        else:
            world, total = 1, len(rows)
        return rows.sum() * (world / total)

    def push(self) -> None:
        """Push the keys of every call since the last push (a collective), in call order."""
        keys = torch.cat(self._pending) if self._pending else torch.zeros(0, self.queue.dim)
        self._pending.clear()
        self.queue.push(keys)

    def discard(self) -> None:
        """Forget the keys of a step that was not taken (nothing is pushed anywhere)."""
        self._pending.clear()


def build_queue_loss(cfg: LossConfig, dim: int) -> QueueLoss:
    """The :class:`QueueLoss` of ``cfg`` (``queue_size > 0``) for keys of dimension ``dim``.

    Raises:
        ConfigError: options the loss refuses (naming the ``loss.*`` key).
    """
    try:
        loss = InfoNCE(
            cfg.temperature,
            reduction="none",
            chunk_size=cfg.chunk_size,
            kernel=cfg.kernel,
            normalize=cfg.normalize,
            gather=False,
            learn_temperature=cfg.learn_temperature,
        )
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None
    return QueueLoss(loss, NegativeQueue(cfg.queue_size, dim))
