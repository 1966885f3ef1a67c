"""The trainer with ``loss.kind=siglip`` on real processes (torchrun, 2 gloo ranks).

- configs/siglip_synthetic.yaml, shortened: a cached step with one micro-batch per rank
  runs the same forwards as an uncached one, so the two runs must log the same losses
  and the same learned scale (the loss module beside DDP averages log t and b itself
  under cached_backward; inside DDP, DDP does).
- SupCon labels on digits through several micro-batches: trains, and t moves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_train import clean_env, max_rel_diff, run, torchrun, train_rows

pytestmark = pytest.mark.slow

SIGLIP = (
    "--config",
    "configs/siglip_synthetic.yaml",
    "train.steps=8",
    "train.batch_size=24",
    "train.warmup_steps=2",
    "log.every=1",
    "log.progress=false",
    "eval.enabled=false",
    "wandb.mode=disabled",
)


def test_siglip_one_micro_batch_equals_uncached_under_torchrun(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run([*torchrun(2), *SIGLIP, f"output_dir={plain}"], env)
    run([*torchrun(2), *SIGLIP, "train.micro_batch_size=24", f"output_dir={cached}"], env)
    a, b = train_rows(cached), train_rows(plain)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    diff = max_rel_diff(a, b, range(1, 9))
    print(f"siglip cached (one micro-batch) vs uncached: max relative loss difference {diff:.3g}")
    assert diff <= 1e-5
    for step in range(1, 9):
        assert a[step]["temperature"] == pytest.approx(b[step]["temperature"], rel=1e-5)
    # SigLIP's init t = 10: the logged temperature 1/t starts at 0.1 and is learned.
    assert b[1]["temperature"] == pytest.approx(0.1, rel=1e-3)
    assert b[8]["temperature"] != pytest.approx(b[1]["temperature"], rel=1e-4)


def test_siglip_supervised_labels_with_micro_batches(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    out = tmp_path / "supcon"
    run(
        [
            *torchrun(2), "loss.kind=siglip", "loss.supervised=true", "train.steps=10",
            "train.batch_size=32", "train.micro_batch_size=12", "train.warmup_steps=2",
            "log.every=1", "log.progress=false", "eval.enabled=false", "wandb.mode=disabled",
            f"output_dir={out}",
        ],
        env,
    )  # fmt: skip
    rows = train_rows(out)
    assert sorted(rows) == list(range(1, 11))
    assert all(r["micro_batch_size"] == 12 and r["global_batch"] == 64 for r in rows.values())
    assert rows[10]["loss"] < rows[1]["loss"]
    assert rows[10]["temperature"] != pytest.approx(rows[1]["temperature"], rel=1e-4)
