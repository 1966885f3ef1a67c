"""The trainer's parts in-process (LARS, schedule, data determinism, checkpoint files),
and one real run through every option a user switches on (bf16, LARS + scaling rule,
accumulation, clipping, explicit negatives, learnable temperature, forced chunking,
user data set and encoder by import path).

The module also serves as the "user code" of that run: ``make_data`` and
``make_encoder`` below are loaded by the trainer as
``tests.test_train_parts:make_data`` / ``:make_encoder``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dist_infonce.trainer.checkpoint import (
    get_rng_state,
    list_checkpoints,
    load_latest,
    prune,
    save_atomic,
    set_rng_state,
)
from dist_infonce.trainer.config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from dist_infonce.trainer.data import DigitsData, SyntheticPairs, batch_generator, recall_at_1
from dist_infonce.trainer.learner import Learner, build_loss
from dist_infonce.trainer.models import SiameseModel, TwoTowerModel, build_model
from dist_infonce.trainer.optim import LARS, build_optimizer, lr_factor, peak_lr

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------- "user code" for a run


class _UserPairs:
    """A user data set: 5-d points and a noisy copy, no evaluation."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.input_shapes = ((5,), (5,))

    def sample(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, ...]:
        x = torch.randn(batch_size, 5, generator=generator)
        return x, x + self.scale * torch.randn(batch_size, 5, generator=generator)


def make_data(cfg: DataConfig, scale: float = 0.1) -> _UserPairs:
    """``data.name=tests.test_train_parts:make_data`` (``data.kwargs.scale`` reaches here)."""
    return _UserPairs(scale)


def make_encoder(cfg: ModelConfig, input_shapes: Any) -> nn.Module:
    """``model.name=tests.test_train_parts:make_encoder``: a plain module, shared by both views."""
    return nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, cfg.embedding_dim))


# ------------------------------------------------------------------------- optimizers


def test_lars_step_matches_hand_computation() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(3))
    g_w, g_b = torch.randn(4, 3), torch.randn(3)
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars": False}],
        lr=0.5,
        momentum=0.9,
        eta=0.01,
    )
    w0, b0 = w.detach().clone(), b.detach().clone()
    for step in range(2):
        w.grad, b.grad = g_w.clone(), g_b.clone()
        opt.step()
        if step == 0:
            d = g_w + 0.1 * w0
            q = 0.01 * w0.norm() / d.norm()
            v_w = q * d
            w1 = w0 - 0.5 * v_w
            torch.testing.assert_close(w.detach(), w1)
            torch.testing.assert_close(b.detach(), b0 - 0.5 * g_b)  # plain SGD group
    d = g_w + 0.1 * w1
    v_w = 0.9 * v_w + 0.01 * w1.norm() / d.norm() * d
    torch.testing.assert_close(w.detach(), w1 - 0.5 * v_w)


def test_build_optimizer_kinds_and_no_decay_for_1d() -> None:
    model = Learner(
        SiameseModel(nn.Linear(4, 3)),
        build_loss(Config().loss.__class__(learn_temperature=True)),
        "nt_xent",
    )
    for kind, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", LARS)):
        opt = build_optimizer(model, TrainConfig(optimizer=kind, weight_decay=0.5), lr=0.1)
        assert isinstance(opt, cls)
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
        # The bias and the 0-d logit scale are exempt from weight decay.
        assert {p.ndim for p in no_decay["params"]} == {0, 1}
        loss = model(torch.randn(6, 4), torch.randn(6, 4))
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())


def test_schedule_and_scaling_rule() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=9, min_lr_ratio=0.1, lr=0.3, batch_size=64)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[8] == pytest.approx(0.9)
    assert factors[9] == pytest.approx(1.0) and max(factors) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert peak_lr(cfg, world_size=8) == 0.3
    cfg.scale_lr, cfg.grad_accum_steps = True, 2
    assert peak_lr(cfg, world_size=8) == pytest.approx(0.3 * 64 * 8 * 2 / 256)


# ------------------------------------------------------------------------------- data


def test_batches_are_a_function_of_seed_step_rank() -> None:
    data = DigitsData(DataConfig())
    a0, a1, a_labels = data.sample(batch_generator(0, 5, 1), 32)
    b0, b1, b_labels = data.sample(batch_generator(0, 5, 1), 32)
    assert torch.equal(a0, b0) and torch.equal(a1, b1) and torch.equal(a_labels, b_labels)
    assert a_labels.dtype == torch.int64 and a_labels.shape == (32,)
    assert a0.shape == (32, 1, 8, 8) and not torch.equal(a0, a1)  # two different views
    for other in (batch_generator(0, 5, 0), batch_generator(0, 6, 1), batch_generator(1, 5, 1)):
        assert not torch.equal(data.sample(other, 32)[0], a0)
    # Rank 1 of step 0 and rank 0 of step 1 are unrelated streams too.
    assert not torch.equal(
        data.sample(batch_generator(0, 0, 1), 8)[0], data.sample(batch_generator(0, 1, 0), 8)[0]
    )


