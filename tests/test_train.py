"""The trainer end to end, on real processes: torchrun (2 gloo ranks), plain python, srun-style.

One shortened default run under torchrun (``ref_run``, shared by several tests)
provides the reference: its accuracy, its ``metrics.jsonl``, its checkpoints and its
W&B offline run file. The resume test kills a second copy of the same run with
SIGKILL after a checkpoint and checks that the restarted run logs the same loss
for every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The shortened default: every step logged so that the resume test compares all.
SHORT = (
    "train.steps=60",
    "train.batch_size=64",
    "train.warmup_steps=5",
    "log.every=1",
    "checkpoint.every=20",
    "checkpoint.keep=2",
    "log.progress=false",
)
#: A hang fails the test instead of the CI job.
TIMEOUT_S = 180.0

pytestmark = pytest.mark.slow


def clean_env(tmp: Path) -> dict[str, str]:
    """This interpreter's environment without any inherited world, W&B/HF dirs in ``tmp``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("SLURM_", "ACCELERATE_", "TORCHELASTIC_", "WANDB_"))
    }
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        HF_HOME=str(tmp / "hf"),
        WANDB_DIR=str(tmp / "wandb"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
    )
    (tmp / "wandb").mkdir(parents=True, exist_ok=True)
    return env


def torchrun(nproc: int, *extra: str) -> list[str]:
    """The torchrun command prefix for ``nproc`` local gloo workers (``extra``: more
    launcher flags)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        "-m",
        "dist_infonce.train",
    ]


PYTHON = [sys.executable, "-m", "dist_infonce.train"]


def run(cmd: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run to the end (bounded); fail with the output unless it exits 0."""
    start = time.monotonic()
    proc = subprocess.run(
        list(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    print(f"{' '.join(cmd[2:6])} ...: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


def read_rows(output_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_rows(output_dir: Path) -> dict[int, dict]:
    """Training rows by step; a step logged twice fails (resume must not duplicate)."""
    rows = [r for r in read_rows(output_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps: {steps}"
    return {r["step"]: r for r in rows}


def max_rel_diff(a: dict[int, dict], b: dict[int, dict], steps: Sequence[int]) -> float:
    """max over ``steps`` of |loss_a - loss_b| / |loss_b|."""
    return max(abs(a[s]["loss"] - b[s]["loss"]) / abs(b[s]["loss"]) for s in steps)


@dataclass
class RefRun:
    """The shared reference run."""

    out: Path
    env: dict[str, str]
    cmd: list[str]
    output: str


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory: pytest.TempPathFactory) -> RefRun:
    """The shortened default under ``torchrun --nproc_per_node=2``, W&B offline."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "run"
    env = clean_env(tmp)
    cmd = [
        *torchrun(2),
        *SHORT,
        f"output_dir={out}",
        "wandb.mode=offline",
        "wandb.project=ci-project",
        "wandb.name=ci-ref",
        "wandb.group=ci-group",
        "wandb.tags=ci,ref",
    ]
    proc = run(cmd, env)
    return RefRun(out, env, cmd, proc.stdout + proc.stderr)


# ------------------------------------------------------------------------ the default


def test_default_short_run_learns(ref_run: RefRun) -> None:
    """2 ranks, global batch 128: the loss falls and the frozen features classify digits."""
    rows = train_rows(ref_run.out)
    assert sorted(rows) == list(range(1, 61))
    first = sum(rows[s]["loss"] for s in range(1, 6)) / 5
    last = sum(rows[s]["loss"] for s in range(56, 61)) / 5
    assert last < first - 0.5, (first, last)
    final = read_rows(ref_run.out)[-1]
    assert final["eval/linear_acc"] >= 0.9, final
    assert final["eval/knn_acc"] >= 0.9, final
    assert "eval: eval/linear_acc=" in ref_run.output


def test_metrics_config_and_checkpoints(ref_run: RefRun) -> None:
    """metrics.jsonl has the contract's keys; config.yaml round-trips; keep=2 checkpoints."""
    import torch

    from dist_infonce.trainer.config import load_config

    rows = read_rows(ref_run.out)
    for row in rows[:-1]:
        for key in ("step", "loss", "lr", "temperature", "samples_per_s", "peak_mem_mb"):
            assert isinstance(row[key], float | int), (key, row)
        assert row["world_size"] == 2 and row["global_batch"] == 128, row
        assert row["temperature"] == pytest.approx(0.2)
        assert row["samples_per_s"] > 0
    # Warm-up then cosine: the peak is at the end of warm-up, the last step is lowest.
    lrs = [r["lr"] for r in rows[:-1]]
    assert lrs.index(max(lrs)) == 5 and lrs[-1] == min(lrs)
    final = rows[-1]
    assert set(final) >= {"step", "eval/linear_acc", "eval/knn_acc"} and "loss" not in final
    assert 0.0 <= final["eval/linear_acc"] <= 1.0 and 0.0 <= final["eval/knn_acc"] <= 1.0

    cfg = load_config(ref_run.out / "config.yaml")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.wandb.tags) == (60, 64, ["ci", "ref"])
    ckpts = sorted(p.name for p in (ref_run.out / "checkpoints").iterdir())
    assert ckpts == ["step_00000040.pt", "step_00000060.pt"]
    state = torch.load(ref_run.out / "checkpoints" / ckpts[-1], weights_only=True)
    assert state["step"] == 60 and state["world_size"] == 2 and len(state["rng"]) == 2
    # Two ranks, two different torch RNG streams.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["wandb_run_id"]


# ------------------------------------------------------------------------------- W&B


def wandb_records(path: Path) -> list:
    """Parse a wandb offline ``.wandb`` file (wandb 0.31: LevelDB-style log of protobufs).

    Layout: a 7-byte header (``:W&B``, u16 0xBEE1, u8 version), then 32 KiB blocks of
    records, each behind a 7-byte header (u32 crc, u16 length, u8 type: 1 full,
    2 first, 3 middle, 4 last); a block tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def test_wandb_offline_values_read_back(ref_run: RefRun) -> None:
    """The offline run file holds the resolved config, every metrics row and the eval."""
    files = list(Path(ref_run.env["WANDB_DIR"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = wandb_records(files[0])
    history: dict[int, dict] = {}
    summary: dict[str, object] = {}
    config: dict[str, object] = {}
    run_meta = None
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
            }
            history[int(items["_step"])] = items
        elif kind == "summary":
            summary.update(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.summary.update
                }
            )
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run":
            run_meta = rec.run
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert run_meta is not None
    assert (run_meta.project, run_meta.display_name, run_meta.run_group) == (
        "ci-project",
        "ci-ref",
        "ci-group",
    )
    assert list(run_meta.tags) == ["ci", "ref"]
    assert config["train"]["batch_size"] == 64
    assert config["loss"]["kind"] == "nt_xent"

    rows = train_rows(ref_run.out)
    assert set(rows) <= set(history), (sorted(rows), sorted(history))
    for step, row in rows.items():
        for key in ("loss", "lr", "temperature", "world_size", "global_batch", "peak_mem_mb"):
            assert history[step][key] == pytest.approx(row[key], rel=1e-12), (step, key)
    final = read_rows(ref_run.out)[-1]
    assert summary["eval/linear_acc"] == pytest.approx(final["eval/linear_acc"])
    assert summary["eval/knn_acc"] == pytest.approx(final["eval/knn_acc"])
    assert history[60]["eval/linear_acc"] == pytest.approx(final["eval/linear_acc"])


def test_wandb_auto_mode_resolution(tmp_path: Path) -> None:
    """auto: $WANDB_MODE wins, then an API key (env or netrc) means online, else offline."""
    from dist_infonce.trainer.metrics import resolve_wandb_mode

    netrc_file = tmp_path / "netrc"
    empty = {"NETRC": str(tmp_path / "missing")}
    assert resolve_wandb_mode("auto", empty) == "offline"
    assert resolve_wandb_mode("auto", {**empty, "WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_wandb_mode("auto", {**empty, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "x"}) == "offline"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc_file)}) == "online"


# ---------------------------------------------------------------------------- resume


class Started:
    """A training command in its own process group, output to a file."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as f:
            self.proc = subprocess.Popen(
                list(cmd),
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> int:
        """SIGKILL the launcher and every worker (no handler, no cleanup runs).

        torchrun starts each worker in its own session, so killing the launcher's
        process group alone would leave the workers running: collect the whole
        tree first, then kill it.
        """
        pids = descendants(self.proc.pid)
        for pid in [self.proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            # Not our children: wait until they are gone (reaped by init).
            end = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
                time.sleep(0.01)
        return self.proc.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may contain spaces: the ppid follows the last ')'.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def last_step(output_dir: Path) -> int:
    """The newest logged step (0 before the first)."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line).get("step", 0))
    return max(steps)


def test_resume_after_sigkill_matches_uninterrupted(ref_run: RefRun, tmp_path: Path) -> None:
    """SIGKILL both ranks after the step-20 checkpoint, restart: every later loss is equal."""
    out = tmp_path / "run"
    env = clean_env(tmp_path)
    cmd = [
        *[a if not a.startswith("output_dir=") else f"output_dir={out}" for a in ref_run.cmd],
        "wandb.name=ci-resume",
    ]
    first = Started(cmd, env, tmp_path / "first.log")
    deadline = time.monotonic() + TIMEOUT_S
    ckpt = out / "checkpoints" / "step_00000020.pt"
    # Kill a few steps past the checkpoint: those rows must be dropped and redone.
    while not (ckpt.is_file() and last_step(out) >= 23):
        assert first.proc.poll() is None, (tmp_path / "first.log").read_text()[-6000:]
        assert time.monotonic() < deadline, "no step-20 checkpoint in time"
        time.sleep(0.02)
    rc = first.kill()
    assert rc == -signal.SIGKILL
    killed_at = last_step(out)
    assert 23 <= killed_at < 60, killed_at
    assert not any("eval/linear_acc" in r for r in read_rows(out)), "the run had finished"
    assert not (out / "checkpoints" / "step_00000040.pt").exists()

    proc = run(cmd, env)
    assert f"resuming from {ckpt} (step 20)" in proc.stderr
    resumed, ref = train_rows(out), train_rows(ref_run.out)
    assert sorted(resumed) == sorted(ref) == list(range(1, 61))
    diff = max_rel_diff(resumed, ref, range(21, 61))
    print(f"resume after SIGKILL at step {killed_at}: max relative loss difference {diff:.3g}")
    assert diff <= 1e-6
    assert max_rel_diff(resumed, ref, range(1, 21)) <= 1e-6  # the part before the kill
    for step in range(21, 61):
        assert resumed[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-12)
    final, ref_final = read_rows(out)[-1], read_rows(ref_run.out)[-1]
    assert final["eval/linear_acc"] == pytest.approx(ref_final["eval/linear_acc"], abs=0.01)
    # The restarted run continued the same W&B run (offline: a second file, same id).
    runs = sorted(p.name for p in Path(env["WANDB_DIR"]).glob("wandb/offline-run-*"))
    assert len(runs) == 2 and len({r.rsplit("-", 1)[-1] for r in runs}) == 1, runs


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    """A truncated newest checkpoint is reported; the run resumes from the previous one."""
    out = tmp_path / "run"
    env = clean_env(tmp_path)
    cmd = [
        *PYTHON,
        "train.steps=30",
        "train.batch_size=32",
        "model.name=mlp",
        "log.every=1",
        "checkpoint.every=10",
        "log.progress=false",
        "wandb.mode=disabled",
        f"output_dir={out}",
    ]
    run(cmd, env)
    ref = train_rows(out)
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step_000000{s}.pt" for s in (10, 20, 30)]
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    proc = run(cmd, env)
    assert f"checkpoint {newest} is unreadable" in proc.stderr
    assert "resuming from" in proc.stderr and "step_00000020.pt (step 20)" in proc.stderr
    again = train_rows(out)
    assert sorted(again) == list(range(1, 31))
    assert max_rel_diff(again, ref, range(21, 31)) <= 1e-6
    # The rewritten step-30 checkpoint reads back.
    import torch

    assert torch.load(newest, weights_only=True)["step"] == 30
    assert "eval/linear_acc" in read_rows(out)[-1]
    assert sum("eval/linear_acc" in r for r in read_rows(out)) == 1

    # The same command once more: nothing left to train, one eval row still.
    proc = run(cmd, env)
    assert "step_00000030.pt (step 30)" in proc.stderr
    assert train_rows(out) == again
    assert sum("eval/linear_acc" in r for r in read_rows(out)) == 1


# --------------------------------------------------------------------- srun-style env


def free_port_for_job() -> tuple[int, int]:
    """A (job id, port) pair with the trainer's port rule 20000 + id % 20000 and the port free."""
    for _ in range(200):
        port = random.randint(20000, 39999)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - 20000 + 20000 * random.randint(1, 50), port
    raise RuntimeError("no free port in 20000-39999")


def test_srun_style_env_two_plain_processes(tmp_path: Path) -> None:
    """Two plain ``python -m dist_infonce.train`` with only SLURM_* variables form one world."""
    out = tmp_path / "run"
    env = clean_env(tmp_path)
    job_id, _port = free_port_for_job()
    cmd = [
        *PYTHON,
        "train.steps=4",
        "train.batch_size=16",
        "model.name=mlp",
        "log.every=1",
        "log.progress=false",
        "wandb.mode=disabled",
        "dist.timeout_s=120",
        f"output_dir={out}",
    ]
    procs = []
    for rank in range(2):
        slurm = {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_ID": str(job_id),
        }
        procs.append(Started(cmd, {**env, **slurm}, tmp_path / f"rank{rank}.log"))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            rc = p.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert rc == 0, p.log.read_text()[-6000:]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
    rows = train_rows(out)
    assert sorted(rows) == [1, 2, 3, 4]
    assert {r["world_size"] for r in rows.values()} == {2}
    assert {r["global_batch"] for r in rows.values()} == {32}


def test_slurm_env_mapping() -> None:
    """RANK & co. come from SLURM_* only for a multi-task step not started by a launcher."""
    from dist_infonce.trainer.launch import slurm_env

    base = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123"}
    got = slurm_env(base)
    assert got == {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "20123",
    }
    # srun's step size wins over the job's task count (a batch script's own python).
    assert slurm_env({**base, "SLURM_STEP_NUM_TASKS": "2"})["WORLD_SIZE"] == "2"
    assert slurm_env({**base, "RANK": "0"}) == {}  # torchrun inside srun
    assert slurm_env({**base, "SLURM_NTASKS": "1"}) == {}
    assert slurm_env({}) == {}
    kept = slurm_env({**base, "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert "MASTER_ADDR" not in kept and "MASTER_PORT" not in kept
