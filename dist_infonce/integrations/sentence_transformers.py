"""A sentence-transformers loss over the global batch: :class:`InfoNCELoss`.

sentence-transformers' trainer calls a loss as ``loss(sentence_features, labels)``, the
features being one tokenised batch per dataset column, and back-propagates what it
returns. :class:`InfoNCELoss` is its ``MultipleNegativesRankingLoss`` with this package's
loss underneath:

- columns ``(anchor, positive, negative_1, ..., negative_n)``: each anchor's candidates
  are every positive and every negative of the *global* batch (all ranks,
  :func:`dist_infonce.info_nce` with ``gather=True`` and ``hard_negatives``), uneven
  local batches allowed, exact under the gradient convention (DDP averages);
- ``scale`` (the logits' multiplier, 1 / temperature; 20 as in sentence-transformers),
  fixed or learnt (``learn_scale``: CLIP's clamped logit scale, its gradient averaged
  over the ranks by the loss itself);
- ``micro_batch_size``: gradient caching (:func:`dist_infonce.cached_backward`): the
  encoder holds the activations of that many rows at a time, the loss still sees every
  row. The whole backward runs inside this forward; the tensor returned then carries the
  trainer's own backward scale (gradient accumulation, an fp16 loss scale) onto the
  gradients it left, so the trainer's loop is unchanged.

Under ``torchrun`` the trainer wraps the model in DDP; with ``micro_batch_size`` this loss
runs the encoder through a DDP of its own (same parameters; DDP's ``no_sync`` needs to see
the module it calls, and sentence-transformers' models take their features as one dict):
the gradients are then all-reduced once per step, on the last micro-batch, also when ranks
hold different numbers of rows. The trainer's DDP stays idle (its forward is not called).

Example::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from dist_infonce.integrations.sentence_transformers import InfoNCELoss

    model = SentenceTransformer("path/to/model")
    loss = InfoNCELoss(model, scale=20.0, micro_batch_size=64)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs, loss=loss).train()

sentence-transformers is imported by nothing here: the module works with any model that
maps a features dict to ``{"sentence_embedding": (B, D)}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce.cache import cached_backward
from dist_infonce.losses import InfoNCE

__all__ = ["InfoNCELoss"]


class _Encode(nn.Module):
    """``model(features)["sentence_embedding"]`` with the features as keyword arguments
    (what :func:`~dist_infonce.cached_backward` passes for a dict of inputs).

    ``constants``: the features that are not per-row tensors (sentence-transformers adds
    e.g. ``modality``), the same for every column, added back to each call's features.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.constants: dict[str, Any] = {}

    def forward(self, **features: torch.Tensor) -> torch.Tensor:
        # A new dict: sentence-transformers' modules add their outputs to the one they get.
        return self.model({**self.constants, **features})["sentence_embedding"]


