"""cached_backward under FSDP2 on real gloo worlds vs one process on the global batch.

Uneven local batches (micro 3: 3 / 2 / 1 micro-batches per rank), dropout replayed, a
learnable temperature beside the sharded model, dict inputs as keyword arguments,
bf16 parameters with float32 gradient reduction. FSDP's collectives are counted with
``dist_infonce.testing.record_collectives`` (those issued from torch's FSDP code, told
apart from the loss's gather by the call stack).
"""

from __future__ import annotations

import pytest

from tests import fsdp_cases
from tests._world import Worlds
from tests.conftest import record_error
from tests.test_cache_dist import MICRO, SIZES, reference

#: Parameter groups of fsdp_cases.sharded_model: one all-gather and one reduce-scatter
#: each per call.
GROUPS = 6


@pytest.mark.parametrize(
    ("world_size", "as_dict", "root_params"),
    [(2, False, False), (2, True, False), (3, False, False), (2, False, True)],
    ids=["2", "2-dict", "3", "2-root-holds-parameters"],
)
def test_fsdp_cached_equals_one_process(
    worlds: Worlds, world_size: int, as_dict: bool, root_params: bool
) -> None:
    sizes, seed, calls, p = SIZES[world_size], 11, 2, 0.25
    res = worlds.run(
        world_size,
        fsdp_cases.fsdp_cache_case,
        sizes, MICRO, seed, p, calls, False, as_dict, root_params,
    )  # fmt: skip
    groups = 5 if root_params else GROUPS
    grads, _, losses = reference(sizes, seed, "layer", p, False, calls)
    assert len({r["micro_batches"] for r in res}) == world_size  # uneven: 3 / 2 (/ 1)
    for rank, r in enumerate(res):
        assert set(r["grads"]) == set(grads)
        for name, g in grads.items():
            err = record_error("cache FSDP2: grads vs one process (float64)", r["grads"][name], g)
            assert err < 1e-12, (rank, name, err)
        assert r["grad_dtypes"] == ["torch.float64"]
        # Per call, on every rank whatever its micro-batch count: each parameter group
        # gathered once and reduce-scattered once (float64 both ways).
        for recorded in r["collectives"]:
            assert sorted(recorded) == sorted(
                [("all_gather_single", 64)] * groups + [("reduce_scatter_single", 64)] * groups
            ), recorded
        assert r["kept"] == [True] * calls  # settings restored, parameters resharded
    for i in range(calls):
        mean = sum(r["losses"][i] for r in res) / world_size
        assert abs(mean - losses[i]) < 1e-12


def test_fsdp_mixed_precision_bf16_params_fp32_reduce(worlds: Worlds) -> None:
    sizes, seed, p = SIZES[2], 5, 0.25
    res = worlds.run(2, fsdp_cases.fsdp_cache_case, sizes, MICRO, seed, p, 1, True, False)
    grads, _, _ = reference(sizes, seed, "layer", p, False, 1)
    for r in res:
        # Parameters travel in bf16, gradients are reduced (and kept) in float32.
        assert sorted(r["collectives"][0]) == sorted(
            [("all_gather_single", 16)] * GROUPS + [("reduce_scatter_single", 32)] * GROUPS
        )
        assert r["grad_dtypes"] == ["torch.float32"]
        for name, g in grads.items():
            # bf16 forwards (8-bit mantissa): a few 1e-3 relative; a wrong scale or a
            # lost micro-batch would be off by O(1).
            err = record_error(
                "cache FSDP2 bf16: grads vs one process (float64)", r["grads"][name], g
            )
            assert err < 5e-2, (name, err)


def test_fsdp_bad_input_on_one_rank_raises_on_every_rank(worlds: Worlds) -> None:
    msgs = worlds.run(2, fsdp_cases.fsdp_bad_input_case)
    assert "all tensors must have the same first dimension" in msgs[1], msgs[1]
    assert "rank(s) [1] of the group passed invalid inputs" in msgs[0], msgs[0]
