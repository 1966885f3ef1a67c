"""Cluster resilience: preemption -> agreed checkpoint -> requeue; the non-finite policy.

The trainer calls two things from here, once per optimizer step:

- :class:`StepGuard` ``.check(loss, parameters, step)`` after backward and before
  ``optimizer.step()``: one all-reduce (MAX) of a 3-element tensor carries both
  "a stop/requeue signal arrived on some rank" and "the loss or a gradient is not
  finite on some rank", so every rank takes the same decision at the same step.
  It returns whether the optimizer may step (``train.on_nonfinite=skip``), or
  writes the last good checkpoint and raises :class:`NonFiniteError` (``stop``).
- ``.after_step(step)`` at the step boundary: when a signal was agreed, rank 0
  writes one checkpoint, requeues the Slurm job (requeue signal inside Slurm),
  and every rank raises :class:`Preempted`.

:func:`install_fault_hook`, called once at setup, gives the fault tests their faults
(``DIST_INFONCE_TEST_FAULT``) through a forward hook on the model; without the
variable it installs nothing, so the training loop holds no test code.

Signal handlers only set a flag: checkpointing or a collective inside a handler
can deadlock (the signal may interrupt a collective or the allocator). A signal
that arrives twice (Slurm and torchrun's agent both forward it) or on only some
ranks gives the same result, because the ranks agree at the next step boundary.

Exit codes of ``python -m dist_infonce.train`` (see :data:`EXIT_PREEMPTED`,
:data:`EXIT_NONFINITE`, :data:`EXIT_CHECKPOINT_FAILED`): 0 finished; 1 an
unexpected error, or a peer that died or went silent (a one-line message says
which rank saw it); 2 a user error in the config; 75 stopped on a signal after writing a checkpoint (re-run
the same command, or let the requeued Slurm job, continue it); 3 stopped on a
non-finite loss/gradient (``on_nonfinite=stop``); 4 a checkpoint could not be
written (the previous one is intact).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from dist_infonce.dist import get_rank, is_distributed

__all__ = [
    "EXIT_CHECKPOINT_FAILED",
    "EXIT_NONFINITE",
    "EXIT_PREEMPTED",
    "CheckpointWriteError",
    "NonFiniteError",
    "Preempted",
    "SignalFlag",
    "StepGuard",
    "StopTraining",
    "agree_max",
    "collective_failure_message",
    "disk_space_problem",
    "inject_fault",
    "install_fault_hook",
    "make_guard",
    "parse_signal",
    "requeue_slurm_job",
]

#: Stopped on a stop/requeue signal after writing a checkpoint (EX_TEMPFAIL: try again).
EXIT_PREEMPTED = 75
#: Stopped on a non-finite loss or gradient (``train.on_nonfinite=stop``).
EXIT_NONFINITE = 3
#: A checkpoint could not be written; the previous checkpoint is untouched.
EXIT_CHECKPOINT_FAILED = 4

#: Environment variable of the fault hook; for the test suite only (see inject_fault).
FAULT_ENV = "DIST_INFONCE_TEST_FAULT"

# Codes in the agreed tensor's first slot; MAX picks requeue over stop.
_NO_SIGNAL, _STOP, _REQUEUE = 0.0, 1.0, 2.0


class StopTraining(Exception):
    """Training stopped early on purpose; ``main`` exits with :attr:`exit_code`."""

    exit_code = 1


class Preempted(StopTraining):
    """A stop/requeue signal was agreed; the checkpoint of :attr:`step` is written."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteError(StopTraining):
    """A non-finite loss/gradient with ``on_nonfinite=stop``; the last good state is saved."""

    exit_code = EXIT_NONFINITE

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class CheckpointWriteError(StopTraining):
    """Rank 0 could not write a checkpoint; every rank stops (the old one is intact)."""

    exit_code = EXIT_CHECKPOINT_FAILED


def parse_signal(name: str, key: str) -> signal.Signals:
    """``"SIGUSR1"`` / ``"USR1"`` / ``"10"`` -> ``signal.SIGUSR1``.

    Raises:
        ValueError: not a signal of this platform (the message names ``key``).
    """
    text = name.strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"{key}: {name!r} is not a signal name (e.g. SIGUSR1, SIGTERM)") from None


