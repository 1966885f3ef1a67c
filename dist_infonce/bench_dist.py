"""Distributed loss benchmark: the gathered loss per rank, ours vs OpenCLIP, on gloo.

Run ``python -m dist_infonce.bench --world 2 --sizes 1024,2048,4096``. Every row is
one configuration measured in a fresh world of ``--world`` spawned gloo processes
on this machine (CPU threads split between the ranks), each rank holding ``B``
rows (the global batch is ``world x B``):

- time: per timed pass, the forward + backward time of the slowest rank (ranks
  start together after a barrier); the median over ``--repeats`` passes after one
  warm-up;
- sent MiB: bytes each rank sends in one forward + backward, counted from the
  collectives the pass really issues (their calls are intercepted, the real
  collective still runs) with the ring-algorithm cost of each (all-gather:
  ``(W - 1) x`` the local part; reduce-scatter, all-to-all: ``(W - 1) / W`` of the
  input; all-reduce: ``2 (W - 1) / W``); the largest over ranks;
- extra MiB: the largest over ranks of peak RSS after the first pass minus the peak
  RSS once the inputs exist.

Methods (the inputs are unit vectors; OpenCLIP's loss takes them as given, ours
normalises them again, O(B * D), as a user's call would):

- ``ours``: ``info_nce(q, k, gather=True, chunk_size=--chunk)``, modes ``one`` and
  ``sym`` (one block row per rank: the key tower gathered, column statistics
  all-reduced);
- ``ours_two_calls``: the symmetric loss as two one-direction calls (q -> k and
  k -> q, each gathering one tower): the cost of gathering both towers and
  computing two block rows, as the symmetric loss did before;
- ``open_clip``: OpenCLIP's ``ClipLoss(local_loss=True, gather_with_grad=True)``
  (symmetric, dense logits; gathers both towers with ``torch.distributed.nn``,
  whose backward on gloo emulates the reduce-scatter with one scatter per rank:
  the same bytes as all-to-all).

Outputs in ``--out``: ``bench_dist.json`` and ``table_dist.md`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistConfig",
    "build_parser",
    "collective_bytes",
    "format_table",
    "main",
    "record_collectives",
    "run_world",
]

METHODS = ("ours", "ours_two_calls", "open_clip")
METHOD_MODES: dict[str, tuple[str, ...]] = {
    "ours": ("one", "sym"),
    "ours_two_calls": ("sym",),
    "open_clip": ("sym",),
}
DEFAULT_SIZES = (1024, 2048, 4096)
_COUNTED = (
    "all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
    "reduce_scatter_tensor", "reduce_scatter", "all_reduce", "all_to_all", "all_to_all_single",
    "broadcast", "scatter",
)  # fmt: skip


@dataclass(frozen=True)
class DistConfig:
    """One configuration, run in a fresh world.

    Attributes:
        method: One of ``METHODS``.
        mode: ``"one"`` or ``"sym"``.
        batch: rows per rank.
        dim: embedding dimension D.
        world: number of gloo processes.
        chunk: tile edge of our chunked kernel (None: the loss chooses).
        repeats: timed passes after one warm-up.
        temperature: softmax temperature (``1 / logit_scale`` for OpenCLIP).
        seed: seed of the inputs (rank r uses ``seed * 1000 + r``).
    """

    method: str
    mode: str
    batch: int
    dim: int
    world: int
    chunk: int | None = 1024
    repeats: int = 3
    temperature: float = 0.1
    seed: int = 0


# ----------------------------------------------------------------- bytes on the wire


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


def collective_bytes(name: str, args: Sequence[Any], kwargs: dict[str, Any], world: int) -> int:
    """Bytes one rank sends in one call of collective ``name`` (ring algorithms).

    Args:
        name: the ``torch.distributed`` function.
        args, kwargs: the call's arguments (tensors or lists of tensors).
        world: ranks in the group.

    Returns:
        All-gather: ``(W - 1)`` times the local input; reduce-scatter and all-to-all:
        ``(W - 1) / W`` of the input; all-reduce: ``2 (W - 1) / W`` of the tensor;
        scatter: on the source, the other ranks' tensors, elsewhere nothing;
        broadcast: the tensor (an upper bound: only the root's tree sends it all).
    """
    if name in ("all_gather_single", "all_gather_into_tensor"):
        src = kwargs.get("input_tensor", args[1] if len(args) > 1 else None)
        return (world - 1) * _nbytes(src)
    if name == "all_gather":
        src = kwargs.get("tensor", args[1] if len(args) > 1 else None)
        return (world - 1) * _nbytes(src)
    if name in ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter"):
        src = kwargs.get("input", args[1] if len(args) > 1 else None)
        return (world - 1) * _nbytes(src) // world
    if name in ("all_to_all", "all_to_all_single"):
        src = kwargs.get(
            "input_tensor_list", kwargs.get("input", args[1] if len(args) > 1 else None)
        )
        return (world - 1) * _nbytes(src) // world
    if name == "all_reduce":
        return 2 * (world - 1) * _nbytes(args[0] if args else kwargs.get("tensor")) // world
    if name == "scatter":
        # Only the source sends: every tensor of its list but its own.
        src = kwargs.get("scatter_list", args[1] if len(args) > 1 else None)
        return (world - 1) * _nbytes(src) // world if src else 0
    if name == "broadcast":
        return _nbytes(args[0] if args else kwargs.get("tensor"))
    raise ValueError(f"collective_bytes: unknown collective {name!r}")


@contextmanager
def record_collectives(
    measure: Callable[[str, tuple[Any, ...], dict[str, Any]], int],
) -> Iterator[list[tuple[str, int]]]:
    """Record ``(collective, measure(name, args, kwargs))`` for every collective this
    process issues through ``torch.distributed``; the real call still runs."""
    calls: list[tuple[str, int]] = []
    originals = {n: getattr(dist, n) for n in _COUNTED if hasattr(dist, n)}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, measure(name, args, kwargs)))
            return fn(*args, **kwargs)

        return counted

    for n, fn in originals.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)


def _count_sent(world: int) -> AbstractContextManager[list[tuple[str, int]]]:
    """Record ``(collective, bytes sent)`` for every collective issued (ring costs)."""
    return record_collectives(
        lambda name, args, kwargs: collective_bytes(name, args, kwargs, world)
    )


# ------------------------------------------------------------------------- a rank


def _loss_fn(cfg: DistConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from dist_infonce import info_nce

    t, chunk = cfg.temperature, cfg.chunk
    if cfg.method == "ours":
        sym = cfg.mode == "sym"
        return lambda q, k: info_nce(
            q, k, temperature=t, symmetric=sym, chunk_size=chunk, gather=True
        )
    if cfg.method == "ours_two_calls":

        def two_calls(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            kw: dict[str, Any] = {"temperature": t, "chunk_size": chunk}
            return 0.5 * (info_nce(q, k, gather=True, **kw) + info_nce(k, q, gather=True, **kw))

        return two_calls
    if cfg.method == "open_clip":
        from dist_infonce.bench import _load_open_clip_loss

        loss = _load_open_clip_loss()(
            local_loss=True,
            gather_with_grad=True,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
        )
        scale = torch.tensor(1.0 / t)
        return lambda q, k: loss(q, k, scale)
    raise ValueError(f"unknown method {cfg.method!r}; expected one of {METHODS}")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rank_main(rank: int, cfg: DistConfig, init_file: str, results: Any) -> None:
    """Run one configuration on this rank; put (rank, result or error) on ``results``."""
    threads = max(1, (os.cpu_count() or 1) // cfg.world)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=cfg.world,
        timeout=timedelta(seconds=600),
    )
    try:
        fn = _loss_fn(cfg)
        warm = torch.ones(64, 64)
        (warm @ warm).sum().item()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        q, k = (
            torch.nn.functional.normalize(
                torch.randn(cfg.batch, cfg.dim, generator=gen), dim=1
            ).requires_grad_()
            for _ in range(2)
        )
        base = _peak_rss()

        def step() -> tuple[float, float]:
            q.grad = k.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            loss = fn(q, k)
            loss.backward()
            elapsed = time.perf_counter() - t0
            # The pass ends when the slowest rank is done.
            slowest = torch.tensor([elapsed])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            return float(slowest), float(loss.detach())

        with _count_sent(cfg.world) as calls:
            warmup_s, loss_value = step()
        # The timing all-reduce inside step() is not part of the loss.
        calls = calls[:-1]
        extra_mib = max(0, _peak_rss() - base) / 2**20
        times = [step()[0] for _ in range(cfg.repeats)]
        results.put(
            (
                rank,
                {
                    "time_s": statistics.median(times),
                    "times_s": times,
                    "warmup_s": warmup_s,
                    "loss": loss_value,
                    "sent_mib": sum(b for _, b in calls) / 2**20,
                    "collectives": [f"{n}:{b}" for n, b in calls],
                    "extra_mib": extra_mib,
                    "threads": threads,
                },
            )
        )
        dist.barrier()
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


def run_world(cfg: DistConfig, timeout: float) -> dict[str, Any]:
    """Measure ``cfg`` in a fresh world of ``cfg.world`` spawned processes.

    Returns:
        The row fields: the slowest rank's median ``time_s``, the mean over ranks of
        the returned ``loss`` (the global mean loss), the largest ``sent_mib`` and
        ``extra_mib`` over ranks, and rank 0's list of collectives; or ``status``
        "failed" with a ``reason``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dist_infonce_bench_") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank_main, args=(r, cfg, init_file, results), daemon=True)
            for r in range(cfg.world)
        ]
        for p in procs:
            p.start()
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(got) < cfg.world:
                try:
                    rank, res = results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                    got[rank] = res
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got]
                    if dead:
                        return {"status": "failed", "reason": f"ranks {dead} died (out of memory?)"}
                    if time.monotonic() > deadline:
                        return {"status": "failed", "reason": f"timeout after {timeout:.0f} s"}
        finally:
            for p in procs:
                p.join(timeout=30)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = {r: v["error"] for r, v in got.items() if "error" in v}
    if errors:
        first = min(errors)
        last = errors[first].strip().splitlines()[-1]
        return {"status": "failed", "reason": f"rank {first}: {last[:300]}"}
    rows = [got[r] for r in range(cfg.world)]
    return {
        "status": "ok",
        "time_s": max(r["time_s"] for r in rows),
        "times_s": rows[0]["times_s"],
        "warmup_s": max(r["warmup_s"] for r in rows),
        "loss": sum(r["loss"] for r in rows) / cfg.world,
        "sent_mib": max(r["sent_mib"] for r in rows),
        "extra_mib": max(r["extra_mib"] for r in rows),
        "collectives": rows[0]["collectives"],
        "threads_per_rank": rows[0]["threads"],
    }


