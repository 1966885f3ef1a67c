"""Towers from the ecosystem: Hugging Face, timm and OpenCLIP encoders in the trainer.

``model.name`` / ``model.towers`` name them (docs/models.md):

- ``hf:<dir>``: a Hugging Face model directory (``AutoModel`` + ``AutoTokenizer``
  ``from_pretrained``; :mod:`~dist_infonce.trainer.zoo_hf`), a text tower with
  ``model.pooling`` (mean / cls);
- ``timm:<arch>``: ``timm.create_model`` (:mod:`~dist_infonce.trainer.zoo_timm`), an
  image tower whose data config drives the image preprocessing;
- ``open_clip:<arch>``: an OpenCLIP model, both towers and its tokenizer
  (:mod:`~dist_infonce.trainer.zoo_open_clip`).

``model.name: hf:<dir>`` or ``timm:<arch>`` is one tower shared by both views
(:class:`SharedTowerModel`); ``model.name: two_tower`` with ``model.towers: [A, B]`` one
tower per view (:class:`TowerPairModel`). Each tower carries its projection to the
joint space (``model.projection``), so what it outputs is what the loss compares and
what the evaluation embeds; :func:`~dist_infonce.trainer.export.export_run` writes it
in its library's own format.

Their preprocessing (tokenisation, the image pipeline) is returned to the data sources
by :func:`tower_transform` (the hook of
:func:`~dist_infonce.trainer.transforms.view_transform`) and runs in the DataLoader
workers. The libraries are imported only when a tower of theirs is built, with an
error naming the extra to install when they are missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_infonce.trainer.config import TOWER_PREFIXES, ConfigError, ModelConfig
from dist_infonce.trainer.models import PairModel
from dist_infonce.trainer.views import View, cat, rows

__all__ = [
    "SharedTowerModel",
    "TowerPairModel",
    "ZooTower",
    "build_zoo_model",
    "is_zoo",
    "require",
    "tower_name",
    "tower_transform",
]

#: The extra that installs each library (pyproject.toml).
_EXTRAS = {
    "transformers": "text",
    "tokenizers": "text",
    "sentence_transformers": "text",
    "timm": "vision",
    "torchvision": "vision",
    "PIL": "vision",
    "open_clip": "open_clip",
    "pyarrow": "data",
    "datasets": "data",
    "webdataset": "data",
}


def require(module: str, key: str) -> Any:
    """Import ``module``, or raise a ConfigError naming ``key`` and the extra to install.

    Raises:
        ConfigError: the package is not installed (or fails to import).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = _EXTRAS.get(module.split(".")[0], "vision,text")
        raise ConfigError(
            f"{key}: needs the {module.split('.')[0]} package: pip install "
            f"'dist_infonce[{extra}]' ({type(e).__name__}: {e})"
        ) from None