class SignalFlag:
    """Handlers that only record which signal arrived (idempotent; async-signal-safe).

    Args:
        requeue: The signal that asks for checkpoint + requeue (None: none).
        stop: Signals that ask for checkpoint + exit without requeue.

    Attributes:
        received: 0 none, 1 a stop signal, 2 the requeue signal (the largest so far).
        names: The names of the signals received, in order (for the message).
    """

    def __init__(
        self, *, requeue: signal.Signals | None, stop: Sequence[signal.Signals] = ()
    ) -> None:
        self.received = _NO_SIGNAL
        self.names: list[str] = []
        self._codes = {s: _STOP for s in stop}
        if requeue is not None:
            self._codes[requeue] = _REQUEUE
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.received = max(self.received, self._codes[sig])
        self.names.append(sig.name)

    def install(self) -> SignalFlag:
        """Install the handlers (main thread only; elsewhere this does nothing)."""
        if not _main_thread():
            return self
        for sig in self._codes:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back (after the loop: a late SIGTERM ends the process)."""
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def agree_max(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """The element-wise maximum of ``values`` over all ranks (one all-reduce).

    At world size 1, or without an initialised process group, ``values`` itself.
    """
    t = torch.tensor(list(values), dtype=torch.float32, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _local_nonfinite(
    loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], check_grads: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss is not finite, some gradient is not finite) as 0-dim bool tensors, no host sync."""
    bad_loss = ~torch.isfinite(loss.detach()).all()
    grads = [p.grad for p in parameters if p.grad is not None] if check_grads else []
    if not grads:
        return bad_loss, torch.zeros((), dtype=torch.bool, device=bad_loss.device)
    bad_grad = torch.stack([~torch.isfinite(g).all() for g in grads]).any()
    return bad_loss, bad_grad.to(bad_loss.device)


@dataclass
class StepGuard:
    """Step-boundary agreement on signals and non-finite values (see the module doc).

    Args:
        on_nonfinite: ``skip`` (no optimizer step on any rank; logged) or ``stop``.
        flag: Installed signal handlers; their flag is read at every step.
        save: ``save(step)`` writes the checkpoint of ``step`` (a collective: every
            rank calls it; rank 0 writes).
        device: Where the agreement tensor lives (the process group's device).
        check_grads: Also check gradients (off under an fp16 GradScaler, which
            expects and handles inf gradients itself).
        env: The environment (for ``SLURM_JOB_ID``); default ``os.environ``.

    Attributes:
        skipped: Optimizer steps skipped so far (``skip``).
        last_saved: The step of the newest checkpoint this guard knows of.
    """

    on_nonfinite: str
    flag: SignalFlag
    save: Callable[[int], None]
    device: torch.device | str = "cpu"
    check_grads: bool = True
    env: Mapping[str, str] | None = None
    skipped: int = 0
    last_saved: int = -1
    _signal: float = _NO_SIGNAL

    def check(
        self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], step: int
    ) -> bool:
        """Agree across ranks; return whether the optimizer may take step ``step``.

        Call once per optimizer step, after backward (and the gradient all-reduce)
        and before clipping and ``optimizer.step()``. ``step`` is 1-based (the
        number of optimizer steps done once this one is taken).

        Raises:
            NonFiniteError: ``on_nonfinite=stop`` and a non-finite value on some rank;
                the checkpoint of ``step - 1`` (the last good state) is written first.
        """
        bad_loss, bad_grad = _local_nonfinite(loss, parameters, self.check_grads)
        rank = get_rank()
        # Rank + 1 where bad, 0 elsewhere: the MAX names the (highest) bad rank.
        values = torch.stack(
            [
                torch.tensor(self.flag.received, device=bad_loss.device),
                bad_loss.float() * (rank + 1),
                bad_grad.float() * (rank + 1),
            ]
        )
        sig, loss_rank, grad_rank = agree_max(values, device=self.device)
        self._signal = max(self._signal, sig)
        if not (loss_rank or grad_rank):
            return True
        where = (
            f"non-finite loss on rank {int(loss_rank) - 1}"
            if loss_rank
            else f"non-finite gradient (seen on rank {int(grad_rank) - 1})"
        )
        if self.on_nonfinite == "skip":
            self.skipped += 1
            if rank == 0:
                _say(f"step {step}: {where}; optimizer step skipped on every rank")
            return False
        if self.last_saved != step - 1:
            self.save(step - 1)
            self.last_saved = step - 1
        raise NonFiniteError(
            f"step {step}: {where}; stopped (train.on_nonfinite=stop). The last good "
            f"state (step {step - 1}) is in the newest checkpoint",
            step,
        )

    def after_step(self, step: int) -> None:
        """At the step boundary: after an agreed signal, checkpoint, requeue, stop.

        Raises:
            Preempted: always after an agreed signal, once the checkpoint of ``step``
                is written (and the job requeued when asked and possible).
        """
        if self._signal == _NO_SIGNAL:
            return
        if self.last_saved != step:
            self.save(step)
            self.last_saved = step
        env = os.environ if self.env is None else self.env
        is_main = get_rank() == 0
        note = "re-run the same command to resume"
        if self._signal == _REQUEUE and env.get("SLURM_JOB_ID"):
            note = requeue_slurm_job(env["SLURM_JOB_ID"]) if is_main else "rank 0 requeues the job"
            # Nobody exits before the requeue is issued: an early exit would make
            # srun --kill-on-bad-exit end the job before rank 0 requeues it.
            if is_distributed():
                dist.barrier()
        got = ",".join(dict.fromkeys(self.flag.names)) or "a signal on another rank"
        raise Preempted(f"{got}: stopped after step {step}, checkpoint written; {note}", step)

    def track_save(self, step: int) -> None:
        """Record that the loop itself wrote the checkpoint of ``step``."""
        self.last_saved = step


