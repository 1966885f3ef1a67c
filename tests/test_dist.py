"""Multi-rank tests on real gloo processes, compared with single-process references."""

from __future__ import annotations

import pytest
import torch

from tests import dist_cases
from tests._world import Worlds
from tests.conftest import record_error
from tests.reference import ref_info_nce

# World size -> uneven local batches (a rank with 0 rows included) and unpaired
# negatives per rank.
LAYOUTS = {
    2: ([5, 3], [4, 2]),
    3: ([4, 0, 6], [0, 3, 5]),
    4: ([3, 5, 1, 4], [2, 2, 0, 3]),
}
DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------- GatherLayer


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("use_layer", [True, False], ids=["GatherLayer", "all_gather_with_grad"])
def test_gather_values_and_summed_gradients(
    worlds: Worlds, world_size: int, dtype: torch.dtype, use_layer: bool
) -> None:
    sizes = LAYOUTS[world_size][0]
    trailing = (3, 2)
    seed = 7
    res = worlds.run(world_size, dist_cases.gather_case, sizes, trailing, dtype, seed, use_layer)
    expected_out = torch.cat(
        [dist_cases.rank_rows(seed, r, n, trailing, dtype) for r, n in enumerate(sizes)]
    )
    # d/dx_r of sum_s sum(w_s * gathered) = sum over ranks s of w_s[rows of r].
    w_sum = sum(dist_cases.rank_weights(seed, s, sum(sizes), trailing) for s in range(world_size))
    start = 0
    for r, n in enumerate(sizes):
        assert torch.equal(res[r]["out"], expected_out), f"rank {r} gathered wrong rows"
        grad = res[r]["grad"]
        assert grad.dtype == dtype and grad.shape == (n, *trailing)
        expected = w_sum[start : start + n]
        if n:
            err = record_error(f"gather grad vs sum of ranks ({dtype})", grad, expected)
            assert err <= DTYPE_TOL[dtype], f"rank {r}"
        start += n


def test_gather_backward_is_not_the_own_slice_only(worlds: Worlds) -> None:
    # The SimCLR-port bug returns grad_r[rows of r]; the exact answer sums all
    # ranks. With rank-specific weights the two differ, so this test can tell.
    sizes, trailing, seed = [2, 2], (3,), 3
    res = worlds.run(2, dist_cases.gather_case, sizes, trailing, torch.float64, seed, True)
    own_only = dist_cases.rank_weights(seed, 0, 4, trailing)[:2]
    assert rel_err(res[0]["grad"], own_only) > 0.1