def is_zoo(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` names ecosystem towers (``hf:``, ``timm:``, ``open_clip:``)."""
    return cfg.name.startswith(TOWER_PREFIXES) or bool(cfg.towers)


def tower_name(cfg: ModelConfig, view: int) -> str | None:
    """The ecosystem tower that encodes view ``view`` (``open_clip:<arch>`` for both views
    of an OpenCLIP model), or None for the built-in and user models."""
    if cfg.towers:
        return cfg.towers[view]
    return cfg.name if cfg.name.startswith(TOWER_PREFIXES) else None


def _split(name: str) -> tuple[str, str]:
    family, _, what = name.partition(":")
    return family, what.strip()


class ZooTower(nn.Module):
    """Base of the ecosystem towers: one view's encoder with its projection.

    ``takes_dict``: called as ``tower(**inputs)`` with a dict view (a tokenizer's
    output), else ``tower(x)``. ``out_dim``: the embedding width. A frozen tower
    (:meth:`freeze`) has no trainable parameter and stays in eval mode.
    """

    takes_dict = False
    out_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def freeze(self) -> None:
        """Stop training this tower (``model.freeze``): no gradients, eval mode for good."""
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ZooTower:
        # A locked tower (LiT) keeps its dropout off and its BatchNorm statistics fixed.
        return super().train(mode and not self.frozen)

    def export(self, out: Path, *, normalize: bool) -> None:
        """Write this tower to ``out`` in its library's format (``normalize``: the loss
        compares unit vectors, so exported sentence embeddings are normalised too)."""
        raise NotImplementedError


def _call(tower: nn.Module, x: View) -> torch.Tensor:
    return tower(**x) if isinstance(x, dict) else tower(x)


class SharedTowerModel(PairModel):
    """One ecosystem tower for both views (``model.name: hf:<dir>`` / ``timm:<arch>``).

    Shape:
        x0, x1: (B, *input) or dicts of (B, L) (the same keys). Output: two (B, D).
    """

    def __init__(self, tower: ZooTower) -> None:
        super().__init__()
        self.tower = tower
        self.dict_views = tower.takes_dict

    def forward(self, x0: View, x1: View) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass over both views, as SiameseModel does.
        n = rows(x0)
        z = _call(self.tower, cat([x0, x1]))
        return z[:n], z[n:]

    def encode(self, x: View, view: int) -> torch.Tensor:
        return _call(self.tower, x)

    def embed(self, x: View, view: int) -> torch.Tensor:
        return _call(self.tower, x)

    def towers(self) -> list[ZooTower]:
        """The towers in view order (one here: index 0)."""
        return [self.tower]


class TowerPairModel(PairModel):
    """One ecosystem tower per view (``model.name: two_tower``, ``model.towers``).

    Shape:
        x0: view 0's input; x1: view 1's (tensors or dicts). Output: two (B, D).
    """

    def __init__(self, tower0: ZooTower, tower1: ZooTower) -> None:
        super().__init__()
        self.tower0, self.tower1 = tower0, tower1
        self.dict_views = tower0.takes_dict or tower1.takes_dict

    def forward(self, x0: View, x1: View) -> tuple[torch.Tensor, torch.Tensor]:
        return _call(self.tower0, x0), _call(self.tower1, x1)

    def encode(self, x: View, view: int) -> torch.Tensor:
        return _call(self.tower0 if view == 0 else self.tower1, x)

    def embed(self, x: View, view: int) -> torch.Tensor:
        # The joint space, as TwoTowerModel: what retrieval and zero-shot compare.
        return self.encode(x, view)

    def towers(self) -> list[ZooTower]:
        """The towers in view order."""
        return [self.tower0, self.tower1]


def _build_tower(name: str, view: int, cfg: ModelConfig, kind: str | None) -> ZooTower:
    """The tower ``name`` for view ``view`` (``kind``: what the view holds; None: unknown)."""
    family, what = _split(name)
    key = f"model.towers[{view}]" if cfg.towers else "model.name"
    out_dim = cfg.embedding_dim if cfg.projection == "linear" else None
    if family == "hf":
        if kind not in ("text", None):
            raise ConfigError(
                f"{key}={name}: a Hugging Face tower encodes text; view {view} holds {kind}"
            )
        from dist_infonce.trainer.zoo_hf import HFTextTower

        return HFTextTower(
            what,
            key=key,
            pooling=cfg.pooling,
            out_dim=out_dim,
            max_length=cfg.max_length,
            grad_checkpointing=cfg.grad_checkpointing,
        )
    if family == "timm":
        if kind not in ("image", None):
            raise ConfigError(
                f"{key}={name}: a timm tower encodes images; view {view} holds {kind}"
            )
        from dist_infonce.trainer.zoo_timm import TimmTower

        return TimmTower(
            what,
            key=key,
            out_dim=out_dim,
            pretrained=cfg.pretrained,
            kwargs=cfg.kwargs,
            grad_checkpointing=cfg.grad_checkpointing,
        )
    raise ConfigError(f"{key}: unknown tower {name!r} (hf:<dir>, timm:<arch>)")


def build_zoo_model(cfg: ModelConfig, input_kinds: tuple[str, str] | None) -> PairModel:
    """The pair model of the ecosystem towers ``cfg`` names, for views of ``input_kinds``.

    Parameters are initialised from torch's global RNG (the projections; the libraries'
    own random initialisations) or loaded from the named files.

    Raises:
        ConfigError: a library that is not installed (naming the extra), a model that
            cannot be loaded, a tower that does not take its view's kind, towers whose
            embedding widths differ (``model.projection=none``).
    """
    kinds: tuple[str | None, str | None] = input_kinds or (None, None)
    if cfg.name.startswith("open_clip:"):
        from dist_infonce.trainer.zoo_open_clip import OpenCLIPModel

        return OpenCLIPModel(_split(cfg.name)[1], cfg=cfg, kinds=kinds)
    if not cfg.towers:
        if kinds[0] != kinds[1] and None not in kinds:
            raise ConfigError(
                f"model.name={cfg.name} shares one tower, but view 0 holds {kinds[0]} and "
                f"view 1 {kinds[1]}: set model.name=two_tower and model.towers=[..., ...]"
            )
        return SharedTowerModel(_build_tower(cfg.name, 0, cfg, kinds[0]))
    towers = [_build_tower(cfg.towers[v], v, cfg, kinds[v]) for v in (0, 1)]
    if towers[0].out_dim != towers[1].out_dim:
        raise ConfigError(
            f"model.projection=none: the towers give embeddings of {towers[0].out_dim} and "
            f"{towers[1].out_dim} dimensions, which the loss cannot compare; use "
            "model.projection=linear (to model.embedding_dim)"
        )
    for i in cfg.freeze:
        towers[i].freeze()
    return TowerPairModel(*towers)


def tower_transform(kind: str, *, view: int, train: bool, model: ModelConfig) -> Any:
    """The preprocessing of view ``view`` for its ecosystem tower (a tokenizer, the image
    pipeline of the tower's data config), or None for built-in and user models.

    Raises:
        ConfigError: a view kind the tower does not take, a missing library.
    """
    name = tower_name(model, view)
    if name is None:
        return None
    family, what = _split(name)
    key = f"model.towers[{view}]" if model.towers else "model.name"
    if kind == "vector":
        takes = {"hf": "text", "timm": "images", "open_clip": "images and text"}[family]
        raise ConfigError(f"{key}={name}: this tower takes {takes}; view {view} holds vectors")
    if family == "hf":
        if kind != "text":
            raise ConfigError(
                f"{key}={name}: a Hugging Face tower encodes text; view {view} holds {kind}"
            )
        from dist_infonce.trainer.zoo_hf import HFTokenize

        return HFTokenize(what, max_length=model.max_length, key=key)
    if family == "timm":
        if kind != "image":
            raise ConfigError(
                f"{key}={name}: a timm tower encodes images; view {view} holds {kind}"
            )
        from dist_infonce.trainer.zoo_timm import TimmImageTransform

        return TimmImageTransform(what, kwargs=model.kwargs, train=train, key=key)
    from dist_infonce.trainer.zoo_open_clip import open_clip_transform

    return open_clip_transform(what, kind=kind, train=train, cfg=model)
