"""Retrieval and zero-shot metrics of frozen embeddings (plain torch, no model).

Pairs may repeat a value (every image of a seven is captioned "a photo of the digit
seven"): a retrieved row counts as a hit when it holds the query row's view-0 value or
its view-1 value (:func:`recall_at_k`). Similarities are computed a block of queries at
a time, so the memory is O(block x N), not O(N x N).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["KS", "recall_at_k", "retrieval_metrics", "value_ids", "zero_shot_accuracy"]

#: The K of recall@K.
KS = (1, 5, 10)
#: Queries per similarity block.
_BLOCK = 1024


def value_ids(values: Sequence[Hashable]) -> torch.Tensor:
    """One integer per distinct value, in order of first appearance. Shape: (N,) int64."""
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(v, len(index)) for v in values], dtype=torch.int64)


def recall_at_k(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ids0: torch.Tensor,
    ids1: torch.Tensor,
    ks: Sequence[int] = KS,
) -> dict[int, float]:
    """Fraction of queries ``i`` with a hit among their ``k`` most similar keys, for each k.

    Row ``i`` of ``queries`` and of ``keys`` form a pair; key ``j`` is a hit for query
    ``i`` when ``ids0[j] == ids0[i]`` or ``ids1[j] == ids1[i]`` (the same view-0 or
    view-1 value: :func:`value_ids`). ``k`` larger than the number of keys counts every key.

    Shape:
        queries, keys: (N, D), compared by dot product (normalise first for cosine);
        ids0, ids1: (N,) int64.
    """
    n, top = len(queries), min(max(ks), len(keys))
    first_hit = torch.empty(n, dtype=torch.int64)
    for lo in range(0, n, _BLOCK):
        sim = queries[lo : lo + _BLOCK].float() @ keys.float().T
        best = sim.topk(top, dim=1).indices  # (block, top)
        rows = torch.arange(lo, lo + len(best))
        hit = (ids0[best] == ids0[rows, None]) | (ids1[best] == ids1[rows, None])
        # The rank of the first hit (top when there is none in the top `top`).
        ranks = torch.where(hit, torch.arange(top), torch.full_like(best, top))
        first_hit[lo : lo + len(best)] = ranks.min(dim=1).values
    return {k: float((first_hit < k).float().mean()) for k in ks}


def retrieval_metrics(
    e0: torch.Tensor,
    e1: torch.Tensor,
    ids0: torch.Tensor,
    ids1: torch.Tensor,
    *,
    prefix: str,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """recall@k in both directions between the views' embeddings (cosine similarity).

    Returns:
        ``{prefix}recall@k`` (the mean of the directions), ``..._a2b`` (view 0 queries
        view 1), ``..._b2a``, for each k; fractions in [0, 1].

    Shape:
        e0, e1: (N, D); ids0, ids1: (N,) (:func:`value_ids` of the raw values).
    """
    e0, e1 = F.normalize(e0.float(), dim=1), F.normalize(e1.float(), dim=1)
    a2b = recall_at_k(e0, e1, ids0, ids1, ks)
    b2a = recall_at_k(e1, e0, ids0, ids1, ks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"{prefix}recall@{k}"] = (a2b[k] + b2a[k]) / 2
        out[f"{prefix}recall@{k}_a2b"] = a2b[k]
        out[f"{prefix}recall@{k}_b2a"] = b2a[k]
    return out


def zero_shot_accuracy(
    images: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Top-k accuracy of classifying ``images`` by their most similar class embedding.

    Shape:
        images: (N, D); classes: (C, D), row ``c`` the embedding of class ``c``'s text;
        labels: (N,) int64 in [0, C). Only the k < C are returned.
    """
    sim = F.normalize(images.float(), dim=1) @ F.normalize(classes.float(), dim=1).T
    out = {}
    for k in ks:
        if k < len(classes) or k == 1:
            best = sim.topk(min(k, len(classes)), dim=1).indices
            out[k] = float((best == labels[:, None]).any(dim=1).float().mean())
    return out
