"""Hard negatives on every rank of a real gloo world (see tests/_world.py), and the
float64 single-process reference they are compared with (dense, from the definition).

The global batch is drawn from a seed on every rank; each rank takes its slice of the
queries, positives and hard negatives, so the test process rebuilds the same global
batch for the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_infonce import info_nce

D = 6


def global_batch(
    sizes: list[int], hard: int | list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (N, D), positives (N, D), hard negatives and int64 labels of the global
    batch. ``hard``: H per query ((N, H, D)), or a list of per-rank counts ((M, D))."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    q = torch.randn(n, D, generator=g, dtype=torch.float64)
    k = q + 0.7 * torch.randn(n, D, generator=g, dtype=torch.float64)
    if isinstance(hard, int):
        # Hard negatives close to their query: they matter to the loss.
        h = q[:, None, :] + 0.9 * torch.randn(n, hard, D, generator=g, dtype=torch.float64)
    else:
        h = torch.randn(sum(hard), D, generator=g, dtype=torch.float64)
    classes = torch.tensor([2**62, -(2**63), 2**63 - 1], dtype=torch.int64)
    labels = classes[torch.randint(0, len(classes), (n,), generator=g)]
    return q, k, h, labels


def rank_slice(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def hard_case(
    sizes: list[int],
    hard: int | list[int],
    seed: int,
    options: dict[str, Any],
    labeled: bool,
    temperature: float,
) -> dict[str, Any]:
    """This rank's gathered loss with hard negatives: the value and the gradients of its
    inputs and of a tensor temperature."""
    rank = dist.get_rank()
    q, k, h, labels = global_batch(sizes, hard, seed)
    rows = rank_slice(sizes, rank)
    hs = h[rows] if isinstance(hard, int) else h[rank_slice(hard, rank)]
    q, k, hs = (x.clone().requires_grad_() for x in (q[rows], k[rows], hs))
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    loss = info_nce(
        q,
        k,
        temperature=t,
        hard_negatives=hs,
        labels=labels[rows] if labeled else None,
        gather=True,
        **options,
    )
    loss.backward()
    return {"loss": loss.item(), "dq": q.grad, "dk": k.grad, "dh": hs.grad, "dt": t.grad}


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    h: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    symmetric: bool,
) -> torch.Tensor:
    """The mean loss over the whole batch in one process, written from the definition:
    row i's logits over [every positive key, every hard negative] / t, its loss the
    log-sum-exp minus the mean logit of its positives (k_i, or every key with its label;
    never a hard negative). Symmetric: plus the key -> query direction over the queries."""
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    hn = F.normalize(h.reshape(-1, h.shape[-1]), dim=-1)
    n = len(q)
    logits = torch.cat([qn @ kn.T, qn @ hn.T], 1) / t
    same = torch.eye(n, dtype=torch.bool) if labels is None else labels[:, None] == labels[None]
    pos_mask = torch.cat([same, torch.zeros(n, len(hn), dtype=torch.bool)], 1).double()
    rows = torch.logsumexp(logits, 1) - (logits * pos_mask).sum(1) / pos_mask.sum(1)
    if symmetric:
        back = (kn @ qn.T) / t
        rows_k = torch.logsumexp(back, 1) - (back * same.double()).sum(1) / same.double().sum(1)
        rows = 0.5 * (rows + rows_k)
    return rows.mean()
