"""Built-in data for the trainer: augmented digits (SimCLR) and synthetic paired modalities (CLIP).

Every training batch is a pure function of ``(seed, step, rank, micro_step)``: the
trainer asks :meth:`ContrastiveData.sample` for a batch with a ``torch.Generator``
seeded from those four numbers (:func:`batch_generator`). There is no iterator
state to save, so a resumed run sees exactly the batches the uninterrupted run saw,
and no two ranks (or steps) share a batch.

A user data set is any ``module:callable`` (``data.name``); the trainer calls it as
``callable(cfg, **cfg.kwargs)``, ``cfg`` being the ``data`` section
(:class:`~dist_infonce.trainer.config.DataConfig`) and ``data.kwargs`` its keyword
arguments, and it returns an object with the two members of :class:`ContrastiveData`
(``evaluate`` is optional), or a map-style source with epochs
(:class:`~dist_infonce.trainer.loader.MapSource`). :func:`sample_batch` is the batch
function of ``sample``-only data sets.

The digits are also a map-style source (``num_rows`` + ``fetch``): the trainer reads them
in epochs through :mod:`~dist_infonce.trainer.loader` (each row once per epoch over the
ranks); ``sample`` stays for code that draws batches with replacement. The file sources
(``table``, ``webdataset``) live in :mod:`~dist_infonce.trainer.sources`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from dist_infonce.trainer.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    import_object,
)
from dist_infonce.trainer.loader import Batch, MapSource, ShardSource

__all__ = [
    "ContrastiveData",
    "DigitsData",
    "Embed",
    "SyntheticPairs",
    "augment_digits",
    "batch_generator",
    "build_data",
    "knn_accuracy",
    "linear_probe_accuracy",
    "recall_at_1",
    "sample_batch",
]

#: ``embed(x, view)``: features of ``x`` as seen by tower ``view`` (0 or 1), no grad.
Embed = Callable[[torch.Tensor, int], torch.Tensor]


@runtime_checkable
class ContrastiveData(Protocol):
    """What the trainer needs from a data set.

    Attributes:
        input_shapes: the per-sample shape of view 0 and of view 1 (models read it).
    """

    input_shapes: tuple[tuple[int, ...], tuple[int, ...]]

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Return one training batch ``(view0, view1)``, each of shape (B, *input_shape),
        optionally followed by int64 class labels of shape (B,) (``loss.supervised``).

        All randomness must come from ``generator`` (a CPU generator) so that the
        batch is reproducible.
        """
        ...


