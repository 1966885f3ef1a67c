"""Contrastive training that runs the same under python, torchrun, accelerate launch and srun.

Usage::

    python -m dist_infonce.train [--config PATH] [key=value ...]
    torchrun --nproc_per_node=2 -m dist_infonce.train [--config PATH] [key=value ...]

With no arguments it runs the embedded default: SimCLR on scikit-learn's digits
with NT-Xent over the global batch, then a linear probe and kNN on held-out digits.
Re-running a command with the same ``output_dir`` resumes from its newest checkpoint.

The loop is one function, :func:`train`, readable top to bottom. The pieces it
calls: :mod:`dist_infonce.config` (the keys), :mod:`dist_infonce.data` and
:mod:`dist_infonce.models` (built-in tasks), :mod:`dist_infonce.optim` (optimizers,
schedule), :mod:`dist_infonce.checkpoint` (files), :mod:`dist_infonce.resilience`
(signals -> checkpoint -> requeue; non-finite losses; exit codes).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import netrc
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_infonce.cache import cached_backward
from dist_infonce.checkpoint import (
    checkpoint_path,
    get_rng_state,
    list_checkpoints,
    load_latest,
    prune,
    save_atomic,
    set_rng_state,
)
from dist_infonce.config import (
    Config,
    ConfigError,
    LossConfig,
    all_keys,
    field_docs,
    load_config,
    to_dict,
    to_yaml,
)
from dist_infonce.data import ContrastiveData, batch_generator, build_data
from dist_infonce.losses import InfoNCE, NTXent
from dist_infonce.models import PairModel, build_model
from dist_infonce.optim import build_optimizer, lr_factor, peak_lr
from dist_infonce.resilience import (
    CheckpointWriteError,
    StopTraining,
    collective_failure_message,
    disk_space_problem,
    inject_fault,
    make_guard,
)

__all__ = ["Learner", "build_loss", "build_parser", "main", "slurm_env", "train"]


# ------------------------------------------------------------------------ the model


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module of ``cfg.kind``, pooling negatives over ranks when ``cfg.gather``."""
    common: dict[str, Any] = {
        "chunk_size": cfg.chunk_size,
        "gather": cfg.gather,
        "learn_temperature": cfg.learn_temperature,
    }
    if cfg.kind == "nt_xent":
        return NTXent(cfg.temperature, **common)
    return InfoNCE(cfg.temperature, symmetric=cfg.kind == "clip", **common)


