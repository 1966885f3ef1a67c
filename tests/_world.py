"""A long-lived group of real gloo processes that runs test functions on demand.

Importing torch costs each process 2-3 s on the project machine, so every world
size is started once per test session (spawn context, as in production) and then
runs many cases. A case is a module-level function (picklable by name); it runs
on every rank and each rank's return value comes back in rank order.

A case that fails on one rank can leave the others inside a collective; the
process group has a finite timeout, and the world is torn down and restarted
after any failure so later tests start clean.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# Long enough for the slowest case on a loaded 2-core machine, short enough that a
# broken case fails the test instead of hanging the suite.
COLLECTIVE_TIMEOUT_S = 60
CASE_TIMEOUT_S = 120


def _worker(rank: int, world_size: int, init_file: str, tasks: Any, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results.put(("ready", rank, None))
    try:
        while True:
            item = tasks.get()
            if item is None:
                break
            fn, args, kwargs = item
            try:
                results.put(("ok", rank, fn(*args, **kwargs)))
            except BaseException:
                results.put(("error", rank, traceback.format_exc()))
    finally:
        # Without a clean teardown gloo processes sometimes abort at exit.
        dist.barrier()
        dist.destroy_process_group()


class World:
    """``world_size`` spawned processes in one gloo process group."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="dist_infonce_world_")
        init_file = os.path.join(self._dir.name, "store")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, init_file, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", timeout=CASE_TIMEOUT_S)

    def _collect(self, kind: str, timeout: float) -> list[Any]:
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(out) + len(errors) < self.world_size:
            try:
                status, rank, value = self._results.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                raise TimeoutError(
                    f"{self.world_size}-rank world: no answer from ranks "
                    f"{sorted(set(range(self.world_size)) - set(out) - set(errors))} within "
                    f"{timeout} s (dead processes: {dead})"
                ) from None
            if status == "error":
                errors[rank] = value
            else:
                out[rank] = value
        if errors:
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RuntimeError(f"case failed on ranks {sorted(errors)}:\n{detail}")
        return [out[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect("ok", timeout=CASE_TIMEOUT_S)

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=20)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        self._dir.cleanup()


class Worlds:
    """Lazily started worlds by size; a world whose case failed is restarted."""

    def __init__(self) -> None:
        self._worlds: dict[int, World] = {}

    def run(self, world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        world = self._worlds.get(world_size)
        if world is None:
            world = self._worlds[world_size] = World(world_size)
        try:
            return world.run(fn, *args, **kwargs)
        except BaseException:
            # Ranks may be stuck in (or out of step with) a collective: start afresh.
            del self._worlds[world_size]
            for p in world._procs:
                p.kill()
            raise

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()
