"""Data benchmark: rows/s of each data source alone (0, 1, 2 DataLoader workers), next to the
trainer's step rate on the same data.

    python -m dist_infonce.bench data                       # every source (~3 min on 2 cores)
    python -m dist_infonce.bench data --sources images --workers 0,2 --rows 1024

The sources are built in a temporary folder (``--data-dir`` keeps them), ``--rows``
rows each:

- ``vectors``: a parquet table, two float32 vectors of 256 per row (precomputed features);
- ``text``: a parquet table, two columns of 8-word sentences (the built-in hashed
  n-gram tokenizer);
- ``images``: a parquet table of 64x64 RGB PNG file names and captions (PIL decode and
  torchvision's random resized crop to 32 px in the workers);
- ``shards``: the same images and captions as 8 webdataset shards.

A *loader* row is one rank's stream (:func:`dist_infonce.trainer.loader.build_stream`,
world 1, ``--batch`` rows per batch) alone: the time to the first batch (worker
start-up) and the rows/s of ``--batches`` batches after two warm-up batches. A
*trainer* row is ``python -m dist_infonce.train`` in one process on that source
(``two_tower``, ``clip``, ``--trainer-workers`` workers, ``--trainer-steps`` steps):
the median of its logged ``samples_per_s`` past the third step. When the loader's
rows/s with those workers is well above the trainer's, the loader does not starve the
step. Outputs in ``--out``: ``data_bench.json`` and ``table.md`` (also printed), with
the load average at the start and the end (other jobs distort timings).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dist_infonce.bench.common import csv_choices, csv_ints, load_avg, write_json

__all__ = ["SOURCES", "build_parser", "format_table", "loader_rate", "main", "make_sources"]

SOURCES = ("vectors", "text", "images", "shards")
_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "digit",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "dark",
    "bright",
    "old",
    "new",
    "cat",
    "dog",
    "tree",
    "house",
    "river",
    "mountain",
    "city",
    "road",
    "car",
    "boat",
    "bird",
    "flower",
    "book",
    "table",
    "chair",
    "window",
    "door",
    "street",
    "light",
    "shadow",
    "morning",
    "evening",
]


# ------------------------------------------------------------------------ the data


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS, size=8)) for _ in range(n)]


def _png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    # Smooth colour blobs (an 8x8 field upscaled): PNG-compressible like a photo, not noise.
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize((64, 64), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_sources(folder: Path, rows: int, sources: Sequence[str]) -> dict[str, list[str]]:
    """Write the benchmark's data sets to ``folder``; each source's trainer overrides."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    if "vectors" in sources:
        flat = rng.standard_normal(rows * 256 * 2).astype(np.float32)
        a = pa.FixedSizeListArray.from_arrays(pa.array(flat[: rows * 256]), 256)
        b = pa.FixedSizeListArray.from_arrays(pa.array(flat[rows * 256 :]), 256)
        pq.write_table(pa.table({"a": a, "b": b}), folder / "vectors.parquet")
        out["vectors"] = [
            "data.name=table",
            f"data.path={folder / 'vectors.parquet'}",
            "data.columns=[a,b]",
        ]
    if "text" in sources:
        table = pa.table({"a": _sentences(rng, rows), "b": _sentences(rng, rows)})
        pq.write_table(table, folder / "text.parquet")
        out["text"] = [
            "data.name=table",
            f"data.path={folder / 'text.parquet'}",
            "data.columns=[a,b]",
        ]
    if "images" in sources or "shards" in sources:
        import webdataset as wds

        images = folder / "images"
        images.mkdir(exist_ok=True)
        captions = _sentences(rng, rows)
        pngs = [_png(rng) for _ in range(rows)]
        for i, png in enumerate(pngs):
            (images / f"{i:06d}.png").write_bytes(png)
        names = [f"{i:06d}.png" for i in range(rows)]
        pq.write_table(pa.table({"image": names, "caption": captions}), folder / "images.parquet")
        out["images"] = [
            "data.name=table",
            f"data.path={folder / 'images.parquet'}",
            f"data.image_root={images}",
            "data.columns=[image,caption]",
        ]
        (folder / "shards").mkdir(exist_ok=True)
        per = -(-rows // 8)
        for s in range(8):
            with wds.TarWriter(str(folder / "shards" / f"{s:04d}.tar")) as sink:
                for i in range(s * per, min(rows, (s + 1) * per)):
                    sink.write({"__key__": f"{i:06d}", "png": pngs[i], "txt": captions[i]})
        out["shards"] = [
            "data.name=webdataset",
            f"data.path={folder / 'shards' / '{0000..0007}.tar'}",
            "data.columns=[png,txt]",
        ]
    return {k: v for k, v in out.items() if k in sources}


# ---------------------------------------------------------------------- the rows


def loader_rate(overrides: Sequence[str], workers: int, batch: int, batches: int) -> dict[str, Any]:
    """One rank's stream alone: seconds to the first batch and rows/s after two warm-ups."""
    import torch

    from dist_infonce.trainer.config import load_config
    from dist_infonce.trainer.data import build_data
    from dist_infonce.trainer.loader import build_stream

    cfg = load_config(
        None,
        [
            *overrides,
            "model.name=two_tower",
            f"train.batch_size={batch}",
            f"loader.num_workers={workers}",
        ],
    )
    data = build_data(cfg.data, model=cfg.model)
    stream = build_stream(data, cfg, rank=0, world=1, device=torch.device("cpu"))
    stream.resume(None, step=0)
    try:
        t0 = time.perf_counter()
        stream.next()
        first = time.perf_counter() - t0
        stream.next()
        t0, rows = time.perf_counter(), 0
        for _ in range(batches):
            rows += len(stream.next().x0)
        seconds = time.perf_counter() - t0
    finally:
        stream.close()
    return {"first_batch_s": first, "rows_per_s": rows / seconds, "rows": rows}


def trainer_rate(overrides: Sequence[str], workers: int, batch: int, steps: int) -> dict[str, Any]:
    """``python -m dist_infonce.train`` in one process on the source: median samples/s."""
    import dist_infonce

    root = str(Path(dist_infonce.__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="dist_infonce_bench_data_") as tmp:
        cmd = [
            sys.executable, "-m", "dist_infonce.train", *overrides,
            "model.name=two_tower", "loss.kind=clip", f"train.batch_size={batch}",
            f"train.steps={steps}", f"loader.num_workers={workers}", "log.every=1",
            "log.progress=false", "eval.enabled=false", "checkpoint.every=0",
            "wandb.mode=disabled", f"output_dir={tmp}/run",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"trainer run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = [
            json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()
        ]
    rates = [r["samples_per_s"] for r in rows if "loss" in r and r["step"] > 3]
    return {"rows_per_s": statistics.median(rates), "steps": steps}


def format_table(
    rows: Sequence[dict[str, Any]], workers: Sequence[int], trainer_workers: int
) -> str:
    """The Markdown table: a line per source, loader rows/s per worker count, the trainer's."""
    head = [f"loader, {w} workers" for w in workers]
    lines = [
        "| source | " + " | ".join(head) + f" | trainer ({trainer_workers} workers) |",
        "|---|" + "---:|" * (len(head) + 1),
    ]
    for r in rows:
        cells = [
            f"{r['loader'][str(w)]['rows_per_s']:,.0f} rows/s ({r['loader'][str(w)]['first_batch_s']:.1f} s to first)"
            for w in workers
        ]
        trainer = r.get("trainer")
        cells.append(f"{trainer['rows_per_s']:,.0f} rows/s" if trainer else "—")
        lines.append(f"| {r['source']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench data",
        description="rows/s of each data source alone (0, 1, 2 workers) next to the trainer's",
    )
    parser.add_argument("--sources", type=csv_choices(SOURCES), default=list(SOURCES))
    parser.add_argument(
        "--workers", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2]
    )
    parser.add_argument("--rows", type=int, default=4096, help="rows of each data set")
    parser.add_argument("--batch", type=int, default=256, help="rows per batch")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per loader row")
    parser.add_argument("--trainer-steps", type=int, default=20, help="0: no trainer rows")
    parser.add_argument("--trainer-workers", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the data sets here")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(w < 0 for w in args.workers):
        parser.error(f"--workers: expected counts >= 0, got {args.workers}")
    if args.rows < 2 * args.batch:
        parser.error(f"--rows {args.rows} must hold at least two batches of --batch {args.batch}")
    csv_ints(str(args.batch))  # a positive integer, with the other modes' message
    load_start = load_avg()
    with tempfile.TemporaryDirectory(prefix="dist_infonce_bench_data_") as tmp:
        folder = args.data_dir or Path(tmp)
        t0 = time.perf_counter()
        sources = make_sources(folder, args.rows, args.sources)
        print(f"data sets built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = []
        for name, overrides in sources.items():
            row: dict[str, Any] = {"source": name, "loader": {}}
            for w in args.workers:
                row["loader"][str(w)] = loader_rate(overrides, w, args.batch, args.batches)
                print(f"{name}, {w} workers: {row['loader'][str(w)]}", file=sys.stderr)
            if args.trainer_steps:
                row["trainer"] = trainer_rate(
                    overrides, args.trainer_workers, args.batch, args.trainer_steps
                )
                print(f"{name}, trainer: {row['trainer']}", file=sys.stderr)
            rows.append(row)
    table = format_table(rows, args.workers, args.trainer_workers)
    result = {
        "rows": rows,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_avg_start": load_start,
        "load_avg_end": load_avg(),
        "cpu_count": os.cpu_count(),
    }
    write_json(args.out / "data_bench.json", result)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"load average {load_start} -> {result['load_avg_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
