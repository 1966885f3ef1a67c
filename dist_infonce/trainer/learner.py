"""The model and the loss as one module (:class:`Learner`), and how the trainer builds it.

This is where what the loss sees is decided: the pair of embeddings, the explicit
negatives, the labels, and, for MoCo, the keys of the momentum (EMA) key encoder and
the queue of negatives (:mod:`~dist_infonce.trainer.moco`), beside the loss they feed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from dist_infonce import InfoNCE, NegativeQueue, NTXent, SigLIP, cached_backward
from dist_infonce.trainer.config import Config, ConfigError, LossConfig
from dist_infonce.trainer.data import ContrastiveData
from dist_infonce.trainer.loader import MapSource, ShardSource
from dist_infonce.trainer.moco import MomentumEncoder, QueryTower, QueueLoss, build_queue_loss
from dist_infonce.trainer.models import PairModel, TwoTowerModel, build_model
from dist_infonce.trainer.views import rows, take

__all__ = ["FlatViews", "Learner", "build_learner", "build_loss", "check_kernel", "micro_for"]


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module of ``cfg.kind``, pooling negatives over ranks when ``cfg.gather``.

    Raises:
        ConfigError: options the loss refuses (naming the ``loss.*`` key).
    """
    common: dict[str, Any] = {
        "chunk_size": cfg.chunk_size,
        "kernel": cfg.kernel,
        "normalize": cfg.normalize,
        "gather": cfg.gather,
        "learn_temperature": cfg.learn_temperature,
    }
    try:
        if cfg.kind == "siglip":
            # SigLIP's own parametrisation: learnable log t and b, initialised as SigLIP.
            del common["learn_temperature"]
            return SigLIP(10.0, -10.0, learn=True, **common)
        if cfg.kind == "nt_xent":
            return NTXent(cfg.temperature, **common)
        return InfoNCE(cfg.temperature, symmetric=cfg.kind == "clip", **common)
    except ValueError as e:  # validate() catches the known cases; this names any other
        raise ConfigError(f"loss: {e}") from None


