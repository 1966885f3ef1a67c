"""OpenCLIP models (``open_clip:<arch>``): both towers, the tokenizer, the image pipeline, the export.

``open_clip.create_model(arch, pretrained=model.pretrained, **model.kwargs)`` builds the
whole CLIP model: the image view goes through ``encode_image``, the text view through
``encode_text`` (which view is which follows the data's kinds), each with OpenCLIP's own
projection. Its ``logit_scale`` (and SigLIP's ``logit_bias``) is not trained here: the
trainer's loss owns the temperature, and the export writes the loss's value into it.
``model.freeze`` locks a tower with OpenCLIP's own ``lock_image_tower`` /
``lock_text_tower`` (LiT). ``arch`` may be a built-in name or ``local-dir:<dir>`` (a folder
with ``open_clip_config.json``).

The tokenizer (``open_clip.get_tokenizer``) and the image transforms of
``create_model_and_transforms`` run in the DataLoader workers.

The export is OpenCLIP's local-directory format: ``open_clip_config.json`` (the model's
config with ``model.kwargs`` applied) and ``open_clip_pytorch_model.bin`` (the state dict):
``open_clip.create_model_and_transforms("local-dir:<out>")``, or, for a built-in
architecture, ``create_model_and_transforms(arch, pretrained="<out>/open_clip_pytorch_model.bin")``.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_infonce.trainer.config import ConfigError, ModelConfig
from dist_infonce.trainer.models import PairModel
from dist_infonce.trainer.transforms import BadSample, ImageTransform
from dist_infonce.trainer.zoo import require

__all__ = ["OpenCLIPImage", "OpenCLIPModel", "OpenCLIPTokenize", "open_clip_transform"]

#: The checkpoint file name of the export (one OpenCLIP finds in a local directory).
WEIGHTS = "open_clip_pytorch_model.bin"


def _create(arch: str, pretrained: str | None, kwargs: dict[str, Any]) -> Any:
    open_clip = require("open_clip", "model.name")
    if pretrained is not None and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained: no such file {pretrained!r}")
    if pretrained is not None and arch.startswith("local-dir:"):
        raise ConfigError(
            "model.pretrained: OpenCLIP reads the weights of a local-dir: model from its "
            "directory (open_clip_pytorch_model.bin beside open_clip_config.json), not from "
            "model.pretrained"
        )
    try:
        return open_clip.create_model_and_transforms(arch, pretrained=pretrained, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"model.name: OpenCLIP cannot build open_clip:{arch}: {type(e).__name__}: {e}"
        ) from None


def model_config(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The config OpenCLIP builds ``arch`` from, with ``kwargs`` applied (as
    ``create_model`` applies them: they override the config's top-level entries)."""
    open_clip = require("open_clip", "model.name")
    if arch.startswith("local-dir:"):
        path = Path(arch.partition(":")[2]) / "open_clip_config.json"
        cfg = json.loads(path.read_text())["model_cfg"]
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ConfigError(f"model.name: OpenCLIP has no architecture {arch!r}")
    return {**cfg, **kwargs}


