"""SigLIP on real gloo ranks: equal to OpenCLIP's four distributed variants at equal
batches, and to one float64 process under DDP at 2, 3 and 4 ranks with uneven batches
(a rank with 0 rows), the gradients of log t and b included; one gather forward and one
reduce-scatter backward."""

from __future__ import annotations

import pytest
import torch

from tests import siglip_cases
from tests._world import Worlds
from tests.conftest import record_error

# (kernel, chunk_size): the dense path and tiles that divide nothing.
KERNELS = [("dense", None), ("chunked", 3)]
# (kernel, chunk_size, labels): both kernels without labels, labels on the tiles.
VARIANTS = [("dense", None, False), ("chunked", 3, False), ("chunked", 3, True)]
VARIANT_IDS = ["dense", "chunk3", "chunk3-labels"]
# Uneven local batches and a rank with 0 rows (cached_backward needs B >= 1 per rank).
GATHERED = {2: [5, 3], 3: [4, 0, 6], 4: [3, 5, 0, 2]}
CACHED = {2: [5, 3], 3: [4, 1, 6], 4: [3, 5, 1, 2]}
# Small all-reduces per step: the module's own average of (log t, b) beside DDP and
# under cached_backward (which leaves it to the module); none inside DDP.
OWN_AVERAGE = {"beside": [2], "inside": [], "cached": [2]}


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("dist_impl", ["bidir", "shift", "reduce", "gather"])
def test_equals_open_clip_variants_at_equal_batches(
    worlds: Worlds, world_size: int, dist_impl: str
) -> None:
    pytest.importorskip("open_clip")
    kernel, chunk = ("chunked", 3) if world_size != 3 else ("dense", None)
    res = worlds.run(
        world_size, siglip_cases.open_clip_case, dist_impl, 4, 6, 7 + world_size, kernel, chunk,
        "float64",
    )  # fmt: skip
    names = ["loss", "grad x", "grad y", "grad t", "grad b"]
    for rank, r in enumerate(res):
        for name, got, peer in zip(names, r["ours"], r["open_clip"], strict=True):
            err = record_error(f"siglip vs OpenCLIP SigLipLoss({dist_impl}) on gloo", got, peer)
            assert err <= 1e-12, f"rank {rank} {name}: {err:.2e}"


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("pattern", ["inside", "beside", "cached"])
@pytest.mark.parametrize("kernel,chunk,labeled", VARIANTS, ids=VARIANT_IDS)
def test_ddp_equals_one_process(
    worlds: Worlds, world_size: int, pattern: str, kernel: str, chunk: int | None, labeled: bool
) -> None:
    sizes = (CACHED if pattern == "cached" else GATHERED)[world_size]
    seed = 21 + world_size
    res = worlds.run(
        world_size, siglip_cases.ddp_case, pattern, sizes, kernel, chunk, labeled, seed
    )
    ref = siglip_cases.reference(sizes, kernel, chunk, labeled, seed)
    assert {"loss.logit_scale", "loss.logit_bias"} <= set(ref["grads"])
    mean = torch.tensor(sum(r["loss"] for r in res) / world_size, dtype=torch.float64)
    expected = torch.tensor(ref["loss"], dtype=torch.float64)
    assert record_error("siglip DDP mean-over-ranks loss vs 1 process", mean, expected) <= 1e-12
    for rank, r in enumerate(res):
        assert set(r["grads"]) == set(ref["grads"]), rank
        for name, g in ref["grads"].items():
            err = record_error(f"siglip DDP grads vs 1 process ({pattern})", r["grads"][name], g)
            assert err <= 1e-10, f"rank {rank} {name}: {err:.2e}"
            # Every rank steps with the same gradient: the same t and b everywhere.
            assert torch.equal(r["grads"][name], res[0]["grads"][name]), (rank, name)
        assert r["small_all_reduces"] == OWN_AVERAGE[pattern], r["small_all_reduces"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kernel,chunk,labeled", VARIANTS, ids=VARIANT_IDS)
def test_reductions_over_ranks_equal_one_process(
    worlds: Worlds, reduction: str, kernel: str, chunk: int | None, labeled: bool
) -> None:
    from tests.reference import ref_siglip

    sizes, d, seed = [4, 0, 5], 6, 3
    res = worlds.run(
        3, siglip_cases.reduction_case, sizes, d, seed, reduction, kernel, chunk, labeled
    )
    x, y = (v.requires_grad_() for v in siglip_cases.global_pairs(sum(sizes), d, seed))
    t = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    labels = siglip_cases.global_labels(sum(sizes), seed) if labeled else None
    ref = ref_siglip(x, y, t, b, labels, reduction)
    w = siglip_cases.cotangent(sum(sizes)) if reduction == "none" else 1.0
    (ref * w).sum().backward()
    family = f"siglip gathered reduction={reduction} vs 1 process"
    if reduction == "none":
        got = torch.cat([r["out"] for r in res])
        assert record_error(family, got, ref) <= 1e-12
    else:
        # "mean": sum * W / N (the mean over ranks is the global mean); "sum": sum * W.
        mean = torch.stack([r["out"] for r in res]).mean()
        assert record_error(family, mean, ref) <= 1e-12
    # Without DDP: each rank holds d(its loss)/d(its x), the sum over ranks of
    # d(loss_r)/d(its y) (the reduce-scatter), and its share of dt, db. The convention's
    # 1/W for "mean" and "sum" is DDP's average, applied here by hand.
    scale = 1.0 / len(sizes) if reduction != "none" else 1.0
    for rank, r in enumerate(res):
        rows = siglip_cases.rows_of(sizes, rank)
        assert record_error(family, r["dx"] * scale, x.grad[rows]) <= 1e-12, rank
        assert record_error(family, r["dy"] * scale, y.grad[rows]) <= 1e-12, rank
    for key, ref_grad in (("dt", t.grad), ("db", b.grad)):
        total = sum(r[key] for r in res) * scale
        assert record_error(family, total, ref_grad) <= 1e-12, key


@pytest.mark.parametrize("kernel,chunk", KERNELS, ids=["dense", "chunk3"])
@pytest.mark.parametrize("labeled", [False, True], ids=["pairs", "labels"])
def test_one_gather_forward_one_reduce_scatter_backward(
    worlds: Worlds, kernel: str, chunk: int | None, labeled: bool
) -> None:
    n, d = 5, 4
    res = worlds.run(2, siglip_cases.collectives_case, n, d, kernel, chunk, labeled)
    for r in res:
        # The size exchange, the y tower (n x d), and with labels the labels (n).
        expected = [("all_gather_single", 11 * 2), ("all_gather_single", 2 * n * d)]
        if labeled:
            expected.append(("all_gather_single", 2 * n))
        assert r["forward"] == expected
        # The y tower's gradients back (2n x d in, n x d each), then the module's own
        # average of its two numbers (log t, b).
        assert r["backward"] == [("reduce_scatter_single", 2 * n * d), ("all_reduce", 2)]
