"""The trainer with ``train.micro_batch_size`` (gradient caching), on real processes.

- With one micro-batch per rank (micro = batch_size), a cached step runs the same
  forwards as an uncached one, so two torchrun runs of the CLIP task (2 gloo ranks,
  learnable temperature) must log the same losses and temperatures at every step.
- With several micro-batches, explicit negatives, bf16, LARS and clipping, a run
  must train, log ``micro_batch_size``, and resume after SIGKILL with the same
  losses as the uninterrupted run.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.test_train import (
    PYTHON,
    TIMEOUT_S,
    Started,
    clean_env,
    last_step,
    max_rel_diff,
    read_rows,
    run,
    torchrun,
    train_rows,
)

pytestmark = pytest.mark.slow

CLIP = (
    "--config",
    "configs/clip_synthetic.yaml",
    "train.steps=8",
    "train.batch_size=24",
    "train.warmup_steps=2",
    "log.every=1",
    "log.progress=false",
    "eval.enabled=false",
    "wandb.mode=disabled",
)


def test_one_micro_batch_equals_uncached_under_torchrun(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run([*torchrun(2), *CLIP, f"output_dir={plain}"], env)
    run([*torchrun(2), *CLIP, "train.micro_batch_size=24", f"output_dir={cached}"], env)
    a, b = train_rows(cached), train_rows(plain)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    diff = max_rel_diff(a, b, range(1, 9))
    print(f"cached (one micro-batch) vs uncached: max relative loss difference {diff:.3g}")
    assert diff <= 1e-5
    for step in range(1, 9):
        # The temperature's gradient is averaged over ranks by cached_backward,
        # by DDP without the cache: the learned values must agree.
        assert a[step]["temperature"] == pytest.approx(b[step]["temperature"], rel=1e-5)
        assert (a[step]["micro_batch_size"], a[step]["global_batch"]) == (24, 48)
    assert a[8]["temperature"] != pytest.approx(0.07, rel=1e-4)  # it was learned


#: Several micro-batches (16 rows as 6 + 6 + 4: no 1-row remainder, which BatchNorm
#: refuses in training), explicit negatives through the second tower (10 rows as
#: 6 + 4), bf16, LARS, clipping, learnable temperature; a checkpoint every 5 steps.
MIXED = (
    "train.steps=12",
    "train.batch_size=16",
    "train.micro_batch_size=6",
    "train.optimizer=lars",
    "train.lr=0.5",
    "train.warmup_steps=2",
    "train.grad_clip=1.0",
    "precision=bf16",
    "loss.kind=info_nce",
    "loss.num_negatives=10",
    "loss.learn_temperature=true",
    "model.name=two_tower",
    "data.name=synthetic_pairs",
    "eval.enabled=false",
    "log.every=1",
    "log.progress=false",
    "checkpoint.every=5",
    "wandb.mode=disabled",
)


def test_micro_batches_with_every_option_resume_exactly(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    run([*PYTHON, *MIXED, f"output_dir={ref_out}"], env)
    ref = train_rows(ref_out)
    assert sorted(ref) == list(range(1, 13))
    assert all(r["micro_batch_size"] == 6 and r["global_batch"] == 16 for r in ref.values())
    assert all(r["grad_norm"] > 0 for r in ref.values())
    assert ref[12]["loss"] < ref[1]["loss"]

    cmd = [*PYTHON, *MIXED, f"output_dir={out}"]
    first = Started(cmd, env, tmp_path / "first.log")
    ckpt = out / "checkpoints" / "step_00000005.pt"
    deadline = time.monotonic() + TIMEOUT_S
    while not (ckpt.is_file() and last_step(out) >= 6):
        assert first.proc.poll() is None, (tmp_path / "first.log").read_text()[-6000:]
        assert time.monotonic() < deadline, "no step-5 checkpoint in time"
        time.sleep(0.01)
    assert first.kill() == -signal.SIGKILL
    killed_at = last_step(out)
    proc = run(cmd, env)
    assert "(step 5)" in proc.stderr or "(step 10)" in proc.stderr, proc.stderr[-2000:]
    resumed = train_rows(out)
    assert sorted(resumed) == list(range(1, 13))
    diff = max_rel_diff(resumed, ref, range(1, 13))
    print(f"cached run killed at step {killed_at}, resumed: max relative loss diff {diff:.3g}")
    assert diff == 0.0
    assert [r["temperature"] for r in read_rows(out)] == [
        r["temperature"] for r in read_rows(ref_out)
    ]