def _split_features(
    features: list[dict[str, Any]],
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Per-row tensors of each column (what the cache splits), and the other entries.

    Raises:
        ValueError: columns whose other entries differ (one set is passed to every call).
    """
    rows, constants = [], []
    for f in features:
        n = next((v.shape[0] for v in f.values() if isinstance(v, torch.Tensor) and v.dim()), None)
        per_row = {
            k: v
            for k, v in f.items()
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
        }
        rows.append(per_row)
        constants.append({k: v for k, v in f.items() if k not in per_row})
    if any(
        c.keys() != constants[0].keys()
        or any(c[k] is not constants[0][k] and c[k] != constants[0][k] for k in c)
        for c in constants[1:]
    ):
        raise ValueError(
            "sentence_features: with micro_batch_size every column must carry the same "
            f"non-tensor features, got {[sorted(c) for c in constants]}"
        )
    return rows, constants[0]


class InfoNCELoss(nn.Module):
    """MultipleNegativesRankingLoss over the global batch, with caching (see the module doc).

    Args:
        model: the SentenceTransformer (the trainer may replace it by its DDP wrapper).
        scale: the initial (``learn_scale``) or fixed multiplier of the cosine
            similarities, 1 / temperature.
        learn_scale: learn it (log-parametrised, clamped to <= 100).
        micro_batch_size: rows per encoder pass (gradient caching); None: one pass.
        gather: pool every rank's positives and negatives (the global batch); False:
            the local batch only.
        symmetric: also the positive -> anchor direction (the hard negatives join the
            anchor -> positive direction only): sentence-transformers'
            ``MultipleNegativesSymmetricRankingLoss``.
        kernel, chunk_size: as :func:`dist_infonce.info_nce` (memory-linear tiles above
            a few thousand rows).
        find_unused_parameters: of the DDP this loss builds for caching (True, as the
            trainer's for a SentenceTransformer: BERT's pooler gets no gradient).

    Shape:
        sentence_features: 2 + H dicts of (B, L) tensors; the embeddings (B, D).
        Output: () the loss of this rank's rows, ``sum * world / global_rows``.

    Raises:
        ValueError: fewer than two feature columns, or columns of different batch sizes.
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        *,
        learn_scale: bool = False,
        micro_batch_size: int | None = None,
        gather: bool = True,
        symmetric: bool = False,
        kernel: str = "auto",
        chunk_size: int | None = None,
        find_unused_parameters: bool = True,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size!r}")
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.find_unused_parameters = find_unused_parameters
        self.loss = InfoNCE(
            1.0 / scale,
            symmetric=symmetric,
            gather=gather,
            kernel=kernel,
            chunk_size=chunk_size,
            learn_temperature=learn_scale,
        )
        # Not a submodule (its parameters are the model's; no second copy in state_dict).
        object.__setattr__(self, "_ddp", None)

    @property
    def scale(self) -> float:
        """The current multiplier of the similarities (1 / temperature)."""
        return 1.0 / float(torch.as_tensor(self.loss.temperature).detach())

    def _module(self) -> nn.Module:
        """The model without the trainer's DDP wrapper."""
        model = self.model
        return model.module if isinstance(model, DistributedDataParallel) else model

    def _loss(
        self, anchor: torch.Tensor, positive: torch.Tensor, *negatives: torch.Tensor
    ) -> torch.Tensor:
        hard = torch.stack(negatives, dim=1) if negatives else None
        return self.loss(anchor, positive, hard_negatives=hard)

    def forward(
        self,
        sentence_features: Iterable[dict[str, torch.Tensor]],
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of the batch (``labels`` are not used, as in MultipleNegativesRankingLoss).

        With ``micro_batch_size`` and grad enabled, the parameters' gradients are
        computed here and handed over in the trainer's ``backward()``."""
        features = [dict(f) for f in sentence_features]
        if len(features) < 2:
            raise ValueError(
                f"sentence_features: expected (anchor, positive, *negatives) columns, got {len(features)}"
            )
        if self.micro_batch_size is None or not torch.is_grad_enabled():
            return self._loss(*(self.model(f)["sentence_embedding"] for f in features))
        return self._cached(features)

    def _encoder(self) -> nn.Module:
        """The callable the cache runs: a DDP of :class:`_Encode` under several ranks."""
        inner = _Encode(self._module())
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return inner
        if self._ddp is None or self._ddp.module.model is not inner.model:
            device = next(inner.parameters()).device
            ddp = DistributedDataParallel(
                inner,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters,
            )
            object.__setattr__(self, "_ddp", ddp)
        return self._ddp

    def _cached(self, features: list[dict[str, Any]]) -> torch.Tensor:
        encoder = self._encoder()
        features, constants = _split_features(features)
        getattr(encoder, "module", encoder).constants = constants
        params = [p for p in self.parameters() if p.requires_grad]
        # This call's gradients alone (what DDP reduces and the hook rescales): the
        # ones accumulated before are set aside and put back.
        before = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            loss = cached_backward(
                [encoder] * len(features), self._loss, features, self.micro_batch_size
            )
        finally:
            added = [p.grad for p in params]
            for p, b in zip(params, before, strict=True):
                p.grad = b
        out = loss.detach().requires_grad_()

        def hand_over(grad: torch.Tensor) -> None:
            # The trainer's backward of `out` brings its scale (1 / accumulation steps,
            # an fp16 loss scale): the gradients computed above, times that, are added.
            g = grad.detach()
            with torch.no_grad():
                for p, a in zip(params, added, strict=True):
                    if a is None:
                        continue
                    scaled = a * g.to(a.dtype)
                    p.grad = scaled if p.grad is None else p.grad + scaled

        out.register_hook(hand_over)
        return out

    def get_config_dict(self) -> dict[str, Any]:
        """The arguments sentence-transformers writes into the model card."""
        o = self.loss.options
        return {
            "scale": self.scale,
            "learn_scale": self.loss.learn_temperature,
            "micro_batch_size": self.micro_batch_size,
            "gather": o.gather,
            "symmetric": o.symmetric,
        }
