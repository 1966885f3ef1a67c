"""DDP vs FSDP2, with and without gradient caching: one trainer step of a wide two-tower model.

    python -m dist_infonce.bench fsdp                          # 4 rows, 2 processes (~5 min on 2 cores)
    python -m dist_infonce.bench fsdp --hidden 2048 --batch 2048 --micro 256

Each row (strategy x mode) runs in a fresh group of ``--world`` gloo processes. The
step is the trainer's: the CLIP task of ``configs/clip_synthetic.yaml`` with the MLP
towers widened to ``--hidden`` (``--depth`` layers), AdamW, one optimizer step.
``ddp`` wraps the learner (uncached) or its encoders (cached) in DDP; ``fsdp`` shards
the towers, their blocks and the model as ``dist.strategy=fsdp`` does
(:func:`dist_infonce.trainer.fsdp.shard_model`) and syncs the buffers as the trainer
does. ``cached`` runs the encoders ``--micro`` rows at a time through
:func:`dist_infonce.cached_backward`.

Columns, per rank (the largest rank counts):

- model state: parameters + gradients + AdamW moments held by this rank, counted from
  the tensors (under FSDP the local shards): what sharding divides;
- peak MiB: the peak resident set during the first timed step, reset just before it
  (:mod:`dist_infonce.memory`); ``base``: the resident set right after the reset
  (libraries, the sharded or whole model and optimizer state);
- step s: the median wall time of up to 5 steps within 10 s (after one warm-up step);
- MiB sent: what this rank sends per step under ring algorithms, from the recorded
  collectives (:func:`dist_infonce.testing.collective_bytes`) of one more step (DDP
  runs its default all-reduce hook, so its buckets go through the recorded functions);
  collectives: the number of those calls.

Outputs in ``--out``: ``fsdp.json`` (rows, the resolved config, the machine's load)
and ``table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_infonce.bench.common import (
    csv_choices,
    emit_result,
    finish_worker,
    start_worker,
    write_json,
)
from dist_infonce.memory import peak_rss_bytes, reset_peak_rss

__all__ = ["build_parser", "format_table", "main", "run_row"]

MODE = ("fsdp",)  # the words of this mode on the command line, for its workers
#: The keys of configs/clip_synthetic.yaml that shape one step (the model, the loss, the
#: data; the cache mode's clip task), before the towers are widened. The modes do not
#: import each other, so the list is here too.
CLIP = (
    "loss.kind=clip", "loss.temperature=0.07", "loss.learn_temperature=true",
    "loss.gather=true", "data.name=synthetic_pairs", "data.latent_dim=16",
    "data.dim_a=64", "data.dim_b=48", "data.noise=0.1", "data.num_eval=1000",
    "model.name=two_tower", "model.hidden_dim=256", "model.feature_dim=128",
    "model.embedding_dim=64", "model.depth=3",
)  # fmt: skip
STRATEGIES = ("ddp", "fsdp")
MODES = ("uncached", "cached")


# --------------------------------------------------------------------------- worker


def _overrides(hidden: int, depth: int) -> list[str]:
    return [*CLIP, f"model.hidden_dim={hidden}", f"model.depth={depth}"]


def _state_bytes(learner: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, gradients and optimizer state held by this rank (local shards)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in learner.parameters():
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += local(v).numel() * v.element_size()
    return total


def _step(
    strategy: str, micro: int | None, hidden: int, depth: int
) -> tuple[Callable[[int], Any], Callable[[Any], None], Callable[[], int], dict[str, Any]]:
    """``(sample(rows), run(batch), state_bytes(), config)`` of the trainer's step."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from dist_infonce import cached_backward
    from dist_infonce.trainer import build_data, build_learner, load_config, sample_batch
    from dist_infonce.trainer.config import to_dict
    from dist_infonce.trainer.fsdp import broadcast_buffers, shard_model

    cfg = load_config(None, [*_overrides(hidden, depth), f"dist.strategy={strategy}"])
    torch.manual_seed(0)
    data = build_data(cfg.data)
    learner = build_learner(cfg, data)
    if strategy == "fsdp":
        shard_model(
            learner.model,
            device=torch.device("cpu"),
            reshard_after_forward=cfg.dist.fsdp_reshard_after_forward,
            precision="fp32",
        )
        model: Any = learner if micro is None else learner.model
    else:
        model = DistributedDataParallel(learner if micro is None else learner.model)
        # DDP's reducer calls the backend from C++; through its default hook in Python
        # (the same all-reduce per bucket) the recorder sees its collectives too.
        model.register_comm_hook(None, allreduce_hook)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-3)
    rank = dist.get_rank()

    def sample(rows: int) -> Any:
        cfg.train.batch_size = rows
        return sample_batch(data, cfg, step=0, rank=rank, micro=0)[:2]

    def run(batch: Any) -> None:
        if strategy == "fsdp":
            broadcast_buffers(learner)
        if micro is None:
            model(*batch).backward()
        else:
            cached_backward(model, learner.loss_fn, batch, micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients' memory, as counted

    return sample, run, lambda: _state_bytes(learner, optimizer), to_dict(cfg)


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    """One row on this rank (RANK/WORLD_SIZE/MASTER_* set by the parent)."""
    from dist_infonce.testing import collective_bytes, record_collectives

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=timedelta(seconds=request["timeout"]))
    sample, run, state_bytes, config = _step(
        request["strategy"], request["micro"], request["hidden"], request["depth"]
    )
    rows = request["rows"]

    def timed() -> float:
        batch = sample(rows)
        dist.barrier()
        t0 = time.perf_counter()
        run(batch)
        return time.perf_counter() - t0

    timed()  # warm-up: thread pools, allocator, DDP buckets, FSDP's lazy init, AdamW state
    reset_peak_rss()
    base = peak_rss_bytes()
    times = [timed()]
    peak = peak_rss_bytes()
    while len(times) < request["repeats"] and sum(times) < request["budget_s"]:
        times.append(timed())
    world = dist.get_world_size()
    batch = sample(rows)
    with record_collectives(lambda n, a, k: collective_bytes(n, a, k, world)) as calls:
        run(batch)
    result = {
        "rank": dist.get_rank(),
        "seconds": sorted(times)[len(times) // 2],
        "peak_mib": peak / 2**20,
        "base_mib": base / 2**20,
        "state_mib": state_bytes() / 2**20,
        "sent_mib": sum(b for _, b in calls) / 2**20,
        "collectives": len(calls),
        "config": config,
    }
    dist.barrier()
    dist.destroy_process_group()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(strategy: str, micro: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one row in ``args.world`` fresh processes; the slowest/largest rank counts."""
    request = {
        "strategy": strategy,
        "micro": micro,
        "rows": args.batch // args.world,
        "hidden": args.hidden,
        "depth": args.depth,
        "timeout": args.timeout,
        "repeats": 5,
        "budget_s": 10.0,
    }
    env = {
        **os.environ,
        "WORLD_SIZE": str(args.world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    procs = [start_worker(MODE, request, {**env, "RANK": str(r)}) for r in range(args.world)]
    results, errors = [], []
    for p in procs:
        result, why = finish_worker(p, args.timeout)
        if result is None:
            errors.append(why)
            if why.startswith("timeout"):
                for q in procs:  # the others wait on this one
                    q.kill()
        else:
            results.append(result)
    if errors:
        return {"error": "; ".join(errors)}
    return {
        "seconds": max(r["seconds"] for r in results),
        **{k: max(r[k] for r in results) for k in ("peak_mib", "base_mib", "state_mib")},
        "sent_mib": max(r["sent_mib"] for r in results),
        "collectives": max(r["collectives"] for r in results),
        "config": results[0]["config"],
    }


# --------------------------------------------------------------------------- report


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per (strategy, mode)."""
    out = [
        "| strategy | mode | model state MiB/rank | peak MiB/rank | base MiB/rank | step s | MiB sent/rank | collectives |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = r["mode"] + (f" ({r['micro']})" if r["micro"] else "")
        if "error" in r:
            out.append(f"| {r['strategy']} | {mode} | {r['error'][:60]} |||||")
            continue
        out.append(
            f"| {r['strategy']} | {mode} | {r['state_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{r['base_mib']:.0f} | {r['seconds']:.2f} | {r['sent_mib']:.0f} | {r['collectives']} |"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dist_infonce.bench fsdp``."""
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench fsdp",
        description="One trainer step, DDP vs FSDP2, cached and not: memory per rank and time.",
    )
    p.add_argument("--batch", type=int, default=1024, help="global batch")
    p.add_argument("--micro", type=int, default=128, help="rows per encoder pass when cached")
    p.add_argument("--hidden", type=int, default=4096, help="width of the MLP towers")
    p.add_argument("--depth", type=int, default=4, help="linear layers per tower")
    p.add_argument("--world", type=int, default=2, help="gloo processes per row")
    p.add_argument(
        "--strategies", type=csv_choices(STRATEGIES), default=list(STRATEGIES), help="ddp,fsdp"
    )
    p.add_argument("--modes", type=csv_choices(MODES), default=list(MODES), help="uncached,cached")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a row is killed")
    p.add_argument("--out", type=Path, default=Path("bench_results/fsdp"))
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the FSDP benchmark; 1 when a row failed, 2 for bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker:
        emit_result(_worker(json.loads(args._worker)))
        return 0
    if min(args.batch, args.micro, args.world, args.hidden, args.depth) < 1:
        parser.error("--batch, --micro, --world, --hidden and --depth must be >= 1")
    if args.batch % args.world:
        parser.error(f"--batch {args.batch} must be a multiple of --world {args.world}")
    load_start = os.getloadavg()[0]
    rows = []
    for strategy in args.strategies:
        for mode in args.modes:
            micro = args.micro if mode == "cached" else None
            row = {
                "strategy": strategy,
                "mode": mode,
                "micro": micro,
                **run_row(strategy, micro, args),
            }
            rows.append(row)
            shown = {
                k: (round(v, 2) if isinstance(v, float) else v)
                for k, v in row.items()
                if k != "config"
            }
            print(json.dumps(shown), file=sys.stderr, flush=True)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "world": args.world,
        "batch": args.batch,
        "micro": args.micro,
        "hidden": args.hidden,
        "depth": args.depth,
        "load_avg_1min_at_start": load_start,
        "load_avg_1min_at_end": os.getloadavg()[0],
        "command": " ".join(["python -m dist_infonce.bench fsdp", *argv]),
    }
    write_json(args.out / "fsdp.json", {"meta": meta, "rows": rows})
    table = format_table(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} row(s) failed: {failed[0]['error']}", file=sys.stderr)
    return 1 if failed else 0
