"""Launch paths on real processes: sbatch (torchrun and plain srun) on a real Slurm
cluster, ``accelerate launch`` on CPU, the torchrun wrapper across two "nodes", and
the sweep script.

Every run is a short training run of the real trainer (a few steps, a tiny batch).
Each test reads back ``metrics.jsonl`` and checks ``world_size``: a launcher that
silently starts unconnected single processes (accelerate's ``--cpu`` trap) writes
``world_size`` 1 and fails here. Waits are bounded; the Slurm fixture cancels jobs
and stops its daemons by PID at the end, also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from dist_infonce.trainer import sweep

# The import registers the real-Slurm fixture `slurm_cluster` in this module.
from tests.slurm_cluster import (
    SlurmCluster,
    _alive,
    _read_pid,
    cluster_processes,
    skip_without_slurm,
    slurm_cluster_fixture,  # noqa: F401
    start_cluster,
)

REPO = Path(__file__).resolve().parents[1]
#: The short run every launch test trains: the launch is under test, not the model.
#: It is a YAML file (written per test) so that the "CONFIG key=value" form of
#: every launcher is exercised; dist.timeout_s bounds a collective that never meets.
SHORT_YAML = """\
train:
  steps: 3
  batch_size: 16
log:
  every: 1
checkpoint:
  every: 100
dist:
  timeout_s: 60
