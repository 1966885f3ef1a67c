"""The file sources end to end: ``torchrun --nproc_per_node=2`` (2 gloo ranks), DataLoader
workers, two epochs, a SIGKILL mid-epoch and a restart, bad samples, bad input.

The trainer records every batch it draws (``DIST_INFONCE_TEST_RECORD_BATCHES``: ids,
epoch, position) so that the tests check which rows each rank saw, not only the losses.
The data: 96 digits as PNGs with captions (examples/make_digits_pairs.py), as a parquet
table and as 4 webdataset shards; 8 rows per rank per step, so 6 steps per epoch.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from dist_infonce.trainer.loader import RECORD_ENV
from examples.make_digits_pairs import make_digits_pairs
from tests.test_train import PYTHON, REPO, Started, clean_env, torchrun, train_rows

pytestmark = pytest.mark.slow

ROWS, STEPS_PER_EPOCH, EPOCHS = 96, 6, 2
STEPS = STEPS_PER_EPOCH * EPOCHS
CONFIG = (
    "train.batch_size=8",
    f"train.epochs={EPOCHS}",
    "train.warmup_steps=2",
    "log.every=1",
    "log.progress=false",
    "checkpoint.every=4",
    "checkpoint.keep=3",
    "eval.enabled=false",
    "wandb.mode=disabled",
    "dist.timeout_s=60",
    "model.name=two_tower",
    "model.hidden_dim=32",
    "model.feature_dim=32",
    "model.embedding_dim=16",
    "model.width=8",
    "loss.kind=clip",
)
TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_digits_pairs(tmp_path_factory.mktemp("pairs"), shards=4, limit=ROWS)


def source_args(source: str, pairs: dict[str, Path]) -> list[str]:
    if source == "table":
        return [
            "data.name=table",
            f"data.path={pairs['table']}",
            f"data.image_root={pairs['images']}",
            "data.columns=[image,caption]",
        ]
    return ["data.name=webdataset", f"data.path={pairs['shards']}", "data.columns=[png,txt]"]


def train(
    tmp: Path, name: str, args: list[str], *, env: dict[str, str] | None = None, restarts: int = 0
) -> tuple[int, str, Path, Path]:
    """One torchrun run; (exit code, output, output_dir, records folder)."""
    out, records = tmp / name, tmp / f"{name}-batches"
    full_env = {**clean_env(tmp), RECORD_ENV: str(records), **(env or {})}
    extra = [f"--max-restarts={restarts}"] if restarts else []
    if restarts:
        # A restarted group must not read the dead attempt's store (see test_resilience.py).
        full_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    p = Started(
        [*torchrun(2, *extra), *CONFIG, *args, f"output_dir={out}"], full_env, tmp / f"{name}.log"
    )
    try:
        rc = p.proc.wait(timeout=TIMEOUT_S)
    except Exception:
        p.kill()
        raise
    return rc, p.log.read_text(errors="replace"), out, records


def records(folder: Path) -> list[dict[str, Any]]:
    """Every recorded batch of both ranks, in the order each rank drew them."""
    out = []
    for rank in (0, 1):
        for line in (folder / f"batches-rank{rank}.jsonl").read_text().splitlines():
            out.append(json.loads(line))
    return out


def by_position(recs: list[dict[str, Any]]) -> dict[tuple, list]:
    """ids by (rank, position after the batch): a batch's place in the run."""
    out: dict[tuple, list] = {}
    for r in recs:
        key = (r["rank"], json.dumps(r["position"], sort_keys=True))
        assert out.setdefault(key, r["ids"]) == r["ids"], ("a batch changed", key)
    return out


def same_losses(a: Path, b: Path) -> float:
    got, want = train_rows(a), train_rows(b)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    return max(abs(got[s]["loss"] - want[s]["loss"]) / abs(want[s]["loss"]) for s in want)


@pytest.fixture(scope="module", params=["table", "webdataset"])
def ref(request: pytest.FixtureRequest, pairs: dict[str, Path], tmp_path_factory: Any) -> Any:
    """The uninterrupted 2-rank run of a source with 2 workers per rank."""
    source = request.param
    tmp = tmp_path_factory.mktemp(f"ref-{source}")
    rc, log, out, recs = train(tmp, "ref", [*source_args(source, pairs), "loader.num_workers=2"])
    assert rc == 0, log[-6000:]
    return source, out, recs


