"""cached_backward under DDP on real gloo worlds vs one process on the global batch."""

from __future__ import annotations

import pytest
import torch

from tests import cache_cases
from tests._world import Worlds
from tests.conftest import record_error
from tests.reference import ref_info_nce

# World size -> local batch sizes: uneven, so ranks run different numbers of
# micro-batches (micro 3: 3 / 2 / 1 micro-batches); no 1-row remainder (BatchNorm).
SIZES = {2: [8, 5], 3: [8, 5, 2]}
MICRO = 3


def reference(
    sizes: list[int], seed: int, norm: str, p: float, scalar: bool, calls: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[float]]:
    """One process, float64: each rank's micro-batch forwards with that rank's dropout
    stream, the global mean loss on the concatenated outputs, one backward.

    Returns the last call's gradients, each rank's buffers after the last call (DDP
    broadcasts rank 0's at the start of every call), and the global losses.
    """
    model = cache_cases.make_model(seed, norm, p, scalar)
    # As InfoNCE initialises it: log(1 / t) in float32, then .double().
    log_scale = torch.nn.Parameter(torch.tensor(1 / 0.3).log().double())
    rank0_buffers = {n: b.clone() for n, b in model.named_buffers()}
    losses: list[float] = []
    for i in range(calls):
        model.zero_grad(set_to_none=True)
        log_scale.grad = None
        x0, x1 = cache_cases.global_batch(seed + i, sizes)
        outs, buffers = [], []
        for rank in range(len(sizes)):
            chunks = list(
                zip(
                    cache_cases.local_slice(x0, sizes, rank).split(MICRO),
                    cache_cases.local_slice(x1, sizes, rank).split(MICRO),
                    strict=True,
                )
            )
            torch.manual_seed(seed * 100 + 10 * i + rank)
            if norm == "center":  # its forward reads the buffer: rank 0's at the start
                model.load_state_dict(rank0_buffers, strict=False)
            outs += [model(c0, c1) for c0, c1 in chunks]
            # Buffers: rank 0's, as DDP broadcasts them, then this rank's micro-batches.
            # (Train-mode outputs do not read them, so a copy tracks them apart.)
            copy = cache_cases.make_model(seed, norm, p, scalar)
            copy.load_state_dict(rank0_buffers, strict=False)
            with torch.no_grad():
                for c0, c1 in chunks:
                    copy(c0, c1)
            buffers.append({n: b.clone() for n, b in copy.named_buffers()})
        za, zb = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        if scalar:
            temperature = 1.0 / outs[0][2]
        else:
            temperature = 1.0 / log_scale.exp()
        loss = ref_info_nce(za, zb, temperature=temperature, symmetric=True)
        loss.backward()
        losses.append(float(loss.detach()))
        rank0_buffers = buffers[0]
    grads = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    if not scalar:
        grads["loss.logit_scale"] = log_scale.grad
    return grads, buffers, losses


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(
    ("norm", "p", "scalar"),
    [("layer", 0.25, False), ("batch", 0.0, False), ("center", 0.25, False), ("layer", 0.25, True)],
    ids=["dropout", "batchnorm", "buffer-read-in-forward", "model-returns-logit-scale"],
)
def test_ddp_cached_equals_one_process(
    worlds: Worlds, world_size: int, norm: str, p: float, scalar: bool
) -> None:
    sizes, seed, calls = SIZES[world_size], 11, 2
    res = worlds.run(
        world_size, cache_cases.ddp_cache_case, sizes, MICRO, seed, norm, p, scalar, calls
    )
    grads, buffers, losses = reference(sizes, seed, norm, p, scalar, calls)
    for rank, r in enumerate(res):
        assert set(r["grads"]) == set(grads)
        for name, g in grads.items():
            err = record_error("cache DDP: grads vs one process (float64)", r["grads"][name], g)
            assert err < 1e-12, (rank, name)
        for name, b in buffers[rank].items():
            # Ranks run 1 thread, this process possibly more: reductions may round apart.
            err = record_error("cache DDP: buffers vs one process (float64)", r["buffers"][name], b)
            assert err < 1e-12, (rank, name)
        # One gradient all-reduce per call on every rank, whatever its micro-batch count.
        assert r["reduces_per_call"] == [1] * calls
    # The mean over ranks of the returned losses is the global loss.
    for i in range(calls):
        mean = sum(r["losses"][i] for r in res) / world_size
        assert abs(mean - losses[i]) < 1e-12


