"""Benchmark: one trainer step with and without gradient caching, global batch 512 -> 65536.

    python -m dist_infonce.bench_cache                  # both tasks, 2 processes (~10 min on 2 cores)
    python -m dist_infonce.bench_cache --sizes 512,4096 --tasks clip

Every row is one (task, global batch, mode) measured in a fresh group of ``--world``
gloo processes, so that each peak is its own. A row is the trainer's step: the
built-in model and loss of the task (``digits``: the embedded default, SimCLR with
NT-Xent over the global batch; ``clip``: ``configs/clip_synthetic.yaml``, two towers
and the symmetric loss with a learnable temperature), DDP, AdamW, one optimizer
step. ``uncached`` runs the whole per-rank batch through the encoders at once (the
trainer with ``train.micro_batch_size=null``); ``cached`` runs them ``--micro`` rows at
a time through :func:`dist_infonce.cache.cached_backward`.

- time per sample: wall time of a step (after one warm-up step of 256 rows; the
  median of up to 5 steps within 10 s, one step where a step takes longer)
  divided by the global batch; the slowest rank counts;
- peak memory: the peak resident set (``VmHWM``) of each process during the first
  timed step, reset just before it (``/proc/self/clear_refs``); the largest rank counts.
  Uncached rows are skipped where their memory, extrapolated linearly from the
  previous size, would pass ``--max-uncached-gib`` per process.

Outputs in ``--out``: ``grad_cache.json`` and ``table.md`` (also printed); the plot
goes to ``--plot`` (default ``docs/grad_cache.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["main"]

TASKS = {
    "digits": (None, ()),
    "clip": ("configs/clip_synthetic.yaml", ()),
}
SIZES = (512, 2048, 8192, 32768, 65536)
_RESULT = "BENCH_CACHE_RESULT "
_REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    # Linux >= 4.0: writing 5 resets VmHWM to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    """One timed trainer step on this rank (RANK/WORLD_SIZE/MASTER_* set by the parent)."""
    import datetime as dt

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dist_infonce.config import load_config
    from dist_infonce.data import build_data
    from dist_infonce.models import build_model
    from dist_infonce.train import Learner, _sample, build_loss

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=request["timeout"]))
    rank = dist.get_rank()
    config, overrides = TASKS[request["task"]]
    cfg = load_config(_REPO / config if config else None, list(overrides))
    torch.manual_seed(0)
    data = build_data(cfg.data)
    learner = Learner(
        build_model(cfg.model, data.input_shapes), build_loss(cfg.loss), cfg.loss.kind
    )
    micro = request["micro"]
    if micro is None:
        model = DistributedDataParallel(learner)
    else:
        from dist_infonce.cache import cached_backward

        model = DistributedDataParallel(learner.model)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-3)

    def step(batch: int) -> float:
        cfg.train.batch_size = batch
        x0, x1 = _sample(data, cfg, step=0, rank=rank, micro=0)
        dist.barrier()
        t0 = time.perf_counter()
        if micro is None:
            model(x0, x1).backward()
        else:
            cached_backward(model, learner.loss_fn, (x0, x1), micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(min(request["warmup_rows"], request["rows"]))  # thread pools, allocator, DDP buckets
    base_kib = _status_kib("VmRSS")
    _reset_peak()
    times = [step(request["rows"])]
    peak_kib = _status_kib("VmHWM")
    # Short steps are repeated (median) within a few seconds; long ones run once.
    while len(times) < request["repeats"] and sum(times) < request["budget_s"]:
        times.append(step(request["rows"]))
    seconds = sorted(times)[len(times) // 2]
    dist.barrier()
    dist.destroy_process_group()
    return {
        "rank": rank,
        "seconds": seconds,
        "peak_mib": peak_kib / 1024,
        "base_mib": base_kib / 1024,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(
    task: str, global_batch: int, micro: int | None, world: int, timeout: float
) -> dict[str, Any]:
    """Measure one row in ``world`` fresh processes; the slowest/largest rank counts."""
    rows = global_batch // world
    request = {
        "task": task,
        "rows": rows,
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
    cmd = [sys.executable, "-m", "dist_infonce.bench_cache", "--_worker", json.dumps(request)]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results, errors = [], []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"error": f"timeout after {timeout:.0f} s"}
        lines = [ln for ln in out.splitlines() if ln.startswith(_RESULT)]
        if p.returncode != 0 or not lines:
            tail = (err.strip().splitlines() or ["no stderr"])[-1]
            errors.append(f"exit {p.returncode}: {tail[:300]}")
        else:
            results.append(json.loads(lines[-1][len(_RESULT) :]))
    if errors:
        return {"error": "; ".join(errors)}
    seconds = max(r["seconds"] for r in results)
    return {
        "seconds": seconds,
        "us_per_sample": 1e6 * seconds / global_batch,
        "peak_mib": max(r["peak_mib"] for r in results),
        "base_mib": max(r["base_mib"] for r in results),
    }


# --------------------------------------------------------------------------- report


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per task and global batch, cached vs uncached side by side."""
    out = [
        "| task | global batch | uncached: peak MiB | cached: peak MiB | uncached: us/sample | cached: us/sample | time ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["task"], r["global_batch"], r["mode"]): r for r in rows}
    for task, g in dict.fromkeys((r["task"], r["global_batch"]) for r in rows):
        u, c = by_key.get((task, g, "uncached"), {}), by_key.get((task, g, "cached"), {})

        def cell(r: dict[str, Any], key: str, spec: str) -> str:
            if key in r:
                return format(r[key], spec)
            return r.get("skipped") or r.get("error", "")[:40] or "-"

        ratio = (
            f"{c['us_per_sample'] / u['us_per_sample']:.2f}x"
            if "us_per_sample" in u and "us_per_sample" in c
            else "-"
        )
        out.append(
            f"| {task} | {g} | {cell(u, 'peak_mib', '.0f')} | {cell(c, 'peak_mib', '.0f')} | "
            f"{cell(u, 'us_per_sample', '.1f')} | {cell(c, 'us_per_sample', '.1f')} | {ratio} |"
        )
    return "\n".join(out)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for task, marker in (("digits", "o"), ("clip", "s")):
        for mode, style in (("uncached", "--"), ("cached", "-")):
            pts = [r for r in rows if r["task"] == task and r["mode"] == mode and "peak_mib" in r]
            if not pts:
                continue
            g = [r["global_batch"] for r in pts]
            label = f"{task}, {mode}"
            ax_mem.plot(g, [r["peak_mib"] / 1024 for r in pts], style, marker=marker, label=label)
            ax_time.plot(g, [r["us_per_sample"] for r in pts], style, marker=marker, label=label)
    for ax, ylabel in (
        (ax_mem, "peak memory per process (GiB)"),
        (ax_time, "time per sample (us)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_mem.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main


def _csv(kind: type, choices: Sequence[str] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated values, got {text!r}"
            ) from None
        if not values or (choices and any(v not in choices for v in values)):
            raise argparse.ArgumentTypeError(
                f"expected a subset of {', '.join(choices or [])}, got {text!r}"
            )
        if kind is int and min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench_cache",
        description="One trainer step, gradient caching vs none: peak memory and time per sample.",
    )
    p.add_argument("--sizes", type=_csv(int), default=list(SIZES), help="global batches")
    p.add_argument("--tasks", type=_csv(str, tuple(TASKS)), default=list(TASKS), help="digits,clip")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        print(_RESULT + json.dumps(_worker(json.loads(args._worker))), flush=True)
        return 0
    if args.micro < 1 or args.world < 1:
        build_parser().error("--micro and --world must be >= 1")
    bad = [g for g in args.sizes if g % args.world]
    if bad:
        build_parser().error(
            f"--sizes: global batches must be multiples of --world {args.world}, got {bad}"
        )
    rows: list[dict[str, Any]] = []
    for task in args.tasks:
        last_uncached: dict[str, Any] | None = None
        for g in sorted(args.sizes):
            for mode, micro in (("uncached", None), ("cached", args.micro)):
                row: dict[str, Any] = {
                    "task": task,
                    "global_batch": g,
                    "mode": mode,
                    "micro": micro,
                }
                if mode == "uncached" and last_uncached is not None and "peak_mib" in last_uncached:
                    prev_g, prev = last_uncached["global_batch"], last_uncached
                    est = prev["base_mib"] + (prev["peak_mib"] - prev["base_mib"]) * g / prev_g
                    if est / 1024 > args.max_uncached_gib:
                        row["skipped"] = f"skipped (est. {est / 1024:.1f} GiB)"
                if "skipped" not in row:
                    row.update(run_row(task, g, micro, args.world, args.timeout))
                if mode == "uncached":
                    last_uncached = row if "peak_mib" in row else last_uncached
                rows.append(row)
                shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
                print(json.dumps(shown), file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "world": args.world,
        "micro": args.micro,
        "load_avg_1min_at_end": load,
        "command": " ".join(
            ["python -m dist_infonce.bench_cache", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grad_cache.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = format_table(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    title = (
        f"one trainer step, {args.world} gloo processes on {meta['cpus']} CPU cores; "
        f"cached = micro-batches of {args.micro} rows (load {load:.1f} at end)"
    )
    if plot(rows, args.plot, title):
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
