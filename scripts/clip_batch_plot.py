"""Recall@1 of the CLIP synthetic task against the global batch size, at equal steps.

Runs ``configs/clip_synthetic.yaml`` once per batch size (each in its own
``output_dir`` under ``--root``), reads ``eval/recall@1`` from each run's
``metrics.jsonl`` and plots it (needs matplotlib, a dev dependency)::

    python scripts/clip_batch_plot.py                       # 1 process per run
    python scripts/clip_batch_plot.py --nproc 2             # torchrun, global = 2 x per-rank
    python scripts/clip_batch_plot.py --global-batches 16 64 256 --steps 300
    python scripts/clip_batch_plot.py --nproc 2 --micro 512 --global-batches 16 ... 8192 \
        --set data.num_eval=5000            # past memory: per-rank batches > 512 cached

With ``--micro``, runs whose per-rank batch exceeds it use gradient caching
(``train.micro_batch_size``): the loss still sees the whole global batch.

Everything but the batch size is the same in every run (steps, lr, schedule,
seed), so the curve isolates the effect of the number of negatives.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(global_batch: int, args: argparse.Namespace) -> dict[str, float]:
    """Train one configuration; return its final eval row (plus timing)."""
    if global_batch % args.nproc:
        raise SystemExit(f"global batch {global_batch} is not divisible by --nproc {args.nproc}")
    out = args.root / f"global_batch={global_batch}"
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
        "--config",
        str(REPO / "configs" / "clip_synthetic.yaml"),
        f"train.steps={args.steps}",
        f"train.batch_size={global_batch // args.nproc}",
        f"output_dir={out}",
        "log.progress=false",
        "checkpoint.resume=false",
        "wandb.mode=disabled",
        *args.set,
    ]
    if args.micro and global_batch // args.nproc > args.micro:
        cmd.append(f"train.micro_batch_size={args.micro}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(rows) if "eval/recall@1" in r)
    cached = any(a.startswith("train.micro_batch_size=") for a in cmd)
    return {**final, "seconds": time.monotonic() - start, "cached": cached}


def main(argv: list[str] | None = None) -> int:
    """Run the grid, print a table, write ``--out`` (PNG) and a JSON of the points."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--global-batches", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024]
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun if > 1)")
    p.add_argument(
        "--micro", type=int, default=0, help="micro_batch_size for larger per-rank batches"
    )
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--root", type=Path, default=Path("runs/clip_batch_plot"))
    p.add_argument("--out", type=Path, default=REPO / "docs" / "clip_recall_vs_batch.png")
    args = p.parse_args(argv)

    points = []
    for b in args.global_batches:
        res = run(b, args)
        points.append({"global_batch": b, **res})
        print(
            f"global batch {b:5d}: recall@1 {res['eval/recall@1']:.3f} "
            f"(a->b {res['eval/recall@1_a2b']:.3f}, b->a {res['eval/recall@1_b2a']:.3f}), "
            f"{res['seconds']:.0f} s" + (" (cached)" if res["cached"] else ""),
            flush=True,
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [pt["global_batch"] for pt in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(xs, [pt["eval/recall@1"] for pt in points], "o-", label="mean of both directions")
    ax.plot(xs, [pt["eval/recall@1_a2b"] for pt in points], "--", alpha=0.6, label="A -> B")
    ax.plot(xs, [pt["eval/recall@1_b2a"] for pt in points], ":", alpha=0.6, label="B -> A")
    cached = [pt for pt in points if pt["cached"]]
    if cached:
        ax.plot(
            [pt["global_batch"] for pt in cached],
            [pt["eval/recall@1"] for pt in cached],
            "o",
            mfc="none",
            ms=11,
            color="k",
            label=f"gradient caching ({args.micro} rows per pass)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(0, 1)
    ax.set_xlabel("global batch (in-batch negatives + 1)")
    ax.set_ylabel("retrieval recall@1 (held-out pairs)")
    extra = f", {' '.join(args.set)}" if args.set else ""
    ax.set_title(
        f"clip_synthetic: {args.steps} steps each, {args.nproc} process(es){extra}", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