def batch_generator(seed: int, step: int, rank: int, micro_step: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, rank, micro_step)``.

    numpy's SeedSequence hashes the four numbers, so nearby tuples (rank 1 of step 0
    and rank 0 of step 1) give unrelated streams.
    """
    state = np.random.SeedSequence([seed, step, rank, micro_step]).generate_state(2, np.uint64)
    g = torch.Generator()
    g.manual_seed(int(state[0]) & ((1 << 63) - 1))
    return g


# ----------------------------------------------------------------------------- digits


def augment_digits(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotation_deg: float = 12.0,
    scale: tuple[float, float] = (0.85, 1.15),
    max_shift_px: float = 1.0,
    noise_std: float = 0.08,
    erase_prob: float = 0.3,
) -> torch.Tensor:
    """Random affine (rotation, zoom, shift, shear), contrast jitter, noise and cutout.

    Zooming in and shifting is the 8x8 analogue of SimCLR's random resized crop.

    Args:
        images: (B, 1, H, W) in [0, 1], on CPU.
        generator: the only source of randomness.
        max_rotation_deg: rotations are uniform in +-this.
        scale: zoom factor range (> 1 zooms in, i.e. crops).
        max_shift_px: shifts are uniform in +-this many pixels.
        noise_std: standard deviation of the additive Gaussian noise.
        erase_prob: probability of blanking a random 3x3 patch.

    Returns:
        (B, 1, H, W) augmented images.
    """
    b, _, h, w = images.shape
    u = lambda *shape: torch.rand(*shape, generator=generator)
    angle = (u(b) * 2 - 1) * math.radians(max_rotation_deg)
    zoom = scale[0] + u(b) * (scale[1] - scale[0])
    shear = (u(b) * 2 - 1) * 0.15
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    shift = (u(b, 2) * 2 - 1) * max_shift_px * 2.0 / torch.tensor([w, h])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear, shift[:, 0]], dim=1),
            torch.stack([sin, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3): maps output coordinates to input coordinates
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = 0.7 + 0.6 * u(b, 1, 1, 1)
    out = out * contrast + noise_std * torch.randn(out.shape, generator=generator)
    # Cutout: a 3x3 patch at a random place, for a random subset of the batch.
    erase = u(b) < erase_prob
    top = torch.randint(0, h - 2, (b,), generator=generator)
    left = torch.randint(0, w - 2, (b,), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    patch = (
        (rows >= top.view(b, 1, 1))
        & (rows < top.view(b, 1, 1) + 3)
        & (cols >= left.view(b, 1, 1))
        & (cols < left.view(b, 1, 1) + 3)
    )
    mask = (patch & erase.view(b, 1, 1)).unsqueeze(1)
    return out.masked_fill(mask, 0.0)


class DigitsData:
    """scikit-learn's 8x8 digits (1797 images, bundled: no download), split once.

    Training batches draw images of the training split uniformly (with replacement)
    and return two independent augmentations of each, and their class labels (used
    for training only with ``loss.supervised``). :meth:`evaluate` fits a linear probe
    and kNN on frozen features of the held-out split.

    Args:
        cfg: the ``data`` section (``eval_fraction``, ``seed``, augmentation).
        knn_k: neighbours of the kNN classifier.
    """

    def __init__(self, cfg: DataConfig, knn_k: int = 5) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        y = torch.from_numpy(digits.target.astype(np.int64))
        idx_train, idx_test = train_test_split(
            np.arange(len(y)), test_size=cfg.eval_fraction, random_state=cfg.seed, stratify=y
        )
        self.x_train, self.y_train = x[idx_train], y[idx_train]
        self.x_test, self.y_test = x[idx_test], y[idx_test]
        self.noise_std = cfg.noise
        self.knn_k = knn_k
        self.input_shapes = ((1, 8, 8), (1, 8, 8))
        self.input_kinds = ("image", "image")
        # A map-style source (loader.MapSource): the trainer reads it in epochs.
        self.num_rows = len(self.y_train)
        self.has_labels = True
        self.may_fail = False

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Two augmented views of ``batch_size`` random training images, each (B, 1, 8, 8),
        and the images' digit labels, (B,) int64."""
        idx = torch.randint(0, len(self.x_train), (batch_size,), generator=generator)
        images = self.x_train[idx]
        v0 = augment_digits(images, generator, noise_std=self.noise_std)
        v1 = augment_digits(images, generator, noise_std=self.noise_std)
        return v0, v1, self.y_train[idx]

    def fetch(
        self, rows: Sequence[int], negatives: Sequence[int], generator: torch.Generator
    ) -> Batch:
        """Two augmented views of the training images ``rows``, each (B, 1, 8, 8), their
        labels (B,), and view 1 of ``negatives`` appended to ``x1`` (the trainer's
        epoch reader; all randomness from ``generator``)."""
        idx = torch.as_tensor(rows, dtype=torch.int64)
        images = self.x_train[idx]
        v0 = augment_digits(images, generator, noise_std=self.noise_std)
        v1 = augment_digits(images, generator, noise_std=self.noise_std)
        if negatives:
            others = self.x_train[torch.as_tensor(negatives, dtype=torch.int64)]
            v1 = torch.cat([v1, augment_digits(others, generator, noise_std=self.noise_std)])
        return Batch(v0, v1, self.y_train[idx], ids=list(rows))

    def evaluate(self, embed: Embed) -> dict[str, float]:
        """Linear-probe and kNN accuracy of the frozen features on the held-out split.

        Returns:
            ``{"eval/linear_acc": ..., "eval/knn_acc": ...}``, fractions in [0, 1].
        """
        f_train = embed(self.x_train, 0).float().cpu().numpy()
        f_test = embed(self.x_test, 0).float().cpu().numpy()
        y_train, y_test = self.y_train.numpy(), self.y_test.numpy()
        return {
            "eval/linear_acc": linear_probe_accuracy(f_train, y_train, f_test, y_test),
            "eval/knn_acc": knn_accuracy(f_train, y_train, f_test, y_test, k=self.knn_k),
        }


