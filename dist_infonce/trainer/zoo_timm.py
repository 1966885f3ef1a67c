"""timm image towers (``timm:<arch>``): the encoder, its image pipeline, its export.

The tower is ``timm.create_model(arch, num_classes=..., **model.kwargs)``: with
``model.projection=linear`` timm's own classifier head, ``num_classes =
model.embedding_dim``, is the projection (so the exported model gives the embedding
itself); with ``none``, ``num_classes=0``: the pooled features. ``model.pretrained``
(a local file) is loaded by timm (``pretrained_cfg_overlay={"file": ...}``; a
classifier of another width is dropped, as timm does for fine-tuning); the
``local-dir:<dir>`` form loads a directory timm wrote.

The images are preprocessed by timm's ``create_transform`` from the model's data
config (input size, interpolation, mean / std, crop) in the DataLoader workers; the
training augmentation is a mild random resized crop without flips (image-text pairs:
a caption may say "left"), as the built-in image pipeline and OpenCLIP do.

The export is timm's own folder format (``save_for_hf``: ``config.json`` with the
model's arguments + ``model.safetensors``): ``timm.create_model("local-dir:<out>")``
rebuilds it, and ``timm.create_model(arch, checkpoint_path=<out>/model.safetensors,
**same kwargs)`` loads the state dict into the same architecture.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from dist_infonce.trainer.config import ConfigError
from dist_infonce.trainer.transforms import ImageTransform
from dist_infonce.trainer.zoo import ZooTower, require

__all__ = ["TimmImageTransform", "TimmTower", "create_timm_model"]

#: The training crop's area range (the built-in image pipeline's).
TRAIN_SCALE = (0.8, 1.0)


def create_timm_model(
    arch: str,
    *,
    key: str,
    num_classes: int,
    pretrained: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``timm.create_model`` with the trainer's conventions (see the module doc).

    Raises:
        ConfigError: timm is missing, the architecture is unknown, or the weights file
            cannot be loaded.
    """
    timm = require("timm", key)
    extra: dict[str, Any] = dict(kwargs or {})
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained: no such file {pretrained!r}")
        extra.update(pretrained=True, pretrained_cfg_overlay={"file": pretrained})
    elif arch.startswith("local-dir:"):
        extra["pretrained"] = True  # the folder's weights
    try:
        return timm.create_model(arch, num_classes=num_classes, **extra)
    except (RuntimeError, FileNotFoundError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{key}: timm cannot build timm:{arch}: {type(e).__name__}: {e}"
        ) from None


class TimmTower(ZooTower):
    """A timm model as one image view's tower.

    Args:
        arch: the architecture (or ``local-dir:<dir>``).
        key: the config key named in errors.
        out_dim: the classifier head's width used as projection, or None (features).
        pretrained: a local weights file (``model.pretrained``), or None.
        kwargs: more ``create_model`` arguments (``model.kwargs``: img_size, ...).
        grad_checkpointing: ``set_grad_checkpointing()``.

    Shape:
        x: (B, C, H, W). Output: (B, out_dim or num_features).
    """

    def __init__(
        self,
        arch: str,
        *,
        key: str,
        out_dim: int | None,
        pretrained: str | None = None,
        kwargs: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.arch, self.kwargs = arch, dict(kwargs or {})
        self.model = create_timm_model(
            arch, key=key, num_classes=out_dim or 0, pretrained=pretrained, kwargs=kwargs
        )
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.out_dim = out_dim or int(self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def export(self, out: Path, *, normalize: bool) -> None:
        """timm's folder format in ``out`` (see the module doc); ``normalize`` is noted in
        ``dist_infonce.json`` (a timm model has no normalisation layer to carry it)."""
        from timm.models import save_for_hf

        out.mkdir(parents=True, exist_ok=True)
        save_for_hf(self.model, str(out), safe_serialization=True)
        (out / "dist_infonce.json").write_text(
            json.dumps(
                {
                    "library": "timm",
                    "arch": self.arch,
                    "create_model_kwargs": {**self.kwargs, "num_classes": self.model.num_classes},
                    "normalize_embeddings": normalize,
                },
                indent=2,
            )
        )


@functools.lru_cache(maxsize=8)
def _data_config(arch: str, kwargs_json: str) -> tuple[tuple[str, Any], ...]:
    """The data config of ``arch`` built with these arguments (its actual input size)."""
    from timm.data import resolve_input_data_config

    # A model built to read its data config must not move the RNG that initialises the
    # trained one (the data is built first).
    with torch.random.fork_rng(devices=[]):
        model = create_timm_model(
            arch, key="model.name", num_classes=0, kwargs=json.loads(kwargs_json)
        )
    return tuple(sorted(resolve_input_data_config(model).items()))


class TimmImageTransform(ImageTransform):
    """An image -> the tensor a timm tower takes, by timm's ``create_transform`` from the
    model's data config (see the module doc).

    Args:
        arch: the architecture (or ``local-dir:<dir>``).
        kwargs: ``model.kwargs`` (``img_size`` changes the input size).
        train: training augmentation (a random resized crop of scale 0.8-1) or the
            evaluation pipeline (resize, centre crop).
        key: the config key named in errors.

    Shape:
        Output: (C, H, W) float32, the data config's ``input_size``.
    """

    def __init__(
        self,
        arch: str,
        *,
        kwargs: dict[str, Any] | None = None,
        train: bool = True,
        key: str = "model.name",
    ) -> None:
        require("timm", key)
        from timm.data import create_transform

        cfg = dict(_data_config(arch, json.dumps(kwargs or {}, sort_keys=True)))
        self.train = train
        self.shape = tuple(int(s) for s in cfg["input_size"])
        self.size = self.shape[-1]
        self.dtype = torch.float32
        extra: dict[str, Any] = {}
        if train:
            extra = {"scale": TRAIN_SCALE, "hflip": 0.0, "color_jitter": None}
        self._pipeline = create_transform(**cfg, is_training=train, **extra)
        if self.shape[0] == 1:
            self._grey = True  # a one-channel model: decode to "L", not RGB

    def decode(self, value: Any) -> Any:
        image = super().decode(value)
        return image.convert("L") if getattr(self, "_grey", False) else image
