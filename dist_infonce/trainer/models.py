"""Built-in encoders for the trainer: a shared-encoder SimCLR model and a CLIP-style two-tower model.

Every model the trainer uses maps a pair of views to a pair of embeddings,
``forward(x0, x1) -> (z0, z1)``, and exposes ``embed(x, view)``: the frozen
features the evaluation uses (SimCLR: the encoder output, before the projection
head, as in SimCLR's linear evaluation; two towers: the joint embedding space that
cross-modal retrieval needs).

A user encoder is any ``module:callable`` (``model.name``); the trainer calls it as
``callable(cfg, input_shapes, **cfg.kwargs)``, ``cfg`` being the ``model`` section and
``input_shapes`` the data's per-sample shapes of view 0 and view 1. If it returns a
:class:`PairModel`, that is used as is; any other ``nn.Module`` is treated as one
encoder shared by both views and wrapped in :class:`SiameseModel` (with no extra head).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_infonce.trainer.config import ConfigError, ModelConfig, import_object
from dist_infonce.trainer.data import check_call

__all__ = ["DigitsCNN", "PairModel", "SiameseModel", "TwoTowerModel", "build_model", "mlp"]


def mlp(in_dim: int, hidden_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """``depth`` linear layers with BatchNorm + ReLU between them (SimCLR's head style)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 images: three 3x3 convolutions, one pooling, a linear layer.

    Args:
        feature_dim: output features per image.
        width: channels of the first convolution (the others use 2x).

    Shape:
        x: (B, 1, 8, 8). Output: (B, feature_dim).
    """

    def __init__(self, feature_dim: int = 128, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4; position still matters for digits, so no global pool
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PairModel(nn.Module):
    """Base of the trainer's models: ``forward(x0, x1) -> (z0, z1)`` plus ``embed(x, view)``."""

    def embed(self, x: torch.Tensor, view: int) -> torch.Tensor:
        """Evaluation features of ``x`` for tower ``view`` (0 or 1)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, view: int) -> torch.Tensor:
        """What ``forward`` gives the loss for view ``view`` alone: the trainer encodes
        explicit negatives (view 1) with it when gradient caching is on."""
        raise NotImplementedError


class SiameseModel(PairModel):
    """One encoder and one projection head shared by both views (SimCLR).

    Args:
        encoder: (B, *input) -> (B, F) features.
        head: (B, F) -> (B, D) projections the loss sees; identity if None.

    Shape:
        x0, x1: (B, *input). Output: two (B, D) tensors.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else nn.Identity()

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass over both views: half the kernel launches, and BatchNorm sees the
        # 2B images NT-Xent compares with each other.
        z = self.head(self.encoder(torch.cat([x0, x1])))
        return z[: len(x0)], z[len(x0) :]

    def embed(self, x: torch.Tensor, view: int) -> torch.Tensor:
        return self.encoder(x)

    def encode(self, x: torch.Tensor, view: int) -> torch.Tensor:
        return self.head(self.encoder(x))


class TwoTowerModel(PairModel):
    """Separate encoder + projection per modality (CLIP).

    Shape:
        x0: (B, *input0); x1: (B, *input1). Output: two (B, D) tensors.
    """

    def __init__(
        self, encoder0: nn.Module, head0: nn.Module, encoder1: nn.Module, head1: nn.Module
    ) -> None:
        super().__init__()
        self.encoder0, self.head0 = encoder0, head0
        self.encoder1, self.head1 = encoder1, head1

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head0(self.encoder0(x0)), self.head1(self.encoder1(x1))

    def embed(self, x: torch.Tensor, view: int) -> torch.Tensor:
        # The joint space (after the heads): retrieval compares the two towers, and
        # only the projections are trained to be comparable.
        return self.encode(x, view)

    def encode(self, x: torch.Tensor, view: int) -> torch.Tensor:
        if view == 0:
            return self.head0(self.encoder0(x))
        return self.head1(self.encoder1(x))


def build_model(
    cfg: ModelConfig,
    input_shapes: tuple[tuple[int, ...], tuple[int, ...]],
    input_kinds: tuple[str, str] | None = None,
) -> PairModel:
    """Build the model named by ``cfg.name``.

    Built-ins:
        ``digits_cnn``: :class:`DigitsCNN` encoder + 2-layer MLP head (SimCLR), for
        (1, 8, 8) images.
        ``mlp``: one MLP encoder shared by both views (on flattened inputs; text first
        through an embedding bag) + 2-layer MLP head; both views of the same kind and shape.
        ``two_tower``: one encoder + head per view (inputs may differ), by the view's kind
        (:func:`~dist_infonce.trainer.towers.encoder_for`): an MLP on flattened vectors,
        a small CNN for images, an embedding bag + MLP for text.
        ``hf:<dir>``, ``timm:<arch>``, ``open_clip:<arch>``, ``two_tower`` with
        ``model.towers``: the ecosystem's towers (:mod:`~dist_infonce.trainer.zoo`).

    Args:
        cfg: the ``model`` section.
        input_shapes: per-sample shapes of view 0 and view 1 (from the data).
        input_kinds: ``vector`` / ``text`` / ``image`` per view (from the data; None:
            vectors).

    Raises:
        ConfigError: ``mlp`` with views of different kinds or sizes; ``digits_cnn`` with
            other inputs than 8x8 digits; a user callable that cannot be imported, does
            not take ``(cfg, input_shapes, **model.kwargs)`` or does not return an
            ``nn.Module``.
    """
    from dist_infonce.trainer.towers import encoder_for
    from dist_infonce.trainer.zoo import build_zoo_model, is_zoo

    if is_zoo(cfg):  # hf: / timm: / open_clip: towers (trainer/zoo.py)
        return build_zoo_model(cfg, input_kinds)
    d_in = [math.prod(s) for s in input_shapes]
    kinds = input_kinds or ("vector", "vector")
    proj = lambda: mlp(cfg.feature_dim, cfg.hidden_dim, cfg.embedding_dim)
    if cfg.name == "digits_cnn":
        if tuple(map(tuple, input_shapes)) != ((1, 8, 8), (1, 8, 8)):
            raise ConfigError(
                f"model.name=digits_cnn takes 8x8 digit images; these views are {kinds[0]} "
                f"{tuple(input_shapes[0])} and {kinds[1]} {tuple(input_shapes[1])}: use "
                "model.name=two_tower (one encoder per view) or mlp (one shared encoder)"
            )
        return SiameseModel(DigitsCNN(cfg.feature_dim, cfg.width), proj())
    if cfg.name == "mlp":
        if d_in[0] != d_in[1] or kinds[0] != kinds[1]:
            raise ConfigError(
                f"model.name=mlp shares one encoder, but the views have {d_in[0]} and "
                f"{d_in[1]} elements ({kinds[0]}, {kinds[1]}); use model.name=two_tower"
            )
        # An MLP on flattened inputs (images included, as it always was); text needs an
        # embedding of its token ids first.
        kind = "text" if kinds[0] == "text" else "vector"
        return SiameseModel(encoder_for(kind, tuple(input_shapes[0]), cfg), proj())
    if cfg.name == "two_tower":
        towers = [
            encoder_for(k, tuple(shape), cfg) for k, shape in zip(kinds, input_shapes, strict=True)
        ]
        return TwoTowerModel(towers[0], proj(), towers[1], proj())
    make = import_object(cfg.name, "model.name")
    check_call(make, "model.name", "model.kwargs", (cfg, input_shapes), cfg.kwargs)
    model = make(cfg, input_shapes, **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name={cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model if isinstance(model, PairModel) else SiameseModel(model)
