"""Shared fixtures: real multi-process gloo worlds, and the worst error per test family."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests._world import Worlds

_WORST: dict[str, float] = {}


def record_error(
    family: str, got: torch.Tensor, expected: torch.Tensor, floor: float = 1.0
) -> float:
    """Error max|got - expected| / max(max|expected|, floor), remembered per family.

    Relative for magnitudes above ``floor`` (default 1) and absolute below, so
    exact zeros (one row: the loss and its gradients vanish) do not divide by zero.
    ``floor`` is the natural magnitude of the quantity's terms where the result
    is a cancellation of larger terms (the temperature gradient).
    """
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return 0.0
    err = ((got - expected).abs().max() / expected.abs().max().clamp_min(floor)).item()
    _WORST[family] = max(_WORST.get(family, 0.0), err)
    return err


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _WORST:
        terminalreporter.section("worst error per test family (relative; absolute below 1)")
        for family, err in sorted(_WORST.items()):
            terminalreporter.write_line(f"{family:<48} {err:.2e}")


@pytest.fixture(scope="session")
def worlds() -> Iterator[Worlds]:
    """``worlds.run(world_size, fn, *args)`` runs ``fn`` on every rank of a gloo world."""
    w = Worlds()
    yield w
    w.close()


@pytest.fixture(scope="session")
def resilience_ref(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One uninterrupted 2-rank trainer run, shared by tests/test_resilience.py and
    tests/test_two_nodes.py (a fixture imported into two modules would run twice)."""
    from tests.test_resilience import start_ref

    return start_ref(tmp_path_factory.mktemp("resilience-ref"))
