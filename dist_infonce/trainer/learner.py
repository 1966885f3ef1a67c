"""The model and the loss as one module (:class:`Learner`), and how the trainer builds it.

This is where what the loss sees is decided: the pair of embeddings, the explicit
negatives, the labels. A momentum (EMA) key encoder or a queue of negatives would
live here too, beside the loss they feed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from dist_infonce import InfoNCE, NTXent, SigLIP, cached_backward
from dist_infonce.trainer.config import Config, ConfigError, LossConfig
from dist_infonce.trainer.data import ContrastiveData
from dist_infonce.trainer.models import PairModel, build_model

__all__ = ["Learner", "build_learner", "build_loss", "check_kernel"]


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


class Learner(nn.Module):
    """The model and the loss in one module, so that DDP also averages the gradient of
    a learnable temperature (the loss returns the globally normalised value; DESIGN.md).

    Args:
        model: ``forward(x0, x1) -> (z0, z1)``.
        loss_fn: from :func:`build_loss`.
        kind: ``cfg.loss.kind``.

    Shape:
        x0: (B, *in0); x1: (B + M, *in1), the last M rows being explicit negatives
        (``info_nce`` only); labels: None or (B,) int64 (``loss.supervised``).
        Output: () the loss.
    """

    def __init__(self, model: PairModel, loss_fn: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.kind = kind

    def forward(
        self, x0: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        z0, z1 = self.model(x0, x1)
        n = len(z0)
        if self.kind == "info_nce":
            negatives = z1[n:] if len(z1) > n else None
            return self.loss_fn(z0, z1[:n], negatives, labels=labels)
        return self.loss_fn(z0, z1, labels=labels)

    @property
    def temperature(self) -> float:
        """The current temperature (learnable or fixed)."""
        return float(self.loss_fn.temperature.detach())

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
        n = len(x0)
        towers: list[Any] = [model]
        inputs: list[Any] = [(x0, x1[:n])]
        if len(x1) > n:

            def negatives(x: torch.Tensor) -> torch.Tensor:
                with accelerator.autocast():
                    return self.model.encode(x, 1)

            towers.append(negatives)
            inputs.append(x1[n:])
        # A partial keeps the module visible to cached_backward (it averages the
        # gradient of a learnable temperature over the ranks).
        loss_fn = functools.partial(self.loss_fn, labels=labels)
        return cached_backward(towers, loss_fn, inputs, micro, scaler=accelerator.scaler)


def build_learner(cfg: Config, data: ContrastiveData) -> Learner:
    """The model of ``cfg.model`` for ``data``'s input shapes with the loss of ``cfg.loss``.

    Parameters are initialised from torch's global RNG: seed it first (the trainer
    seeds ``cfg.seed`` on every rank, so that every rank starts from the same weights).

    Raises:
        ConfigError: a model or loss option that cannot be built, or explicit negatives
            under gradient caching with a model that has no ``encode``.
    """
    model = build_model(cfg.model, data.input_shapes)
    if (
        cfg.train.micro_batch_size is not None
        and cfg.loss.num_negatives
        and type(model).encode is PairModel.encode
    ):
        raise ConfigError(
            f"train.micro_batch_size with loss.num_negatives needs {type(model).__name__}"
            ".encode(x, view) (the projection of one view; see PairModel)"
        )
    return Learner(model, build_loss(cfg.loss), cfg.loss.kind)


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
