"""Evaluation of frozen features: how the trainer turns its model into ``embed(x, view)``.

The data set owns its metric (``ContrastiveData.evaluate(embed)``: the digits linear
probe and kNN, retrieval recall@1); this module owns the model side of it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from dist_infonce.trainer.data import Embed
from dist_infonce.trainer.models import PairModel
from dist_infonce.trainer.views import View, rows, take, to_device

__all__ = ["embed_fn"]


def embed_fn(
    model: PairModel,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[None]],
) -> Embed:
    """``embed(x, view)`` for ``model``: without grad, ``batch_size`` rows at a time on
    ``device`` under ``autocast``, returning CPU float32. Put the model in eval mode first.

    Shape:
        x: (N, *input of view), or a dict of such tensors (a tokenizer's output).
        Output: (N, F), F the model's evaluation features.
    """

    @torch.no_grad()
    def embed(x: View, view: int) -> torch.Tensor:
        out = []
        for i in range(0, rows(x), batch_size):
            with autocast():
                part = to_device(take(x, slice(i, i + batch_size)), device)
                out.append(model.embed(part, view).float().cpu())
        return torch.cat(out)

    return embed