def test_synthetic_pairs_and_recall() -> None:
    data = SyntheticPairs(DataConfig(dim_a=20, dim_b=12, num_eval=50))
    a, b = data.sample(batch_generator(0, 0, 0), 7)
    assert a.shape == (7, 20) and b.shape == (7, 12)
    assert torch.equal(
        SyntheticPairs(DataConfig(dim_a=20, dim_b=12, num_eval=50)).eval_a, data.eval_a
    )
    q = torch.eye(4)
    assert recall_at_1(q, q) == 1.0 and recall_at_1(q, q.flip(0)) == 0.0
    model = build_model(ModelConfig(name="two_tower"), data.input_shapes)
    assert isinstance(model, TwoTowerModel)
    z0, z1 = model(a, b)
    assert z0.shape == z1.shape == (7, 64)
    model.eval()
    res = data.evaluate(lambda x, v: model.embed(x, v).detach())
    assert 0.0 <= res["eval/recall@1"] <= 1.0


# ------------------------------------------------------------------------ checkpoints


def test_checkpoint_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Atomic save, keep-last-K, weights_only load, fallback past unreadable files."""
    d = tmp_path / "ckpt"
    for step in (10, 20, 30, 40):
        save_atomic({"step": step, "w": torch.full((3,), float(step))}, d / f"step_{step:08d}.pt")
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    removed = prune(d, keep=3)
    assert [p.name for p in removed] == ["step_00000010.pt"]
    assert [s for s, _ in list_checkpoints(d)] == [20, 30, 40]

    (d / "step_00000040.pt").write_bytes(b"not a checkpoint")
    # A file whose content does not match its name is not trusted either.
    torch.save({"step": 7}, d / "step_00000030.pt")
    state, path = load_latest(d)  # type: ignore[misc]
    assert state["step"] == 20 and path.name == "step_00000020.pt"
    err = capsys.readouterr().err
    assert "step_00000040.pt is unreadable" in err and "step_00000030.pt is unreadable" in err
    assert load_latest(tmp_path / "empty") is None


def test_rng_state_round_trip_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    save_atomic({"step": 0, "rng": [get_rng_state()]}, path)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    set_rng_state(torch.load(path, weights_only=True)["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


# ------------------------------------------------------------------ a run with options


@pytest.mark.slow
def test_run_with_every_option(tmp_path: Path) -> None:
    """bf16, LARS + scaling rule, accumulation, clipping, info_nce with explicit negatives
    (the tutorial's ``negative_samples``), learnable temperature, forced chunking,
    user data and encoder by import path: all in one real process."""
    out = tmp_path / "run"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_"))
        },
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }
    args = [
        "train.steps=6",
        "batch_size=16",
        "learning_rate=0.5",
        "embedding_dim=8",
        "negative_samples=24",
        "train.optimizer=lars",
        "train.scale_lr=true",
        "train.warmup_steps=2",
        "train.grad_accum_steps=2",
        "train.grad_clip=1.0",
        "precision=bf16",
        "loss.kind=info_nce",
        "loss.learn_temperature=true",
        "loss.temperature=0.1",
        "loss.chunk_size=7",
        "data.name=tests.test_train_parts:make_data",
        "data.kwargs.scale=0.05",
        "model.name=tests.test_train_parts:make_encoder",
        "log.every=1",
        "log.progress=false",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "dist_infonce.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # no eval: the data set has none
    peak = 0.5 * 16 * 2 / 256  # lr x (batch x world x accumulation) / 256
    assert rows[2]["lr"] == pytest.approx(peak)
    assert {r["global_batch"] for r in rows} == {32}
    assert all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["temperature"] == pytest.approx(0.1, rel=1e-6)
    assert rows[-1]["temperature"] != pytest.approx(0.1, rel=1e-6)  # it was learned
    cfg = load_config(out / "config.yaml")
    assert cfg.loss.num_negatives == 24 and cfg.train.precision == "bf16"
    state = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert "loss_fn.logit_scale" in state["model"]


@pytest.mark.slow
def test_clip_synthetic_short_run_logs_recall(tmp_path: Path) -> None:
    """configs/clip_synthetic.yaml, shortened: learns, logs eval/recall@1, temperature moves."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_infonce.train",
            "--config",
            "configs/clip_synthetic.yaml",
            "train.steps=60",
            "log.progress=false",
            f"output_dir={out}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert "eval/linear_acc" not in final
    # 1000 candidates: chance is 0.001; 60 steps of batch 128 get far above it.
    assert final["eval/recall@1"] > 0.2, final
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert train[-1]["temperature"] != pytest.approx(0.07, rel=1e-4)
