"""Gradient-caching benchmark: one trainer step with and without caching, global batch
512 -> 65536.

    python -m dist_infonce.bench cache                  # both tasks, 2 processes (~10 min on 2 cores)
    python -m dist_infonce.bench cache --sizes 512,4096 --tasks clip

Every row is one (task, global batch, mode) measured in a fresh group of ``--world``
gloo processes, so that each peak is its own. A row is the trainer's step: the
built-in model and loss of the task, DDP, AdamW, one optimizer step. The tasks are
override lists of the trainer's defaults (``TASKS``), so the benchmark reads no file:
``digits`` is the embedded default (SimCLR with NT-Xent over the global batch);
``clip`` is the task of ``configs/clip_synthetic.yaml`` (two towers and the symmetric
loss with a learnable temperature). ``uncached`` runs the whole per-rank batch
through the encoders at once (the trainer with ``train.micro_batch_size=null``);
``cached`` runs them ``--micro`` rows at a time through
:func:`dist_infonce.cache.cached_backward`.

- time per sample: wall time of a step (after one warm-up step of 256 rows; the
  median of up to 5 steps within 10 s, one step where a step takes longer)
  divided by the global batch; the slowest rank counts;
- peak memory: the peak resident set of each process during the first timed step,
  reset just before it (:mod:`dist_infonce.memory`); the largest rank counts.
  Uncached rows are skipped where their memory, extrapolated linearly from the
  previous size, would pass ``--max-uncached-gib`` per process.

Outputs in ``--out``: ``grad_cache.json`` (each row with the resolved task config it
measured) and ``table.md`` (also printed); the plot goes to ``--plot`` (default
``docs/grad_cache.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_infonce.bench.common import (
    csv_choices,
    csv_ints,
    emit_result,
    finish_worker,
    log_log_axes,
    pyplot,
    save_figure,
    start_worker,
    write_json,
)
from dist_infonce.memory import peak_rss_bytes, reset_peak_rss

__all__ = ["TASKS", "build_parser", "format_table", "main", "run_row"]

#: Each task as ``key=value`` overrides of the trainer's defaults.
TASKS: dict[str, tuple[str, ...]] = {
    "digits": (),
    # The keys of configs/clip_synthetic.yaml that shape one step (the model, the
    # loss, the data); schedule, logging and checkpoint keys do not.
    "clip": (
        "loss.kind=clip", "loss.temperature=0.07", "loss.learn_temperature=true",
        "loss.gather=true", "data.name=synthetic_pairs", "data.latent_dim=16",
        "data.dim_a=64", "data.dim_b=48", "data.noise=0.1", "data.num_eval=1000",
        "model.name=two_tower", "model.hidden_dim=256", "model.feature_dim=128",
        "model.embedding_dim=64", "model.depth=3",
    ),
}  # fmt: skip
SIZES = (512, 2048, 8192, 32768, 65536)
MODE = ("cache",)  # the words of this mode on the command line, for its workers


# --------------------------------------------------------------------------- worker


@dataclass
class TrainerStep:
    """One trainer step, split so that only the step itself is timed.

    Attributes:
        config: The resolved config of the task (a nested dict), for the record.
        sample: ``sample(rows) -> batch``, this rank's batch of ``rows`` rows.
        run: ``run(batch)``: forward, backward and one AdamW step.
    """

    config: dict[str, Any]
    sample: Callable[[int], Any]
    run: Callable[[Any], None]


def _trainer_step(overrides: Sequence[str], micro: int | None) -> TrainerStep:
    """The trainer's step for ``overrides`` on this rank (the process group is up),
    built from the trainer's public pieces (:mod:`dist_infonce.trainer`)."""
    from torch.nn.parallel import DistributedDataParallel

    from dist_infonce.cache import cached_backward
    from dist_infonce.trainer import build_data, build_learner, load_config, sample_batch
    from dist_infonce.trainer.config import to_dict

    cfg = load_config(None, list(overrides))
    torch.manual_seed(0)
    data = build_data(cfg.data)
    learner = build_learner(cfg, data)
    # Uncached: the trainer's DDP over model and loss; cached: DDP over the encoders,
    # beside which the loss module averages its learnable temperature's gradient itself.
    model = DistributedDataParallel(learner if micro is None else learner.model)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-3)
    rank = dist.get_rank()

    def sample(rows: int) -> Any:
        cfg.train.batch_size = rows
        return sample_batch(data, cfg, step=0, rank=rank, micro=0)[:2]

    def run(batch: Any) -> None:
        if micro is None:
            model(*batch).backward()
        else:
            cached_backward(model, learner.loss_fn, batch, micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return TrainerStep(config=to_dict(cfg), sample=sample, run=run)


def _timed(step: TrainerStep, rows: int) -> float:
    batch = step.sample(rows)
    dist.barrier()
    t0 = time.perf_counter()
    step.run(batch)
    return time.perf_counter() - t0


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    """One timed trainer step on this rank (RANK/WORLD_SIZE/MASTER_* set by the parent)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=timedelta(seconds=request["timeout"]))
    step = _trainer_step(TASKS[request["task"]], request["micro"])
    rows = request["rows"]
    _timed(step, min(request["warmup_rows"], rows))  # thread pools, allocator, DDP buckets
    reset_peak_rss()
    base = peak_rss_bytes()  # right after the reset: the RSS now
    times = [_timed(step, rows)]
    peak = peak_rss_bytes()
    # Short steps are repeated (median) within a few seconds; long ones run once.
    while len(times) < request["repeats"] and sum(times) < request["budget_s"]:
        times.append(_timed(step, rows))
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return {
        "rank": rank,
        "seconds": sorted(times)[len(times) // 2],
        "peak_mib": peak / 2**20,
        "base_mib": base / 2**20,
        "config": step.config,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(
    task: str, global_batch: int, micro: int | None, world: int, timeout: float
) -> dict[str, Any]:
    """Measure one row in ``world`` fresh processes; the slowest/largest rank counts."""
    request = {
        "task": task,
        "rows": global_batch // world,
        "micro": micro,
        "warmup_rows": 256,
        "timeout": timeout,
        "repeats": 5,
        "budget_s": 10.0,
    }
    env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    procs = [start_worker(MODE, request, {**env, "RANK": str(r)}) for r in range(world)]
    results, errors = [], []
    for p in procs:
        result, why = finish_worker(p, timeout)
        if result is None:
            errors.append(why)
            if why.startswith("timeout"):
                # The other ranks wait on this one: do not wait for them as well.
                for q in procs:
                    q.kill()
        else:
            results.append(result)
    if errors:
        return {"error": "; ".join(errors)}
    seconds = max(r["seconds"] for r in results)
    return {
        "seconds": seconds,
        "us_per_sample": 1e6 * seconds / global_batch,
        "peak_mib": max(r["peak_mib"] for r in results),
        "base_mib": max(r["base_mib"] for r in results),
        "config": results[0]["config"],
    }


# --------------------------------------------------------------------------- report


def _cell(r: dict[str, Any], key: str, spec: str) -> str:
    if key in r:
        return format(r[key], spec)
    return r.get("skipped") or r.get("error", "")[:40] or "-"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per task and global batch, cached vs uncached side by side."""
    out = [
        "| task | global batch | uncached: peak MiB | cached: peak MiB | uncached: us/sample | cached: us/sample | time ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["task"], r["global_batch"], r["mode"]): r for r in rows}
    for task, g in dict.fromkeys((r["task"], r["global_batch"]) for r in rows):
        u, c = by_key.get((task, g, "uncached"), {}), by_key.get((task, g, "cached"), {})
        ratio = (
            f"{c['us_per_sample'] / u['us_per_sample']:.2f}x"
            if "us_per_sample" in u and "us_per_sample" in c
            else "-"
        )
        out.append(
            f"| {task} | {g} | {_cell(u, 'peak_mib', '.0f')} | {_cell(c, 'peak_mib', '.0f')} | "
            f"{_cell(u, 'us_per_sample', '.1f')} | {_cell(c, 'us_per_sample', '.1f')} | {ratio} |"
        )
    return "\n".join(out)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Peak memory and time per sample vs global batch; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for task, marker in zip(TASKS, "os^vD", strict=False):
        for mode, style in (("uncached", "--"), ("cached", "-")):
            pts = [r for r in rows if r["task"] == task and r["mode"] == mode and "peak_mib" in r]
            if not pts:
                continue
            g = [r["global_batch"] for r in pts]
            label = f"{task}, {mode}"
            ax_mem.plot(g, [r["peak_mib"] / 1024 for r in pts], style, marker=marker, label=label)
            ax_time.plot(g, [r["us_per_sample"] for r in pts], style, marker=marker, label=label)
    log_log_axes(ax_mem, "global batch", "peak memory per process (GiB)")
    log_log_axes(ax_time, "global batch", "time per sample (us)", log_y=False)
    for ax in (ax_mem, ax_time):
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(plt, fig, path)
    return True


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dist_infonce.bench cache``."""
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench cache",
        description="One trainer step, gradient caching vs none: peak memory and time per sample.",
    )
    p.add_argument("--sizes", type=csv_ints, default=list(SIZES), help="global batches")
    p.add_argument(
        "--tasks", type=csv_choices(tuple(TASKS)), default=list(TASKS), help=",".join(TASKS)
    )
    p.add_argument("--micro", type=int, default=256, help="rows per encoder pass when cached")
    p.add_argument("--world", type=int, default=2, help="gloo processes per row")
    p.add_argument(
        "--max-uncached-gib",
        type=float,
        default=6.0,
        help="skip uncached rows whose extrapolated peak per process passes this",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a row is killed")
    p.add_argument("--out", type=Path, default=Path("bench_results/grad_cache"))
    p.add_argument("--plot", type=Path, default=Path("docs/grad_cache.png"))
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def _skip_uncached(g: int, last: dict[str, Any] | None, max_gib: float) -> str | None:
    """Why the uncached row at global batch ``g`` is skipped (its memory, extrapolated
    linearly from the last measured uncached row, passes ``max_gib``), or None."""
    if last is None:
        return None
    est = last["base_mib"] + (last["peak_mib"] - last["base_mib"]) * g / last["global_batch"]
    return f"skipped (est. {est / 1024:.1f} GiB)" if est / 1024 > max_gib else None


def _measure_task(task: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    last_uncached: dict[str, Any] | None = None
    for g in sorted(args.sizes):
        for mode, micro in (("uncached", None), ("cached", args.micro)):
            row: dict[str, Any] = {"task": task, "global_batch": g, "mode": mode, "micro": micro}
            skipped = _skip_uncached(g, last_uncached, args.max_uncached_gib)
            if mode == "uncached" and skipped:
                row["skipped"] = skipped
            else:
                row.update(run_row(task, g, micro, args.world, args.timeout))
            if mode == "uncached" and "peak_mib" in row:
                last_uncached = row
            rows.append(row)
            shown = {
                k: (round(v, 2) if isinstance(v, float) else v)
                for k, v in row.items()
                if k != "config"
            }
            print(json.dumps(shown), file=sys.stderr, flush=True)
    return rows


def _write(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> None:
    load = os.getloadavg()[0]
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "world": args.world,
        "micro": args.micro,
        "load_avg_1min_at_end": load,
        "command": " ".join(["python -m dist_infonce.bench cache", *argv]),
    }
    write_json(args.out / "grad_cache.json", {"meta": meta, "rows": rows})
    table = format_table(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    title = (
        f"one trainer step, {args.world} gloo processes on {meta['cpus']} CPU cores; "
        f"cached = micro-batches of {args.micro} rows (load {load:.1f} at end)"
    )
    if plot(rows, args.plot, title):
        print(f"plot: {args.plot}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the caching benchmark; 1 when a row failed, 2 for bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker:
        emit_result(_worker(json.loads(args._worker)))
        return 0
    if args.micro < 1 or args.world < 1:
        parser.error("--micro and --world must be >= 1")
    bad = [g for g in args.sizes if g % args.world]
    if bad:
        parser.error(
            f"--sizes: global batches must be multiples of --world {args.world}, got {bad}"
        )
    rows = [row for task in args.tasks for row in _measure_task(task, args)]
    _write(rows, args, argv)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} row(s) failed: {failed[0]['error']}", file=sys.stderr)
    return 1 if failed else 0
