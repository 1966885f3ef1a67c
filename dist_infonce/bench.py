"""Benchmark: dense InfoNCE vs the chunked kernel vs peers, forward + backward.

Run ``python -m dist_infonce.bench --quick`` (about two minutes on a 2-core CPU)
or ``python -m dist_infonce.bench`` for the full sweep. Every row is one
configuration (method x mode x B x D) measured in a fresh subprocess, so its peak
memory is its own:

- time: median of ``--repeats`` timed forward + backward passes after one
  warm-up (``time.perf_counter``; ``torch.cuda.synchronize`` on CUDA);
- extra memory: on CPU, the peak RSS (``ru_maxrss``) after the first forward +
  backward minus the peak RSS once the inputs exist; on CUDA,
  ``torch.cuda.max_memory_allocated`` minus the inputs;
- floor fraction: the time of the 4 matmuls an exact chunked kernel cannot avoid
  (forward logits; backward recompute, dq, dk: 4 x 2*N*M*D flops) at the
  machine's measured matmul rate, divided by the measured time. 1.0 is the floor.

Methods: ``dense`` (our reference: ``q @ k.T / t`` and ``F.cross_entropy``),
``chunked`` (``dist_infonce.info_nce`` with a tile edge), and, where installed,
``info_nce_pytorch`` (one direction) and ``open_clip`` (``ClipLoss``, symmetric).
Modes: ``one`` (in-batch, one direction) and ``sym`` (symmetric / CLIP).

``python -m dist_infonce.bench --world 2`` runs the distributed benchmark instead
(the gathered loss on gloo processes, ours vs OpenCLIP; see
:mod:`dist_infonce.bench_dist`).

Outputs in ``--out``: ``bench.json`` (rows and machine info), ``bench.png``
(log-log time and memory vs B) and ``table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dist_infonce.kernels import DEFAULT_CHUNK

__all__ = ["Config", "build_grid", "format_table", "main", "measure_matmul_rate", "run_config"]

METHODS = ("dense", "chunked", "info_nce_pytorch", "open_clip")
MODES = ("one", "sym")
#: Modes each method implements: info-nce-pytorch has no symmetric loss and
#: OpenCLIP's ClipLoss is symmetric only.
METHOD_MODES: dict[str, tuple[str, ...]] = {
    "dense": ("one", "sym"),
    "chunked": ("one", "sym"),
    "info_nce_pytorch": ("one",),
    "open_clip": ("sym",),
}
#: Copies of the (B, B) logits a dense method keeps alive at its peak; the skip
#: rule multiplies B * B * itemsize by this. Measured (extra RSS / (B*B*4) at
#: B=8192, float32, on the project machine): dense one-direction 3.0 (matmul
#: output, scaled logits, log-softmax saved by cross_entropy; its gradient
#: reuses freed blocks), info-nce-pytorch 3.05, dense symmetric 4.0 (the
#: transposed direction's log-softmax), OpenCLIP ClipLoss 4.05; rounded up.
DENSE_COPIES: dict[tuple[str, str], float] = {
    ("dense", "one"): 3.1,
    ("dense", "sym"): 4.1,
    ("info_nce_pytorch", "one"): 3.1,
    ("open_clip", "sym"): 4.1,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

QUICK_SIZES = (2048, 4096, 8192)
FULL_SIZES = (4096, 8192, 16384, 32768)
#: Sizes only the chunked kernel runs (one direction) in the full sweep: dense
#: would need 64 GiB and 256 GiB.
FULL_CHUNKED_ONLY_SIZES = (65536, 131072)
#: (B, D) added to the full sweep for every method and mode: a wider embedding.
FULL_EXTRA = ((16384, 512),)

#: Rows of the matmul-rate probe: (RATE_EDGE x D) @ (D x RATE_EDGE).
RATE_EDGE = 4096
#: Rows of random inputs generated at a time, so that setting up the inputs
#: leaves no large temporaries in the peak RSS the baseline is read from.
_INPUT_BLOCK = 8192
_RESULT_MARK = "BENCH_RESULT "


@dataclass(frozen=True)
class Config:
    """One benchmark configuration, run in its own process.

    Attributes:
        method: One of ``METHODS``.
        mode: ``"one"`` (in-batch, one direction) or ``"sym"`` (symmetric / CLIP).
        batch: B, rows of the query and of the key matrices.
        dim: D, the embedding dimension.
        chunk: Tile edge of the chunked kernel; None for other methods.
        dtype: Name of the input dtype, a key of ``DTYPES``.
        device: ``"cpu"`` or ``"cuda"``.
        repeats: Timed forward + backward passes after the warm-up.
        budget_s: Seconds a configuration may spend on warm-up + timed passes;
            when one pass is long, fewer than ``repeats`` are timed (at least
            one). 0 disables the cap.
        temperature: Softmax temperature (``1 / logit_scale`` for OpenCLIP).
        seed: Seed of the inputs: every method sees the same matrices.
    """

    method: str
    mode: str
    batch: int
    dim: int
    chunk: int | None
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    budget_s: float = 0.0
    temperature: float = 0.1
    seed: int = 0

    @property
    def label(self) -> str:
        """Method name for tables and legends; chunked rows carry their tile edge."""
        return f"chunked[{self.chunk}]" if self.method == "chunked" else self.method


# ---------------------------------------------------------------------- peers


def _load_open_clip_loss() -> type[torch.nn.Module]:
    """OpenCLIP's ``ClipLoss`` without importing the ``open_clip`` package.

    The package ``__init__`` pulls in the models and torchvision; the loss module
    itself needs only torch, so it is loaded from its file.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("_bench_open_clip_loss", path)
    if loss_spec is None or loss_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module.ClipLoss


