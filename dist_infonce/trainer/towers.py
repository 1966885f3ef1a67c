"""The built-in encoders of one view by its kind: vectors, text, images.

``model.name: two_tower`` (one encoder per view) and ``mlp`` (one shared encoder) build
their encoders with :func:`encoder_for`, so a table of image paths and captions trains
with the built-in models: a small CNN for images, an embedding bag over the hashed
n-grams of :class:`~dist_infonce.trainer.transforms.HashedNgramTokenizer` for text, an
MLP for vectors. They are small on purpose (examples, tests, CPU); real towers (timm,
Hugging Face, OpenCLIP) come with their own preprocessing
(:func:`~dist_infonce.trainer.transforms.view_transform`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_infonce.trainer.config import ConfigError, ModelConfig
from dist_infonce.trainer.transforms import HashedNgramTokenizer

__all__ = ["ImageEncoder", "TextBagEncoder", "encoder_for"]


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    from dist_infonce.trainer.models import mlp

    return mlp(in_dim, hidden_dim, out_dim, depth)


class TextBagEncoder(nn.Module):
    """Token ids -> the mean of their embeddings -> an MLP (fastText-like; id 0 pads).

    Args:
        vocab_size: token ids are in ``[0, vocab_size)``.
        hidden_dim: embedding and MLP width.
        feature_dim: output features.
        depth: linear layers of the MLP.

    Shape:
        x: (B, L) int64. Output: (B, feature_dim).
    """

    def __init__(self, vocab_size: int, hidden_dim: int, feature_dim: int, depth: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, hidden_dim, mode="mean", padding_idx=0)
        self.mlp = _mlp(hidden_dim, hidden_dim, feature_dim, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.bag(x))


class ImageEncoder(nn.Module):
    """A small CNN for square RGB images: three conv blocks, global average pooling.

    Args:
        channels: input channels.
        width: channels of the first convolution (then 2x, 4x).
        feature_dim: output features.

    Shape:
        x: (B, channels, H, W). Output: (B, feature_dim).
    """

    def __init__(self, channels: int, width: int, feature_dim: int) -> None:
        super().__init__()

        def block(i: int, o: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o)]
            return [*layers, nn.ReLU(inplace=True), *([nn.MaxPool2d(2)] if pool else [])]

        self.net = nn.Sequential(
            *block(channels, width, True),
            *block(width, 2 * width, True),
            *block(2 * width, 4 * width, False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, feature_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def encoder_for(kind: str, shape: tuple[int, ...], cfg: ModelConfig) -> nn.Module:
    """The built-in encoder of a view of ``kind`` whose samples have ``shape``.

    Raises:
        ConfigError: a shape the encoder cannot take.
    """
    if kind == "text":
        return TextBagEncoder(
            HashedNgramTokenizer().vocab_size, cfg.hidden_dim, cfg.feature_dim, cfg.depth
        )
    if kind == "image":
        if len(shape) != 3:
            raise ConfigError(f"model.name={cfg.name}: images of shape {shape}; expected (C, H, W)")
        return ImageEncoder(shape[0], cfg.width, cfg.feature_dim)
    return nn.Sequential(
        nn.Flatten(), _mlp(math.prod(shape), cfg.hidden_dim, cfg.feature_dim, cfg.depth)
    )
