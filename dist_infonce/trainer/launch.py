"""Process setup for every launcher: Slurm variables, the rendezvous port, the Accelerator,
and leaving the process group.

``python -m dist_infonce.trainer.launch master-port`` prints the rendezvous port of the
current Slurm job (the sbatch scripts call it, so the scripts and a plain
``srun python -m dist_infonce.train`` use the same port rule, :func:`master_port`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from dist_infonce.trainer.config import Config, ConfigError

__all__ = ["main", "make_accelerator", "master_port", "slurm_env", "teardown"]

#: Ports of the rule below: [PORT_BASE, PORT_BASE + PORT_SPAN).
PORT_BASE = 20000
PORT_SPAN = 20000
#: The step between two attempts of one job: a prime, so the attempts of a job
#: go through every port of the span before one repeats.
RESTART_STRIDE = 7919


def master_port(job_id: str, restart_count: int | str = 0) -> int:
    """The rendezvous port of attempt ``restart_count`` of Slurm job ``job_id``.

    ``20000 + (job_id + 7919 * restart_count) % 20000``: derived from the job id so
    that two jobs sharing a node do not collide, and different for each attempt of
    a requeued job (same id, ``SLURM_RESTART_COUNT`` + 1) so that it does not meet
    the previous attempt's socket still in TIME_WAIT. A non-numeric id (never seen
    from Slurm, but possible in a hand-set environment) counts by its bytes.

    Raises:
        ValueError: ``restart_count`` is not a non-negative integer.
    """
    job = int(job_id) if job_id.isdigit() else sum(job_id.encode())
    restart = int(restart_count or 0)
    if restart < 0:
        raise ValueError(f"SLURM_RESTART_COUNT must be >= 0, got {restart_count!r}")
    return PORT_BASE + (job + RESTART_STRIDE * restart) % PORT_SPAN


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables to export for a plain ``srun python -m ...``.

    Nothing when ``RANK`` is already set (torchrun, accelerate launch) or the Slurm
    step has one task. The world size is the step's task count
    (``SLURM_STEP_NUM_TASKS``, set by srun) and falls back to ``SLURM_NTASKS``; the
    rendezvous host is the first node of the job (``scontrol show hostnames``), or
    127.0.0.1 without scontrol; the port is :func:`master_port` of the job and its
    restart count. ``MASTER_ADDR``/``MASTER_PORT`` already in the environment win.
    """
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if ntasks <= 1:
        return {}
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = _first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))
    if "MASTER_PORT" not in env:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
        out["MASTER_PORT"] = str(master_port(job, env.get("SLURM_RESTART_COUNT") or 0))
    return out


def _first_host(nodelist: str | None) -> str:
    if nodelist and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return "127.0.0.1"


def make_accelerator(cfg: Config) -> Any:
    """The Accelerator: device, process group (gloo on CPU, NCCL on CUDA), precision.

    Raises:
        ConfigError: fp16 without CUDA.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    if cpu and cfg.train.precision == "fp16":
        # accelerate would silently run fp16 in fp32 on CPU.
        raise ConfigError("train.precision: fp16 needs a CUDA device; on CPU use bf16")
    return Accelerator(
        # cpu=True is what makes accelerate build a gloo world from torchrun/srun
        # variables on a machine without GPUs (otherwise: N unconnected processes).
        cpu=cpu,
        # Under FSDP its MixedPrecisionPolicy casts (dist_infonce.trainer.fsdp), not autocast.
        mixed_precision="no"
        if cfg.dist.strategy == "fsdp"
        else {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        # A finite timeout: a rank that died makes the others fail, not hang forever.
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_s)),
            DistributedDataParallelKwargs(find_unused_parameters=cfg.dist.find_unused_parameters),
        ],
        step_scheduler_with_optimizer=False,
    )


def teardown(clean: bool) -> None:
    """Leave the process group: barrier + destroy after success, destroy only after an error.

    After an error the other ranks may be inside a different collective; a barrier
    would pair with it (or wait for the timeout). torchrun stops them anyway. Call it
    only once nothing holds DDP state any more (:meth:`Trainer.close` does).
    """
    # Not dist_infonce.dist.is_distributed(): a world of one has a group to destroy too.
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``master-port``: print :func:`master_port` of $SLURM_JOB_ID and $SLURM_RESTART_COUNT."""
    parser = argparse.ArgumentParser(
        prog="python -m dist_infonce.trainer.launch",
        description="Launch helpers for the sbatch scripts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "master-port",
        help="the rendezvous port of this Slurm job attempt ($SLURM_JOB_ID, $SLURM_RESTART_COUNT)",
    )
    parser.parse_args(argv)
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if not job:
        parser.exit(2, f"{parser.prog} master-port: SLURM_JOB_ID is not set (not inside a job)\n")
    try:
        print(master_port(job, os.environ.get("SLURM_RESTART_COUNT") or 0))
    except ValueError as e:
        parser.exit(2, f"{parser.prog} master-port: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
