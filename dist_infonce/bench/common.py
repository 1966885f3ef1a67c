"""Helpers every benchmark mode shares: list parsers, the worker runner, the machine
probe, the peers, and table / plot / output helpers.

Nothing here imports a mode; every mode imports this module only (no cycles).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import dist_infonce

__all__ = [
    "DTYPES",
    "Timer",
    "csv_choices",
    "csv_ints",
    "emit_result",
    "finish_worker",
    "fmt",
    "load_avg",
    "load_open_clip_loss",
    "log_log_axes",
    "machine_probe",
    "measure_matmul_rate",
    "peer_missing",
    "pyplot",
    "run_worker",
    "save_figure",
    "start_worker",
    "sync",
    "write_json",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Rows of the matmul-rate probe: (RATE_EDGE x D) @ (D x RATE_EDGE). On CUDA a
#: 4096-edge product is too short to time well; 16384 fills an H100.
RATE_EDGE = 4096
RATE_EDGE_CUDA = 16384
#: A worker prints its result on one stdout line after this mark; anything else it
#: prints (warnings, a library's banner) is ignored.
RESULT_MARK = "BENCH_RESULT "


# ---------------------------------------------------------------------- parsers


def csv_ints(text: str) -> list[int]:
    """``"256,1024"`` -> ``[256, 1024]``; an argparse ``type`` (positive integers only).

    Raises:
        argparse.ArgumentTypeError: not a comma-separated list of positive integers.
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` accepting a comma-separated, non-empty subset of ``choices``."""

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(choices)}; got {text!r}"
            )
        return values

    return parse


# ----------------------------------------------------------------- worker runner


def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result where :func:`finish_worker` finds it."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def start_worker(
    mode: Sequence[str], request: dict[str, Any], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m dist_infonce.bench MODE... --_worker REQUEST`` in a fresh interpreter.

    Args:
        mode: The mode's words before the options (``[]`` for the loss sweep).
        request: What the worker measures, as JSON.
        env: The child's environment (default: this process's).
    """
    env = dict(os.environ if env is None else env)
    # The worker imports the dist_infonce this process runs, also when the
    # benchmark is started from another directory without an install.
    root = str(Path(dist_infonce.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "dist_infonce.bench", *mode, "--_worker", json.dumps(request)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_worker(proc: subprocess.Popen[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Wait for a worker; returns ``(result, "")`` or ``(None, why it failed)``.

    A worker still running after ``timeout`` seconds is killed.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, f"timeout after {timeout:.0f} s"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return None, f"killed by {name}{hint}"
    if proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no stderr"
        return None, f"exit {proc.returncode}: {last[:300]}"
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :]), ""
    return None, "worker printed no result"


def run_worker(
    mode: Sequence[str], request: dict[str, Any], timeout: float
) -> tuple[dict[str, Any] | None, str]:
    """:func:`start_worker` then :func:`finish_worker`: one request, one fresh process."""
    return finish_worker(start_worker(mode, request), timeout)


# ----------------------------------------------------------------- machine probe


def sync(device: str) -> None:
    """Wait for queued CUDA work (timings must not end before the work does)."""
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Seconds of the enclosed work: CUDA events on CUDA, ``perf_counter`` on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = math.nan

    def __enter__(self) -> Timer:
        sync(self.device)
        if self.device == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def measure_matmul_rate(dim: int, dtype: str, device: str, runs: int = 10) -> float:
    """Best GFLOP/s of ``(E x dim) @ (dim x E)`` over ``runs`` runs (E: RATE_EDGE[_CUDA])."""
    edge = RATE_EDGE_CUDA if device == "cuda" else RATE_EDGE
    gen = torch.Generator().manual_seed(0)
    # Random data: tensor cores run faster on zeros than on real numbers.
    a = torch.randn(edge, dim, generator=gen).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(dim, edge, generator=gen).to(device=device, dtype=DTYPES[dtype])
    out = a @ b
    best = math.inf
    for _ in range(runs):
        with Timer(device) as timer:
            torch.matmul(a, b, out=out)
        best = min(best, timer.seconds)
    return 2.0 * edge * edge * dim / best / 1e9


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_probe(dims: Sequence[int], dtype: str, device: str) -> dict[str, Any]:
    """Matmul rate per D (``matmul_gflops``, keyed by ``str(D)``) and facts about the device."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "matmul_gflops": {str(d): measure_matmul_rate(d, dtype, device) for d in dims},
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["device_name"] = props.name
        info["device_mem_gib"] = props.total_memory / 2**30
    else:
        info["device_name"] = _cpu_name()
    return info


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages (other jobs distort timings); [] where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------------------- peers


def _open_clip_loss_path() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "loss.py"


def load_open_clip_loss(name: str = "ClipLoss") -> type[torch.nn.Module]:
    """OpenCLIP's ``ClipLoss`` (or another class of its loss module, e.g.
    ``"SigLipLoss"``) without importing the ``open_clip`` package.

    The package ``__init__`` pulls in the models and torchvision; the loss module
    itself needs only torch, so it is loaded from its file.

    Raises:
        ImportError: open-clip-torch is not installed, or its loss module does not load.
    """
    path = _open_clip_loss_path()
    if path is None:
        raise ImportError("open_clip is not installed")
    loss_spec = importlib.util.spec_from_file_location("_bench_open_clip_loss", path)
    if loss_spec is None or loss_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return getattr(module, name)


def _triton_runs_here(device: str) -> bool:
    # Under TRITON_INTERPRET=1 the fused kernel runs on CPU tensors (slowly): the
    # way its benchmark rows are checked without a GPU.
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def peer_missing(method: str, device: str = "cpu") -> str | None:
    """Why ``method`` cannot run here (a package is not installed, or it needs CUDA), or None."""
    if method == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not _triton_runs_here(device):
            return "triton is benchmarked on CUDA only (or on CPU under TRITON_INTERPRET=1)"
    if method == "inf_cl":
        if importlib.util.find_spec("inf_cl") is None:
            return "inf-cl is not installed"
        if device != "cuda":
            return "inf_cl is benchmarked on CUDA only"
    if method == "torch_lce" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
    if method == "info_nce_pytorch" and importlib.util.find_spec("info_nce") is None:
        return "info-nce-pytorch is not installed"
    if method == "open_clip":
        path = _open_clip_loss_path()
        if path is None:
            return "open-clip-torch is not installed"
        if not path.is_file():
            return "open_clip/loss.py not found"
    return None


# ------------------------------------------------------------ tables, plots, files


def fmt(value: float | None, spec: str, missing: str = "—") -> str:
    """``format(value, spec)``, or ``missing`` for None (a cell a row does not have)."""
    return missing if value is None else format(value, spec)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def log_log_axes(ax: Any, xlabel: str, ylabel: str, *, log_y: bool = True) -> None:
    """Base-2 log x (batch sizes), log y, labels and a light grid."""
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
