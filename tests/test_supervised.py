"""``loss.supervised``: the trainer feeds the digits labels to the loss (SupCon)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_infonce import info_nce, nt_xent
from dist_infonce.trainer.config import Config, ConfigError, load_config
from dist_infonce.trainer.data import DigitsData, SyntheticPairs, sample_batch
from dist_infonce.trainer.learner import Learner, build_loss
from dist_infonce.trainer.models import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["nt_xent", "clip", "info_nce"])
def test_learner_gives_the_batch_labels_to_the_loss(kind: str) -> None:
    cfg = load_config(None, ["loss.supervised=true", f"loss.kind={kind}", "train.batch_size=48"])
    data = DigitsData(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.input_shapes)
    learner = Learner(model, build_loss(cfg.loss), kind)
    x0, x1, labels = sample_batch(data, cfg, step=3, rank=1, micro=0)
    assert labels is not None and labels.shape == (48,) and labels.unique().numel() < 48
    z0, z1 = model(x0, x1)
    if kind == "nt_xent":
        expected = nt_xent(z0, z1, cfg.loss.temperature, labels=labels)
        unlabelled = nt_xent(z0, z1, cfg.loss.temperature)
    else:
        sym = kind == "clip"
        expected = info_nce(z0, z1, temperature=cfg.loss.temperature, symmetric=sym, labels=labels)
        unlabelled = info_nce(z0, z1, temperature=cfg.loss.temperature, symmetric=sym)
    got = learner(x0, x1, labels)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, unlabelled)


def test_unsupervised_batches_carry_no_labels_and_are_unchanged() -> None:
    cfg = Config()
    data = DigitsData(cfg.data)
    x0, x1, labels = sample_batch(data, cfg, step=0, rank=0, micro=0)
    assert labels is None
    cfg.loss.supervised = True
    y0, y1, _ = sample_batch(data, cfg, step=0, rank=0, micro=0)
    assert torch.equal(x0, y0) and torch.equal(x1, y1)  # the same batches, labelled


def test_supervised_needs_labels_and_no_explicit_negatives() -> None:
    with pytest.raises(ConfigError, match=r"loss\.supervised"):
        load_config(None, ["loss.supervised=true", "loss.kind=info_nce", "loss.num_negatives=8"])
    cfg = load_config(None, ["loss.supervised=true", "data.name=synthetic_pairs"])
    with pytest.raises(ConfigError, match=r"loss\.supervised: data\.name=.synthetic_pairs."):
        sample_batch(SyntheticPairs(cfg.data), cfg, step=0, rank=0, micro=0)


@pytest.mark.slow
def test_supcon_short_run_learns_digits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_"))}
    args = ["loss.supervised=true", "train.steps=30", "train.batch_size=64", "log.progress=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "dist_infonce.train", *args, f"output_dir={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert load_config(out / "config.yaml").loss.supervised
    assert rows[-1]["eval/linear_acc"] >= 0.9, rows[-1]