def requeue_slurm_job(job_id: str) -> str:
    """``scontrol requeue JOB_ID``; returns what happened, for the stop message.

    Never raises: the checkpoint is already written, so a failed requeue only
    means the user resubmits by hand, which the message says.
    """
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return (
            f"cannot requeue Slurm job {job_id}: `scontrol` is not on PATH; resubmit the "
            "same command to resume from the checkpoint"
        )
    try:
        proc = subprocess.run(
            [scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (subprocess.SubprocessError, OSError) as e:
        return f"`scontrol requeue {job_id}` failed ({e}); resubmit the same command to resume"
    if proc.returncode != 0:
        return (
            f"`scontrol requeue {job_id}` failed ({proc.stderr.strip() or proc.returncode}); "
            "resubmit the same command to resume"
        )
    return f"Slurm job {job_id} requeued (it resumes from this checkpoint)"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def disk_space_problem(directory: Path, model: torch.nn.Module, optimizer: str, keep: int) -> str:
    """Why checkpoints of ``model`` will not fit in ``directory``, or ``""``.

    A checkpoint holds the model and the optimizer state (adamw: two moments per
    parameter; sgd/lars: one momentum). Less free space than one checkpoint is an
    error (found before training, not at the first save hours later); less than
    ``keep + 1`` checkpoints (the kept ones and the one being written) only warns,
    since older checkpoints may already occupy part of it.
    """
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = model_bytes * (3 if optimizer == "adamw" else 2) + 2**16  # + RNG states, config
    free = shutil.disk_usage(directory).free
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    if free < need:
        return (
            f"output_dir: only {mib(free)} free in {str(directory)!r}; one checkpoint "
            f"needs about {mib(need)} (model + {optimizer} state)"
        )
    if free < need * (keep + 1):
        _say(
            f"warning: {mib(free)} free in {directory}; checkpoint.keep={keep} may need up "
            f"to {mib(need * (keep + 1))}"
        )
    return ""


def collective_failure_message(error: BaseException, timeout_s: float) -> str:
    """A one-line explanation when ``error`` came out of a torch.distributed call, else ``""``.

    gloo reports a dead peer as "Connection reset/closed by peer" with an address,
    and a silent one as a timeout; neither names a rank, so the message says what
    the user needs: which rank this is, that another one is gone, and the bound.
    """
    frames = traceback.extract_tb(error.__traceback__)
    dist_error = getattr(dist, "DistError", ())
    if not (
        isinstance(error, dist_error) or any("torch/distributed" in f.filename for f in frames)
    ):
        return ""
    rank = get_rank()
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    kind = (
        "timed out" if "timed out" in first.lower() or "timeout" in first.lower() else "lost a peer"
    )
    return (
        f"error: rank {rank}: a collective {kind}: another rank died, was killed or did not "
        f"answer within dist.timeout_s={timeout_s:g} s; this rank stops too ({first})"
    )


# ----------------------------------------------------------------------- test hook


@functools.cache
def _faults(spec: str) -> tuple[tuple[str, int, int | None], ...]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if (
            kind not in ("nan", "kill", "stop")
            or not step.isdigit()
            or (rank and not rank.isdigit())
        ):
            raise ValueError(
                f"{FAULT_ENV}: expected items like nan@STEP[:RANK], kill@STEP[:RANK] or stop@STEP[:RANK], got {item!r}"
            )
        out.append((kind, int(step), int(rank) if rank else None))
    return tuple(out)


def inject_fault(
    loss: torch.Tensor, *, step: int, rank: int, spec: str | None = None
) -> torch.Tensor:
    """FOR TESTS ONLY: the fault ``DIST_INFONCE_TEST_FAULT`` asks for at ``step`` on ``rank``.

    Items (comma-separated): ``nan@STEP[:RANK]`` turns this rank's loss (and so its
    gradients) into NaN at 1-based optimizer step STEP; ``kill@STEP[:RANK]``
    SIGKILLs this process there, after the forward pass and before the backward
    (mid-step: the other ranks are inside a collective or about to enter one),
    ``stop@STEP[:RANK]`` SIGSTOPs it there (a hung rank: alive, silent),
    only in a first attempt (``TORCHELASTIC_RESTART_COUNT`` and
    ``SLURM_RESTART_COUNT`` unset or 0), so a restarted group runs through. No
    RANK means every rank. Unset (always, outside the tests): returns ``loss``.
    ``spec`` replaces the variable's value when given.
    """
    spec = os.environ.get(FAULT_ENV) if spec is None else spec
    if not spec:
        return loss
    for kind, at, only in _faults(spec):
        if at != step or (only is not None and only != rank):
            continue
        if kind == "nan":
            loss = loss * float("nan")
        elif kind == "stop":
            _say(f"{FAULT_ENV}: SIGSTOP rank {rank} at step {step}")
            os.kill(os.getpid(), signal.SIGSTOP)  # hangs here until SIGCONT/SIGKILL
        elif all(
            os.environ.get(v, "0") == "0"
            for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
        ):
            _say(f"{FAULT_ENV}: SIGKILL rank {rank} at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
    return loss


def install_fault_hook(
    module: nn.Module, *, step: Callable[[], int], rank: int, env: Mapping[str, str] | None = None
) -> RemovableHandle | None:
    """FOR TESTS ONLY: the faults of ``DIST_INFONCE_TEST_FAULT`` as a forward hook on ``module``.

    The hook passes the module's output (the loss) through :func:`inject_fault` at
    the 1-based optimizer step ``step()`` returns. Unset variable (always, outside
    the tests): nothing is installed and None is returned.

    Raises:
        ValueError: the variable is set but malformed (found here, at setup).
    """
    spec = (os.environ if env is None else env).get(FAULT_ENV)
    if not spec:
        return None
    _faults(spec)  # a typo in a test's fault spec fails before training, not at its step

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return inject_fault(output, step=step(), rank=rank, spec=spec)

    return module.register_forward_hook(hook)


def make_guard(
    cfg: Any, *, save: Callable[[int], None], device: torch.device | str, check_grads: bool
) -> StepGuard:
    """The trainer's :class:`StepGuard` for ``cfg`` (a :class:`~dist_infonce.trainer.config.Config`),
    with its signal handlers installed (``dist.requeue_signal``, ``dist.stop_signals``).
    """
    requeue = cfg.dist.requeue_signal
    flag = SignalFlag(
        requeue=parse_signal(requeue, "dist.requeue_signal") if requeue else None,
        stop=[parse_signal(s, "dist.stop_signals") for s in cfg.dist.stop_signals],
    )
    return StepGuard(
        on_nonfinite=cfg.train.on_nonfinite,
        flag=flag.install(),
        save=save,
        device=device,
        check_grads=check_grads,
    )
