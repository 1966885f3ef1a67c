"""Distributed loss benchmark: the gathered loss per rank, ours vs OpenCLIP, on gloo.

Run ``python -m dist_infonce.bench --world 2 --sizes 1024,2048,4096`` (or
``python -m dist_infonce.bench dist --world 2 ...``). Every row is one configuration
measured in a fresh world of ``--world`` spawned gloo processes on this machine (CPU
threads split between the ranks), each rank holding ``B`` rows (the global batch is
``world x B``):

- time: per timed pass, the forward + backward time of the slowest rank (ranks
  start together after a barrier); the median over ``--repeats`` passes after one
  warm-up;
- sent MiB: bytes each rank sends in one forward + backward, counted from the
  collectives the pass really issues (:func:`dist_infonce.testing.record_collectives`:
  their calls are intercepted, the real collective still runs) with the
  ring-algorithm cost of each (:func:`dist_infonce.testing.collective_bytes`); the
  largest over ranks;
- extra MiB: the largest over ranks of the peak RSS during the first pass minus the
  RSS once the inputs exist (:mod:`dist_infonce.memory`).

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
  the same bytes as all-to-all). A peer, not a dependency: where open-clip-torch is
  not installed its rows are "skipped" with the reason.

Mode ``siglip`` (SigLIP's sigmoid loss at t = 10, b = -10, both requiring grad):

- ``ours``: ``siglip_loss(x, y, t, b, gather=True, chunk_size=--chunk)``: one gather of
  the y tower forward, one reduce-scatter of its gradient backward;
- ``open_clip_bidir``, ``open_clip_shift``, ``open_clip_reduce``, ``open_clip_gather``:
  OpenCLIP's ``SigLipLoss(dist_impl=...)``: the y tower passed around the ring by
  point-to-point exchanges (both ways, or one way; bytes counted from
  ``batch_isend_irecv``), one all-reduce per rank, or one all-gather
  (``torch.distributed.nn``), each block's logits dense.

Outputs in ``--out``: ``bench_dist.json`` and ``table_dist.md`` (also printed).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_infonce.bench.common import (
    csv_choices,
    csv_ints,
    fmt,
    load_avg,
    load_open_clip_loss,
    peer_missing,
    write_json,
)
from dist_infonce.memory import peak_rss_bytes, reset_peak_rss
from dist_infonce.testing import collective_bytes, record_collectives

__all__ = ["DistConfig", "build_grid", "build_parser", "format_table", "main", "run_world"]

#: OpenCLIP's SigLipLoss(dist_impl=...), one method each.
SIGLIP_PEERS = ("open_clip_bidir", "open_clip_shift", "open_clip_reduce", "open_clip_gather")
METHODS = ("ours", "ours_two_calls", "open_clip", *SIGLIP_PEERS)
MODES = ("one", "sym", "siglip")
METHOD_MODES: dict[str, tuple[str, ...]] = {
    "ours": ("one", "sym", "siglip"),
    "ours_two_calls": ("sym",),
    "open_clip": ("sym",),
    **{m: ("siglip",) for m in SIGLIP_PEERS},
}
#: SigLIP's initial scale t and bias b.
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
DEFAULT_SIZES = (1024, 2048, 4096)


@dataclass(frozen=True)
class DistConfig:
    """One configuration, run in a fresh world.

    Attributes:
        method: One of ``METHODS``.
        mode: ``"one"`` or ``"sym"``.
        batch: Rows per rank.
        dim: Embedding dimension D.
        world: Number of gloo processes.
        chunk: Tile edge of our chunked kernel (None: the loss chooses).
        repeats: Timed passes after one warm-up.
        temperature: Softmax temperature (``1 / logit_scale`` for OpenCLIP).
        seed: Seed of the inputs (rank r uses ``seed * 1000 + r``).
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


# ------------------------------------------------------------------------- a rank

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _siglip_fn(cfg: DistConfig) -> LossFn:
    scale = torch.tensor(SIGLIP_SCALE, requires_grad=True)
    bias = torch.tensor(SIGLIP_BIAS, requires_grad=True)
    if cfg.method == "ours":
        from dist_infonce import siglip_loss

        chunk = cfg.chunk
        return lambda x, y: siglip_loss(x, y, scale, bias, gather=True, chunk_size=chunk)
    peer = load_open_clip_loss("SigLipLoss")(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        dist_impl=cfg.method.removeprefix("open_clip_"),
    )
    return lambda x, y: peer(x, y, scale, bias)


