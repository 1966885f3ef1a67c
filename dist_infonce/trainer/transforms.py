"""Per-view preprocessing: what turns one raw value of a data source into a model input.

A source (:mod:`~dist_infonce.trainer.sources`) yields raw values: a float vector, a
string of text, an image (a path or encoded bytes). Each view gets a
:class:`ViewTransform` that runs in the DataLoader workers and returns one fixed-shape
tensor per sample (the trainer stacks them into a batch; a batch may hold no rows, so
the shape and dtype are known without a sample).

**Where a tower's own preprocessing plugs in**: :func:`view_transform`. It picks the
transform of a view from its kind and the model config. The built-in towers
(``mlp``, ``two_tower``) take the defaults below: vectors as they are, text as hashed
byte n-grams (:class:`HashedNgramTokenizer`, embedded by
:class:`~dist_infonce.trainer.towers.TextBagEncoder`), images decoded by PIL and
augmented by torchvision. A tower that brings its own tokenizer or image preprocessing
(Hugging Face, OpenCLIP, timm) returns it from :func:`view_transform` instead, keyed by
``model.name`` / ``model.towers`` (:func:`~dist_infonce.trainer.zoo.tower_transform`). A
transform with ``keys`` returns a dict of tensors per sample (a tokenizer's
``input_ids`` and ``attention_mask``, each of ``shape``): the view is then a dict.

Randomness (augmentation) comes from the global ``torch`` / ``random`` / ``numpy``
RNGs, which the loader seeds once per batch from the batch's identity (seed, epoch,
position): the batch does not depend on the number of workers, and the training
process's own RNG streams are left where they were.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from dist_infonce.trainer.config import ConfigError, ModelConfig

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadSample",
    "HashedNgramTokenizer",
    "ImageTransform",
    "Kind",
    "VectorTransform",
    "ViewTransform",
    "view_transform",
]

#: What a view holds: a float vector, text, or an image.
Kind = Literal["vector", "text", "image"]

#: File extensions (lower case, no dot) read as images: table paths and webdataset keys.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")

#: Side of the square images the built-in image tower takes.
BUILTIN_IMAGE_SIZE = 32


class BadSample(Exception):
    """A sample that cannot be turned into a tensor (an unreadable image); the loader
    skips it or stops, as ``data.on_bad_sample`` says."""


class ViewTransform(Protocol):
    """One view's preprocessing: a raw value -> one tensor of ``shape`` and ``dtype``.

    Must be picklable (it runs in DataLoader workers) and take its randomness from the
    global torch / random / numpy RNGs only.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __call__(self, value: Any) -> torch.Tensor:
        """Raises BadSample for a value that cannot be read."""
        ...


class VectorTransform:
    """A float vector as a float32 tensor (precomputed features: nothing to augment).

    Args:
        dim: the vector length (checked when the source is read).

    Shape:
        value: (dim,). Output: (dim,) float32.
    """

    def __init__(self, dim: int) -> None:
        self.shape = (dim,)
        self.dtype = torch.float32

    def __call__(self, value: Any) -> torch.Tensor:
        out = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if out.shape != self.shape:
            raise BadSample(
                f"expected a vector of {self.shape[0]} numbers, got shape {tuple(out.shape)}"
            )
        return out