@pytest.mark.parametrize("kind", ["shape", "dtype"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_mismatch_raises_on_every_rank(worlds: Worlds, kind: str, world_size: int) -> None:
    res = worlds.run(world_size, dist_cases.gather_mismatch_case, kind)
    for r, msg in enumerate(res):
        assert msg.startswith("ValueError"), f"rank {r}: {msg}"
        assert "disagree" in msg and "rank 1" in msg
        assert f"follow-up all_reduce={float(world_size)}" in msg


@pytest.mark.parametrize("mode", ["one", "unpaired", "ntxent"])
def test_one_gather_forward_one_reduce_scatter_backward(worlds: Worlds, mode: str) -> None:
    n, d = 6, 4
    res = worlds.run(2, dist_cases.collectives_case, mode, n, d, 4)
    for r in res:
        fwd, bwd = r["forward"], r["backward"]
        # Forward: a fixed-size metadata exchange, then one gather of the embeddings
        # (both towers / views stacked into one buffer).
        assert [name for name, _ in fwd] == ["all_gather_single", "all_gather_single"], fwd
        assert fwd[0][1] < 64
        # Backward: one reduce-scatter of the embedding gradients.
        assert [name for name, _ in bwd] == ["reduce_scatter_single"], bwd
        # Nothing of size N x M crosses the wire: at most 2 views x global rows x D.
        pool_rows = 2 * (n + 1) * 2
        assert max(numel for _, numel in fwd + bwd) <= pool_rows * d


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("normalize", [True, False], ids=["bounded", "general"])
def test_gathered_symmetric_sends_one_tower_and_column_statistics(
    worlds: Worlds, world_size: int, normalize: bool
) -> None:
    n, d = 6, 4
    res = worlds.run(world_size, dist_cases.collectives_case, "sym", n, d, 4, False, normalize)
    pool = world_size * n
    # Unit vectors bound the logits by 1/temperature: the column partial sums are
    # plain sums, one all-reduce (float64). Otherwise max, then shifted sums.
    column_stats = [("all_reduce", pool)] * (1 if normalize else 2)
    for r in res:
        # Forward: metadata, the key tower only (pool x D, half of both towers), then
        # the column log-sum-exps completed over the ranks.
        assert r["forward"] == [
            ("all_gather_single", r["forward"][0][1]),
            ("all_gather_single", pool * d),
            *column_stats,
        ], r["forward"]
        assert r["forward"][0][1] < 64
        # Backward: the column gradient coefficients (pool numbers), then the usual
        # reduce-scatter of the key gradients (pool x D).
        assert r["backward"] == [("all_reduce", pool), ("reduce_scatter_single", pool * d)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize(
    "temperature,normalize,scale,chunk",
    # the one-all-reduce path at a large logit range (t = 250: terms down to
    # exp(-500)); past its range (t = 500) and unnormalised inputs: max + sums.
    [
        (0.004, True, 1.0, None),
        (0.002, True, 1.0, 3),
        (0.2, False, 3.0, 2),
        (0.5, False, 0.2, None),
    ],
    ids=["bounded-t250", "general-t500", "general-raw", "general-raw-dense"],
)
def test_gathered_symmetric_column_statistics_are_exact(
    worlds: Worlds, world_size: int, temperature: float, normalize: bool, scale: float,
    chunk: int | None,
) -> None:  # fmt: skip
    sizes = LAYOUTS[world_size][0]
    seed = 41 + world_size
    res = worlds.run(
        world_size, dist_cases.symmetric_case, sizes, seed, temperature, normalize, scale, chunk
    )
    xq, xk, _ = dist_cases.make_data("sym", sizes, [], seed)
    q, k = (scale * xq).requires_grad_(), (scale * xk).requires_grad_()
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    ref = ref_info_nce(q, k, temperature=t, symmetric=True, normalize=normalize)
    ref.backward()
    mean = torch.tensor(sum(r["loss"] for r in res) / world_size, dtype=torch.float64)
    assert record_error("gathered symmetric vs 1 process", mean, ref) <= 1e-12
    # Each rank's input gradients are its rows' share times the world size (DDP
    # averages); the temperature's, averaged over ranks, is the global one.
    got = torch.cat([torch.cat([r["dq"], r["dk"]], 1) for r in res]) / world_size
    assert (
        record_error("gathered symmetric vs 1 process", got, torch.cat([q.grad, k.grad], 1))
        <= 1e-10
    )
    dt = sum(r["dt"] for r in res) / world_size
    assert (
        record_error("gathered symmetric vs 1 process", dt, t.grad, floor=1 / temperature) <= 1e-10
    )


@pytest.mark.parametrize("mode", ["one", "sym", "ntxent"])
def test_labels_add_one_gather_of_the_labels(worlds: Worlds, mode: str) -> None:
    n, d = 5, 4
    plain = worlds.run(2, dist_cases.collectives_case, mode, n, d, 4)
    labeled = worlds.run(2, dist_cases.collectives_case, mode, n, d, 4, True)
    for p, r in zip(plain, labeled, strict=True):
        towers = 2 if mode != "one" else 1  # symmetric: the query sums need the queries
        gathers = [c for c in r["forward"] if c[0] == "all_gather_single"]
        # metadata, the embeddings (pool x towers x D), the int64 labels (pool).
        assert [c[1] for c in gathers[1:]] == [2 * n * towers * d, 2 * n], r["forward"]
        others = [c for c in r["forward"] if c[0] != "all_gather_single"]
        assert others == [c for c in p["forward"] if c[0] != "all_gather_single"]
        assert [c[0] for c in r["backward"]] == [c[0] for c in p["backward"]]
        assert max(c[1] for c in r["forward"] + r["backward"]) <= 2 * n * 2 * d


# -------------------------------------------------- the gradient convention (DDP)

MODES = ["one", "sym", "unpaired", "paired", "ntxent"]
# (chunk_size, temperature): the dense path; the chunked kernel with tiles that
# divide nothing on its fixed-shift path (t <= 32); and on its online path (t = 50).
KERNELS = [(None, 0.2), (2, 0.2), (3, 0.02)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk,temperature", KERNELS, ids=["dense", "chunk2", "chunk3-online"])
def test_ddp_gradients_equal_single_process(
    worlds: Worlds, world_size: int, mode: str, chunk: int | None, temperature: float
) -> None:
    sizes, neg_sizes = LAYOUTS[world_size]
    seed = 11 + world_size
    res = worlds.run(
        world_size, dist_cases.ddp_case, mode, sizes, neg_sizes, chunk, temperature, seed
    )

    ref_model = dist_cases.make_model(mode, None, temperature, gather=False, seed=seed)
    xq, xk, xn = dist_cases.make_data(mode, sizes, neg_sizes, seed)
    ref_loss = ref_model(xq, xk, xn)
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in ref_model.named_parameters()}
    assert "loss.logit_scale" in ref_grads

    # The mean over ranks of the returned values is the global mean loss.
    mean_loss = torch.tensor(sum(r["loss"] for r in res) / world_size, dtype=torch.float64)
    assert record_error("DDP mean-over-ranks loss vs 1 process", mean_loss, ref_loss) <= 1e-12
    for rank, r in enumerate(res):
        for name, ref in ref_grads.items():
            err = record_error(f"DDP grads vs 1 process, {mode}", r["grads"][name], ref)
            assert err <= 1e-10, f"rank {rank} {name}: rel err {err:.2e}"


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("mode", ["one", "sym", "ntxent"])
@pytest.mark.parametrize("chunk,temperature", KERNELS, ids=["dense", "chunk2", "chunk3-online"])
def test_ddp_labels_equal_single_process(
    worlds: Worlds, world_size: int, mode: str, chunk: int | None, temperature: float
) -> None:
    sizes, _ = LAYOUTS[world_size]
    seed = 31 + world_size
    res = worlds.run(
        world_size, dist_cases.ddp_case, mode, sizes, [], chunk, temperature, seed, True
    )
    ref_model = dist_cases.make_model(mode, None, temperature, gather=False, seed=seed)
    xq, xk, xn = dist_cases.make_data(mode, sizes, [], seed)
    labels = dist_cases.make_labels(sizes, seed)
    assert labels.unique().numel() < len(labels)  # several positives per row
    ref_loss = ref_model(xq, xk, xn, labels)
    ref_loss.backward()
    mean_loss = torch.tensor(sum(r["loss"] for r in res) / world_size, dtype=torch.float64)
    assert record_error("DDP labels loss vs 1 process", mean_loss, ref_loss) <= 1e-12
    for rank, r in enumerate(res):
        for name, p in ref_model.named_parameters():
            err = record_error(f"DDP labels grads vs 1 process, {mode}", r["grads"][name], p.grad)
            assert err <= 1e-10, f"rank {rank} {name}: rel err {err:.2e}"


def test_gather_within_a_subgroup(worlds: Worlds) -> None:
    sizes, seed = [3, 2, 4, 1], 5
    res = worlds.run(4, dist_cases.subgroup_case, sizes, seed)
    xq, xk, _ = dist_cases.make_data("sym", sizes, [], seed)
    for members in ([0, 1], [2, 3]):
        lo, hi = sum(sizes[: members[0]]), sum(sizes[: members[-1] + 1])
        q = xq[lo:hi].clone().requires_grad_()
        k = xk[lo:hi].clone().requires_grad_()
        ref = ref_info_nce(q, k, symmetric=True)
        ref.backward()
        # Each rank's loss is scaled by the group's size: the group mean is the loss.
        mean = torch.tensor(sum(res[r]["loss"] for r in members) / 2, dtype=torch.float64)
        assert record_error("subgroup gather vs 1 process", mean, ref) <= 1e-12
        start = 0
        for r in members:
            n = sizes[r]
            # Rank r's own gradient, times the group size (DDP would average it).
            got = torch.cat([res[r]["dq"], res[r]["dk"]]) / 2
            exp = torch.cat([q.grad[start : start + n], k.grad[start : start + n]])
            assert record_error("subgroup gather vs 1 process", got, exp) <= 1e-10
            start += n


@pytest.mark.parametrize("mode", ["one", "sym", "ntxent"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("chunk", [None, 3], ids=["dense", "chunk3"])
def test_labels_reductions_over_ranks_equal_single_process(
    worlds: Worlds, mode: str, reduction: str, chunk: int | None
) -> None:
    from dist_infonce import info_nce, nt_xent

    sizes, seed = LAYOUTS[3][0], 23  # a rank with 0 rows
    res = worlds.run(3, dist_cases.labels_reduction_case, mode, sizes, seed, reduction, chunk)
    xq, xk, _ = dist_cases.make_data("sym", sizes, [], seed)
    q, k = xq.clone().requires_grad_(), xk.clone().requires_grad_()
    labels = dist_cases.make_labels(sizes, seed)
    w = dist_cases.cotangent(sizes, seed)
    if mode == "ntxent":
        ref = nt_xent(q, k, 0.3, labels=labels, reduction=reduction)
    else:
        ref = info_nce(q, k, temperature=0.3, symmetric=mode == "sym", labels=labels,
                       reduction=reduction)  # fmt: skip
    if reduction == "none":
        # Per-row losses: rank r returns its own rows (z1's then z2's for NT-Xent).
        n = sum(sizes)
        halves = [ref[:n], ref[n:]] if mode == "ntxent" else [ref]
        starts = [sum(sizes[:r]) for r in range(3)]
        expected = [
            torch.cat([h[s : s + m] for h in halves]) for s, m in zip(starts, sizes, strict=True)
        ]
        for r, e in enumerate(expected):
            assert record_error("DDP labels reductions vs 1 process", res[r]["out"], e) <= 1e-12
        (ref * (w.repeat(2) if mode == "ntxent" else w)).sum().backward()
        scale = 1.0  # each rank's gradient is the global one for its rows
    else:
        total = torch.tensor(sum(float(r["out"]) for r in res) / 3, dtype=torch.float64)
        assert record_error("DDP labels reductions vs 1 process", total, ref) <= 1e-12
        ref.backward()
        scale = 3.0  # the convention: world_size x (DDP averages)
    got = torch.cat([torch.cat([r["dq"], r["dk"]], 1) for r in res]) / scale
    exp = torch.cat([q.grad, k.grad], 1)
    assert record_error("DDP labels reductions vs 1 process", got, exp) <= 1e-10
