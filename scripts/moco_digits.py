"""MoCo against SimCLR on the digits at small batches: accuracy, time, and the queue's effect.

Three methods, each at every per-step batch of ``--batches`` (same steps, lr, schedule,
seed and temperature; only the loss and its negatives differ):

- ``simclr``: the embedded default (NT-Xent over the batch: 2B - 2 negatives per view);
- ``moco``: ``loss.kind=info_nce loss.queue_size=Q model.momentum=M`` (positive + the Q
  keys of the queue, keys from the EMA encoder);
- ``moco-no-queue``: the same EMA key encoder with in-batch negatives (B - 1): the
  difference to ``moco`` is the queue alone.

Every run trains in its own ``output_dir`` under ``--root`` and is read back from its
``metrics.jsonl`` (``eval/linear_acc``, ``eval/knn_acc``, the training time); the script
prints a Markdown table and writes ``--out`` (PNG) and the points next to it (JSON)::

    python scripts/moco_digits.py                                   # the docs/ figure
    python scripts/moco_digits.py --batches 64 --steps 100          # a quick look
    python scripts/moco_digits.py --nproc 2 --set train.precision=bf16

With ``--nproc N`` each run uses torchrun with N processes and a per-rank batch of
``batch / N``. Timings are wall-clock on whatever else the machine is doing: the table
records the load average (``os.getloadavg``) before every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = ("simclr", "moco", "moco-no-queue")


def overrides(method: str, args: argparse.Namespace) -> list[str]:
    """The config of ``method`` as ``key=value`` overrides of the embedded default."""
    if method == "simclr":
        return []
    moco = ["loss.kind=info_nce", f"model.momentum={args.momentum}"]
    return [*moco, f"loss.queue_size={args.queue if method == 'moco' else 0}"]


def negatives(method: str, batch: int, args: argparse.Namespace) -> int:
    """Negatives per query once the queue is full."""
    return {"simclr": 2 * batch - 2, "moco": args.queue, "moco-no-queue": batch - 1}[method]


def run(method: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration; its final evaluation, training time and load average."""
    if batch % args.nproc:
        raise SystemExit(f"batch {batch} is not divisible by --nproc {args.nproc}")
    out = args.root / f"{method}-b{batch}"
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
        ]
    cmd = [
        *launcher,
        "-m",
        "dist_infonce.train",
        f"train.steps={args.steps}",
        f"train.batch_size={batch // args.nproc}",
        f"seed={args.seed}",
        *overrides(method, args),
        f"output_dir={out}",
        "log.progress=false",
        "checkpoint.resume=false",
        "checkpoint.every=0",
        "wandb.mode=disabled",
        *args.set,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(rows) if "eval/linear_acc" in r)
    last = next(r for r in reversed(rows) if "loss" in r)
    point = {
        "method": method,
        "batch": batch,
        "negatives": negatives(method, batch, args),
        "linear_acc": final["eval/linear_acc"],
        "knn_acc": final["eval/knn_acc"],
        "train_s": last["time_s"],
        "wall_s": wall,
        "final_loss": last["loss"],
        "load_avg_1m": load,
        "command": " ".join(cmd[cmd.index("dist_infonce.train") + 1 :]),
    }
    if "queue/size" in last:
        point["queue_size"], point["queue_age"] = last["queue/size"], last["queue/age"]
    return point


def table(points: list[dict[str, Any]]) -> str:
    """The Markdown table of the points."""
    lines = [
        "| method | batch | negatives / query | linear acc | kNN acc | train s | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['method']} | {p['batch']} | {p['negatives']} | {p['linear_acc']:.4f} | "
            f"{p['knn_acc']:.4f} | {p['train_s']:.1f} | {p['load_avg_1m']:.1f} |"
        )
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Accuracy (kNN and linear) against the batch, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120)
    style = {"simclr": "o-", "moco": "s-", "moco-no-queue": "^--"}
    for method in METHODS:
        pts = [p for p in points if p["method"] == method]
        if not pts:
            continue
        xs = [p["batch"] for p in pts]
        label = {
            "simclr": "SimCLR (NT-Xent, 2B-2 negatives)",
            "moco": f"MoCo (queue {args.queue}, m={args.momentum})",
            "moco-no-queue": f"MoCo without queue (m={args.momentum}, B-1 negatives)",
        }[method]
        for ax, key in zip(axes, ("knn_acc", "linear_acc", "train_s"), strict=True):
            ax.plot(xs, [p[key] for p in pts], style[method], label=label)
    for ax, title in zip(
        axes, ("kNN accuracy", "linear-probe accuracy", "training time (s)"), strict=True
    ):
        batches = sorted({p["batch"] for p in points})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch per step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    loads = [p["load_avg_1m"] for p in points]
    fig.suptitle(
        f"digits, {args.steps} steps each, {args.nproc} process(es); load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the runs"
        + (f"; {' '.join(args.set)}" if args.set else ""),
        fontsize=9,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)


def main(argv: list[str] | None = None) -> int:
    """Run the grid, print the table, write ``--out`` and its JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every run")
    p.add_argument("--queue", type=int, default=4096, help="loss.queue_size of moco")
    p.add_argument("--momentum", type=float, default=0.99, help="model.momentum of moco")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun if > 1)")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--root", type=Path, default=Path("runs/moco_digits"))
    p.add_argument("--out", type=Path, default=REPO / "docs" / "moco_digits.png")
    args = p.parse_args(argv)

    points = []
    for batch in args.batches:
        for method in args.methods:
            point = run(method, batch, args)
            points.append(point)
            print(
                f"{method:>13} batch {batch:4d}: linear {point['linear_acc']:.4f} "
                f"kNN {point['knn_acc']:.4f}, {point['train_s']:.1f} s "
                f"(load {point['load_avg_1m']:.1f})",
                flush=True,
            )
    print(table(points))
    plot(points, args)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
