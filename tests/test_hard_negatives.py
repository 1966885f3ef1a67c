"""``info_nce(..., hard_negatives=...)``: every positive and every hard negative of the
global batch are each query's candidates.

Against a float64 dense single-process reference written from the definition
(tests/hard_cases.py), on real gloo worlds of 2 and 3 ranks with uneven batches (a rank
with no rows, a rank with no hard negatives), per-query (N, H, D) and free (M, D) hard
negatives, labels, the symmetric loss, the dense and the chunked kernel (tiles that do
not divide the pool). The gradient convention: the mean over ranks of the values is the
global loss; each rank's input gradients, divided by the world size (what DDP's average
does to the parameters upstream), are the reference's; the temperature's gradient,
averaged over ranks, is the reference's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dist_infonce import InfoNCE, info_nce
from tests import hard_cases
from tests._world import Worlds
from tests.conftest import record_error

#: (query rows per rank, hard negatives: H per query or (M, D) rows per rank)
LAYOUTS: dict[int, list[tuple[list[int], int | list[int]]]] = {
    2: [([3, 5], 2), ([4, 2], [3, 0])],
    3: [([4, 0, 3], 1), ([2, 5, 1], [0, 4, 2])],
}
KERNELS = {"dense": {"kernel": "dense"}, "chunk3": {"kernel": "chunked", "chunk_size": 3}}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("layout", [0, 1], ids=["per-query", "free-rows"])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize(
    "symmetric,labeled", [(False, False), (False, True), (True, False), (True, True)]
)
def test_gathered_hard_negatives_equal_one_process(
    worlds: Worlds, world_size: int, layout: int, kernel: str, symmetric: bool, labeled: bool
) -> None:
    sizes, hard = LAYOUTS[world_size][layout]
    seed, temperature = 7 * world_size + layout, 0.2
    options: dict[str, Any] = {**KERNELS[kernel], "symmetric": symmetric}
    res = worlds.run(
        world_size, hard_cases.hard_case, sizes, hard, seed, options, labeled, temperature
    )
    q, k, h, labels = hard_cases.global_batch(sizes, hard, seed)
    q, k, h = (x.clone().requires_grad_() for x in (q, k, h))
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    ref = hard_cases.reference(q, k, h, labels if labeled else None, t, symmetric)
    ref.backward()
    family = "hard negatives gathered vs float64 reference"
    mean = torch.tensor(sum(r["loss"] for r in res) / world_size, dtype=torch.float64)
    assert record_error(family, mean, ref) <= 1e-12
    for name, leaf in (("dq", q), ("dk", k), ("dh", h)):
        got = torch.cat([r[name] for r in res]) / world_size
        assert record_error(family, got, leaf.grad) <= 1e-10, name
    dt = sum(r["dt"] for r in res) / world_size
    assert record_error(family, dt, t.grad, floor=1 / temperature) <= 1e-10


def test_hard_negatives_change_the_loss_and_match_an_explicit_pool() -> None:
    """One process: the hard negatives are candidates of every query, so the loss equals
    the in-batch loss over the pool [K; H] (cross-entropy with target i), and differs
    from the loss without them."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    h = torch.randn(6, 2, 4, generator=g)
    got = info_nce(q, k, temperature=0.5, hard_negatives=h)
    qn, pool = torch.nn.functional.normalize(q, dim=-1), torch.cat([k, h.reshape(-1, 4)])
    logits = qn @ torch.nn.functional.normalize(pool, dim=-1).T / 0.5
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, info_nce(q, k, temperature=0.5))
    module = InfoNCE(0.5, learn_temperature=True)
    assert torch.allclose(module(q, k, hard_negatives=h), expected, atol=1e-6)
    # No hard negatives at all (0 rows) is the in-batch loss.
    empty = info_nce(q, k, temperature=0.5, hard_negatives=torch.zeros(0, 4))
    assert torch.equal(empty, info_nce(q, k, temperature=0.5))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hard_negatives": torch.randn(5, 2, 4)}, r"hard_negatives of shape \(N, H, D\)"),
        ({"hard_negatives": torch.randn(3, 5)}, r"hard_negatives must have the same embedding"),
        (
            {"hard_negatives": torch.randn(3, 4, dtype=torch.float64)},
            r"hard_negatives must have the dtype",
        ),
        ({"hard_negatives": torch.randn(3)}, r"hard_negatives must have 2 dimensions"),
        ({"hard_negatives": [1.0]}, r"hard_negatives must be a torch.Tensor"),
        (
            {"hard_negatives": torch.randn(3, 4), "negative_keys": torch.randn(3, 4)},
            r"hard_negatives join the in-batch keys",
        ),
    ],
)
def test_bad_hard_negatives_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match=match):
        info_nce(q, k, **kwargs)
