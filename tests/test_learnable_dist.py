"""A learnable temperature on real gloo ranks equals one process in float64, step after step.

The loss module averages its own temperature's gradient where no DDP forward owns it
(beside a DDP encoder, under cached_backward) and adds nothing inside one; either way
every rank keeps the same temperature, the one-process run's.
"""

from __future__ import annotations

import pytest
import torch

from tests import learnable_cases
from tests._world import Worlds
from tests.conftest import record_error

# Uneven local batches; with gather, a rank with 0 rows (cached_backward needs B >= 1).
GATHERED = {2: [5, 3], 3: [4, 0, 6]}
CACHED = {2: [5, 3], 3: [4, 1, 6]}
LOCAL = {2: [5, 3], 3: [4, 2, 6]}
STEPS = 4
# Small all-reduces (the temperature's average) a rank issues per step.
OWN_AVERAGE = {"beside": [1], "inside": [], "cached": [1]}


def compare(family: str, res: list[dict], ref: dict, world_size: int, gather: bool = True) -> None:
    """Every rank, every step: loss convention, gradients, the temperature after the step."""
    for step in range(STEPS):
        mean = torch.tensor(sum(r["loss"][step] for r in res) / world_size, dtype=torch.float64)
        expected = torch.tensor(ref["loss"][step], dtype=torch.float64)
        assert record_error(f"{family}: loss", mean, expected) <= 1e-12, step
        for rank, r in enumerate(res):
            assert set(r["grads"][step]) == set(ref["grads"][step]), (rank, step)
            for name, g in ref["grads"][step].items():
                err = record_error(f"{family}: grads", r["grads"][step][name], g)
                assert err <= 1e-10, (rank, step, name, err)
            for name, p in ref["params"][step].items():
                err = record_error(f"{family}: temperature", r["params"][step][name], p)
                assert err <= 1e-10, (rank, step, name, err)
                # Every rank holds the same temperature, not merely a close one.
                assert torch.equal(r["params"][step][name], res[0]["params"][step][name])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("loss_kind", ["clip", "ntxent", "param"])
@pytest.mark.parametrize("pattern", ["beside", "inside", "cached"])
def test_learnable_temperature_equals_one_process(
    worlds: Worlds, world_size: int, loss_kind: str, pattern: str
) -> None:
    sizes = (CACHED if pattern == "cached" else GATHERED)[world_size]
    seed = 3 + world_size
    res = worlds.run(
        world_size, learnable_cases.train_case, pattern, loss_kind, True, sizes, seed, STEPS
    )
    ref = learnable_cases.train_reference(loss_kind, True, sizes, seed, STEPS)
    compare(f"learnable temperature, {pattern} DDP", res, ref, world_size)
    # One average, not two: the module's own beside DDP and under cached_backward
    # (which leaves it to the module), none inside DDP (DDP averages).
    for r in res:
        assert r["small_all_reduces"] == [OWN_AVERAGE[pattern]] * STEPS, r["small_all_reduces"]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("pattern", ["beside", "cached"])
def test_learnable_temperature_without_gather_equals_mean_of_local_losses(
    worlds: Worlds, world_size: int, pattern: str
) -> None:
    # gather=False: each rank its own in-batch loss; DDP averages the encoder's local
    # gradients, the module its temperature's, so all descend the mean of the losses.
    sizes, seed = LOCAL[world_size], 17
    res = worlds.run(
        world_size, learnable_cases.train_case, pattern, "one", False, sizes, seed, STEPS
    )
    ref = learnable_cases.train_reference("one", False, sizes, seed, STEPS)
    compare(f"learnable temperature, {pattern} DDP, no gather", res, ref, world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_without_the_ddp_marker_the_module_averages_and_stays_exact(
    worlds: Worlds, world_size: int
) -> None:
    # A torch without DistributedDataParallel._active_ddp_module: inside DDP the module
    # cannot tell, averages too, and DDP averages the average: the same gradient.
    sizes, seed = GATHERED[world_size], 23
    res = worlds.run(
        world_size, learnable_cases.train_case, "inside", "clip", True, sizes, seed, STEPS,
        hide_marker=True,
    )  # fmt: skip
    ref = learnable_cases.train_reference("clip", True, sizes, seed, STEPS)
    compare("learnable temperature, inside DDP, no marker", res, ref, world_size)
    for r in res:
        assert r["small_all_reduces"] == [[1]] * STEPS


@pytest.mark.parametrize("world_size", [2, 3])
def test_cached_backward_averages_a_user_parameter_and_leaves_ours_to_the_module(
    worlds: Worlds, world_size: int
) -> None:
    sizes, seed = CACHED[world_size], 29
    res = worlds.run(
        world_size, learnable_cases.train_case, "cached", "weighted", True, sizes, seed, STEPS
    )
    ref = learnable_cases.train_reference("weighted", True, sizes, seed, STEPS)
    assert {"loss.log_weight", "loss.inner.logit_scale"} <= set(ref["grads"][0])
    compare("learnable parameters, cached DDP, user module", res, ref, world_size)
    # Two one-number averages: our module's temperature in its backward, the user's
    # weight by cached_backward. (Averaging both in cached_backward as well would add a
    # second number to the latter.)
    for r in res:
        assert r["small_all_reduces"] == [[1, 1]] * STEPS, r["small_all_reduces"]


def test_bad_input_with_a_self_averaging_loss_raises_on_every_rank(worlds: Worlds) -> None:
    # A plain model and a loss that gathers nothing, but whose temperature is averaged
    # over the ranks: every rank is in this call, so every rank must raise.
    msgs = worlds.run(2, learnable_cases.bad_input_plain_model_case)
    assert "all tensors must have the same first dimension" in msgs[1], msgs[1]
    assert "rank(s) [1] of the group passed invalid inputs" in msgs[0], msgs[0]