class FlatViews(nn.Module):
    """A pair model called with both views as keyword arguments: what gradient caching
    wraps (in DDP) when a view is a dict of tensors (a Hugging Face tower's
    ``input_ids`` and ``attention_mask``).

    :func:`~dist_infonce.cached_backward` splits a dict of tensors key by key and calls
    the model with the slices as keywords, but takes no dict inside a tuple; so the two
    views travel as one flat dict (``x0`` or ``x0.<key>``, then ``x1`` or ``x1.<key>``)
    and are put back together here, inside the DDP forward (which keeps DDP's
    ``no_sync`` and its one gradient all-reduce per step).

    Args:
        model: ``forward(x0, x1) -> (z0, z1)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def flatten(x0: Any, x1: Any) -> dict[str, torch.Tensor]:
        """The keyword arguments of :meth:`forward` for the views ``x0`` and ``x1``."""
        out: dict[str, torch.Tensor] = {}
        for name, x in (("x0", x0), ("x1", x1)):
            if isinstance(x, dict):
                out.update({f"{name}.{k}": v for k, v in x.items()})
            else:
                out[name] = x
        return out

    def forward(self, **flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views: list[Any] = []
        for name in ("x0", "x1"):
            if name in flat:
                views.append(flat[name])
            else:
                prefix = name + "."
                views.append({k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)})
        return self.model(*views)


class Learner(nn.Module):
    """The model and the loss in one module, so that DDP also averages the gradient of
    a learnable temperature (the loss returns the globally normalised value; DESIGN.md).

    Args:
        model: ``forward(x0, x1) -> (z0, z1)``.
        loss_fn: from :func:`build_loss` (or a :class:`QueueLoss`, ``loss.queue_size``).
        kind: ``cfg.loss.kind``.
        key_encoder: MoCo's EMA key encoder (``model.momentum``): the keys of view 1
            come from it, without gradient, and the model encodes view 0 only.

    Shape:
        x0: (B, *in0); x1: (B + M, *in1), the last M rows being explicit negatives
        (``info_nce`` only); labels: None or (B,) int64 (``loss.supervised``).
        Output: () the loss.

    With a queue or a key encoder, call :meth:`end_step` once per optimizer step.
    """

    def __init__(
        self,
        model: PairModel,
        loss_fn: nn.Module,
        kind: str,
        *,
        key_encoder: MomentumEncoder | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.kind = kind
        self.key_encoder = key_encoder

    def forward(
        self, x0: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.key_encoder is not None:
            q = self.model.encode(x0, 0)
            return self.loss_fn(q, self.key_encoder(x1).to(q.dtype), labels=labels)
        z0, z1 = self.model(x0, x1)
        n = len(z0)
        if self.kind == "info_nce":
            negatives = z1[n:] if len(z1) > n else None
            return self.loss_fn(z0, z1[:n], negatives, labels=labels)
        return self.loss_fn(z0, z1, labels=labels)

    @property
    def temperature(self) -> float:
        """The current temperature (learnable or fixed)."""
        return float(torch.as_tensor(self.loss_fn.temperature).detach())

    @property
    def queue(self) -> NegativeQueue | None:
        """MoCo's queue of negatives (``loss.queue_size``), or None."""
        return self.loss_fn.queue if isinstance(self.loss_fn, QueueLoss) else None

    def cache_tower(self) -> nn.Module:
        """What DDP wraps under gradient caching: the model (in :class:`FlatViews` when
        its views are dicts of tensors, ``model.dict_views``), or, with a key encoder,
        its view-0 tower alone (:class:`QueryTower`: the model encodes no keys then)."""
        if self.key_encoder is not None:
            return QueryTower(self.model)
        return FlatViews(self.model) if getattr(self.model, "dict_views", False) else self.model

    def end_step(self, *, taken: bool) -> None:
        """After the optimizer step (a collective with a queue or a key encoder): the EMA
        update, then the push of every micro-step's keys; a step not taken (a non-finite
        value skipped on every rank) changes neither."""
        if taken and self.key_encoder is not None:
            self.key_encoder.update(self.model)
        if isinstance(self.loss_fn, QueueLoss):
            if taken:
                self.loss_fn.push()
            else:
                self.loss_fn.discard()

    def log_values(self) -> dict[str, float]:
        """``queue/size`` (rows held) and ``queue/age`` (optimizer steps since the oldest
        was pushed) with a queue; {} without. The same on every rank."""
        queue = self.queue
        if queue is None:
            return {}
        return {"queue/size": queue.filled, "queue/age": queue.age}

    def cached_backward(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        x1: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        micro: int,
        accelerator: Any,
    ) -> torch.Tensor:
        """The backward of ``forward(x0, x1, labels)`` with the encoders run ``micro`` rows at a
        time (:func:`dist_infonce.cached_backward`); returns the detached loss.

        ``model`` is ``self.model`` as prepared (DDP under several processes); the loss
        module stays outside DDP and averages its learnable temperature's gradient itself. Explicit
        negatives (the rows of ``x1`` past ``len(x0)``) are a second tower through
        :meth:`PairModel.encode`, under the same autocast as the prepared forward.
        """
        if self.key_encoder is not None:
            # The keys first, micro-batch by micro-batch (no grad; BatchNorm normalises
            # each micro-batch, as in the query tower); then the query tower alone.
            with accelerator.autocast():
                keys = torch.cat([self.key_encoder(chunk) for chunk in x1.split(micro)])
            # cached_backward hands the loss half-precision outputs as float32.
            keys = keys.to(torch.promote_types(keys.dtype, torch.float32))
            loss_fn = functools.partial(self.loss_fn, positive_key=keys, labels=labels)
            return cached_backward(model, loss_fn, x0, micro, scaler=accelerator.scaler)
        n = rows(x0)
        micro = micro_for(n, micro)
        towers: list[Any] = [model]
        inputs: list[Any] = [(x0, take(x1, slice(0, n)))]
        if isinstance(x0, dict) or isinstance(x1, dict):
            # Dict views travel as one flat dict of keywords (FlatViews); under DDP the
            # prepared model already is one (cache_tower), under FSDP it is wrapped here.
            inner = getattr(model, "module", model)
            towers = [model if isinstance(inner, FlatViews) else FlatViews(model)]
            inputs = [FlatViews.flatten(*inputs[0])]
        if rows(x1) > n:

            def negatives(*x: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
                with accelerator.autocast():
                    return self.model.encode(kw if kw else x[0], 1)

            towers.append(negatives)
            inputs.append(take(x1, slice(n, None)))
        # A partial keeps the module visible to cached_backward (it averages the
        # gradient of a learnable temperature over the ranks).
        loss_fn = functools.partial(self.loss_fn, labels=labels)
        return cached_backward(towers, loss_fn, inputs, micro, scaler=accelerator.scaler)


def micro_for(rows: int, micro: int) -> int:
    """The micro-batch size for a batch of ``rows`` rows: ``micro``
    (``train.micro_batch_size``), unless it would leave a last micro-batch of one row,
    which BatchNorm cannot train on (an epoch's smaller last batch makes such sizes):
    then the nearest size that does not, smaller ones first. The gradients do not
    depend on it (only BatchNorm's per-micro-batch statistics do).
    """
    if rows <= micro or rows % micro != 1:
        return micro
    for m in [*range(micro - 1, 1, -1), *range(micro + 1, rows + 1)]:
        if rows % m != 1:
            return m
    return rows


def build_learner(cfg: Config, data: ContrastiveData | MapSource | ShardSource) -> Learner:
    """The model of ``cfg.model`` for ``data``'s input shapes with the loss of ``cfg.loss``.

    Parameters are initialised from torch's global RNG: seed it first (the trainer
    seeds ``cfg.seed`` on every rank, so that every rank starts from the same weights).

    Raises:
        ConfigError: a model or loss option that cannot be built, or explicit negatives
            under gradient caching with a model that has no ``encode``.
    """
    model = build_model(cfg.model, data.input_shapes, getattr(data, "input_kinds", None))
    if (
        cfg.train.micro_batch_size is not None
        and cfg.loss.num_negatives
        and type(model).encode is PairModel.encode
    ):
        raise ConfigError(
            f"train.micro_batch_size with loss.num_negatives needs {type(model).__name__}"
            ".encode(x, view) (the projection of one view; see PairModel)"
        )
    key_encoder = None
    if cfg.model.momentum > 0:
        if isinstance(model, TwoTowerModel) or type(model).encode is PairModel.encode:
            raise ConfigError(
                f"model.momentum: the key encoder is an EMA copy of the query encoder, so "
                f"one encoder must serve both views through encode(x, view); "
                f"{type(model).__name__} "
                + (
                    "has one tower per view"
                    if isinstance(model, TwoTowerModel)
                    else "has no encode"
                )
            )
        key_encoder = MomentumEncoder(model, cfg.model.momentum)
    if cfg.loss.queue_size > 0:
        loss_fn: nn.Module = build_queue_loss(cfg.loss, cfg.model.embedding_dim)
    else:
        loss_fn = build_loss(cfg.loss)
    return Learner(model, loss_fn, cfg.loss.kind, key_encoder=key_encoder)


def check_kernel(cfg: LossConfig, device: torch.device) -> None:
    """Refuse, before training, a ``loss.kernel`` this process cannot run.

    Raises:
        ConfigError: ``triton`` without the package, or on CPU without
            ``TRITON_INTERPRET=1`` (the interpreter: slow, for tests).
    """
    if cfg.kernel != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("loss.kernel: triton is not installed (pip install triton); use chunked")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "loss.kernel: triton runs on a CUDA device (on CPU only under TRITON_INTERPRET=1, "
            "slowly, for tests); use loss.kernel=chunked on CPU"
        )
