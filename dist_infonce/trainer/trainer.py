"""The :class:`Trainer`: one contrastive training run, from setup to a clean exit.

    trainer = Trainer(cfg)
    try:
        trainer.setup()      # processes, data, model, optimizer; resume from output_dir
        trainer.fit()        # the loop, then the final evaluation
    finally:
        trainer.close()      # release DDP state, then leave the process group

:mod:`dist_infonce.train` does exactly this (with the exit codes). The loop is
:meth:`Trainer.fit`; one optimizer step is :meth:`Trainer.train_step`. The pieces:
:mod:`~dist_infonce.trainer.config` (the keys), :mod:`~dist_infonce.trainer.data` and
:mod:`~dist_infonce.trainer.models` (built-in tasks, user ``module:callable``),
:mod:`~dist_infonce.trainer.learner` (model + loss), :mod:`~dist_infonce.trainer.optim`,
:mod:`~dist_infonce.trainer.checkpoint` (files), :mod:`~dist_infonce.trainer.resilience`
(signals -> checkpoint -> requeue; non-finite steps), :mod:`~dist_infonce.trainer.metrics`
(metrics.jsonl, W&B), :mod:`~dist_infonce.trainer.launch` (processes).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_infonce.dist import get_world_size, is_distributed
from dist_infonce.memory import peak_memory_mb
from dist_infonce.trainer.checkpoint import (
    checkpoint_path,
    get_rng_state,
    list_checkpoints,
    load_latest,
    prune,
    save_atomic,
    set_rng_state,
)
from dist_infonce.trainer.config import Config, ConfigError, to_dict, to_yaml
from dist_infonce.trainer.data import build_data
from dist_infonce.trainer.evaluation import embed_fn
from dist_infonce.trainer.fsdp import (
    broadcast_buffers,
    clip_grad_norm_,
    local_grads,
    shard_model,
    unsharded_copy,
)
from dist_infonce.trainer.heldout import build_evaluation
from dist_infonce.trainer.launch import make_accelerator, teardown
from dist_infonce.trainer.learner import Learner, build_learner, check_kernel
from dist_infonce.trainer.loader import (
    BadSampleError,
    Batch,
    Stream,
    build_stream,
    record_batches,
    steps_for_epochs,
)
from dist_infonce.trainer.metrics import MetricsLog, init_wandb
from dist_infonce.trainer.models import build_model
from dist_infonce.trainer.optim import build_optimizer, lr_factor, peak_lr
from dist_infonce.trainer.resilience import (
    CheckpointWriteError,
    StepGuard,
    agree_max,
    disk_space_problem,
    install_fault_hook,
    make_guard,
)
from dist_infonce.trainer.sharded_checkpoint import (
    list_sharded,
    load_sharded,
    newest_sharded,
    save_sharded,
)
from dist_infonce.trainer.views import to_device

__all__ = ["StepResult", "Trainer"]


@dataclass
class StepResult:
    """What one optimizer step leaves for the log.

    Attributes:
        step: optimizer steps done, this one included (1-based).
        loss: this rank's loss, averaged over the micro-steps; detached, 0-dim.
        lr: the learning rate this step's update used.
        temperature: the temperature this step's forward used (NaN when not logged:
            reading it costs a host sync).
        grad_norm: the global gradient norm before clipping (None without clipping).
        ok: False when a non-finite value made every rank skip the update.
        epoch: the epoch of the step's (last) batch; None for data without epochs.
    """

    step: int
    loss: torch.Tensor
    lr: float
    temperature: float
    grad_norm: torch.Tensor | None
    ok: bool
    epoch: int | None = None


class Trainer:
    """One training run of ``cfg``, under any launcher (python, torchrun, accelerate, srun).

    Every method but :meth:`close` is collective: every rank calls it, in the same
    order. After :meth:`setup`: ``learner`` is what the loop calls (DDP-wrapped under
    several processes), ``unwrapped`` the plain :class:`Learner`, ``encoder`` what
    gradient accumulation wraps (the learner, or its model under gradient caching),
    ``step`` the optimizer steps done (the resume point).

    Args:
        cfg: the resolved config (:func:`~dist_infonce.trainer.config.load_config`).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.step = 0
        self.wandb_id: str | None = None
        # dist.strategy=fsdp: the encoders fully_shard-ed (dist_infonce.trainer.fsdp).
        self.sharded = cfg.dist.strategy == "fsdp"
        # The process's place in the world, known once setup() has started it.
        self.rank, self.world, self.is_main = 0, 1, True
        self.device = torch.device("cpu")
        # Set by setup(), dropped by close() (None outside that span).
        self.accelerator: Any = None  # accelerate.Accelerator, imported only when used
        self.data: Any = None  # ContrastiveData, or a map-style / shard source (loader.py)
        self.evaluation: Any = None  # evaluate(embed) -> metrics (heldout.py), or None
        self.batches: Stream | None = None  # where every rank's batches come from (loader.py)
        self.learner: nn.Module | None = None
        self.unwrapped: Learner | None = None
        self.encoder: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.metrics: MetricsLog | None = None
        self.guard: StepGuard | None = None
        self._fault_hook: Any = None
        self._closed = False

    # ------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Start the processes, build data, model, loss and optimizer, and resume.

        Raises:
            ConfigError: on every rank, for a user error found while building (an
                output_dir that cannot be written or holds too little space for a
                checkpoint, a data set, model or loss that cannot be built).
        """
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.accelerator = make_accelerator(cfg)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        problem = self._prepare_output_dir() if self.is_main else ""

        set_seed(cfg.seed)  # the same initial weights on every rank
        self.data = build_data(cfg.data, knn_k=cfg.eval.knn_k, model=cfg.model)
        # The data's own evaluation, and the held-out one of eval.path (read and checked
        # here, on every rank: a problem with it stops the run before training).
        self.evaluation = build_evaluation(cfg, self.data)
        self.batches = record_batches(
            build_stream(self.data, cfg, rank=self.rank, world=self.world, device=self.device),
            self.rank,
        )
        learner = build_learner(cfg, self.data)
        check_kernel(cfg.loss, self.device)
        if self.sharded:  # before the optimizer: it must see the sharded parameters
            learner.to(self.device)
            shard_model(
                learner.model,
                device=self.device,
                reshard_after_forward=cfg.dist.fsdp_reshard_after_forward,
                precision=cfg.train.precision,
            )
        optimizer = build_optimizer(learner, cfg.train, peak_lr(cfg.train, self.world))
        # self.cfg, not cfg: with train.epochs the step count is known only after resume.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.cfg.train)
        )
        if self.is_main and not problem:
            problem = disk_space_problem(
                self.ckpt_dir, learner, cfg.train.optimizer, cfg.checkpoint.keep
            )
        self._raise_everywhere(problem)
        self._prepare(learner, optimizer)
        self.resume()
        if cfg.train.epochs is not None:
            # train.epochs replaces train.steps: the steps those epochs hold from here.
            steps = steps_for_epochs(
                self.batches, cfg.train.epochs, self.step, cfg.train.grad_accum_steps
            )
            self.cfg = cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, steps=steps)
            )

        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.is_main)
        self.metrics.truncate_after(self.step)
        if self.is_main:
            self.metrics.wandb_run = init_wandb(cfg, self.wandb_id, self.out)
            self.wandb_id = self.metrics.wandb_run.id if self.metrics.wandb_run else None
        self.guard = make_guard(
            cfg,
            save=self.save,
            device=self.device,
            check_grads=self.accelerator.scaler is None,  # fp16's GradScaler handles inf itself
        )
        self._fault_hook = install_fault_hook(
            self.unwrapped, step=lambda: self.step + 1, rank=self.rank
        )

    def _prepare_output_dir(self) -> str:
        """Rank 0: set output_dir up and write config.yaml; what is wrong with it, or ``""``."""
        old = list_checkpoints(self.ckpt_dir) or list_sharded(self.ckpt_dir)
        if not self.cfg.checkpoint.resume and old:
            # A fresh run must not mix its checkpoints with an older run's (keep-last-K
            # and a later resume go by step number); move them aside, never delete.
            aside = self.out / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            self.ckpt_dir.rename(aside)
            print(f"checkpoint.resume=false: moved old checkpoints to {aside}", file=sys.stderr)
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
        except OSError as e:
            return f"output_dir: cannot write to {str(self.out)!r}: {e.strerror}"
        return ""

    def _raise_everywhere(self, problem: str) -> None:
        """Rank 0's verdict, on every rank: a ConfigError before training, or nothing."""
        from accelerate.utils import broadcast_object_list

        verdict = broadcast_object_list([problem])
        if verdict[0]:
            raise ConfigError(verdict[0])

    def _prepare(self, learner: Learner, optimizer: torch.optim.Optimizer) -> None:
        """Place and wrap (DDP) the model and the optimizer through accelerate."""
        if self.sharded:
            # Sharded in setup(); accelerate wraps only the optimizer. The loss module
            # stays outside FSDP and averages its learnable temperature itself.
            self.optimizer = self.accelerator.prepare(optimizer)
            self.learner, self.encoder = learner, learner.model
        elif self.cfg.train.micro_batch_size is None:
            self.learner, self.optimizer = self.accelerator.prepare(learner, optimizer)
            self.encoder = self.learner
        else:
            # Gradient caching: DDP wraps the encoders only; the loss module runs once per
            # step outside it (beside DDP it averages its learnable temperature's gradient itself).
            learner.to(self.device)
            self.encoder, self.optimizer = self.accelerator.prepare(
                learner.cache_tower(), optimizer
            )
            self.learner = learner
        self.unwrapped = self.accelerator.unwrap_model(self.learner)

    # ------------------------------------------------------------------------- loop

    def fit(self) -> dict[str, float]:
        """Train up to ``train.steps``, then evaluate. Returns the evaluation (rank 0; {}
        elsewhere).

        Raises:
            StopTraining: every rank agreed to stop (a signal: :class:`Preempted`; a
                non-finite step: :class:`NonFiniteError`; a failed checkpoint write).
        """
        self._require_setup()
        cfg, guard = self.cfg, self.guard
        bar = self._progress_bar()
        self._t_start = self._t_last = time.perf_counter()
        self._last_logged = self.step
        while self.step < cfg.train.steps:
            result = self.train_step()
            bar.update(1)
            if self._log_due(result.step) or not result.ok:
                row = self.log(result)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.2e}",
                    sps=f"{row['samples_per_s']:.0f}",
                )
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or (
                self.step == cfg.train.steps
            ):
                self.save()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                self.evaluate()  # the last step's evaluation follows the loop
                self.accelerator.wait_for_everyone()
            guard.after_step(self.step)  # after an agreed signal: checkpoint, requeue, raise
        bar.close()
        guard.flag.restore()  # past the loop a signal ends the process as usual
        results = self.evaluate()
        # Ranks > 0 wait here while rank 0 evaluates (bounded by dist.timeout_s).
        self.accelerator.wait_for_everyone()
        return results

    def train_step(self) -> StepResult:
        """One optimizer step: ``train.grad_accum_steps`` forward/backward micro-steps,
        the agreed non-finite/signal check, clipping, the update, the schedule."""
        self._require_setup()
        cfg, acc, guard = self.cfg, self.accelerator, self.guard
        learner, unwrapped = self.learner, self.unwrapped
        done = self.step + 1
        learner.train()
        # lr and temperature as this step's update and forward use them (read before).
        lr = self.optimizer.param_groups[0]["lr"]
        temperature = unwrapped.temperature if self._log_due(done) else math.nan
        loss_sum = torch.zeros((), device=self.device)
        grad_norm, ok = None, True
        if self.sharded:  # DDP sends rank 0's buffers at a step's first forward; so here
            broadcast_buffers(unwrapped)
        for micro in range(cfg.train.grad_accum_steps):
            batch = self._next_batch(done)
            x0 = to_device(batch.x0, self.device, non_blocking=True)
            x1 = to_device(batch.x1, self.device, non_blocking=True)
            labels = batch.labels
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
            if self.sharded:  # accelerate's no_sync does not reach FSDP2 modules here
                self.encoder.set_requires_gradient_sync(micro == cfg.train.grad_accum_steps - 1)
            with acc.accumulate(self.encoder):
                if cfg.train.micro_batch_size is None:
                    loss = learner(x0, x1, labels)
                    acc.backward(loss)
                else:
                    loss = unwrapped.cached_backward(
                        self.encoder,
                        x0,
                        x1,
                        labels,
                        micro=cfg.train.micro_batch_size,
                        accelerator=acc,
                    )
                # One all-reduce per optimizer step: signals and non-finite values, agreed.
                # Under FSDP each rank checks its own shards; the ranks agree anyway.
                held = (
                    local_grads(unwrapped.parameters()) if self.sharded else unwrapped.parameters()
                )
                ok = not acc.sync_gradients or guard.check(loss, held, done)
                if ok and acc.sync_gradients and cfg.train.grad_clip > 0:
                    clip = clip_grad_norm_ if self.sharded else acc.clip_grad_norm_
                    grad_norm = clip(unwrapped.parameters(), cfg.train.grad_clip)
                if ok:
                    self.optimizer.step()
                if acc.sync_gradients:  # MoCo: EMA update and queue push, once per step
                    unwrapped.end_step(taken=ok)
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        self.scheduler.step()
        self.step = done
        self.batches.commit()  # the loader position a checkpoint of this step stores
        return StepResult(
            done,
            loss_sum / cfg.train.grad_accum_steps,
            lr,
            temperature,
            grad_norm,
            ok,
            batch.epoch,
        )

    def _next_batch(self, step: int) -> Batch:
        """The next batch of this rank; a bad sample is agreed on by every rank first.

        With a source that can meet unreadable samples mid-epoch, one all-reduce per batch
        tells every rank whether some rank's batch stopped on one
        (``data.on_bad_sample=stop``): then every rank writes the last good step's
        checkpoint and raises, instead of one rank raising while the others wait in the
        step's collectives. Skipped samples are named on stderr and counted.

        Raises:
            BadSampleError: on every rank, naming the sample (broadcast from its rank).
        """
        batch = self.batches.next()
        if not self.batches.may_fail:
            return batch
        for name in batch.skipped:
            print(f"rank {self.rank}: skipped a bad sample: {name}", file=sys.stderr, flush=True)
        bad = agree_max([float(self.rank + 1) if batch.error else 0.0], device=self.device)[0]
        if not bad:
            return batch
        message = [batch.error]
        if is_distributed():
            torch.distributed.broadcast_object_list(message, src=int(bad) - 1)
        if self.guard.last_saved != self.step:
            self.save()
        raise BadSampleError(
            f"step {step}: {message[0]}; stopped (data.on_bad_sample=stop). The state after "
            f"step {self.step} is in the newest checkpoint: fix or remove the sample, or set "
            "data.on_bad_sample=skip, and re-run the same command to resume",
            step,
        )

    def log(self, result: StepResult) -> dict[str, Any]:
        """Log the metrics row of ``result`` (rank 0 writes it; a collective). Returns it."""
        # Each rank's loss is its share of the global mean (sum * world / rows), so the
        # mean over ranks is the loss of the whole global batch.
        mean_loss = self.accelerator.reduce(result.loss, "mean")
        now = time.perf_counter()
        t = self.cfg.train
        samples_per_step = t.batch_size * self.world * t.grad_accum_steps
        row: dict[str, Any] = {
            "step": result.step,
            "loss": float(mean_loss),
            "lr": result.lr,
            "temperature": result.temperature,
            "samples_per_s": (result.step - self._last_logged)
            * samples_per_step
            / (now - self._t_last),
            "world_size": self.world,
            "global_batch": samples_per_step,
            "micro_batch_size": t.micro_batch_size or t.batch_size,
            "peak_mem_mb": peak_memory_mb(self.device),
            "time_s": now - self._t_start,
        }
        if result.epoch is not None:
            row["epoch"] = result.epoch
        if self.batches.may_fail:
            # Every rank's count, summed (a collective: every rank logs the same steps).
            skipped = torch.tensor(float(self.batches.skipped), device=self.device)
            row["bad_samples_skipped"] = int(self.accelerator.reduce(skipped, "sum"))
        if result.grad_norm is not None:
            row["grad_norm"] = float(result.grad_norm)
        row.update(self.unwrapped.log_values())
        if not result.ok:
            row["nonfinite_skipped"] = 1
        self.metrics.log(row)
        self._t_last, self._last_logged = now, result.step
        return row

    def evaluate(self) -> dict[str, float]:
        """The evaluation of the frozen features on rank 0 (``eval.enabled``): the data
        set's own, and the held-out one of ``eval.path`` (:mod:`~dist_infonce.trainer.heldout`);
        logged as one ``eval/*`` row of the current step and put in the W&B summary. {}
        elsewhere. The model is left in eval mode (the next training step sets train)."""
        evaluate = self.evaluation
        if not (self.cfg.eval.enabled and evaluate is not None):
            return {}
        model: nn.Module | None = self.unwrapped.model
        if self.sharded:  # rank 0 evaluates alone: a plain copy, gathered by every rank
            data, cfg = self.data, self.cfg.model
            model = unsharded_copy(model, lambda: build_model(cfg, data.input_shapes))
        if not self.is_main:
            return {}
        assert model is not None
        metrics = self.metrics
        model.to(self.device).eval()
        embed = embed_fn(model, self.device, self.cfg.eval.batch_size, self.accelerator.autocast)
        t0 = time.perf_counter()
        results: dict[str, float] = evaluate(embed)
        metrics.log(
            {
                "step": self.step,
                **results,
                "eval/time_s": time.perf_counter() - t0,
                "eval/peak_mem_mb": peak_memory_mb(self.device),
            }
        )
        print(
            "eval: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()),
            file=sys.stderr,
            flush=True,
        )
        metrics.summary(results)
        return results

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int | None = None) -> None:
        """Write the checkpoint of ``step`` (default: the steps done) on rank 0 (under
        FSDP: every rank its shards, :mod:`~dist_infonce.trainer.sharded_checkpoint`).

        Every rank's RNG state goes in; nobody moves on before the file is on disk.

        Raises:
            CheckpointWriteError: on every rank, when rank 0 could not write it.
        """
        step = self.step if step is None else step
        # Every rank's RNG state and loader position, in one gather.
        mine = (get_rng_state(), self.batches.state_dict())
        if is_distributed():
            everyone: list[Any] = [None] * get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        rngs, streams = [r for r, _ in everyone], [s for _, s in everyone]
        error = ""
        if self.sharded:
            broadcast_buffers(self.unwrapped)  # the checkpoint keeps one copy: rank 0's
            error = save_sharded(
                self.ckpt_dir,
                step,
                self.unwrapped,
                self.optimizer,
                self._trainer_state(step, rngs, streams) if self.is_main else None,
                self.cfg.checkpoint.keep,
            )
            if error:
                error = f"checkpoint of step {step} could not be written to {self.ckpt_dir} ({error}); training stopped"
        elif self.is_main:
            state = {
                "model": self.unwrapped.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                **self._trainer_state(step, rngs, streams),
            }
            error = self._write(state, step)
        # A failed write stops every rank (rank 0's verdict is broadcast) instead of
        # leaving them waiting; the broadcast also keeps everyone until the file is written.
        verdict = [error]
        if is_distributed():
            torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise CheckpointWriteError(verdict[0])
        if self.guard is not None:
            self.guard.track_save(step)

    def _trainer_state(
        self, step: int, rngs: list[Any], streams: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """What a checkpoint holds besides the model and the optimizer."""
        acc = self.accelerator
        return {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "rng": rngs,
            # Where each rank's loader stands (loader.py: epoch, position, rows by rank).
            "data": {
                "step": step,
                "samples_seen": step * self.cfg.train.batch_size * len(rngs),
                "streams": streams,
            },
            "wandb_run_id": self.wandb_id or "",
            "world_size": len(rngs),
            "config": to_dict(self.cfg),
            # What the views hold: python -m dist_infonce.export rebuilds the model from
            # the config and these, without reading the data.
            "inputs": {
                "shapes": [list(s) for s in self.data.input_shapes],
                "kinds": list(getattr(self.data, "input_kinds", None) or []),
            },
        }

    def _write(self, state: dict[str, Any], step: int) -> str:
        """Rank 0: the file of ``step`` and keep-last-K; what went wrong, or ``""``."""
        try:
            save_atomic(state, checkpoint_path(self.ckpt_dir, step))
            prune(self.ckpt_dir, self.cfg.checkpoint.keep)
        except Exception as e:  # torch.save wraps a failed write (ENOSPC) in a RuntimeError
            cause = e if isinstance(e, OSError) else e.__context__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else e
            newest = list_checkpoints(self.ckpt_dir)
            return (
                f"checkpoint of step {step} could not be written to {self.ckpt_dir} ({reason}); "
                "training stopped. The newest good checkpoint is "
                + (str(newest[-1][1]) if newest else "none")
            )
        return ""

    def resume(self) -> bool:
        """Continue from the newest readable checkpoint in output_dir (``checkpoint.resume``).

        Rank 0 picks the file, every rank loads that one: weights, optimizer, schedule,
        scaler, this rank's RNG state, the step and the W&B run id. Without one, every
        rank gets its own RNG stream. Returns whether a checkpoint was loaded.

        Under FSDP the checkpoint is a sharded directory, read by every rank for its
        shards, from a run of any world size; the checkpoints of the other strategy
        are refused (a ConfigError on every rank, naming ``dist.strategy``).
        """
        from accelerate.utils import broadcast_object_list, set_seed

        found: list[str | None] = [None, None]
        if self.cfg.checkpoint.resume and self.is_main:
            if self.sharded:
                hit = newest_sharded(self.ckpt_dir)
                found[0] = str(hit) if hit else None
            else:
                latest = load_latest(self.ckpt_dir)
                found[0] = str(latest[1]) if latest else None
            found[1] = self._other_strategy(found[0])
        broadcast_object_list(found)
        if found[1]:
            raise ConfigError(found[1])
        if found[0] is None:
            set_seed(self.cfg.seed + self.rank)  # per-rank streams for anything stochastic
            self.batches.resume(None, step=0)
            return False
        if self.sharded:
            state = load_sharded(Path(found[0]), self.unwrapped, self.optimizer)
        else:
            state = torch.load(found[0], map_location="cpu", weights_only=True)
            self.unwrapped.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.wandb_id = state["wandb_run_id"] or None
        if self.is_main:
            print(f"resuming from {found[0]} (step {self.step})", file=sys.stderr, flush=True)
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        streams = state.get("data", {}).get("streams")
        # Ranks move in lockstep: any rank's position is the world's (rank 0's for a new world).
        stream = None if not streams else streams[self.rank if len(streams) == self.world else 0]
        warning = self.batches.resume(stream, step=self.step)
        if warning and self.is_main:
            print(f"warning: resume: {warning}", file=sys.stderr, flush=True)
        rngs = state["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:
            # A different world size: the run continues, but not as the old world
            # would have (other ranks, other batches); per-rank RNGs are reseeded.
            if self.is_main:
                print(
                    f"warning: checkpoint was written by {len(rngs)} process(es), this run has "
                    f"{self.world}; continuing with fresh per-rank RNG streams",
                    file=sys.stderr,
                    flush=True,
                )
            torch.manual_seed(self.cfg.seed + 1_000_003 * (self.step + 1) + self.rank)
        return True

    def _other_strategy(self, found: str | None) -> str:
        """Rank 0: why the run cannot resume (only the other strategy's checkpoints in
        output_dir), or ``""``."""
        if found is not None:
            return ""
        if self.sharded and list_checkpoints(self.ckpt_dir):
            have, kind = "ddp", "step_*.pt files"
        elif not self.sharded and list_sharded(self.ckpt_dir):
            have, kind = "fsdp", "sharded step_*.dcp directories"
        else:
            return ""
        return (
            f"dist.strategy={self.cfg.dist.strategy}: {self.ckpt_dir} holds checkpoints of "
            f"dist.strategy={have} ({kind}), which this strategy does not read; resume with "
            f"dist.strategy={have}, or start afresh with checkpoint.resume=false"
        )

    # ------------------------------------------------------------------------ close

    def close(self, *, clean: bool = True, exit_code: int = 0) -> None:
        """Release the run, then leave the process group. Idempotent; fine after a failed
        :meth:`setup`.

        DDP + gloo abort at interpreter exit ("terminate called without an active
        exception", SIGABRT, and torchrun reports a failed run) unless the DDP-wrapped
        model, the optimizer and everything holding their autograd graph are gone
        before the process group is destroyed (RECIPES.md, "gloo aborts at exit"). So,
        in this order: the signal handlers and the fault hook go, W&B closes,
        accelerate lets go of what it prepared, this object drops its references, the
        garbage collector runs (DDP's reducer sits in reference cycles), and only then
        ``barrier`` (``clean``) and ``destroy_process_group``.

        Args:
            clean: every rank got here on purpose (finished, or an agreed stop): a
                barrier first. False after an error, when a peer may be gone.
            exit_code: what the W&B run is closed with.
        """
        if self._closed:
            return
        self._closed = True
        if self.guard is not None:
            self.guard.flag.restore()
        if self._fault_hook is not None:
            self._fault_hook.remove()
        if self.metrics is not None:
            self.metrics.finish(exit_code)
        if self.batches is not None:
            self.batches.close()  # DataLoader workers exit before the process group goes
        if self.accelerator is not None:
            self.accelerator.free_memory()
        self.learner = self.unwrapped = self.encoder = self.batches = None
        self.optimizer = self.scheduler = self.guard = self.data = self.evaluation = None
        self.metrics = self._fault_hook = self.accelerator = None
        gc.collect()
        teardown(clean)

    # ---------------------------------------------------------------------- helpers

    def _log_due(self, step: int) -> bool:
        every, last = self.cfg.log.every, self.cfg.train.steps
        return step % every == 0 or step == 1 or step == last

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=self.cfg.train.steps,
            initial=self.step,
            desc="train",
            disable=not (self.is_main and self.cfg.log.progress),
            mininterval=1.0,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def _require_setup(self) -> None:
        if self.guard is None:
            raise RuntimeError("Trainer.setup() has not run (or close() already has)")
