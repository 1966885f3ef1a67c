"""The end-to-end example of docs/models.md: CLIP with a timm ViT-tiny and a tiny BERT on the
digits image-text shards, zero-shot on held-out digits while training, then the towers
exported and loaded back by their libraries.

    python scripts/clip_digits_towers.py                  # the docs/ figure (2 ranks)
    python scripts/clip_digits_towers.py --set train.epochs=4 --out /tmp/curve.png

Steps: write the data (examples/make_digits_pairs.py, 25% held out) and the tiny BERT with
its tokenizer (examples/make_tiny_text_model.py) under ``--root`` unless there;
``torchrun --nproc_per_node=N -m dist_infonce.train --config configs/clip_digits_towers.yaml``
there; ``python -m dist_infonce.export``; then the zero-shot accuracy of the held-out digits
recomputed from the exports alone (timm ``local-dir:`` + ``SentenceTransformer``), which
must equal the run's last ``eval/zeroshot_acc``. Writes the curve (``--out``, PNG) and its
points (JSON beside it), and prints the wall time with the load average before and after:
on a shared machine the time is only what that load allowed.
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
CONFIG = REPO / "configs" / "clip_digits_towers.yaml"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def prepare(root: Path) -> None:
    """The data and the text model the config names (relative to ``root``), if missing."""
    sys.path.insert(0, str(REPO))
    from examples.make_digits_pairs import make_digits_pairs
    from examples.make_tiny_text_model import make_tiny_text_model

    if not (root / "data/digits_pairs/heldout/pairs-0000.tar").is_file():
        make_digits_pairs(root / "data/digits_pairs", heldout=0.25)
    if not (root / "models/tiny_bert/config.json").is_file():
        make_tiny_text_model(root / "models/tiny_bert")


def train(root: Path, nproc: int, extra: list[str]) -> tuple[Path, float, tuple[float, float]]:
    """The training run; its output_dir, wall time and the 1-minute load before/after."""
    out = root / "runs" / "clip_digits_towers"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "dist_infonce.train", "--config", str(CONFIG), f"output_dir={out}",
        "checkpoint.resume=false", "log.progress=false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.setdefault("WANDB_MODE", "offline")
    before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, check=True)
    return out, time.perf_counter() - start, (before, os.getloadavg()[0])


def check_exports(run: Path, exported: Path) -> float:
    """Zero-shot accuracy of the held-out digits from the exported towers alone."""
    import timm
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from dist_infonce.trainer.export import load_learner
    from dist_infonce.trainer.heldout import _heldout_source
    from dist_infonce.trainer.views import stack

    _, cfg, _ = load_learner(run)
    held = _heldout_source(cfg).eval_samples(10_000)
    image_tower = timm.create_model(f"local-dir:{exported / 'tower0'}", pretrained=True).eval()
    text_tower = SentenceTransformer(str(exported / "tower1"), device="cpu")
    with torch.no_grad():
        images = F.normalize(image_tower(stack(held.x0)), dim=-1)
    classes = text_tower.encode([cfg.eval.prompt.format(d) for d in DIGITS], convert_to_tensor=True)
    pred = (images @ classes.T).argmax(1)
    return float((pred == torch.tensor(held.labels)).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO, help="where data/, models/, runs/ go")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "clip_digits_towers.png")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    root = args.root.resolve()
    # The config's paths are relative: train, export and check from the same directory.
    os.chdir(root)
    prepare(root)
    run, wall, load = train(root, args.nproc, args.set)
    exported = root / "runs" / "clip_digits_towers-export"
    subprocess.run(
        [sys.executable, "-m", "dist_infonce.export", str(run), "--out", str(exported)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/zeroshot_acc" in r]
    from_exports = check_exports(run, exported)
    logged = evals[-1]["eval/zeroshot_acc"]
    if abs(from_exports - logged) > 1e-6:
        raise SystemExit(f"zero-shot from the exports {from_exports} != logged {logged}")
    points: dict[str, Any] = {
        "steps": [r["step"] for r in evals],
        "zeroshot_acc": [r["eval/zeroshot_acc"] for r in evals],
        "recall@1": [r["eval/recall@1"] for r in evals],
        "linear_acc": [r.get("eval/linear_acc") for r in evals],
        "wall_s": wall,
        "train_s": max(r.get("time_s", 0.0) for r in rows),
        "load_before_after": load,
        "nproc": args.nproc,
        "zeroshot_from_exports": from_exports,
        "overrides": args.set,
    }
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(points["steps"], points["zeroshot_acc"], marker="o", label="zero-shot accuracy")
    ax.plot(points["steps"], points["recall@1"], marker=".", label="recall@1 (both ways)")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance")
    ax.set(xlabel="optimizer step", ylabel="held-out digits", ylim=(0, 1))
    ax.set_title("CLIP: timm ViT-tiny + tiny BERT, 2 ranks, random init", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("| step | zero-shot | recall@1 | linear probe |\n|---|---|---|---|")
    for s, z, r, lin in zip(
        points["steps"],
        points["zeroshot_acc"],
        points["recall@1"],
        points["linear_acc"],
        strict=True,
    ):
        print(f"| {s} | {z:.3f} | {r:.3f} | {lin if lin is None else f'{lin:.3f}'} |")
    print(
        f"wall {wall:.0f} s (training loop {points['train_s']:.0f} s), {args.nproc} ranks, load "
        f"{load[0]:.1f} before / {load[1]:.1f} after; zero-shot from the exports {from_exports:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