# -------------------------------------------------------------------------- parent


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dist_infonce.bench --world W``."""
    from dist_infonce.bench import _csv_choices, _csv_ints

    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench --world W",
        description="Per-rank fwd+bwd time and bytes sent of the gathered loss on W gloo "
        "processes: ours (one direction, symmetric) vs OpenCLIP's local loss.",
    )
    p.add_argument("--world", type=int, required=True, help="number of gloo processes (>= 2)")
    p.add_argument(
        "--sizes",
        type=_csv_ints,
        default=list(DEFAULT_SIZES),
        help="rows per rank B, e.g. 1024,2048 (global batch W x B)",
    )
    p.add_argument("--dims", type=_csv_ints, default=[128], help="embedding dims D")
    p.add_argument(
        "--methods", type=_csv_choices(METHODS), default=list(METHODS), help=",".join(METHODS)
    )
    p.add_argument("--chunk", type=int, default=1024, help="tile edge of our chunked kernel")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    return p


def build_grid(args: argparse.Namespace) -> list[DistConfig]:
    """Per (D, B): every method and mode back to back (they see the same load)."""
    grid = []
    for d in args.dims:
        for b in args.sizes:
            for method in args.methods:
                for mode in METHOD_MODES[method]:
                    grid.append(
                        DistConfig(
                            method=method,
                            mode=mode,
                            batch=b,
                            dim=d,
                            world=args.world,
                            chunk=args.chunk if method.startswith("ours") else None,
                            repeats=args.repeats,
                            temperature=args.temperature,
                            seed=args.seed,
                        )
                    )
    return grid


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Time and bytes relative to ours one-direction at the same (B, D)."""
    ref = {
        (r["batch"], r["dim"]): r
        for r in rows
        if r["method"] == "ours" and r["mode"] == "one" and r["status"] == "ok"
    }
    for r in rows:
        base = ref.get((r["batch"], r["dim"]))
        if base is not None and r["status"] == "ok":
            r["time_vs_one"] = r["time_s"] / base["time_s"]
            r["bytes_vs_one"] = r["sent_mib"] / base["sent_mib"] if base["sent_mib"] else None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    head = (
        "| W | B/rank | D | method | mode | time/rank s | x one-dir | sent MiB/rank "
        "| x one-dir | extra MiB | loss | load |\n|" + "---|" * 12 + "\n"
    )

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['world']} | {r['batch']} | {r['dim']} | {r['method']} | {r['mode']} "
                f"| {r['status']}: {r.get('reason', '')} |||||||\n"
            )
            continue
        load = r.get("load_before") or []
        lines.append(
            f"| {r['world']} | {r['batch']} | {r['dim']} | {r['method']} | {r['mode']} "
            f"| {r['time_s']:.3f} | {f(r.get('time_vs_one'), '.2f')} | {r['sent_mib']:.2f} "
            f"| {f(r.get('bytes_vs_one'), '.2f')} | {r['extra_mib']:.0f} | {r['loss']:.5f} "
            f"| {load[0] if load else '-'} |\n"
        )
    return head + "".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the distributed benchmark; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world must be >= 2 for the distributed benchmark, got {args.world}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    grid = build_grid(args)
    from dist_infonce.bench import _load, peer_missing

    load_before = _load()
    print(f"{len(grid)} configurations on {args.world} gloo processes, load {load_before}")
    rows: list[dict[str, Any]] = []
    for i, cfg in enumerate(grid, 1):
        row: dict[str, Any] = {**asdict(cfg), "load_before": _load()}
        missing = peer_missing("open_clip") if cfg.method == "open_clip" else None
        if missing:
            row.update(status="skipped", reason=missing)
        else:
            row.update(run_world(cfg, args.timeout))
        rows.append(row)
        what = (
            f"{row['time_s']:.3f} s/rank, {row['sent_mib']:.2f} MiB sent/rank"
            if row["status"] == "ok"
            else f"{row['status']}: {row.get('reason')}"
        )
        print(f"[{i}/{len(grid)}] B={cfg.batch} D={cfg.dim} {cfg.mode} {cfg.method}: {what}")
        sys.stdout.flush()
    _ratios(rows)
    machine = {
        "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_before": load_before,
        "load_after": _load(),
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    (args.out / "bench_dist.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1)
    )
    (args.out / "table_dist.md").write_text(table)
    print()
    print(table, end="")
    print(
        f"\nload before {load_before}, after {machine['load_after']}; wrote "
        f"{args.out / 'bench_dist.json'}, {args.out / 'table_dist.md'}",
        flush=True,
    )
    return 0
