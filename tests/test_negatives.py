"""NegativeQueue: a one-process replay after every push on real gloo worlds (uneven
pushes, a rank with 0 rows, wrap-around, a push larger than the queue), byte-identical
ranks, bad input on one rank, the state_dict round trip, no DDP broadcast of the rows,
MoCo's loss against the float64 reference, and memory linear in the queue size."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dist_infonce import NegativeQueue, info_nce
from dist_infonce.memory import peak_rss_bytes, reset_peak_rss
from tests import negatives_cases as cases
from tests._world import Worlds
from tests.conftest import record_error
from tests.reference import ref_info_nce

#: Per push, the rows each rank pushes: uneven, a rank with 0, a push filling the queue
#: exactly, one wrapping around, one larger than the whole queue (size 7), an empty push.
LAYOUTS = {
    2: [[2, 1], [0, 3], [1, 0], [4, 4], [3, 6], [0, 0], [1, 2]],
    3: [[1, 0, 2], [3, 1, 0], [0, 0, 1], [2, 5, 4], [0, 6, 0], [1, 1, 1]],
}
SIZE, DIM = 7, 3


def replay(layout: list[list[int]], seed: int) -> list[tuple[torch.Tensor, int]]:
    """One process: after every push, the newest ``SIZE`` rows of everything pushed (rank
    order within a push), each rank's keys cast to float32 as the queue stores them, and
    the age (pushes since the oldest of those rows was pushed)."""
    history, stamps = torch.zeros(0, DIM), torch.zeros(0, dtype=torch.int64)
    out = []
    for p, sizes in enumerate(layout):
        for r, n in enumerate(sizes):
            history = torch.cat([history, cases.push_keys(seed, p, r, n, DIM).float()])
            stamps = torch.cat([stamps, torch.full((n,), p + 1)])
        held = stamps[-SIZE:]
        out.append((history[-SIZE:], p + 1 - int(held[0]) if len(held) else 0))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_push_equals_one_process_replay_on_every_rank(worlds: Worlds, world_size: int) -> None:
    layout, seed = LAYOUTS[world_size], 5
    res = worlds.run(world_size, cases.replay_case, SIZE, DIM, layout, seed)
    total = 0
    for p, (want, age) in enumerate(replay(layout, seed)):
        total += sum(layout[p])
        for r in range(world_size):
            got = res[r][p]
            assert torch.equal(got["negatives"], want), f"push {p}, rank {r}"
            assert got["bytes"] == res[0][p]["bytes"], f"push {p}: rank {r} differs from rank 0"
            assert got["filled"] == min(total, SIZE) and got["pushes"] == p + 1
            assert got["position"] == total % SIZE and got["age"] == age
            assert not got["requires_grad"]


def test_queue_rows_wrap_and_keep_the_newest_of_an_oversized_push() -> None:
    """One process: order, wrap-around, an oversized push, the snapshot semantics."""
    q = NegativeQueue(5, 2)
    assert q.negatives().shape == (0, 2) and q.age == 0
    q.push(torch.arange(6.0).view(3, 2))
    snapshot = q.negatives()
    q.push(torch.arange(6.0, 12.0).view(3, 2))  # 6 rows pushed: wraps, oldest dropped
    assert torch.equal(snapshot, torch.arange(6.0).view(3, 2))  # a copy, not a view
    assert torch.equal(q.negatives(), torch.arange(2.0, 12.0).view(5, 2))
    assert (q.position, q.filled, q.age) == (1, 5, 1)
    q.push(torch.arange(100.0, 114.0).view(7, 2))  # larger than the queue
    assert torch.equal(q.negatives(), torch.arange(104.0, 114.0).view(5, 2))
    assert (q.position, q.filled, q.pushes, q.age) == (3, 5, 3, 0)
    q.push(torch.zeros(0, 2))  # an empty push still counts as a step
    assert (q.pushes, q.age) == (4, 1)
    x = torch.ones(1, 2, requires_grad=True)
    q.push(x * 2)
    assert not q.negatives().requires_grad


@pytest.mark.parametrize("kind", ["dim", "ndim", "int", "list"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_bad_keys_on_one_rank_raise_on_every_rank(
    worlds: Worlds, world_size: int, kind: str
) -> None:
    res = worlds.run(world_size, cases.bad_push_case, 1, kind)
    for r in res:
        assert r["message"].startswith("ValueError: NegativeQueue.push: keys on rank 1"), r
        assert "expected a floating-point tensor of shape (N, 3)" in r["message"]
        assert (r["filled"], r["pushes"], r["sum"]) == (world_size, 1, float(world_size))


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match=r"size must be an int >= 1, got 0"):
        NegativeQueue(0, 4)
    with pytest.raises(ValueError, match=r"dim must be an int >= 1, got 2.5"):
        NegativeQueue(4, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype"):
        NegativeQueue(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"keys has D=3; expected .* shape \(N, 2\)"):
        NegativeQueue(4, 2).push(torch.zeros(1, 3))


@pytest.mark.parametrize("world_size", [2, 3])
def test_state_dict_round_trip_continues_identically(worlds: Worlds, world_size: int) -> None:
    for r in worlds.run(world_size, cases.round_trip_case, 5, 3, 11):
        assert r["same_after_load"] and r["same_after_pushes"], r
        assert r["state"] == r["loaded_state"]


def test_state_dict_keys_moves_and_load_errors() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model.queue = NegativeQueue(4, 2)
    model.queue.push(torch.ones(3, 2))
    state = model.state_dict()
    assert [k for k in state if k.startswith("queue.")] == [
        "queue.rows", "queue.stamps", "queue.position", "queue.filled", "queue.pushes",
    ]  # fmt: skip
    assert not [name for name, _ in model.named_buffers()]  # invisible to DDP
    model.double()  # rows follow the module like a buffer
    assert model.queue.dtype == torch.float64 and model.queue.negatives().dtype == torch.float64
    fresh = nn.Sequential(nn.Linear(2, 2))
    fresh.queue = NegativeQueue(4, 2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue.negatives(), torch.ones(3, 2)) and fresh.queue.filled == 3

    wrong = nn.Sequential(nn.Linear(2, 2))
    wrong.queue = NegativeQueue(5, 2)
    with pytest.raises(RuntimeError, match=r"rows has shape \(4, 2\), this queue holds \(5, 2\)"):
        wrong.load_state_dict(state)
    partial = {k: v for k, v in state.items() if k != "queue.pushes"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "queue.pushes"'):
        fresh.load_state_dict(partial)
    bad = dict(state, **{"queue.position": torch.tensor(9)})
    with pytest.raises(RuntimeError, match=r"position=9, filled=3, pushes=1 out of range"):
        fresh.load_state_dict(bad)
    # A checkpoint written before the model had a queue loads with strict=False.
    before = {k: v for k, v in state.items() if not k.startswith("queue.")}
    result = fresh.load_state_dict(before, strict=False)
    assert set(result.missing_keys) == {f"queue.{k}" for k in ("rows", "stamps", "position", "filled", "pushes")}  # fmt: skip
    buf = io.BytesIO()
    torch.save(state, buf)  # weights_only-safe: tensors only
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True)["queue.rows"], state["queue.rows"])


@pytest.mark.parametrize("cached", [False, True], ids=["ddp", "ddp+cached_backward"])
def test_ddp_never_broadcasts_the_queue(worlds: Worlds, cached: bool) -> None:
    """Counting collectives: with the queue inside a DDP model nothing of the queue's
    size crosses the wire (construction and steps), while a registered buffer of the
    same size is broadcast, which shows the count can tell."""
    size, dim = 4096, 3
    for r in worlds.run(2, cases.ddp_broadcast_case, size, dim, False, cached):
        every = r["init"] + [c for step in r["steps"] for c in step]
        assert max(n for _, n in every) < size * dim, every
        # Buffers are still broadcast (BatchNorm's), just not the queue.
        assert any(name in ("_broadcast_coalesced", "broadcast") for name, _ in r["steps"][1])
    for r in worlds.run(2, cases.ddp_broadcast_case, size, dim, True, cached):
        assert max(n for _, n in r["init"]) >= size * dim, r["init"]
        assert max(n for _, n in r["steps"][1]) >= size * dim, r["steps"]  # re-sent each step


@pytest.mark.parametrize("chunk", [None, 3], ids=["dense", "chunked"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_moco_loss_against_float64_reference(
    worlds: Worlds, world_size: int, chunk: int | None
) -> None:
    """info_nce(q, k, queue.negatives()) on each rank: positive + the replayed queue."""
    sizes, queue_size, dim, seed = [3, 5, 2][:world_size], 10, 4, 17
    res = worlds.run(world_size, cases.moco_loss_case, sizes, queue_size, dim, seed, chunk)
    history = torch.cat(
        [
            cases.push_keys(seed, p, r, sizes[r] + 1, dim).double()
            for p in range(3)
            for r in range(world_size)
        ]
    )
    negatives = history[-queue_size:]
    g = torch.Generator().manual_seed(seed)
    q_all = torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64)
    k_all = q_all + 0.3 * torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64)
    for rank, r in enumerate(res):
        assert torch.equal(r["negatives"], negatives)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        q = q_all[rows].clone().requires_grad_()
        k = k_all[rows].clone().requires_grad_()
        ref = ref_info_nce(q, k, negatives, 0.2)
        ref.backward()
        loss = torch.tensor(r["loss"], dtype=torch.float64)
        assert record_error("MoCo loss vs float64", loss, ref) <= 1e-12
        assert record_error("MoCo loss grad vs float64", r["dq"], q.grad) <= 1e-12
        assert record_error("MoCo loss grad vs float64", r["dk"], k.grad) <= 1e-12


def _loss_memory(kernel: str, n: int, size: int, dim: int) -> tuple[int, int]:
    """(bytes autograd saves, peak RSS growth) of info_nce against a full queue."""
    queue = NegativeQueue(size, dim)
    queue.push(torch.randn(size, dim, generator=torch.Generator().manual_seed(0)))
    q = torch.randn(n, dim, requires_grad=True)
    k = torch.randn(n, dim, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    negatives = queue.negatives()
    if not reset_peak_rss():
        pytest.skip("peak RSS cannot be reset on this platform")
    base = peak_rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = info_nce(q, k, negatives, kernel=kernel)
    loss.backward()
    return sum(saved), peak_rss_bytes() - base


def test_chunked_loss_against_a_large_queue_is_linear_in_memory() -> None:
    """N=256 queries against a queue of 65536 (D=8): the logits would be 64 MiB per
    copy. The chunked kernel (also what "auto" picks here) saves O((N + K) D) and its
    peak grows by a few tiles; dense, measured the same way, holds several N x K
    copies, which shows that the measurement can tell."""
    n, size, dim = 256, 65536, 8
    logits = n * size * 4
    for kernel in ("chunked", "auto"):
        saved, peak = _loss_memory(kernel, n, size, dim)
        print(f"{kernel}: saved {saved / 2**20:.1f} MiB, peak +{peak / 2**20:.1f} MiB")
        assert saved <= 3 * (n + size) * dim * 4, saved  # q, k, normalised queue, stats
        assert peak < logits / 2, peak
    saved, peak = _loss_memory("dense", n, size, dim)
    print(f"dense: saved {saved / 2**20:.1f} MiB, peak +{peak / 2**20:.1f} MiB")
    assert saved >= logits and peak >= logits