def peer_missing(method: str) -> str | None:
    """Why ``method`` cannot run here (a peer package is not installed), or None."""
    if method == "info_nce_pytorch" and importlib.util.find_spec("info_nce") is None:
        return "info-nce-pytorch is not installed"
    if method == "open_clip":
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return "open-clip-torch is not installed"
        if not (Path(next(iter(spec.submodule_search_locations))) / "loss.py").is_file():
            return "open_clip/loss.py not found"
    return None


# --------------------------------------------------------------------- worker

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _loss_fn(cfg: Config) -> LossFn:
    """The loss under test, as ``fn(query, key) -> scalar``."""
    t = cfg.temperature
    symmetric = cfg.mode == "sym"
    if cfg.method == "dense":

        def dense(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            logits = q @ k.T / t
            labels = torch.arange(q.shape[0], device=q.device)
            if not symmetric:
                return F.cross_entropy(logits, labels)
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

        return dense
    if cfg.method == "chunked":
        from dist_infonce import info_nce

        chunk = cfg.chunk
        return lambda q, k: info_nce(q, k, temperature=t, symmetric=symmetric, chunk_size=chunk)
    if cfg.method == "info_nce_pytorch":
        # Imported by name: ``info_nce`` the package, not dist_infonce's function.
        peer = importlib.import_module("info_nce")
        return lambda q, k: peer.info_nce(q, k, temperature=t)
    if cfg.method == "open_clip":
        loss = _load_open_clip_loss()()

        def clip(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return loss(q, k, torch.tensor(1.0 / t, device=q.device))

        return clip
    raise ValueError(f"unknown method {cfg.method!r}; expected one of {METHODS}")


def _make_inputs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Random L2-normalised (B, D) query and key leaves that require grad.

    Generated in float32 on the CPU block by block from one seed, then cast: the
    same seed gives the same matrices for every method, dtype and device, and no
    full-size temporary raises the RSS high-water mark before the baseline.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    for _ in range(2):
        x = torch.empty(cfg.batch, cfg.dim, dtype=DTYPES[cfg.dtype], device=cfg.device)
        for i0 in range(0, cfg.batch, _INPUT_BLOCK):
            block = torch.randn(min(_INPUT_BLOCK, cfg.batch - i0), cfg.dim, generator=gen)
            block /= block.norm(dim=1, keepdim=True)
            x[i0 : i0 + block.shape[0]].copy_(block)
        out.append(x.requires_grad_(True))
    return out[0], out[1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_config(cfg: Config) -> dict[str, Any]:
    """Measure one configuration in this process; see the module docstring.

    Returns:
        ``time_s`` (median), ``times_s``, ``warmup_s``, ``repeats_used``,
        ``extra_mib``, ``loss`` (the warm-up's loss value) and ``rate_gflops`` (the
        matmul rate measured in this process just after the timed passes).
    """
    fn = _loss_fn(cfg)
    # Start the BLAS / OpenMP thread pools (and the CUDA context) before the
    # baseline: they are not part of any loss's memory.
    warm = torch.ones(64, 64, device=cfg.device)
    (warm @ warm).sum().item()
    q, k = _make_inputs(cfg)
    _sync(cfg.device)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()

    def step() -> tuple[float, torch.Tensor]:
        # Fresh gradients each pass, so every pass allocates the same.
        q.grad = None
        k.grad = None
        _sync(cfg.device)
        t0 = time.perf_counter()
        loss = fn(q, k)
        loss.backward()
        _sync(cfg.device)
        return time.perf_counter() - t0, loss.detach()

    warmup_s, loss = step()
    peak = torch.cuda.max_memory_allocated() if cfg.device == "cuda" else _peak_rss_bytes()
    extra_mib = max(0, peak - base) / 2**20
    loss_value = float(loss)
    repeats = cfg.repeats
    if cfg.budget_s > 0:
        # Long passes (B = 131072 takes minutes on a CPU) get fewer repeats.
        repeats = min(cfg.repeats, max(1, int((cfg.budget_s - warmup_s) // warmup_s)))
    times = [step()[0] for _ in range(repeats)]
    # The matmul rate this process gets right now (after the memory reading: the
    # probe's buffers would raise the RSS high-water mark). On a shared machine
    # it tracks the contention the timed passes saw.
    rate = measure_matmul_rate(cfg.dim, cfg.dtype, cfg.device, runs=5)
    return {
        "rate_gflops": rate,
        "time_s": statistics.median(times),
        "times_s": times,
        "warmup_s": warmup_s,
        "repeats_used": repeats,
        "extra_mib": extra_mib,
        "loss": loss_value,
    }


def measure_matmul_rate(dim: int, dtype: str, device: str, runs: int = 10) -> float:
    """Best GFLOP/s of ``(RATE_EDGE x dim) @ (dim x RATE_EDGE)`` over ``runs`` runs."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(RATE_EDGE, dim, generator=gen).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(dim, RATE_EDGE, generator=gen).to(device=device, dtype=DTYPES[dtype])
    out = a @ b
    best = math.inf
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * RATE_EDGE * RATE_EDGE * dim / best / 1e9


def _machine_probe(dims: Sequence[int], dtype: str, device: str) -> dict[str, Any]:
    """Matmul rate per D and facts about the device, from a worker process."""
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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _worker_main(payload: str) -> None:
    request = json.loads(payload)
    if request.get("kind") == "probe":
        result = _machine_probe(request["dims"], request["dtype"], request["device"])
    else:
        result = run_config(Config(**request["config"]))
    print(_RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------- parent


def _run_worker(request: dict[str, Any], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run one request in a fresh interpreter. Returns (result, "") or (None, why)."""
    env = dict(os.environ)
    # The worker imports dist_infonce from this checkout even when the bench is
    # started from another directory without an install.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "dist_infonce.bench", "--_worker", json.dumps(request)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f} s"
    if proc.returncode != 0:
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return None, f"killed by {name}{hint}"
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no stderr"
        return None, f"exit {proc.returncode}: {last[:300]}"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :]), ""
    return None, "worker printed no result"


def dense_estimate_gib(cfg: Config) -> float | None:
    """Estimated peak extra memory of a dense method (GiB); None for chunked."""
    copies = DENSE_COPIES.get((cfg.method, cfg.mode))
    if copies is None:
        return None
    itemsize = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    return copies * cfg.batch * cfg.batch * itemsize / 2**30


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(choices)}; got {text!r}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m dist_infonce.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench",
        description="fwd+bwd time and peak memory of dense vs chunked InfoNCE vs peers.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small sweep: B in {QUICK_SIZES}, D=128 (a couple of minutes on 2 cores)",
    )
    p.add_argument(
        "--sizes", type=_csv_ints, help="batch sizes B, e.g. 4096,8192 (replaces the sweep)"
    )
    p.add_argument(
        "--dims", type=_csv_ints, help="embedding dims D, e.g. 128,512 (replaces the sweep)"
    )
    p.add_argument("--modes", type=_csv_choices(MODES), default=list(MODES), help="one,sym")
    p.add_argument(
        "--methods",
        type=_csv_choices(METHODS),
        default=list(METHODS),
        help=f"subset of {','.join(METHODS)} (peers run where installed)",
    )
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tile edge of the chunked rows")
    p.add_argument(
        "--chunks",
        type=_csv_ints,
        default=[],
        help="extra chunked rows per tile edge, e.g. 512,1024,2048",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up (median)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=300.0,
        help="seconds of warm-up + timed passes per configuration; slower ones time "
        "fewer repeats (at least 1); 0 = always --repeats",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before a configuration is killed"
    )
    p.add_argument(
        "--max-dense-gib",
        type=float,
        default=None,
        help="skip dense methods whose estimated memory exceeds this "
        "(default 14 on CPU, 80%% of the GPU's memory on CUDA)",
    )
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def build_grid(args: argparse.Namespace) -> list[Config]:
    """Configurations in run order: per (D, B, mode), every method back to back, so
    that the dense reference and the kernel see the same machine load."""
    if args.sizes or args.dims:
        sizes = args.sizes or list(QUICK_SIZES if args.quick else FULL_SIZES)
        points = [(b, d, False) for d in (args.dims or [128]) for b in sizes]
    elif args.quick:
        points = [(b, 128, False) for b in QUICK_SIZES]
    else:
        points = [(b, 128, False) for b in FULL_SIZES]
        points += [(b, 128, True) for b in FULL_CHUNKED_ONLY_SIZES]
        points += [(b, d, False) for b, d in FULL_EXTRA]
    chunks = list(dict.fromkeys([args.chunk, *args.chunks]))
    common = {
        "dtype": args.dtype,
        "device": args.device,
        "repeats": args.repeats,
        "budget_s": args.time_budget,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    grid: list[Config] = []
    for b, d, chunked_only in points:
        for mode in args.modes:
            if chunked_only and mode != "one":
                continue
            for method in args.methods:
                if mode not in METHOD_MODES[method] or (chunked_only and method != "chunked"):
                    continue
                for chunk in chunks if method == "chunked" else [None]:
                    grid.append(Config(method, mode, b, d, chunk, **common))
    return grid


def _row(cfg: Config) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "label": cfg.label,
        "mode": cfg.mode,
        "B": cfg.batch,
        "D": cfg.dim,
        "chunk": cfg.chunk,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "status": "ok",
        "reason": "",
        "config": asdict(cfg),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _progress(i: int, n: int, row: dict[str, Any]) -> str:
    head = f"[{i}/{n}] B={row['B']} D={row['D']} {row['mode']} {row['label']}:"
    if row["status"] != "ok":
        return f"{head} {row['status']} ({row['reason']})"
    return (
        f"{head} {row['time_s']:.3f} s, {row['extra_mib']:.1f} MiB, "
        f"floor {row['floor_fraction_now']:.2f} at {row['rate_gflops']:.0f} GFLOP/s now, "
        f"loss {row['loss']:.6f}, "
        f"{row['repeats_used']} repeats, load {row['load_before'][:1]}"
    )


def _flops(cfg: Config) -> float:
    """Flops of the 4-matmul floor: 4 x 2*N*M*D with N = M = B (also symmetric)."""
    return 4 * 2.0 * cfg.batch * cfg.batch * cfg.dim


def _add_floors(rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    """Floor time and fraction of every row at the best matmul rate of the run.

    The machine's rate is the best of the start-up probe and every worker's
    probe: other jobs only ever slow a probe down, so the best is the closest to
    what the hardware does, and every row is judged against the same number.
    """
    best = machine["matmul_gflops"]
    for r in rows:
        if r.get("rate_gflops"):
            best[str(r["D"])] = max(best[str(r["D"])], r["rate_gflops"])
    for r in rows:
        cfg = Config(**r["config"])
        r["floor_s"] = _flops(cfg) / (best[str(cfg.dim)] * 1e9)
        if r["status"] == "ok":
            r["floor_fraction"] = r["floor_s"] / r["time_s"]


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    dense = {
        (r["B"], r["D"], r["mode"]): r["time_s"]
        for r in rows
        if r["method"] == "dense" and r["status"] == "ok"
    }
    for r in rows:
        ref = dense.get((r["B"], r["D"], r["mode"]))
        r["speedup_vs_dense"] = ref / r["time_s"] if ref and r["status"] == "ok" else None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows, ordered by D, B, mode, method."""
    order = {m: i for i, m in enumerate(METHODS)}
    lines = [
        "| B | D | mode | method | time s | extra MiB | floor fraction | speedup vs dense "
        "| GFLOP/s now | load | note |",
        "|---:|---:|:---|:---|---:|---:|---:|---:|---:|---:|:---|",
    ]
    key = lambda r: (r["D"], r["B"], r["mode"], order[r["method"]], r["chunk"] or 0)
    for r in sorted(rows, key=key):
        ok = r["status"] == "ok"
        note = "" if ok else f"{r['status']}: {r['reason']}"
        if ok and r.get("repeats_used", 0) < r["config"]["repeats"]:
            note = f"{r['repeats_used']} timed repeat(s)"
        lines.append(
            f"| {r['B']} | {r['D']} | {r['mode']} | {r['label']} | "
            f"{_fmt(r.get('time_s') if ok else None, '.3g')} | "
            f"{_fmt(r.get('extra_mib') if ok else None, '.1f')} | "
            f"{_fmt(r.get('floor_fraction') if ok else None, '.2f')} | "
            f"{_fmt(r.get('speedup_vs_dense'), '.2f')} | "
            f"{_fmt(r.get('rate_gflops') if ok else None, '.0f')} | "
            f"{_fmt((r.get('load_before') or [None])[0], '.1f')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], machine: dict[str, Any], path: Path) -> bool:
    """Log-log PNG: time vs B and extra memory vs B, one line per method x mode x D.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    series: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in ok:
        series.setdefault((r["label"], r["mode"], r["D"]), []).append(r)
    dims = sorted({d for _, _, d in series})
    markers = dict(zip(dims, "os^vD", strict=False))
    styles = dict(zip(dims, ["-", "--", ":", "-."], strict=False))
    colors: dict[tuple[str, str], Any] = {}
    cmap = plt.get_cmap("tab10")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.2))
    for (label, mode, d), pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r["B"])
        color = colors.setdefault((label, mode), cmap(len(colors) % 10))
        style = {
            "color": color,
            "marker": markers.get(d, "o"),
            "linestyle": styles.get(d, "-"),
            "label": f"{label} {mode} D={d}",
        }
        bs = [r["B"] for r in pts]
        ax_t.plot(bs, [r["time_s"] for r in pts], **style)
        # RSS can read 0 extra for tiny configs; keep them on a log axis.
        ax_m.plot(bs, [max(r["extra_mib"], 0.1) for r in pts], **style)
    for d in dims:
        # The floor depends only on (B, D); rows of any method carry it.
        floor_by_b = {r["B"]: r["floor_s"] for r in ok if r["D"] == d}
        bs = sorted(floor_by_b)
        ax_t.plot(
            bs,
            [floor_by_b[b] for b in bs],
            color="black",
            linestyle=styles.get(d, "-"),
            linewidth=0.8,
            alpha=0.6,
            label=f"4-matmul floor D={d}",
        )
    rates = ", ".join(f"D={d}: {g:.0f}" for d, g in machine["matmul_gflops"].items())
    fig.suptitle(
        f"InfoNCE fwd+bwd, {machine['device_name']}, {machine['dtype']}, "
        f"{machine['threads']} threads, matmul GFLOP/s {rates}",
        fontsize=10,
    )
    for ax, ylabel in ((ax_t, "time per fwd+bwd (s)"), (ax_m, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7, loc="upper left")
    ax_t.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 also when some rows failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--world" or a.startswith("--world=") for a in argv):
        # The distributed benchmark (gathered loss on gloo processes) has its own options.
        from dist_infonce.bench_dist import main as dist_main

        return dist_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker is not None:
        _worker_main(args._worker)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'})"
        )
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    grid = build_grid(args)
    if not grid:
        parser.error("no configuration matches --methods / --modes")
    dims = sorted({c.dim for c in grid})
    load_before = _load()
    probe_request = {"kind": "probe", "dims": dims, "dtype": args.dtype, "device": args.device}
    probe, why = _run_worker(probe_request, args.timeout)
    if probe is None:
        print(f"matmul-rate probe failed: {why}", file=sys.stderr)
        return 1
    machine = {
        **probe,
        "dtype": args.dtype,
        "device": args.device,
        "hostname": platform.node(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_before": load_before,
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    max_gib = args.max_dense_gib
    if max_gib is None:
        max_gib = 0.8 * probe["device_mem_gib"] if args.device == "cuda" else 14.0
    print(
        f"torch {machine['torch']}, {machine['device_name']}, {machine['threads']} threads, "
        f"matmul GFLOP/s {machine['matmul_gflops']}, load {load_before}; "
        f"{len(grid)} configurations",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for i, cfg in enumerate(grid, 1):
        row = _row(cfg)
        # Other jobs on the machine distort timings; keep the load next to each row.
        row["load_before"] = _load()
        est = dense_estimate_gib(cfg)
        row["est_dense_gib"] = est
        missing = peer_missing(cfg.method)
        if missing:
            row.update(status="skipped", reason=missing)
        elif est is not None and est > max_gib:
            row.update(
                status="skipped",
                reason=f"dense estimate {est:.1f} GiB > --max-dense-gib {max_gib:.1f}",
            )
        else:
            result, why = _run_worker({"config": asdict(cfg)}, args.timeout)
            if result is None:
                row.update(status="failed", reason=why)
            else:
                row.update(result)
                # Relative to the rate this worker got; the run-wide fraction
                # is set once every probe is in (_add_floors).
                row["floor_fraction_now"] = _flops(cfg) / (row["rate_gflops"] * 1e9) / row["time_s"]
        rows.append(row)
        print(_progress(i, len(grid), row), flush=True)
    _add_speedups(rows)
    _add_floors(rows, machine)
    machine["load_after"] = _load()
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    (args.out / "bench.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (args.out / "table.md").write_text(table)
    plotted = plot(rows, machine, args.out / "bench.png")
    print()
    print(table, end="")
    print(
        f"\nload before {load_before}, after {machine['load_after']}; wrote "
        f"{args.out / 'bench.json'}, {args.out / 'table.md'}"
        + (f", {args.out / 'bench.png'}" if plotted else " (no PNG: matplotlib missing)"),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
