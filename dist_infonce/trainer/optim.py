"""Optimizers and the learning-rate schedule of the trainer.

LARS (You et al., 2017), as SimCLR uses it for large batches: SGD with momentum
whose step for each weight matrix is rescaled by the trust ratio
``eta * ||w|| / (||g|| + wd * ||w||)``. Biases and normalisation weights (1-D
parameters) get neither weight decay nor the trust ratio, as in SimCLR.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from dist_infonce.trainer.config import TrainConfig

__all__ = ["LARS", "build_optimizer", "lr_factor", "param_groups", "peak_lr"]


class LARS(torch.optim.Optimizer):
    """SGD + momentum with a layer-wise trust ratio.

    Args:
        params: parameters or parameter groups. A group with ``lars=False`` (and
            usually ``weight_decay=0``) is plain SGD + momentum.
        lr: learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        eta: trust coefficient.
        eps: guards the ratio against zero norms.

    Update, per parameter ``w`` with gradient ``g`` (``lars`` groups)::

        d = g + wd * w
        q = eta * ||w|| / ||d||   (1 when ||w|| or ||d|| is 0)
        v = momentum * v + q * d
        w = w - lr * v
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 1e-9,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "eps": eps,
            "lars": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]  # torch's signature
        """Perform one optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    # where() instead of an `if`: no host sync on CUDA.
                    q = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["eta"] * w_norm / (d_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    d = d * q
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters: matrices/kernels get weight decay (and LARS), 1-D ones do not.

    Biases, norm scales and a learnable logit scale are 0- or 1-D; decaying them
    (or rescaling them by a trust ratio) hurts, as SimCLR and CLIP both note.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars": False})
    return groups


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """The peak learning rate, after the linear scaling rule when ``cfg.scale_lr``.

    The rule scales by the samples per optimizer step:
    ``batch_size x world_size x grad_accum_steps / 256``.
    """
    if not cfg.scale_lr:
        return cfg.lr
    return cfg.lr * cfg.batch_size * world_size * cfg.grad_accum_steps / 256


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``model``'s parameters."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    for g in groups:
        g.pop("lars", None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps,
    then a half cosine down to ``min_lr_ratio`` at ``steps - 1``.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    span = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