def test_every_row_once_per_epoch_over_the_ranks(ref: Any) -> None:
    """Each epoch the two ranks together see each of the 96 rows exactly once, in another
    order than the epoch before; every metrics row carries its epoch."""
    source, out, folder = ref
    recs = records(folder)
    assert len(recs) == 2 * STEPS
    ids = defaultdict(list)
    for r in recs:
        ids[r["epoch"]].append((r["rank"], r["ids"]))
    assert sorted(ids) == list(range(EPOCHS))
    flat = {}
    for epoch, batches in ids.items():
        rows = [i for _, b in batches for i in b]
        assert len(rows) == ROWS and len(set(rows)) == ROWS, (source, epoch)
        flat[epoch] = [tuple(b) for rank, b in batches if rank == 0]
    assert flat[0] != flat[1], "epoch 1 repeats epoch 0's batches"
    rows = train_rows(out)
    assert [rows[s]["epoch"] for s in range(1, STEPS + 1)] == [0] * 6 + [1] * 6
    assert all(rows[s]["bad_samples_skipped"] == 0 for s in rows)


def test_sigkill_mid_epoch_restart_sees_the_same_rows_and_losses(
    ref: Any, pairs: dict[str, Path], tmp_path: Path
) -> None:
    """Rank 1 SIGKILLed mid-step 10 (epoch 1); torchrun restarts the group, which resumes
    from the step-8 checkpoint (mid-epoch 1): the rows of every batch, in order, and the
    losses equal the uninterrupted run's. The table run has 0 workers where the reference
    had 2 (so it also shows that the workers change nothing); the webdataset run has 2."""
    source, ref_out, ref_records = ref
    workers = 0 if source == "table" else 2
    rc, log, out, folder = train(
        tmp_path,
        "killed",
        [*source_args(source, pairs), f"loader.num_workers={workers}"],
        env={"DIST_INFONCE_TEST_FAULT": "kill@10:1"},
        restarts=1,
    )
    assert rc == 0, log[-6000:]
    assert "SIGKILL rank 1 at step 10" in log and "step_00000008.pt (step 8)" in log, log[-4000:]
    err = same_losses(out, ref_out)
    print(
        f"{source}: SIGKILL at step 10 + restart, {workers} vs 2 workers: max relative loss "
        f"difference {err:.3g}"
    )
    assert err <= 1e-6
    want, got = by_position(records(ref_records)), records(folder)
    assert len(got) > 2 * STEPS  # the batches after the checkpoint were drawn twice
    for r in got:
        key = (r["rank"], json.dumps(r["position"], sort_keys=True))
        assert r["ids"] == want[key], key
    assert set(by_position(got)) == set(want)


def test_unreadable_image_stops_every_rank_then_skip_resumes(
    pairs: dict[str, Path], tmp_path: Path
) -> None:
    """An image that is there but truncated: with on_bad_sample=stop both ranks stop at the
    same step (exit 2 each, the row named on both), after writing the last good step's
    checkpoint; the same command with on_bad_sample=skip resumes there, leaves the row
    out (once per epoch) and counts it."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(pairs["images"], images)
    bad = images / "00011.png"
    bad.write_bytes(bad.read_bytes()[:40])
    args = [*source_args("table", pairs), f"data.image_root={images}", "loader.num_workers=2"]
    rc, log, out, _ = train(tmp_path, "bad", args)
    assert rc != 0
    where = f"'{pairs['table']}' row 11, column 'image': cannot read image '{bad}'"
    stops = [line for line in log.splitlines() if where in line and "stopped" in line]
    assert len(stops) == 2, log[-6000:]  # rank 0's and rank 1's message
    assert log.count("exitcode  : 2") >= 1 or "exit code 2" in log, log[-3000:]
    step = int(stops[0].split("step ", 1)[1].split(":", 1)[0])
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert f"step_{step - 1:08d}.pt" in ckpts, (step, ckpts)

    rc, log, out, _ = train(tmp_path, "bad", [*args, "data.on_bad_sample=skip"])
    assert rc == 0, log[-6000:]
    assert f"(step {step - 1})" in log
    rows = train_rows(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert rows[STEPS]["bad_samples_skipped"] == EPOCHS
    assert log.count(f"skipped a bad sample: {where}") == EPOCHS


def test_bad_input_exits_2_before_training(pairs: dict[str, Path], tmp_path: Path) -> None:
    """A missing column: exit 2 within seconds, the file and the columns it has named."""
    import subprocess

    cmd = [
        *PYTHON,
        "data.name=table",
        f"data.path={pairs['table']}",
        "data.columns=[image,text]",
        "wandb.mode=disabled",
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"error: data.columns: no column 'text' in '{pairs['table']}' "
        "(it has: image, caption, label, id)"
    ) in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