"""
#: Overrides on the command line, on top of the file.
SHORT = ("wandb.mode=disabled",)
#: Seconds one short run may take on a loaded 2-core machine; a hang fails the test.
RUN_TIMEOUT_S = 120.0

pytestmark = pytest.mark.slow


@pytest.fixture()
def run_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a launched run: this interpreter, temp W&B/HF dirs, no inherited world.

    Inherited ``RANK``/``WORLD_SIZE``/``MASTER_*``/``SLURM_*`` would make the
    trainer join a world that is not this test's.
    """
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("SLURM_", "ACCELERATE_", "TORCHELASTIC_"))
    }
    bindir = str(Path(sys.executable).parent)
    env.update(
        PATH=bindir + os.pathsep + env.get("PATH", ""),
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        HF_HOME=str(tmp_path / "hf"),
        WANDB_MODE="disabled",
        WANDB_DIR=str(tmp_path / "wandb"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
    )
    return env


@pytest.fixture()
def config(tmp_path: Path) -> str:
    """Path of the short 2-step YAML config of these tests."""
    path = tmp_path / "short.yaml"
    path.write_text(SHORT_YAML)
    return str(path)


def read_metrics(output_dir: Path) -> list[dict[str, object]]:
    """Return the rows of ``output_dir/metrics.jsonl``."""
    path = output_dir / "metrics.jsonl"
    assert path.is_file(), f"no {path}; files: {sorted(p.name for p in output_dir.glob('*'))}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_world(output_dir: Path, world_size: int, batch_size: int = 16) -> None:
    """Check that every logged training step saw ``world_size`` ranks and ended with an eval."""
    rows = read_metrics(output_dir)
    train = [r for r in rows if "loss" in r]
    assert train, rows
    assert {r["world_size"] for r in train} == {world_size}, train
    assert {r["global_batch"] for r in train} == {world_size * batch_size}, train
    evals = [r for r in rows if "eval/linear_acc" in r]
    assert evals and 0.0 <= float(evals[-1]["eval/linear_acc"]) <= 1.0, rows


class Launched:
    """A launcher started in its own process group, with its output in a file."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> None:
        """Start ``cmd`` from the repository root, stdout and stderr into ``log``."""
        self.cmd = list(cmd)
        self.log = log
        self.start = time.monotonic()
        with log.open("w") as f:
            # Own session: on a timeout the whole tree (torchrun/accelerate and its
            # workers) is killed, not only the launcher.
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, deadline: float) -> tuple[int, str]:
        """Wait until ``deadline`` (monotonic time); kill the group if it is still running.

        Returns:
            ``(returncode, output)``; the return code is -9 after a kill.
        """
        try:
            rc = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        finally:
            if self.proc.poll() is None:
                self.kill()
        print(f"{' '.join(self.cmd[:5])} ...: {time.monotonic() - self.start:.1f} s (rc {rc})")
        return rc, self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process group and reap the launcher."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def run(cmd: Sequence[str], env: dict[str, str], log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    """Run a launcher to the end (bounded); fail with its output unless it exits 0."""
    rc, output = Launched(cmd, env, log).wait(time.monotonic() + timeout)
    assert rc == 0, f"rc={rc}\n{output[-6000:]}"
    return output


# --------------------------------------------------------------------------- Slurm


def test_slurm_cluster_runs_steps_and_reports_exit_codes(slurm_cluster: SlurmCluster) -> None:
    """The fixture's cluster runs a 2-task step, and a failing script's code comes back."""
    script = slurm_cluster.root / "probe.sh"
    script.write_text(
        "#!/bin/bash\nsrun --ntasks=2 bash -c 'echo task=$SLURM_PROCID/$SLURM_NTASKS'\nexit 3\n"
    )
    job = slurm_cluster.sbatch(script, sbatch_args=["--ntasks=2"])
    res = slurm_cluster.wait(job, timeout=30)
    assert (res.state, res.exit_code) == ("FAILED", 3), res
    assert sorted(res.output.split()) == ["task=0/2", "task=1/2"], res.output


def test_cluster_teardown_stops_daemons_and_running_jobs() -> None:
    """Leaving start_cluster() with a job still running leaves no process behind."""
    skip_without_slurm()
    with start_cluster() as c:
        script = c.root / "sleep.sh"
        script.write_text("#!/bin/bash\nsrun sleep 300\n")
        job = c.sbatch(script)
        daemons = [pid for f in c.pid_files if (pid := _read_pid(f)) is not None]
        assert len(daemons) == 3
        # Wait for the whole job tree: slurmscriptd, 2 slurmstepd (batch and step 0),
        # the script, srun (2 processes), sleep.
        deadline = time.monotonic() + 30
        while len(tree := cluster_processes(c.conf, daemons)) < 7:
            assert time.monotonic() < deadline, (tree, c.run(["squeue"]).stdout)
            time.sleep(0.1)
        assert job > 0
        tree += daemons
        root = c.root
    assert not [pid for pid in tree if _alive(pid)]
    assert not root.exists()


def test_sbatch_torchrun_two_processes(
    config: str, slurm_cluster: SlurmCluster, run_env: dict[str, str], tmp_path: Path
) -> None:
    """``sbatch slurm/train.sbatch CONFIG k=v``: srun -> torchrun (c10d) -> 2 workers."""
    out = tmp_path / "run"
    job = slurm_cluster.sbatch(
        "slurm/train.sbatch",
        [config, *SHORT, f"output_dir={out}"],
        env={**run_env, "NPROC_PER_NODE": "2"},
        cwd=REPO,
    )
    res = slurm_cluster.wait(job, timeout=RUN_TIMEOUT_S)
    print(f"sbatch train.sbatch: {res.elapsed_s:.1f} s")
    assert (res.state, res.exit_code) == ("COMPLETED", 0), res.output
    assert "1 node(s) x 2 process(es)" in res.output
    assert_world(out, 2)
    assert (out / "config.yaml").is_file()


def test_sbatch_plain_srun_two_tasks(
    config: str, slurm_cluster: SlurmCluster, run_env: dict[str, str], tmp_path: Path
) -> None:
    """``sbatch --ntasks=2 slurm/train_srun.sbatch``: the world comes from SLURM_* alone."""
    out = tmp_path / "run"
    job = slurm_cluster.sbatch(
        "slurm/train_srun.sbatch",
        [config, *SHORT, f"output_dir={out}"],
        sbatch_args=["--ntasks=2"],
        env=run_env,
        cwd=REPO,
    )
    res = slurm_cluster.wait(job, timeout=RUN_TIMEOUT_S)
    print(f"sbatch train_srun.sbatch: {res.elapsed_s:.1f} s")
    assert (res.state, res.exit_code) == ("COMPLETED", 0), res.output
    assert_world(out, 2)


def test_sbatch_failed_training_fails_the_job(
    config: str, slurm_cluster: SlurmCluster, run_env: dict[str, str], tmp_path: Path
) -> None:
    """A trainer error (here an unknown key) surfaces as a FAILED job, not a hang."""
    job = slurm_cluster.sbatch(
        "slurm/train.sbatch",
        [config, "no_such.key=1", f"output_dir={tmp_path / 'run'}"],
        env={**run_env, "NPROC_PER_NODE": "2"},
        cwd=REPO,
    )
    res = slurm_cluster.wait(job, timeout=RUN_TIMEOUT_S)
    assert res.state == "FAILED" and res.exit_code != 0, res
    assert "no_such" in res.output, res.output


# --------------------------------------------------------------- accelerate, torchrun


def test_accelerate_launch_cpu_config_two_processes(
    config: str, run_env: dict[str, str], tmp_path: Path
) -> None:
    """``accelerate launch --config_file launch/accelerate_cpu.yaml`` gives one 2-rank world."""
    out = tmp_path / "run"
    run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "launch/accelerate_cpu.yaml",
            "--num_processes",
            "2",
            "-m",
            "dist_infonce.train",
            "--config",
            config,
            *SHORT,
            f"output_dir={out}",
        ],
        {**run_env, "ACCELERATE_USE_CPU": "true"},
        tmp_path / "launch.log",
    )
    assert_world(out, 2)


def test_accelerate_wrapper_cpu_two_processes(
    config: str, run_env: dict[str, str], tmp_path: Path
) -> None:
    """``launch/accelerate.sh --cpu --nproc 2`` sets what the config file cannot."""
    out = tmp_path / "run"
    output = run(
        [
            "launch/accelerate.sh",
            "--cpu",
            "--nproc",
            "2",
            "--config",
            config,
            *SHORT,
            f"output_dir={out}",
        ],
        run_env,
        tmp_path / "launch.log",
    )
    assert "accelerate_cpu.yaml" in output
    assert_world(out, 2)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_wrapper_two_nodes_c10d(
    config: str, run_env: dict[str, str], tmp_path: Path
) -> None:
    """Two "nodes" (one process each) on this machine meet through the c10d rendezvous."""
    out = tmp_path / "run"
    env = {
        **run_env,
        "NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": f"test-{os.getpid()}",
    }
    cmd = [
        "launch/torchrun.sh",
        "--nproc",
        "1",
        "--",
        "--config",
        config,
        *SHORT,
        f"output_dir={out}",
    ]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    nodes = [Launched(cmd, env, tmp_path / f"node{i}.log") for i in range(2)]
    results = [node.wait(deadline) for node in nodes]
    for rc, output in results:
        assert rc == 0, output[-6000:]
        assert "--rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:" in output
    assert_world(out, 2)


# ------------------------------------------------------------------------------ sweep


def test_sweep_runs_grid_reports_failure_and_prints_summary(
    config: str, run_env: dict[str, str], tmp_path: Path
) -> None:
    """A 2x1 grid of 2-process torchrun runs whose first run fails: the second still
    runs, in its own output_dir and W&B group, the table shows its eval, and the
    sweep exits 1.

    One sweep covers both paths because every run costs seconds of imports here.
    """
    root = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "dist_infonce.sweep",
        "--config",
        config,
        "--root",
        str(root),
        "--name",
        "tiny",
        "--launcher",
        "torchrun",
        "--nproc",
        "2",
        "--timeout",
        str(RUN_TIMEOUT_S),
        "--grid",
        "train.lr=not_a_number,0.05",
        "loss.temperature=0.3",
        "--",
        *SHORT,
    ]
    rc, output = Launched(cmd, run_env, tmp_path / "sweep.log").wait(
        time.monotonic() + 2 * RUN_TIMEOUT_S
    )
    assert rc == 1, output[-6000:]
    assert "1 of 2 run(s) failed" in output, output[-6000:]
    summary = json.loads((root / "summary.json").read_text())
    assert [s["params"] for s in summary] == [
        {"train.lr": "not_a_number", "loss.temperature": "0.3"},
        {"train.lr": "0.05", "loss.temperature": "0.3"},
    ]
    bad, good = summary
    assert bad["status"].startswith("failed") and bad["returncode"] != 0, bad
    assert "train.lr" in (root / "logs" / f"{bad['name']}.log").read_text()
    assert good["status"] == "ok", good
    assert bad["output_dir"] != good["output_dir"]
    assert 0.0 <= good["evals"]["eval/linear_acc"] <= 1.0
    assert 0.0 <= good["evals"]["eval/knn_acc"] <= 1.0
    assert good["final"]["lr"] > 0.0 and good["final"]["step"] == 3
    resolved = (Path(good["output_dir"]) / "config.yaml").read_text()
    assert "group: tiny" in resolved and "lr: 0.05" in resolved, resolved
    assert_world(Path(good["output_dir"]), 2)
    # The printed table has one row per run, with the good run's eval values.
    table = output.split("sweep tiny (")[-1]
    assert "eval/linear_acc" in table and "eval/knn_acc" in table
    rows = {
        line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| 0")
    }
    assert set(rows) == {bad["name"], good["name"]}, table
    assert f"{good['evals']['eval/linear_acc']:.4g}" in rows[good["name"]]
    assert "failed" in rows[bad["name"]]


def test_sweep_grid_helpers() -> None:
    """Grid order, labels and the metrics reader (pure functions, no process)."""
    axes = [sweep.parse_axis("train.lr=0.1,0.3"), sweep.parse_axis("train.batch_size=64,128")]
    points = sweep.grid_points(axes)
    assert points[1] == {"train.lr": "0.1", "train.batch_size": "128"}
    assert len(points) == 4
    label = sweep.run_label(3, points[3], ["train.lr", "train.batch_size"])
    assert label == "03-lr=0.3-batch_size=128"
    for bad in ("train.lr", "train.lr=", "output_dir=1,2", "=1,2", "train.lr=0.1,,0.3"):
        with pytest.raises(Exception, match=r"key=|output_dir"):
            sweep.parse_axis(bad)
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--grid", "train.lr=1", "--nproc", "0"])
    assert exc.value.code == 2


def test_sweep_reads_metrics_tolerantly(tmp_path: Path) -> None:
    """The last loss row and the last eval row win; a torn last line is skipped."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
        '{"step": 2, "eval/linear_acc": 0.9, "eval/knn_acc": 0.8}\n{"step": 3, "lo'
    )
    final, evals = sweep.read_metrics(path)
    assert final == {"step": 2, "loss": 1.5}
    assert evals == {"eval/linear_acc": 0.9, "eval/knn_acc": 0.8}
    assert sweep.read_metrics(tmp_path / "missing.jsonl") == ({}, {})
