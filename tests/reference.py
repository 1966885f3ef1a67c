"""Independent float64 references, written from the definitions with F.cross_entropy.

They share no code with the package: logits are materialised in full and the
labels say where each positive is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def ref_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    neg: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    symmetric: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    q, k = q.double(), k.double()
    neg = None if neg is None else neg.double()
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
    if neg is None:
        logits = q @ k.T / temperature
        labels = torch.arange(q.shape[0])
        per_row = F.cross_entropy(logits, labels, reduction="none")
        if symmetric:
            per_row = 0.5 * (per_row + F.cross_entropy(logits.T, labels, reduction="none"))
    else:
        pos = (q * k).sum(1, keepdim=True)
        if negative_mode == "unpaired":
            negl = q @ neg.T
        else:
            negl = (q[:, None, :] * neg).sum(-1)
        logits = torch.cat([pos, negl], 1) / temperature
        per_row = F.cross_entropy(
            logits, torch.zeros(q.shape[0], dtype=torch.long), reduction="none"
        )
    return _reduce(per_row, reduction)


def ref_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float | torch.Tensor = 0.5,
    reduction: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    z = torch.cat([z1, z2]).double()
    if normalize:
        z = F.normalize(z, dim=-1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return _reduce(F.cross_entropy(logits, labels, reduction="none"), reduction)


def ref_siglip(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: float | torch.Tensor,
    bias: float | torch.Tensor,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """SigLIP's loss from its definition: the full sign matrix and -logsigmoid(s * z)."""
    x, y = x.double(), y.double()
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    z = scale * (x @ y.T) + bias
    if labels is None:
        positive = torch.eye(x.shape[0], dtype=torch.bool)
    else:
        positive = labels[:, None] == labels[None, :]
    sign = positive.double() * 2 - 1
    return _reduce(-F.logsigmoid(sign * z).sum(1), reduction)
