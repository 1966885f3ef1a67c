"""The sentence-embedding example of docs/models.md: one Hugging Face encoder shared by both
columns of a text-pair table, trained on 2 ranks, exported, and used through
sentence-transformers.

    python scripts/sentence_pairs.py
    python scripts/sentence_pairs.py --set train.epochs=2

Steps (under ``--root``): the table (examples/make_text_pairs.py: held-out rows are unseen
attribute combinations), a tiny random BERT with a tokenizer trained on the table's texts
(examples/make_tiny_text_model.py); ``torchrun ... -m dist_infonce.train`` with
``model.name=hf:<dir>``, InfoNCE over the global batch and ``eval.path`` = the held-out
table; ``python -m dist_infonce.export``; then ``SentenceTransformer(DIR/encoder)`` encodes
the held-out pairs and its recall@1 (sentence -> paraphrase) must equal the run's last
``eval/recall@1_a2b``. Prints the held-out recall over the steps, the wall time and the
load average.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAIN = [
    "model.pooling=mean",
    "model.embedding_dim=64",
    "model.max_length=24",
    "data.name=table",
    "data.columns=[sentence,paraphrase]",
    "loss.kind=info_nce",
    "loss.temperature=0.05",
    "train.epochs=15",
    "train.batch_size=32",
    "train.lr=0.001",
    "train.warmup_steps=10",
    "eval.every=10",
    "log.every=10",
    "checkpoint.every=0",
    "checkpoint.resume=false",
    "log.progress=false",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "sentence_pairs")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from examples.make_text_pairs import make_text_pairs
    from examples.make_tiny_text_model import make_tiny_text_model

    paths = make_text_pairs(root / "data")
    corpus = paths["corpus"].read_text().splitlines()
    bert = make_tiny_text_model(root / "bert", corpus=corpus, hidden_size=64, layers=2)
    out = root / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.setdefault("WANDB_MODE", "offline")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "dist_infonce.train", f"model.name=hf:{bert}", f"data.path={paths['train']}",
        f"eval.path={paths['heldout']}", f"output_dir={out}", *TRAIN, *args.set,
    ]  # fmt: skip
    before, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, check=True)
    wall, after = time.perf_counter() - start, os.getloadavg()[0]
    exported = root / "export"
    subprocess.run(
        [sys.executable, "-m", "dist_infonce.export", str(out), "--out", str(exported)],
        env=env,
        check=True,
    )

    from sentence_transformers import SentenceTransformer

    with paths["heldout"].open() as f:
        rows = list(csv.DictReader(f))
    model = SentenceTransformer(str(exported / "encoder"), device="cpu")
    a = model.encode([r["sentence"] for r in rows], convert_to_tensor=True)
    b = model.encode([r["paraphrase"] for r in rows], convert_to_tensor=True)
    import torch

    recall = float(((a @ b.T).argmax(1) == torch.arange(len(rows))).float().mean())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/recall@1_a2b" in m]
    logged = evals[-1]["eval/recall@1_a2b"]
    if abs(recall - logged) > 1e-6:
        raise SystemExit(f"recall@1 through SentenceTransformer {recall} != logged {logged}")
    print("| step | held-out recall@1 | recall@5 | recall@10 |\n|---|---|---|---|")
    for m in evals:
        print(
            f"| {m['step']} | {m['eval/recall@1']:.3f} | {m['eval/recall@5']:.3f} | {m['eval/recall@10']:.3f} |"
        )
    print(
        f"{len(rows)} held-out pairs; SentenceTransformer({exported / 'encoder'}) recall@1 "
        f"sentence->paraphrase {recall:.3f} (= the run's last eval/recall@1_a2b); wall "
        f"{wall:.0f} s on {args.nproc} ranks, load {before:.1f} before / {after:.1f} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
