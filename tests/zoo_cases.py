"""Ecosystem towers on every rank of a real gloo world (tests/_world.py), and the tiny
local models they are built from (no download: a BERT written here, a small timm ViT,
an OpenCLIP config in a local directory).

The global batch is built from a seed on every rank; each rank takes its slice, so the
test process computes the float64 single-process reference on the same rows.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

#: A small ViT through timm.create_model's own arguments (model.kwargs).
TIMM_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TIMM = "timm:vit_tiny_patch16_224"
#: Texts of the global batch (one per row, cycled).
TEXTS = [
    "a photo of the digit one",
    "a photo of a cat",
    "the quick brown fox jumps over the lazy dog",
    "paris",
    "what is the capital of france",
    "a picture of a dog on the grass",
]


def tiny_open_clip_dir(path: Path) -> Path:
    """An OpenCLIP ``local-dir:`` folder holding only a tiny config (random weights)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {
                "image_size": 16,
                "layers": 1,
                "width": 32,
                "head_width": 16,
                "patch_size": 8,
            },
            "text_cfg": {
                "context_length": 12,
                "vocab_size": 49408,
                "width": 16,
                "heads": 1,
                "layers": 1,
            },
        },
        "preprocess_cfg": {},
    }
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    return path


def zoo_overrides(hf_dir: str) -> list[str]:
    """The config of a timm image tower + HF text tower CLIP, as key=value overrides."""
    return [
        "model.name=two_tower",
        f"model.towers=[{TIMM},hf:{hf_dir}]",
        f"model.kwargs={json.dumps(TIMM_KWARGS)}",
        "model.embedding_dim=8",
        "model.max_length=16",
        "loss.kind=clip",
        "loss.learn_temperature=true",
    ]


def global_batch(hf_dir: str, n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images (n, 3, 16, 16) float64 and the tokenised texts of the global batch."""
    from dist_infonce.trainer.views import stack
    from dist_infonce.trainer.zoo_hf import HFTokenize

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    tokenize = HFTokenize(hf_dir, max_length=16)
    texts = stack([tokenize(TEXTS[i % len(TEXTS)]) for i in range(n)])
    return images, texts


def build(hf_dir: str, seed: int) -> Any:
    """The trainer's Learner for the tower pair, in float64."""
    from dist_infonce.trainer.config import load_config
    from dist_infonce.trainer.learner import build_learner

    cfg = load_config(None, zoo_overrides(hf_dir))
    data = SimpleNamespace(input_shapes=((3, 16, 16), (16,)), input_kinds=("image", "text"))
    torch.manual_seed(seed)
    return build_learner(cfg, data).double()


def grads(learner: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None}


def ddp_case(hf_dir: str, sizes: list[int], seed: int, micro: int | None) -> dict[str, Any]:
    """One step on this rank's rows, as the trainer takes it: DDP over the learner, or
    (``micro``) gradient caching with DDP over the model in FlatViews; the loss and the
    gradients."""
    from dist_infonce.trainer.views import take

    rank = dist.get_rank()
    learner = build(hf_dir, seed)
    images, texts = global_batch(hf_dir, sum(sizes), seed)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    x0, x1 = images[rows], take(texts, rows)
    if micro is None:
        ddp = DistributedDataParallel(learner)
        loss = ddp(x0, x1)
        loss.backward()
    else:
        ddp = DistributedDataParallel(learner.cache_tower())
        accelerator = SimpleNamespace(autocast=contextlib.nullcontext, scaler=None)
        loss = learner.cached_backward(ddp, x0, x1, None, micro=micro, accelerator=accelerator)
    return {"loss": float(loss), "grads": grads(learner)}