class Learner(nn.Module):
    """The model and the loss in one module, so that DDP also averages the gradient of
    a learnable temperature (the loss returns the globally normalised value; DESIGN.md).

    Args:
        model: ``forward(x0, x1) -> (z0, z1)``.
        loss_fn: from :func:`build_loss`.
        kind: ``cfg.loss.kind``.

    Shape:
        x0: (B, *in0); x1: (B + M, *in1), the last M rows being explicit negatives
        (``info_nce`` only); labels: None or (B,) int64 (``loss.supervised``).
        Output: () the loss.
    """

    def __init__(self, model: PairModel, loss_fn: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.kind = kind

    def forward(
        self, x0: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        z0, z1 = self.model(x0, x1)
        n = len(z0)
        if self.kind == "info_nce":
            negatives = z1[n:] if len(z1) > n else None
            return self.loss_fn(z0, z1[:n], negatives, labels=labels)
        return self.loss_fn(z0, z1, labels=labels)

    @property
    def temperature(self) -> float:
        """The current temperature (learnable or fixed)."""
        return float(self.loss_fn.temperature.detach())

    def cached_backward(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        x1: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        micro: int,
        accelerator: Any,
    ) -> torch.Tensor:
        """The backward of ``forward(x0, x1, labels)`` with the encoders run ``micro`` rows at a
        time (:func:`dist_infonce.cache.cached_backward`); returns the detached loss.

        ``model`` is ``self.model`` as prepared (DDP under several processes); the loss
        module stays outside DDP, and cached_backward averages its gradient. Explicit
        negatives (the rows of ``x1`` past ``len(x0)``) are a second tower through
        :meth:`PairModel.encode`, under the same autocast as the prepared forward.
        """
        n = len(x0)
        towers: list[Any] = [model]
        inputs: list[Any] = [(x0, x1[:n])]
        if len(x1) > n:

            def negatives(x: torch.Tensor) -> torch.Tensor:
                with accelerator.autocast():
                    return self.model.encode(x, 1)

            towers.append(negatives)
            inputs.append(x1[n:])
        # A partial keeps the module visible to cached_backward (it averages the
        # gradient of a learnable temperature over the ranks).
        loss_fn = functools.partial(self.loss_fn, labels=labels)
        return cached_backward(towers, loss_fn, inputs, micro, scaler=accelerator.scaler)


# -------------------------------------------------------------------- process setup


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables to export for a plain ``srun python -m ...``.

    Nothing when ``RANK`` is already set (torchrun, accelerate launch) or the Slurm
    step has one task. The world size is the step's task count
    (``SLURM_STEP_NUM_TASKS``, set by srun) and falls back to ``SLURM_NTASKS``; the
    rendezvous host is the first node of the job (``scontrol show hostnames``), or
    127.0.0.1 without scontrol; the port is derived from the job id so that jobs
    sharing a node do not collide. ``MASTER_ADDR``/``MASTER_PORT`` already in the
    environment win.
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
        job_id = int(job) if job.isdigit() else sum(job.encode())
        out["MASTER_PORT"] = str(20000 + job_id % 20000)
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
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    if cpu and cfg.train.precision == "fp16":
        # accelerate would silently run fp16 in fp32 on CPU.
        raise ConfigError("train.precision: fp16 needs a CUDA device; on CPU use bf16")
    return Accelerator(
        # cpu=True is what makes accelerate build a gloo world from torchrun/srun
        # variables on a machine without GPUs (otherwise: N unconnected processes).
        cpu=cpu,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        # A finite timeout: a rank that died makes the others fail, not hang forever.
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
        ],
        step_scheduler_with_optimizer=False,
    )


def teardown(clean: bool) -> None:
    """Leave the process group: barrier + destroy after success, destroy only after an error.

    After an error the other ranks may be inside a different collective; a barrier
    would pair with it (or wait for the timeout). torchrun stops them anyway.
    """
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------- logging


def resolve_wandb_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """``auto`` -> $WANDB_MODE if set, else online with an API key (env or netrc), else offline."""
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = env.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        path = env.get("NETRC") or str(Path.home() / ".netrc")
        if Path(path).is_file() and netrc.netrc(path).authenticators(host):
            return "online"
    except (netrc.NetrcParseError, OSError):
        pass
    return "offline"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLog:
    """``metrics.jsonl`` (and W&B) on rank 0; no-ops elsewhere."""

    def __init__(self, path: Path, enabled: bool, wandb_run: Any = None) -> None:
        self.path = path
        self.enabled = enabled
        self.wandb_run = wandb_run

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written by a run that died after its checkpoint)
        and the eval rows of ``step`` itself (they are redone).

        A resumed run re-logs those steps; keeping one row per step makes the file
        the run's history, identical to an uninterrupted run's up to timings.
        """
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if not isinstance(row, dict):
                continue
            # An eval row of the resume step is redone too (a finished run re-run).
            last = step if "loss" in row else step - 1
            if row.get("step", math.inf) <= last:
                keep.append(line + "\n")
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")  # one write per row: a kill leaves whole lines
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def init_wandb(cfg: Config, run_id: str | None, output_dir: Path) -> Any:
    """Start (or resume, with ``run_id``) the W&B run on rank 0; None when disabled."""
    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode == "disabled":
        return None
    import wandb

    w = cfg.wandb
    return wandb.init(
        project=w.project,
        entity=w.entity,
        name=w.name or output_dir.resolve().name,
        group=w.group,
        tags=w.tags or None,
        config=to_dict(cfg),
        id=run_id,
        resume="allow" if run_id else None,
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(output_dir),
    )


# -------------------------------------------------------------------------- training


def _embed_fn(model: PairModel, device: torch.device, batch_size: int, autocast: Any) -> Any:
    """``embed(x, view)`` in eval mode, without grad, in batches, returning CPU float32."""

    @torch.no_grad()
    def embed(x: torch.Tensor, view: int) -> torch.Tensor:
        out = []
        for i in range(0, len(x), batch_size):
            with autocast():
                out.append(model.embed(x[i : i + batch_size].to(device), view).float().cpu())
        return torch.cat(out)

    return embed


def _sample(data: ContrastiveData, cfg: Config, step: int, rank: int, micro: int) -> Any:
    """The batch ``(x0, x1, labels)`` of ``(step, rank, micro)``: a pure function of the
    seed and these numbers. ``labels`` is None unless ``loss.supervised``.

    Raises:
        ConfigError: ``loss.supervised`` with a data set that returns no labels.
    """
    g = batch_generator(cfg.seed, step, rank, micro)
    batch = data.sample(g, cfg.train.batch_size)
    x0, x1 = batch[:2]
    labels = None
    if cfg.loss.supervised:
        if len(batch) < 3:
            raise ConfigError(
                f"loss.supervised: data.name={cfg.data.name!r} returns no class labels "
                "(its sample() gives two views only)"
            )
        labels = batch[2]
    if cfg.loss.num_negatives:
        # Explicit negatives: view-1 samples of other items, after the positives.
        negatives = data.sample(g, cfg.loss.num_negatives)[1]
        x1 = torch.cat([x1, negatives])
    return x0, x1, labels


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


def train(cfg: Config, accelerator: Any) -> dict[str, float]:
    """Train, checkpoint, evaluate. Returns the final evaluation (rank 0; {} elsewhere)."""
    from accelerate.utils import broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    problem = ""  # rank 0's verdict on output_dir, shared with every rank below
    if is_main:
        if not cfg.checkpoint.resume and list_checkpoints(ckpt_dir):
            # A fresh run must not mix its checkpoints with an older run's (keep-last-K
            # and a later resume go by step number); move them aside, never delete.
            aside = out / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            ckpt_dir.rename(aside)
            print(f"checkpoint.resume=false: moved old checkpoints to {aside}", file=sys.stderr)
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(to_yaml(cfg))
        except OSError as e:
            problem = f"output_dir: cannot write to {str(out)!r}: {e.strerror}"

    # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
    set_seed(cfg.seed)
    data = build_data(cfg.data, knn_k=cfg.eval.knn_k)
    model = build_model(cfg.model, data.input_shapes)
    learner = Learner(model, build_loss(cfg.loss), cfg.loss.kind)
    if cfg.train.micro_batch_size is not None and cfg.loss.num_negatives:
        _check_encode(model)
    lr = peak_lr(cfg.train, world)
    optimizer = build_optimizer(learner, cfg.train, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))

    # Resume: rank 0 picks the newest readable checkpoint, every rank loads that one.
    found: list[Any] = [None, problem]
    if is_main and not problem:
        found[1] = disk_space_problem(ckpt_dir, learner, cfg.train.optimizer, cfg.checkpoint.keep)
    if cfg.checkpoint.resume and is_main and not found[1]:
        hit = load_latest(ckpt_dir)
        found[0] = str(hit[1]) if hit else None
    broadcast_object_list(found)
    if found[1]:
        raise ConfigError(found[1])  # on every rank, before training
    start_step, wandb_id, state = 0, None, None
    if found[0] is not None:
        state = torch.load(found[0], map_location="cpu", weights_only=True)
        learner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        wandb_id = state["wandb_run_id"] or None
        if is_main:
            print(f"resuming from {found[0]} (step {start_step})", file=sys.stderr, flush=True)

    micro_batch = cfg.train.micro_batch_size
    if micro_batch is None:
        learner, optimizer = accelerator.prepare(learner, optimizer)
        encoder: nn.Module = learner
    else:
        # Gradient caching: DDP wraps the encoders only; the loss module runs once per
        # step outside it (cached_backward averages a learnable temperature's gradient).
        learner.to(accelerator.device)
        encoder, optimizer = accelerator.prepare(learner.model, optimizer)
    device = accelerator.device
    if state is not None:
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:
            # A different world size: the run continues, but not as the old world
            # would have (other ranks, other batches); per-rank RNGs are reseeded.
            if is_main:
                print(
                    f"warning: checkpoint was written by {len(rngs)} process(es), this run has "
                    f"{world}; continuing with fresh per-rank RNG streams",
                    file=sys.stderr,
                    flush=True,
                )
            torch.manual_seed(cfg.seed + 1_000_003 * (start_step + 1) + rank)
    else:
        set_seed(cfg.seed + rank)  # per-rank streams for anything stochastic in the model

    metrics = MetricsLog(out / "metrics.jsonl", is_main)
    metrics.truncate_after(start_step)
    if is_main:
        metrics.wandb_run = init_wandb(cfg, wandb_id, out)
        wandb_id = metrics.wandb_run.id if metrics.wandb_run is not None else None
    unwrapped: Learner = accelerator.unwrap_model(learner)

    samples_per_step = cfg.train.batch_size * world * cfg.train.grad_accum_steps
    bar = tqdm(
        total=cfg.train.steps,
        initial=start_step,
        desc="train",
        disable=not (is_main and cfg.log.progress),
        mininterval=1.0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    t_start = t_last = time.perf_counter()
    last_logged = start_step
    guard = make_guard(
        cfg,
        save=lambda s: _save(
            cfg, accelerator, unwrapped, optimizer, scheduler, s, wandb_id, ckpt_dir
        ),
        device=device,
        check_grads=accelerator.scaler is None,  # fp16's GradScaler handles inf gradients itself
    )
    for step in range(start_step, cfg.train.steps):
        learner.train()
        done = step + 1
        log_now = done % cfg.log.every == 0 or done == 1 or done == cfg.train.steps
        # lr and temperature as used by this step's forward/update (read before it).
        step_lr = optimizer.param_groups[0]["lr"]
        step_temperature = unwrapped.temperature if log_now else math.nan
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for micro in range(cfg.train.grad_accum_steps):
            x0, x1, labels = _sample(data, cfg, step, rank, micro)
            x0, x1, labels = x0.to(device), x1.to(device), _to(labels, device)
            with accelerator.accumulate(encoder):
                if micro_batch is None:
                    loss = inject_fault(learner(x0, x1, labels), step=done, rank=rank)
                    accelerator.backward(loss)
                else:
                    loss = unwrapped.cached_backward(
                        encoder, x0, x1, labels, micro=micro_batch, accelerator=accelerator
                    )
                # One all-reduce per optimizer step: signals and non-finite values, agreed.
                ok = not accelerator.sync_gradients or guard.check(
                    loss, unwrapped.parameters(), done
                )
                if ok and accelerator.sync_gradients and cfg.train.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(
                        unwrapped.parameters(), cfg.train.grad_clip
                    )
                if ok:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        scheduler.step()
        bar.update(1)

        if log_now or not ok:
            # Each rank's loss is its share of the global mean (sum * world / rows),
            # so the mean over ranks is the loss of the whole global batch.
            mean_loss = accelerator.reduce(loss_sum / cfg.train.grad_accum_steps, "mean")
            now = time.perf_counter()
            row: dict[str, Any] = {
                "step": done,
                "loss": float(mean_loss),
                "lr": step_lr,
                "temperature": step_temperature,
                "samples_per_s": (done - last_logged) * samples_per_step / (now - t_last),
                "world_size": world,
                "global_batch": samples_per_step,
                "micro_batch_size": micro_batch or cfg.train.batch_size,
                "peak_mem_mb": peak_memory_mb(device),
                "time_s": now - t_start,
            }
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if not ok:
                row["nonfinite_skipped"] = 1
            metrics.log(row)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}", lr=f"{step_lr:.2e}", sps=f"{row['samples_per_s']:.0f}"
            )
            t_last, last_logged = now, done

        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.train.steps:
            _save(cfg, accelerator, unwrapped, optimizer, scheduler, done, wandb_id, ckpt_dir)
            guard.track_save(done)
        guard.after_step(done)  # after an agreed signal: checkpoint, requeue, raise Preempted
    bar.close()
    guard.flag.restore()

    results: dict[str, float] = {}
    evaluate = getattr(data, "evaluate", None)
    if is_main and cfg.eval.enabled and evaluate is not None:
        unwrapped.eval()
        embed = _embed_fn(unwrapped.model, device, cfg.eval.batch_size, accelerator.autocast)
        t0 = time.perf_counter()
        results = evaluate(embed)
        row = {"step": cfg.train.steps, **results, "eval/time_s": time.perf_counter() - t0}
        row["eval/peak_mem_mb"] = peak_memory_mb(device)
        metrics.log(row)
        print(
            "eval: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()),
            file=sys.stderr,
            flush=True,
        )
    if metrics.wandb_run is not None:
        metrics.wandb_run.summary.update(results)
        metrics.wandb_run.finish()
    # Ranks > 0 wait here while rank 0 evaluates (bounded by dist.timeout_s).
    accelerator.wait_for_everyone()
    return results


def _check_encode(model: PairModel) -> None:
    """Explicit negatives under gradient caching need ``PairModel.encode``."""
    if type(model).encode is PairModel.encode:
        raise ConfigError(
            f"train.micro_batch_size with loss.num_negatives needs {type(model).__name__}"
            ".encode(x, view) (the projection of one view; see PairModel)"
        )


def _save(
    cfg: Config,
    accelerator: Any,
    learner: Learner,
    optimizer: Any,
    scheduler: Any,
    step: int,
    wandb_id: str | None,
    ckpt_dir: Path,
) -> None:
    """Write the checkpoint of ``step`` on rank 0 (every rank's RNG state included)."""
    rng = get_rng_state()
    if dist.is_available() and dist.is_initialized():
        rngs: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    error = ""
    if accelerator.is_main_process:
        state = {
            "step": step,
            "model": learner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": rngs,
            # Batches are a function of (seed, step, rank): the step is the data position.
            "data": {"step": step, "samples_seen": step * cfg.train.batch_size * len(rngs)},
            "wandb_run_id": wandb_id or "",
            "world_size": len(rngs),
            "config": to_dict(cfg),
        }
        try:
            save_atomic(state, checkpoint_path(ckpt_dir, step))
            prune(ckpt_dir, cfg.checkpoint.keep)
        except Exception as e:  # torch.save wraps a failed write (ENOSPC) in a RuntimeError
            cause = e if isinstance(e, OSError) else e.__context__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else e
            newest = list_checkpoints(ckpt_dir)
            error = (
                f"checkpoint of step {step} could not be written to {ckpt_dir} ({reason}); "
                "training stopped. The newest good checkpoint is "
                + (str(newest[-1][1]) if newest else "none")
            )
    # Nobody moves on (or exits) before the checkpoint is on disk, and a failed write
    # stops every rank (rank 0's verdict is broadcast) instead of leaving them waiting.
    verdict = [error]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise CheckpointWriteError(verdict[0])


# ---------------------------------------------------------------------------- entry


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--config PATH`` and ``key=value`` overrides (keys in the epilog)."""
    docs = field_docs()
    width = max(len(k) for k in all_keys())
    keys = "\n".join(f"  {k:<{width}}  {docs[k]}" for k in all_keys())
    parser = argparse.ArgumentParser(
        prog="python -m dist_infonce.train",
        description="Contrastive training (SimCLR / CLIP / InfoNCE) over the global batch.",
        epilog=f"config keys (key=value overrides):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="PATH", help="YAML config (default: the embedded default)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, applied in order"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, set up the processes, train, tear down. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    os.environ.update(slurm_env(os.environ))
    clean = False
    try:
        accelerator = make_accelerator(cfg)
        train(cfg, accelerator)
        clean = True
    except ConfigError as e:
        # A user error found while building (an import path, fp16 on CPU): no traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except StopTraining as e:
        # Every rank agreed to stop here (a signal, a NaN, a failed checkpoint write).
        print(f"{parser.prog}: {e}", file=sys.stderr, flush=True)
        _finish_wandb(e.exit_code)
        clean = True
        return e.exit_code
    except Exception as e:
        # A dead or silent peer: say so in one line (gloo's error names no rank).
        if message := collective_failure_message(e, cfg.dist.timeout_s):
            print(f"{parser.prog}: {message}", file=sys.stderr, flush=True)
        raise
    finally:
        teardown(clean)
    return 0


def _finish_wandb(exit_code: int) -> None:
    """Close the W&B run of this process (if any) so an offline run is complete on disk."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=exit_code)


if __name__ == "__main__":
    sys.exit(main())