def linear_probe_accuracy(
    f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test accuracy of a logistic regression on standardised frozen features.

    Shape:
        f_train: (N, F); y_train: (N,); f_test: (M, F); y_test: (M,).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(f_train, y_train)
    return float(probe.score(f_test, y_test))


def knn_accuracy(
    f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, k: int = 5
) -> float:
    """Test accuracy of a cosine-distance k-nearest-neighbour classifier on frozen features."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    knn.fit(f_train, y_train)
    return float(knn.score(f_test, y_test))


# -------------------------------------------------------------------- synthetic pairs


class SyntheticPairs:
    """Two synthetic "modalities": different non-linear views of shared latents.

    A latent ``z ~ N(0, I_latent_dim)`` is seen as ``a = tanh(z A1) A2 + noise`` and as
    ``b = sin(z B1) * softplus(z B2) + noise``. The maps A1, A2, B1, B2 are fixed by
    ``cfg.seed`` (the same "world" for every run); training latents are fresh for every
    batch; evaluation uses ``cfg.num_eval`` held-out pairs drawn from their own stream.

    Args:
        cfg: the ``data`` section (``latent_dim``, ``dim_a``, ``dim_b``, ``noise``,
            ``num_eval``, ``seed``).
    """

    def __init__(self, cfg: DataConfig) -> None:
        g = torch.Generator().manual_seed(cfg.seed)
        d = cfg.latent_dim
        self.a1 = torch.randn(d, 2 * cfg.dim_a, generator=g) / math.sqrt(d)
        self.a2 = torch.randn(2 * cfg.dim_a, cfg.dim_a, generator=g) / math.sqrt(2 * cfg.dim_a)
        self.b1 = torch.randn(d, cfg.dim_b, generator=g) * 1.5 / math.sqrt(d)
        self.b2 = torch.randn(d, cfg.dim_b, generator=g) / math.sqrt(d)
        self.latent_dim = d
        self.noise = cfg.noise
        self.input_shapes = ((cfg.dim_a,), (cfg.dim_b,))
        # Held-out pairs: a stream no training batch can draw (training streams are
        # seeded through batch_generator, this one directly).
        self.eval_a, self.eval_b = self._pairs(
            torch.Generator().manual_seed(cfg.seed + 7919), cfg.num_eval
        )

    def _pairs(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.latent_dim, generator=g)
        a = torch.tanh(z @ self.a1) @ self.a2
        b = torch.sin(z @ self.b1) * F.softplus(z @ self.b2)
        a = a + self.noise * torch.randn(a.shape, generator=g)
        b = b + self.noise * torch.randn(b.shape, generator=g)
        return a, b

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, ...]:
        """A batch of fresh pairs: (B, dim_a) and (B, dim_b)."""
        return self._pairs(generator, batch_size)

    def evaluate(self, embed: Embed) -> dict[str, float]:
        """Retrieval recall@1 among the held-out pairs, both directions.

        Returns:
            ``eval/recall@1`` (mean of a->b and b->a), ``eval/recall@1_a2b``,
            ``eval/recall@1_b2a``; fractions in [0, 1].
        """
        ea = F.normalize(embed(self.eval_a, 0).float(), dim=1)
        eb = F.normalize(embed(self.eval_b, 1).float(), dim=1)
        a2b, b2a = recall_at_1(ea, eb), recall_at_1(eb, ea)
        return {
            "eval/recall@1": (a2b + b2a) / 2,
            "eval/recall@1_a2b": a2b,
            "eval/recall@1_b2a": b2a,
        }


def recall_at_1(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """Fraction of queries whose most similar key is their own pair.

    Shape:
        queries: (N, D); keys: (N, D), row i of each form a pair.
    """
    best = (queries @ keys.T).argmax(dim=1)
    return float((best == torch.arange(len(queries), device=best.device)).float().mean())


# --------------------------------------------------------------------------- factory


def build_data(
    cfg: DataConfig, knn_k: int = 5, *, model: ModelConfig | None = None
) -> ContrastiveData | MapSource | ShardSource:
    """Build the data set named by ``cfg.name``.

    Args:
        cfg: the ``data`` section. ``name`` is ``digits``, ``synthetic_pairs``, ``table``,
            ``webdataset`` or a ``module:callable`` that is called as
            ``callable(cfg, **cfg.kwargs)``.
        knn_k: neighbours of the digits kNN evaluation.
        model: the ``model`` section: the towers choose the preprocessing of the file
            sources' views (:func:`~dist_infonce.trainer.transforms.view_transform`).

    Raises:
        ConfigError: a file source that cannot be read (the file, column or row is
            named); the callable cannot be imported, does not take
            ``(cfg, **data.kwargs)``, or returned an object that is neither a
            :class:`ContrastiveData` nor a map-style source.
    """
    if cfg.name == "digits":
        return DigitsData(cfg, knn_k=knn_k)
    if cfg.name == "synthetic_pairs":
        return SyntheticPairs(cfg)
    if cfg.name in ("table", "webdataset"):
        from dist_infonce.trainer.sources import TableSource, WebDatasetSource
        from dist_infonce.trainer.zoo import require

        # A missing reader is a clear exit 2 naming the extra, not an ImportError mid-setup.
        require("pyarrow" if cfg.name == "table" else "webdataset", f"data.name={cfg.name}")
        return (TableSource if cfg.name == "table" else WebDatasetSource)(cfg, model)
    make = import_object(cfg.name, "data.name")
    check_call(make, "data.name", "data.kwargs", (cfg,), cfg.kwargs)
    data = make(cfg, **cfg.kwargs)
    if not isinstance(data, ContrastiveData | MapSource):
        raise ConfigError(
            f"data.name={cfg.name!r} returned {type(data).__name__}, which lacks "
            "`sample(generator, batch_size)` and `input_shapes` (see dist_infonce.trainer.data.ContrastiveData)"
        )
    return data


def check_call(
    fn: Callable[..., Any], key: str, kwargs_key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse, before calling it, a user callable that cannot take ``fn(*args, **kwargs)``.

    A TypeError from deep inside the user's code would not say which config key to fix.

    Raises:
        ConfigError: naming ``key`` and ``kwargs_key``.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable without a signature: let the call tell
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"
        raise ConfigError(
            f"{key}: {getattr(fn, '__qualname__', fn)}{signature} cannot be called with "
            f"{len(args)} positional argument(s) and {kwargs_key} ({given}): {e}"
        ) from None


def sample_batch(
    data: ContrastiveData, cfg: Config, *, step: int, rank: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The training batch ``(x0, x1, labels)`` of ``(step, rank, micro)``: a pure function
    of ``cfg.seed`` and these numbers, ``cfg.train.batch_size`` rows.

    ``labels`` is None unless ``loss.supervised``. With ``loss.num_negatives`` the
    explicit negatives (view-1 samples of other items) follow the positives in ``x1``.

    Shape:
        x0: (B, *input0); x1: (B + M, *input1), M = ``loss.num_negatives``;
        labels: None or (B,) int64.

    Raises:
        ConfigError: ``loss.supervised`` with a data set that returns no labels.
    """
    g = batch_generator(cfg.seed, step, rank, micro)
    batch = data.sample(g, cfg.train.batch_size)
    x0, x1 = batch[:2]
    labels = None
    if cfg.loss.supervised:
        if len(batch) < 3:
            raise ConfigError(
                f"loss.supervised: data.name={cfg.data.name!r} returns no class labels "
                "(its sample() gives two views only)"
            )
        labels = batch[2]
    if cfg.loss.num_negatives:
        negatives = data.sample(g, cfg.loss.num_negatives)[1]
        x1 = torch.cat([x1, negatives])
    return x0, x1, labels