class OpenCLIPModel(PairModel):
    """An OpenCLIP model as the trainer's pair model (see the module doc).

    Args:
        arch: the architecture (a built-in name or ``local-dir:<dir>``).
        cfg: the ``model`` section (``pretrained``, ``kwargs``, ``freeze``,
            ``grad_checkpointing``).
        kinds: what view 0 and view 1 hold (``image`` / ``text``; None: unknown, told
            by the input's dtype: token ids are integers).

    Shape:
        x (image view): (B, 3, H, W); x (text view): (B, context_length) int64.
        Output: (B, embed_dim).
    """

    def __init__(
        self, arch: str, *, cfg: ModelConfig, kinds: tuple[str | None, str | None]
    ) -> None:
        super().__init__()
        for view, kind in enumerate(kinds):
            if kind not in ("image", "text", None):
                raise ConfigError(
                    f"model.name=open_clip:{arch}: view {view} holds {kind}; OpenCLIP towers "
                    "take images and text"
                )
        self.arch, self.kwargs, self.kinds = arch, dict(cfg.kwargs), kinds
        self.clip = _create(arch, cfg.pretrained, self.kwargs)[0]
        for name in ("logit_scale", "logit_bias"):
            p = getattr(self.clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)  # the loss owns the temperature
        if cfg.grad_checkpointing:
            self.clip.set_grad_checkpointing(True)
        self.frozen: set[str] = set()
        for i in cfg.freeze:
            kind = kinds[i] or ("image" if i == 0 else "text")
            if kind == "image":
                self.clip.lock_image_tower(freeze_bn_stats=True)
            else:
                self.clip.lock_text_tower()
            self.frozen.add(kind)
        self.dict_views = False

    def _kind(self, x: torch.Tensor, view: int) -> str:
        return self.kinds[view] or ("image" if x.is_floating_point() else "text")

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(x0, 0), self.encode(x1, 1)

    def encode(self, x: torch.Tensor, view: int) -> torch.Tensor:
        if self._kind(x, view) == "image":
            return self.clip.encode_image(x)
        return self.clip.encode_text(x)

    def embed(self, x: torch.Tensor, view: int) -> torch.Tensor:
        return self.encode(x, view)

    def train(self, mode: bool = True) -> OpenCLIPModel:
        super().train(mode)
        if "image" in self.frozen:
            self.clip.visual.eval()  # a locked image tower keeps its statistics (LiT)
        return self

    def export(self, out: Path, *, normalize: bool, temperature: float | None = None) -> None:
        """OpenCLIP's local-directory format in ``out`` (see the module doc).

        ``temperature``: the loss's, written into ``logit_scale`` as ``log(1 / t)``.
        """
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.clip.state_dict().items()}
        if temperature is not None and "logit_scale" in state:
            state["logit_scale"].fill_(math.log(1.0 / temperature))
        torch.save(state, out / WEIGHTS)
        cfg = {
            "model_cfg": model_config(self.arch, self.kwargs),
            "preprocess_cfg": dict(getattr(self.clip.visual, "preprocess_cfg", {}) or {}),
        }
        (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2, default=str))


@functools.lru_cache(maxsize=4)
def _preprocess(arch: str, pretrained: str | None, kwargs_json: str) -> tuple[Any, Any, int]:
    """OpenCLIP's training and evaluation image transforms of ``arch``, and its image size."""
    # The model built for its transforms must not move the RNG that initialises the
    # trained one (the data is built first).
    with torch.random.fork_rng(devices=[]):
        model, train, val = _create(arch, pretrained, json.loads(kwargs_json))
    size = model.visual.image_size
    return train, val, int(size[0] if isinstance(size, tuple | list) else size)


class OpenCLIPImage(ImageTransform):
    """An image -> the tensor OpenCLIP's image tower takes (its own transforms).

    Shape:
        Output: (3, image_size, image_size) float32.
    """

    def __init__(self, arch: str, *, cfg: ModelConfig, train: bool) -> None:
        kwargs = json.dumps(cfg.kwargs, sort_keys=True)
        pre_train, pre_val, size = _preprocess(arch, cfg.pretrained, kwargs)
        self.train, self.size = train, size
        self.shape = (3, size, size)
        self.dtype = torch.float32
        self._pipeline = pre_train if train else pre_val


class OpenCLIPTokenize:
    """Text -> OpenCLIP token ids, (context_length,) int64 (``open_clip.get_tokenizer``)."""

    def __init__(self, arch: str) -> None:
        open_clip = require("open_clip", "model.name")
        self._tokenizer = open_clip.get_tokenizer(arch)
        self.shape = (int(self._tokenizer.context_length),)
        self.dtype = torch.int64

    def __call__(self, value: Any) -> torch.Tensor:
        if not isinstance(value, str):
            raise BadSample(f"expected text, got {type(value).__name__}")
        return self._tokenizer([value])[0].to(torch.int64)


def open_clip_transform(arch: str, *, kind: str, train: bool, cfg: ModelConfig) -> Any:
    """The preprocessing of an OpenCLIP view of ``kind`` (image or text)."""
    if kind == "image":
        return OpenCLIPImage(arch, cfg=cfg, train=train)
    return OpenCLIPTokenize(arch)