class HashedNgramTokenizer:
    """Text -> the ids of its byte n-grams, hashed into a fixed vocabulary (fastText style).

    The default text preprocessing of the built-in towers: it needs no vocabulary file
    and no download, so a text table trains end to end. The UTF-8 bytes of the lower-
    cased text give every n-gram of the orders in ``orders``; each is hashed (a fixed
    polynomial, the same in every process, unlike Python's ``hash``) into
    ``1 .. vocab_size - 1``; id 0 pads. N-grams are kept in the order of their start
    byte, up to ``max_tokens``.

    Args:
        vocab_size: hash buckets, padding included.
        orders: n-gram lengths in bytes.
        max_tokens: ids per text (longer texts are cut, shorter ones padded with 0).

    Shape:
        Output: (max_tokens,) int64.
    """

    def __init__(
        self, vocab_size: int = 2**14, orders: tuple[int, ...] = (1, 2, 3), max_tokens: int = 128
    ) -> None:
        self.vocab_size = vocab_size
        self.orders = orders
        self.max_tokens = max_tokens
        self.shape = (max_tokens,)
        self.dtype = torch.int64

    def ids(self, text: str) -> np.ndarray:
        """The n-gram ids of ``text`` before padding, in the order of their start byte."""
        b = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8).astype(np.uint64)
        starts, hashes = [], []
        for n in self.orders:
            count = len(b) - n + 1
            if count <= 0:
                continue
            # uint64 arithmetic wraps modulo 2**64: a well-defined hash in every process.
            h = np.full(count, n * 0x9E3779B97F4A7C15 % 2**64, dtype=np.uint64)
            for i in range(n):
                h = h * np.uint64(1_000_003) + b[i : i + count]
            starts.append(np.arange(count))
            hashes.append(h)
        if not hashes:
            return np.zeros(0, dtype=np.int64)
        order = np.argsort(np.concatenate(starts), kind="stable")
        h = np.concatenate(hashes)[order]
        return (h % np.uint64(self.vocab_size - 1)).astype(np.int64) + 1

    def __call__(self, value: Any) -> torch.Tensor:
        if not isinstance(value, str):
            raise BadSample(f"expected text, got {type(value).__name__}")
        ids = self.ids(value)[: self.max_tokens]
        out = torch.zeros(self.max_tokens, dtype=torch.int64)
        out[: len(ids)] = torch.from_numpy(ids)
        return out


class ImageTransform:
    """An image (a file path or encoded bytes) -> a normalised float tensor.

    Decoded by PIL and converted to RGB; in training a random resized crop (scale 0.8-1,
    as OpenCLIP's training transform does for image-text pairs: no flips, a caption may
    say "left"), at evaluation a resize and centre crop. Values are scaled to [-1, 1].

    Args:
        size: the output side in pixels.
        train: augment (training) or not (evaluation).

    Shape:
        Output: (3, size, size) float32.

    Raises:
        BadSample: the value cannot be read or decoded as an image.
    """

    def __init__(self, size: int = BUILTIN_IMAGE_SIZE, *, train: bool = True) -> None:
        from torchvision.transforms import v2

        self.size = size
        self.train = train
        self.shape = (3, size, size)
        self.dtype = torch.float32
        geometry = (
            [v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True)]
            if train
            else [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        )
        self._pipeline = v2.Compose(
            [
                v2.ToImage(),
                *geometry,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
            ]
        )

    def decode(self, value: Any) -> Any:
        """The PIL image of a path or of encoded bytes, in RGB.

        Raises:
            BadSample: missing, unreadable or not an image.
        """
        from PIL import Image

        try:
            source = io.BytesIO(value) if isinstance(value, bytes | bytearray) else Path(value)
            with Image.open(source) as im:
                return im.convert("RGB")  # convert() reads the pixels: a truncated file fails here
        except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "not an image"
            what = (
                "image bytes" if isinstance(value, bytes | bytearray) else f"image {str(value)!r}"
            )
            raise BadSample(f"cannot read {what}: {type(e).__name__}: {e}") from None

    def __call__(self, value: Any) -> torch.Tensor:
        return self._pipeline(self.decode(value))


def view_transform(
    kind: Kind, *, view: int, train: bool, model: ModelConfig, dim: int | None = None
) -> ViewTransform:
    """The preprocessing of view ``view`` (0 or 1) for the towers of ``model``.

    THE PLACE WHERE A TOWER'S OWN PREPROCESSING PLUGS IN: a tower family with a
    tokenizer or an image pipeline of its own (``model.name: hf:<dir>``,
    ``open_clip:<arch>``, ``timm:<arch>``) returns it here for the views it encodes;
    the built-in towers and user ``module:callable`` models get the defaults.

    Args:
        kind: what the source yields for this view.
        view: 0 or 1 (two towers may preprocess differently).
        train: training (augment) or evaluation (deterministic) preprocessing.
        model: the ``model`` section.
        dim: the vector length (``kind="vector"``).

    Raises:
        ConfigError: a view this model cannot take.
    """
    from dist_infonce.trainer.zoo import tower_transform

    own = tower_transform(kind, view=view, train=train, model=model)
    if own is not None:  # hf: tokenizer, timm: data config, open_clip: both (trainer/zoo.py)
        return own
    if kind == "vector":
        if dim is None:
            raise ConfigError(f"view {view}: a vector view needs its length")
        return VectorTransform(dim)
    if kind == "text":
        return HashedNgramTokenizer()
    if kind == "image":
        return ImageTransform(BUILTIN_IMAGE_SIZE, train=train)
    raise ConfigError(f"view {view}: unknown kind {kind!r}")
