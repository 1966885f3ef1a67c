"""Shared fixtures: real multi-process gloo worlds, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._world import Worlds


@pytest.fixture(scope="session")
def worlds() -> Iterator[Worlds]:
    """``worlds.run(world_size, fn, *args)`` runs ``fn`` on every rank of a gloo world."""
    w = Worlds()
    yield w
    w.close()
