"""The trainer with ``dist.strategy=fsdp`` end to end, under torchrun (2 gloo ranks).

- Without gradient caching an FSDP run computes what a DDP run computes: the same
  losses and learned temperatures at every step (float32 rounding apart); a run
  refuses the checkpoints of the other strategy, naming ``dist.strategy``.
- With several micro-batches (gradient caching), explicit negatives, bf16, LARS,
  clipping and a learnable temperature: a run stopped by SIGTERM (preemption: one
  agreed checkpoint, exit 75), resumed, killed with SIGKILL after a later checkpoint
  and resumed again logs exactly the losses and temperatures of the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.test_resilience import finish, wait_for_step
from tests.test_train import (
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
from tests.test_train_cache import CLIP, MIXED

pytestmark = pytest.mark.slow


def test_fsdp_equals_ddp_under_torchrun(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run([*torchrun(2), *CLIP, f"output_dir={ddp}"], env)
    run([*torchrun(2), *CLIP, "dist.strategy=fsdp", f"output_dir={fsdp}"], env)
    a, b = train_rows(fsdp), train_rows(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    diff = max_rel_diff(a, b, range(1, 9))
    print(f"fsdp vs ddp: max relative loss difference {diff:.3g}")
    assert diff <= 1e-5
    for step in range(1, 9):
        # FSDP averages the sharded gradients, the loss module its own temperature's.
        assert a[step]["temperature"] == pytest.approx(b[step]["temperature"], rel=1e-5)
    assert a[8]["temperature"] != pytest.approx(a[1]["temperature"], rel=1e-4)  # learned
    assert sorted(p.name for p in (fsdp / "checkpoints").iterdir()) == ["step_00000008.dcp"]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step_00000008.pt"]


def test_checkpoints_of_the_other_strategy_are_refused(tmp_path: Path) -> None:
    """What rank 0 finds before resuming (the message every rank raises as a ConfigError)."""
    from dist_infonce.trainer.config import load_config
    from dist_infonce.trainer.trainer import Trainer

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000008.dcp").mkdir(parents=True)
    ddp = Trainer(load_config(None, [f"output_dir={tmp_path}"]))
    fsdp = Trainer(load_config(None, [f"output_dir={tmp_path}", "dist.strategy=fsdp"]))
    msg = ddp._other_strategy(None)
    assert "dist.strategy=ddp" in msg and "holds checkpoints of dist.strategy=fsdp" in msg, msg
    assert fsdp._other_strategy(None) == ""  # its own kind (newest_sharded decides)
    (ckpts / "step_00000008.dcp").rmdir()
    (ckpts / "step_00000004.pt").write_bytes(b"")
    assert "holds checkpoints of dist.strategy=ddp" in fsdp._other_strategy(None)
    assert ddp._other_strategy(None) == ""


#: The cached run of tests/test_train_cache.py under FSDP (12 steps, a checkpoint every 5).
FSDP_MIXED = (*MIXED, "dist.strategy=fsdp", "dist.timeout_s=60")


def test_fsdp_cached_preempted_and_killed_resumes_exactly(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    run([*torchrun(2), *FSDP_MIXED, f"output_dir={ref_out}"], env)
    ref = train_rows(ref_out)
    assert sorted(ref) == list(range(1, 13))
    assert all(r["micro_batch_size"] == 6 and r["global_batch"] == 32 for r in ref.values())
    assert ref[12]["loss"] < ref[1]["loss"]

    cmd = [*torchrun(2), *FSDP_MIXED, f"output_dir={out}"]
    # Preemption: SIGTERM to torchrun, forwarded to the workers; they agree at the step
    # boundary, write one sharded checkpoint and exit 75.
    first = Started(cmd, env, tmp_path / "first.log")
    wait_for_step(out, 2, [first])
    os.kill(first.proc.pid, signal.SIGTERM)
    rc, output = finish(first)
    stopped = last_step(out)
    assert rc != 0, output[-4000:]  # torchrun's agent re-raises the signal it got
    assert "exitcode  : 75" in output or output.count("SIGTERM: stopped after step") == 2
    assert f"SIGTERM: stopped after step {stopped}, checkpoint written" in output
    assert (out / "checkpoints" / f"step_{stopped:08d}.dcp" / ".metadata").is_file()

    # Resumed, then SIGKILLed (launcher and workers) once a later checkpoint is on disk.
    second = Started(cmd, env, tmp_path / "second.log")
    later = (stopped // 5 + 1) * 5
    ckpt = out / "checkpoints" / f"step_{later:08d}.dcp"
    deadline = time.monotonic() + TIMEOUT_S
    while not (ckpt.is_dir() and last_step(out) > later):
        assert second.proc.poll() is None, (tmp_path / "second.log").read_text()[-4000:]
        assert time.monotonic() < deadline, f"no step-{later} checkpoint in time"
        time.sleep(0.01)
    assert second.kill() == -signal.SIGKILL
    assert f"(step {stopped})" in (tmp_path / "second.log").read_text()

    proc = run(cmd, env)
    assert f"(step {later})" in proc.stderr, proc.stderr[-2000:]
    resumed = train_rows(out)
    assert sorted(resumed) == list(range(1, 13))
    diff = max_rel_diff(resumed, ref, range(1, 13))
    print(f"fsdp cached: SIGTERM after {stopped}, SIGKILL after {later}: loss diff {diff:.3g}")
    assert diff == 0.0
    assert [r["temperature"] for r in read_rows(out)] == [
        r["temperature"] for r in read_rows(ref_out)
    ]