@pytest.mark.parametrize("wrap", [True, False], ids=["ddp", "plain-model-gathering-loss"])
def test_empty_rank_raises_on_every_rank(worlds: Worlds, wrap: bool) -> None:
    msgs = worlds.run(2, cache_cases.empty_rank_case, [3, 0], wrap)
    for msg in msgs:
        assert "empty batch" in msg and "rank(s) [1]" in msg, msg


def test_same_ddp_model_in_two_towers(worlds: Worlds) -> None:
    sizes, micro, seed = [8, 5], 2, 4
    res = worlds.run(2, cache_cases.shared_ddp_case, sizes, micro, seed)
    model = cache_cases.make_model(seed, "center", 0.25, False)
    rank0_buffers = {n: b.clone() for n, b in model.named_buffers()}
    x0, x1 = cache_cases.global_batch(seed, sizes)
    a_parts, b_parts, buffers = [], [], []
    for rank in range(2):
        l0, l1 = (cache_cases.local_slice(x, sizes, rank) for x in (x0, x1))
        half = len(l0) // 2
        model.load_state_dict(rank0_buffers, strict=False)  # DDP's broadcast
        torch.manual_seed(seed * 100 + rank)
        for lo, hi in ((0, half), (half, len(l0))):  # tower 0, then tower 1
            for c0, c1 in zip(l0[lo:hi].split(micro), l1[lo:hi].split(micro), strict=True):
                za, zb = model(c0, c1)
                a_parts.append(za)
                b_parts.append(zb)
        buffers.append({n: b.clone() for n, b in model.named_buffers()})
    ref_info_nce(torch.cat(a_parts), torch.cat(b_parts), temperature=0.3, symmetric=True).backward()
    for rank, r in enumerate(res):
        assert r["reduces"] == 1  # one all-reduce for the DDP model, not one per tower
        for name, q in model.named_parameters():
            err = record_error(
                "cache DDP: grads vs one process (float64)", r["grads"][name], q.grad
            )
            assert err < 1e-12, (rank, name)
        for name, b in buffers[rank].items():
            # Ranks run 1 thread, this process possibly more: reductions may round apart.
            err = record_error("cache DDP: buffers vs one process (float64)", r["buffers"][name], b)
            assert err < 1e-12, (rank, name)


def test_closure_tower_sharing_the_ddp_model_updates_buffers_once(worlds: Worlds) -> None:
    sizes, micro, seed = [6, 4], 2, 7  # even: BatchNorm refuses a 1-row micro-batch
    res = worlds.run(2, cache_cases.closure_tower_case, sizes, micro, seed)
    x0, x1 = cache_cases.global_batch(seed, sizes)
    for rank, got in enumerate(res):
        model = cache_cases.make_model(seed, "batch", 0.0, False)
        l0, l1 = (cache_cases.local_slice(x, sizes, rank) for x in (x0, x1))
        with torch.no_grad():  # the plain forwards, in cached_backward's tower order
            for c in (l0.flip(0) + 0.5).split(micro):
                model.a(c)
            for c0, c1 in zip(l0.split(micro), l1.split(micro), strict=True):
                model(c0, c1)
        for name, b in model.named_buffers():
            err = record_error("cache DDP: buffers vs one process (float64)", got[name], b)
            assert err < 1e-12, (rank, name)
        assert int(got["a.1.num_batches_tracked"]) == 2 * -(-len(l0) // micro)


def test_bad_input_on_one_rank_raises_on_every_rank(worlds: Worlds) -> None:
    msgs = worlds.run(2, cache_cases.bad_input_on_one_rank_case)
    assert "all tensors must have the same first dimension" in msgs[1], msgs[1]
    assert "rank(s) [1] of the group passed invalid inputs" in msgs[0], msgs[0]