def _loss_fn(cfg: DistConfig) -> LossFn:
    from dist_infonce import info_nce

    if cfg.mode == "siglip":
        return _siglip_fn(cfg)
    t, chunk = cfg.temperature, cfg.chunk
    if cfg.method == "ours":
        sym = cfg.mode == "sym"
        return lambda q, k: info_nce(
            q, k, temperature=t, symmetric=sym, chunk_size=chunk, gather=True
        )
    if cfg.method == "ours_two_calls":

        def two_calls(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            kw: dict[str, Any] = {"temperature": t, "chunk_size": chunk, "gather": True}
            return 0.5 * (info_nce(q, k, **kw) + info_nce(k, q, **kw))

        return two_calls
    if cfg.method == "open_clip":
        loss = load_open_clip_loss()(
            local_loss=True,
            gather_with_grad=True,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
        )
        scale = torch.tensor(1.0 / t)
        return lambda q, k: loss(q, k, scale)
    raise ValueError(f"unknown method {cfg.method!r}; expected one of {METHODS}")


def _timed_pass(fn: LossFn, q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns (the slowest rank's seconds, this rank's loss)."""
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


def _measure_rank(cfg: DistConfig, rank: int, threads: int) -> dict[str, Any]:
    """This rank's measurements of ``cfg`` (the group is initialised)."""
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
    reset_peak_rss()
    base = peak_rss_bytes()
    sent = lambda name, args, kwargs: collective_bytes(name, args, kwargs, cfg.world)
    with record_collectives(sent) as calls:
        warmup_s, loss_value = _timed_pass(fn, q, k)
    # The timing all-reduce inside _timed_pass is not part of the loss.
    calls = calls[:-1]
    extra_mib = max(0, peak_rss_bytes() - base) / 2**20
    times = [_timed_pass(fn, q, k)[0] for _ in range(cfg.repeats)]
    return {
        "time_s": statistics.median(times),
        "times_s": times,
        "warmup_s": warmup_s,
        "loss": loss_value,
        "sent_mib": sum(b for _, b in calls) / 2**20,
        "collectives": [f"{n}:{b}" for n, b in calls],
        "extra_mib": extra_mib,
        "threads": threads,
    }


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
        results.put((rank, _measure_rank(cfg, rank, threads)))
        dist.barrier()
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------- a world


def _collect(
    procs: list[Any], results: Any, world: int, timeout: float
) -> tuple[dict[int, dict[str, Any]], str]:
    """Every rank's result, or what went wrong (a rank died, the deadline passed)."""
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < world:
        try:
            rank, res = results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            got[rank] = res
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got]
            if dead:
                return got, f"ranks {dead} died (out of memory?)"
            if time.monotonic() > deadline:
                return got, f"timeout after {timeout:.0f} s"
    return got, ""


def _combine(got: dict[int, dict[str, Any]], world: int) -> dict[str, Any]:
    """One row from the ranks' results: the slowest / largest rank counts."""
    errors = {r: v["error"] for r, v in got.items() if "error" in v}
    if errors:
        first = min(errors)
        last = errors[first].strip().splitlines()[-1]
        return {"status": "failed", "reason": f"rank {first}: {last[:300]}"}
    rows = [got[r] for r in range(world)]
    return {
        "status": "ok",
        "time_s": max(r["time_s"] for r in rows),
        "times_s": rows[0]["times_s"],
        "warmup_s": max(r["warmup_s"] for r in rows),
        "loss": sum(r["loss"] for r in rows) / world,
        "sent_mib": max(r["sent_mib"] for r in rows),
        "extra_mib": max(r["extra_mib"] for r in rows),
        "collectives": rows[0]["collectives"],
        "threads_per_rank": rows[0]["threads"],
    }


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
        try:
            got, why = _collect(procs, results, cfg.world, timeout)
        finally:
            for p in procs:
                p.join(timeout=30)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    if why:
        return {"status": "failed", "reason": why}
    return _combine(got, cfg.world)


# -------------------------------------------------------------------------- parent


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dist_infonce.bench --world W``."""
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench --world W",
        description="Per-rank fwd+bwd time and bytes sent of the gathered loss on W gloo "
        "processes: ours (one direction, symmetric, SigLIP) vs OpenCLIP's ClipLoss and its "
        "SigLipLoss variants.",
    )
    p.add_argument("--world", type=int, required=True, help="number of gloo processes (>= 2)")
    p.add_argument(
        "--sizes",
        type=csv_ints,
        default=list(DEFAULT_SIZES),
        help="rows per rank B, e.g. 1024,2048 (global batch W x B)",
    )
    p.add_argument("--dims", type=csv_ints, default=[128], help="embedding dims D")
    p.add_argument(
        "--methods", type=csv_choices(METHODS), default=list(METHODS), help=",".join(METHODS)
    )
    p.add_argument("--modes", type=csv_choices(MODES), default=list(MODES), help=",".join(MODES))
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
                for mode in (m for m in METHOD_MODES[method] if m in args.modes):
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
    """Time and bytes relative to ours at the same (B, D): one direction for the softmax
    rows, ours siglip for the siglip rows."""
    ref = {
        (r["batch"], r["dim"], r["mode"] == "siglip"): r
        for r in rows
        if r["method"] == "ours" and r["mode"] in ("one", "siglip") and r["status"] == "ok"
    }
    for r in rows:
        base = ref.get((r["batch"], r["dim"], r["mode"] == "siglip"))
        if base is not None and r["status"] == "ok":
            r["time_vs_one"] = r["time_s"] / base["time_s"]
            r["bytes_vs_one"] = r["sent_mib"] / base["sent_mib"] if base["sent_mib"] else None


def _table_line(r: dict[str, Any]) -> str:
    head = f"| {r['world']} | {r['batch']} | {r['dim']} | {r['method']} | {r['mode']} "
    if r["status"] != "ok":
        return f"{head}| {r['status']}: {r.get('reason', '')} |||||||\n"
    load = r.get("load_before") or []
    return (
        f"{head}| {r['time_s']:.3f} | {fmt(r.get('time_vs_one'), '.2f', '-')} "
        f"| {r['sent_mib']:.2f} | {fmt(r.get('bytes_vs_one'), '.2f', '-')} "
        f"| {r['extra_mib']:.0f} | {r['loss']:.5f} | {load[0] if load else '-'} |\n"
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    head = (
        "| W | B/rank | D | method | mode | time/rank s | x ours | sent MiB/rank "
        "| x ours | extra MiB | loss | load |\n|" + "---|" * 12 + "\n"
    )
    return head + "".join(_table_line(r) for r in rows)


def _run_grid(grid: list[DistConfig], timeout: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, cfg in enumerate(grid, 1):
        row: dict[str, Any] = {**asdict(cfg), "load_before": load_avg()}
        missing = peer_missing("open_clip") if cfg.method.startswith("open_clip") else None
        if missing:
            row.update(status="skipped", reason=missing)
        else:
            row.update(run_world(cfg, timeout))
        rows.append(row)
        what = (
            f"{row['time_s']:.3f} s/rank, {row['sent_mib']:.2f} MiB sent/rank"
            if row["status"] == "ok"
            else f"{row['status']}: {row.get('reason')}"
        )
        print(f"[{i}/{len(grid)}] B={cfg.batch} D={cfg.dim} {cfg.mode} {cfg.method}: {what}")
        sys.stdout.flush()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the distributed benchmark; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world must be >= 2 for the distributed benchmark, got {args.world}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    grid = build_grid(args)
    load_before = load_avg()
    print(f"{len(grid)} configurations on {args.world} gloo processes, load {load_before}")
    rows = _run_grid(grid, args.timeout)
    _ratios(rows)
    machine = {
        "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_before": load_before,
        "load_after": load_avg(),
        "argv": argv,
    }
    table = format_table(rows)
    write_json(args.out / "bench_dist.json", {"machine": machine, "rows": rows})
    (args.out / "table_dist.md").write_text(table)
    print()
    print(table, end="")
    print(
        f"\nload before {load_before}, after {machine['load_after']}; wrote "
        f"{args.out / 'bench_dist.json'}, {args.out / 'table_dist.md'}",
        flush=True,
    )
    return 0
