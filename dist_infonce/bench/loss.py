"""The loss sweep: dense InfoNCE vs the chunked kernel vs peers, forward + backward.

Run ``python -m dist_infonce.bench --quick`` (about two minutes on a 2-core CPU)
or ``python -m dist_infonce.bench`` for the full sweep. Every row is one
configuration (method x mode x B x D) measured in a fresh subprocess, so its peak
memory is its own:

- time: median of ``--repeats`` timed forward + backward passes after one
  warm-up (``time.perf_counter`` on CPU; CUDA events on CUDA);
- extra memory: the peak after the first forward + backward minus the memory in
  use once the inputs exist, the peak being reset just before the pass
  (:mod:`dist_infonce.memory`: the RSS high-water mark on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA);
- floor fraction: the time of the 4 matmuls an exact chunked kernel cannot avoid
  (forward logits; backward recompute, dq, dk: 4 x 2*N*M*D flops) at the
  machine's measured matmul rate, divided by the measured time. 1.0 is the floor.

Methods: ``dense`` (our reference: ``q @ k.T / t`` and ``F.cross_entropy``),
``chunked`` (``dist_infonce.info_nce`` with a tile edge), and, where installed,
``info_nce_pytorch`` (one direction) and ``open_clip`` (``ClipLoss``, symmetric).
On CUDA also ``triton`` (``info_nce(..., kernel="triton")``, the fused kernel;
also on CPU under ``TRITON_INTERPRET=1``, slowly, to check its rows) and ``inf_cl``
(Inf-CL's ``cal_inf_loss``; symmetric = its two calls, as its authors do).
Modes: ``one`` (in-batch, one direction) and ``sym`` (symmetric / CLIP).

``--device cuda`` runs the GPU sweep: bf16, D = 512 at B = 16k..1M (each method up
to the size that fits its memory and time) and D = 1024 at B = 64k. The achieved
rate is the 4-matmul floor's flops over the measured time; the floor fraction is
that rate over the measured matmul rate in the same dtype (bf16 tensor cores on
CUDA). A method that runs past ``--timeout`` at some B is not tried at larger B.
``bench.json`` is rewritten after every row, so a run cut short keeps what it
measured; ``--redraw OUT/bench.json`` then writes its table and plot.

Outputs in ``--out``: ``bench.json`` (rows and machine info), ``bench.png``
(log-log time and memory vs B) and ``table.md`` (also printed); with
``--dry-run``, only ``plan.json`` (the configurations and the rows that would be
skipped, with the reason).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dist_infonce.bench.common import (
    DTYPES,
    Timer,
    csv_choices,
    csv_ints,
    emit_result,
    fmt,
    load_avg,
    load_open_clip_loss,
    log_log_axes,
    machine_probe,
    measure_matmul_rate,
    peer_missing,
    pyplot,
    run_worker,
    save_figure,
    sync,
    write_json,
)
from dist_infonce.kernels import DEFAULT_CHUNK
from dist_infonce.memory import peak_memory_mb, reset_peak

__all__ = ["Config", "build_grid", "build_parser", "format_table", "main", "run_config"]

METHODS = ("dense", "chunked", "info_nce_pytorch", "open_clip", "triton", "inf_cl")
#: What runs on CPU: the fused kernel and Inf-CL need CUDA.
CPU_METHODS = ("dense", "chunked", "info_nce_pytorch", "open_clip")
MODES = ("one", "sym")
#: Modes each method implements: info-nce-pytorch has no symmetric loss and
#: OpenCLIP's ClipLoss is symmetric only.
METHOD_MODES: dict[str, tuple[str, ...]] = {
    "dense": ("one", "sym"),
    "chunked": ("one", "sym"),
    "info_nce_pytorch": ("one",),
    "open_clip": ("sym",),
    "triton": ("one", "sym"),
    "inf_cl": ("one", "sym"),
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

QUICK_SIZES = (2048, 4096, 8192)
FULL_SIZES = (4096, 8192, 16384, 32768)
#: Sizes only the chunked kernel runs (one direction) in the full sweep: dense
#: would need 64 GiB and 256 GiB.
FULL_CHUNKED_ONLY_SIZES = (65536, 131072)
#: (B, D) added to the full sweep for every method and mode: a wider embedding.
FULL_EXTRA = ((16384, 512),)
#: The CUDA sweep (issue 9): D = 512 at these B, plus D = 1024 at GPU_EXTRA.
GPU_SIZES = (16384, 65536, 262144, 1048576)
GPU_DIM = 512
GPU_EXTRA = ((65536, 1024),)
#: Rows of random inputs generated at a time, so that setting up the inputs
#: leaves no large temporaries behind the baseline.
_INPUT_BLOCK = 8192


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
        variant: Triton rows only: ``"BLOCKxBLOCK_DxWARPS"`` (tile edge, D slice
            of the backward, backward warps); None for the kernel's defaults.
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
    variant: str | None = None

    @property
    def label(self) -> str:
        """Method name for tables and legends; tiled rows carry their tile edge."""
        if self.variant is not None:
            return f"{self.method}[{self.variant}]"
        if self.method in ("chunked", "triton") and self.chunk is not None:
            return f"{self.method}[{self.chunk}]"
        return self.method


# --------------------------------------------------------------------- worker

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _dense_loss(t: float, symmetric: bool) -> LossFn:
    def dense(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = q @ k.T / t
        labels = torch.arange(q.shape[0], device=q.device)
        if not symmetric:
            return F.cross_entropy(logits, labels)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    return dense


def _triton_loss(cfg: Config) -> LossFn:
    from dist_infonce import info_nce
    from dist_infonce.kernels import triton_lse

    chunk, t, symmetric = cfg.chunk, cfg.temperature, cfg.mode == "sym"
    if cfg.variant is not None:
        # This worker process runs one configuration: set the module's knobs.
        chunk, triton_lse.BLOCK_D_MAX, triton_lse.BWD_WARPS = parse_variant(cfg.variant)
    return lambda q, k: info_nce(
        q, k, temperature=t, symmetric=symmetric, chunk_size=chunk, kernel="triton"
    )


def _inf_cl_loss(t: float, symmetric: bool) -> LossFn:
    cal_inf_loss = importlib.import_module("inf_cl").cal_inf_loss

    def inf_cl(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # Its logit scale multiplies q; its head_dim must divide D (<= 256).
        scale = torch.tensor(1.0 / t, device=q.device)
        head_dim = math.gcd(q.shape[1], 256)
        loss = cal_inf_loss(q, k, scale=scale, head_dim=head_dim)
        if not symmetric:
            return loss
        return 0.5 * (loss + cal_inf_loss(k, q, scale=scale, head_dim=head_dim))

    return inf_cl


def _loss_fn(cfg: Config) -> LossFn:
    """The loss under test, as ``fn(query, key) -> scalar``."""
    t, symmetric = cfg.temperature, cfg.mode == "sym"
    if cfg.method == "dense":
        return _dense_loss(t, symmetric)
    if cfg.method == "chunked":
        from dist_infonce import info_nce

        chunk = cfg.chunk
        return lambda q, k: info_nce(q, k, temperature=t, symmetric=symmetric, chunk_size=chunk)
    if cfg.method == "triton":
        return _triton_loss(cfg)
    if cfg.method == "inf_cl":
        return _inf_cl_loss(t, symmetric)
    if cfg.method == "info_nce_pytorch":
        # Imported by name: ``info_nce`` the package, not dist_infonce's function.
        peer = importlib.import_module("info_nce")
        return lambda q, k: peer.info_nce(q, k, temperature=t)
    if cfg.method == "open_clip":
        clip_loss = load_open_clip_loss()()
        return lambda q, k: clip_loss(q, k, torch.tensor(1.0 / t, device=q.device))
    raise ValueError(f"unknown method {cfg.method!r}; expected one of {METHODS}")


def parse_variant(text: str) -> tuple[int, int, int]:
    """``"64x128x8"`` -> (tile edge 64, backward D slice 128, backward warps 8).

    Raises:
        argparse.ArgumentTypeError: not three numbers, BLOCK or BLOCK_D not a power of
            two >= 16, or WARPS not one of 1, 2, 4, 8, 16.
    """
    try:
        block, block_d, warps = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BLOCKxBLOCK_DxWARPS such as 64x128x8, got {text!r}"
        ) from None
    if min(block, block_d) < 16 or block & (block - 1) or block_d & (block_d - 1):
        raise argparse.ArgumentTypeError(f"BLOCK and BLOCK_D must be powers of two >= 16: {text!r}")
    if warps not in (1, 2, 4, 8, 16):
        raise argparse.ArgumentTypeError(f"WARPS must be 1, 2, 4, 8 or 16: {text!r}")
    return block, block_d, warps


def _csv_variants(text: str) -> list[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    # Every bad entry in one message, not only the first.
    problems = []
    for v in values:
        try:
            parse_variant(v)
        except argparse.ArgumentTypeError as e:
            problems.append(str(e))
    if problems:
        raise argparse.ArgumentTypeError("; ".join(problems))
    return values


def _make_inputs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Random L2-normalised (B, D) query and key leaves that require grad.

    Generated in float32 on the CPU block by block from one seed, then cast: the
    same seed gives the same matrices for every method, dtype and device, and no
    full-size temporary stays behind the baseline.
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


def _triton_knobs() -> dict[str, Any]:
    from dist_infonce.kernels import triton_lse

    return {"block_d_max": triton_lse.BLOCK_D_MAX, "bwd_warps": triton_lse.BWD_WARPS}


def run_config(cfg: Config) -> dict[str, Any]:
    """Measure one configuration in this process; see the module docstring.

    Returns:
        ``time_s`` (median), ``times_s``, ``warmup_s``, ``repeats_used``,
        ``extra_mib``, ``loss`` (the warm-up's loss value), ``rate_gflops`` (the
        matmul rate measured in this process just after the timed passes) and, for
        triton rows, ``triton_knobs`` (the kernel module's settings during the run).
    """
    fn = _loss_fn(cfg)
    device = torch.device(cfg.device)
    # Start the BLAS / OpenMP thread pools (and the CUDA context) before the
    # baseline: they are not part of any loss's memory.
    warm = torch.ones(64, 64, device=device)
    (warm @ warm).sum().item()
    q, k = _make_inputs(cfg)
    sync(cfg.device)
    # Right after the reset the peak is what is in use now: the inputs and the
    # process itself, not the imports' transient high-water mark.
    reset_peak(device)
    base_mib = peak_memory_mb(device)

    def step() -> tuple[float, torch.Tensor]:
        # Fresh gradients each pass, so every pass allocates the same.
        q.grad = None
        k.grad = None
        with Timer(cfg.device) as timer:
            loss = fn(q, k)
            loss.backward()
        return timer.seconds, loss.detach()

    warmup_s, loss = step()
    if cfg.device == "cuda":
        # The first CUDA pass also JIT-compiles (Triton) and tunes (cuBLAS); the
        # second one is the cost the time budget should plan with.
        warmup_s, loss = step()
    extra_mib = max(0.0, peak_memory_mb(device) - base_mib)
    repeats = cfg.repeats
    if cfg.budget_s > 0:
        # Long passes (B = 131072 takes minutes on a CPU) get fewer repeats.
        repeats = min(cfg.repeats, max(1, int((cfg.budget_s - warmup_s) // warmup_s)))
    times = [step()[0] for _ in range(repeats)]
    result: dict[str, Any] = {
        # The matmul rate this process gets right now (after the memory reading: the
        # probe's buffers would raise the high-water mark). On a shared machine it
        # tracks the contention the timed passes saw.
        "rate_gflops": measure_matmul_rate(cfg.dim, cfg.dtype, cfg.device, runs=5),
        "time_s": statistics.median(times),
        "times_s": times,
        "warmup_s": warmup_s,
        "repeats_used": repeats,
        "extra_mib": extra_mib,
        "loss": float(loss),
    }
    if cfg.method == "triton":
        result["triton_knobs"] = _triton_knobs()
    return result


def _worker_main(payload: str) -> None:
    request = json.loads(payload)
    if request.get("kind") == "probe":
        emit_result(machine_probe(request["dims"], request["dtype"], request["device"]))
    else:
        emit_result(run_config(Config(**request["config"])))


# --------------------------------------------------------------------- the grid


def dense_estimate_gib(cfg: Config) -> float | None:
    """Estimated peak extra memory of a dense method (GiB); None for tiled kernels."""
    copies = DENSE_COPIES.get((cfg.method, cfg.mode))
    if copies is None:
        return None
    itemsize = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    return copies * cfg.batch * cfg.batch * itemsize / 2**30


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the device-dependent defaults of ``--methods`` and ``--dtype`` in place."""
    if args.methods is None:
        args.methods = list(METHODS if args.device == "cuda" else CPU_METHODS)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"


def _points(args: argparse.Namespace) -> list[tuple[int, int, bool]]:
    """``(B, D, chunked only)`` of the sweep the options ask for."""
    if args.sizes or args.dims:
        sizes = args.sizes or list(QUICK_SIZES if args.quick else FULL_SIZES)
        return [(b, d, False) for d in (args.dims or [128]) for b in sizes]
    if args.device == "cuda":
        return [(b, GPU_DIM, False) for b in GPU_SIZES] + [(b, d, False) for b, d in GPU_EXTRA]
    if args.quick:
        return [(b, 128, False) for b in QUICK_SIZES]
    points = [(b, 128, False) for b in FULL_SIZES]
    points += [(b, 128, True) for b in FULL_CHUNKED_ONLY_SIZES]
    return points + [(b, d, False) for b, d in FULL_EXTRA]


def build_grid(args: argparse.Namespace) -> list[Config]:
    """Configurations in run order: per (D, B, mode), every method back to back, so
    that the dense reference and the kernel see the same machine load."""
    _resolve_defaults(args)
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
    for b, d, chunked_only in _points(args):
        for mode in args.modes:
            if chunked_only and mode != "one":
                continue
            for method in args.methods:
                if mode not in METHOD_MODES[method] or (chunked_only and method != "chunked"):
                    continue
                # The fused kernel runs with its own default tile (DEFAULT_BLOCK).
                for chunk in chunks if method == "chunked" else [None]:
                    grid.append(Config(method, mode, b, d, chunk, **common))
                if method == "triton":
                    for v in args.triton_variants:
                        block = parse_variant(v)[0]
                        grid.append(Config(method, mode, b, d, block, **common, variant=v))
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


def _planned_row(cfg: Config, max_gib: float | None) -> dict[str, Any]:
    """The row of ``cfg`` before it runs: skipped with the reason where it cannot run here
    (a peer missing, a dense estimate over ``max_gib``)."""
    row = _row(cfg)
    # Other jobs on the machine distort timings; keep the load next to each row.
    row["load_before"] = load_avg()
    est = dense_estimate_gib(cfg)
    row["est_dense_gib"] = est
    missing = peer_missing(cfg.method, cfg.device)
    if missing:
        row.update(status="skipped", reason=missing)
    elif est is not None and max_gib is not None and est > max_gib:
        reason = f"dense estimate {est:.1f} GiB > --max-dense-gib {max_gib:.1f}"
        row.update(status="skipped", reason=reason)
    return row


# ------------------------------------------------------------------ the report


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
            best[str(r["D"])] = max(best.get(str(r["D"]), 0.0), r["rate_gflops"])
    for r in rows:
        cfg = Config(**r["config"])
        rate = best.get(str(cfg.dim))
        r["floor_s"] = _flops(cfg) / (rate * 1e9) if rate else None
        if r["status"] == "ok" and rate:
            r["floor_fraction"] = r["floor_s"] / r["time_s"]
            r["achieved_gflops"] = _flops(cfg) / r["time_s"] / 1e9


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    dense = {
        (r["B"], r["D"], r["mode"]): r["time_s"]
        for r in rows
        if r["method"] == "dense" and r["status"] == "ok"
    }
    for r in rows:
        ref = dense.get((r["B"], r["D"], r["mode"]))
        r["speedup_vs_dense"] = ref / r["time_s"] if ref and r["status"] == "ok" else None


def _table_line(r: dict[str, Any]) -> str:
    ok = r["status"] == "ok"
    note = "" if ok else f"{r['status']}: {r['reason']}"
    if ok and r.get("repeats_used", 0) < r["config"]["repeats"]:
        note = f"{r['repeats_used']} timed repeat(s)"

    def cell(key: str, spec: str) -> str:
        return fmt(r.get(key) if ok else None, spec)

    return (
        f"| {r['B']} | {r['D']} | {r['mode']} | {r['label']} | {cell('time_s', '.3g')} | "
        f"{cell('extra_mib', '.1f')} | {cell('achieved_gflops', '.0f')} | "
        f"{cell('floor_fraction', '.2f')} | {fmt(r.get('speedup_vs_dense'), '.2f')} | "
        f"{cell('rate_gflops', '.0f')} | {fmt((r.get('load_before') or [None])[0], '.1f')} "
        f"| {note} |"
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows, ordered by D, B, mode, method."""
    order = {m: i for i, m in enumerate(METHODS)}
    lines = [
        "| B | D | mode | method | time s | extra MiB | achieved GFLOP/s | floor fraction "
        "| speedup vs dense | GFLOP/s now | load | note |",
        "|---:|---:|:---|:---|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    key = lambda r: (r["D"], r["B"], r["mode"], order[r["method"]], r["chunk"] or 0)
    lines += [_table_line(r) for r in sorted(rows, key=key)]
    return "\n".join(lines) + "\n"


def _plot_series(ax_t: Any, ax_m: Any, plt: Any, ok: list[dict[str, Any]]) -> dict[int, str]:
    """One line per method x mode x D on both axes; returns the line style of each D."""
    series: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in ok:
        series.setdefault((r["label"], r["mode"], r["D"]), []).append(r)
    dims = sorted({d for _, _, d in series})
    markers = dict(zip(dims, "os^vD", strict=False))
    styles = dict(zip(dims, ["-", "--", ":", "-."], strict=False))
    colors: dict[tuple[str, str], Any] = {}
    cmap = plt.get_cmap("tab10")
    for (label, mode, d), pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r["B"])
        style = {
            "color": colors.setdefault((label, mode), cmap(len(colors) % 10)),
            "marker": markers.get(d, "o"),
            "linestyle": styles.get(d, "-"),
            "label": f"{label} {mode} D={d}",
        }
        bs = [r["B"] for r in pts]
        ax_t.plot(bs, [r["time_s"] for r in pts], **style)
        # RSS can read 0 extra for tiny configs; keep them on a log axis.
        ax_m.plot(bs, [max(r["extra_mib"], 0.1) for r in pts], **style)
    return styles


def plot(rows: Sequence[dict[str, Any]], machine: dict[str, Any], path: Path) -> bool:
    """Log-log PNG: time vs B and extra memory vs B, one line per method x mode x D.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = _plot_series(ax_t, ax_m, plt, ok)
    for d, style in styles.items():
        # The floor depends only on (B, D); rows of any method carry it.
        floor_by_b = {r["B"]: r["floor_s"] for r in ok if r["D"] == d and r.get("floor_s")}
        bs = sorted(floor_by_b)
        ax_t.plot(
            bs, [floor_by_b[b] for b in bs], color="black", linestyle=style, linewidth=0.8,
            alpha=0.6, label=f"4-matmul floor D={d}",
        )  # fmt: skip
    rates = ", ".join(f"D={d}: {g:.0f}" for d, g in machine["matmul_gflops"].items())
    fig.suptitle(
        f"InfoNCE fwd+bwd, {machine.get('device_name', '?')}, {machine.get('dtype', '?')}, "
        f"{machine.get('threads', '?')} threads, matmul GFLOP/s {rates}",
        fontsize=10,
    )
    log_log_axes(ax_t, "batch size B", "time per fwd+bwd (s)")
    log_log_axes(ax_m, "batch size B", "extra peak memory (MiB)")
    ax_m.legend(fontsize=7, loc="upper left")
    ax_t.legend(fontsize=7, loc="upper left")
    save_figure(plt, fig, path)
    return True


def write_outputs(
    rows: list[dict[str, Any]],
    machine: dict[str, Any],
    out: Path,
    plot_path: Path,
    *,
    partial: bool = False,
) -> tuple[str, bool]:
    """Derived columns, then ``bench.json``, ``table.md`` and the PNG; returns (table, plotted).

    Rows are those :func:`main` builds (``_row`` plus a worker's result, or a
    status "skipped" / "failed" with a reason), or rows read back from a
    ``bench.json`` (``--redraw``; ``partial`` keeps the mark of a run cut short).
    """
    _add_speedups(rows)
    _add_floors(rows, machine)
    table = format_table(rows)
    data: dict[str, Any] = {"machine": machine, "rows": rows}
    if partial:
        data["partial"] = True
    write_json(out / "bench.json", data)
    (out / "table.md").write_text(table)
    return table, plot(rows, machine, plot_path)


# ------------------------------------------------------------------- the sweep


def _probe_machine(
    args: argparse.Namespace, argv: Sequence[str], dims: list[int]
) -> dict[str, Any]:
    """The machine facts and matmul rates, measured in a worker like every row."""
    load_before = load_avg()
    request = {"kind": "probe", "dims": dims, "dtype": args.dtype, "device": args.device}
    probe, why = run_worker([], request, args.timeout)
    if probe is None:
        raise RuntimeError(f"matmul-rate probe failed: {why}")
    return {
        **probe,
        "dtype": args.dtype,
        "device": args.device,
        "hostname": platform.node(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_before": load_before,
        "argv": list(argv),
    }


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


def _measure(
    cfg: Config, max_gib: float, failed_at: dict[Any, int], timeout: float
) -> dict[str, Any]:
    """The row of ``cfg``: measured in a worker, or skipped / failed with the reason.

    ``failed_at`` maps a series (method, mode, D, chunk, variant) to the smallest B
    at which it failed (timeout, out of memory); larger B of that series are skipped.
    """
    row = _planned_row(cfg, max_gib)
    series = (cfg.method, cfg.mode, cfg.dim, cfg.chunk, cfg.variant)
    if row["status"] != "ok":
        return row
    if series in failed_at and cfg.batch > failed_at[series]:
        row.update(status="skipped", reason=f"failed at B={failed_at[series]}")
        return row
    result, why = run_worker([], {"config": asdict(cfg)}, timeout)
    if result is None:
        row.update(status="failed", reason=why)
        failed_at[series] = min(cfg.batch, failed_at.get(series, cfg.batch))
        return row
    row.update(result)
    # Relative to the rate this worker got; the run-wide fraction is set once
    # every probe is in (_add_floors).
    row["floor_fraction_now"] = _flops(cfg) / (row["rate_gflops"] * 1e9) / row["time_s"]
    return row


def _sweep(
    grid: list[Config], args: argparse.Namespace, machine: dict[str, Any], max_gib: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    failed_at: dict[Any, int] = {}
    for i, cfg in enumerate(grid, 1):
        rows.append(_measure(cfg, max_gib, failed_at, args.timeout))
        print(_progress(i, len(grid), rows[-1]), flush=True)
        # A run killed from outside (a device lease ending) keeps what it measured.
        write_json(args.out / "bench.json", {"machine": machine, "rows": rows, "partial": True})
    return rows


def _dry_run(grid: list[Config], args: argparse.Namespace) -> int:
    """Print and write (``plan.json``) the configurations; nothing is measured."""
    max_gib = args.max_dense_gib
    if max_gib is None and args.device == "cpu":
        max_gib = 14.0
    elif max_gib is None and torch.cuda.is_available():
        max_gib = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30
    rows = [_planned_row(cfg, max_gib) for cfg in grid]
    for i, row in enumerate(rows, 1):
        if row["status"] == "ok":
            row["status"] = "planned"
        what = row["status"] if not row["reason"] else f"{row['status']} ({row['reason']})"
        print(f"[{i}/{len(rows)}] B={row['B']} D={row['D']} {row['mode']} {row['label']}: {what}")
    write_json(args.out / "plan.json", {"max_dense_gib": max_gib, "rows": rows})
    print(f"{len(rows)} configurations; wrote {args.out / 'plan.json'}")
    return 0


#: What --redraw needs of every row.
_ROW_KEYS = frozenset({"method", "label", "mode", "B", "D", "chunk", "status", "reason", "config"})


def _redraw(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Derived columns, table and plot of the rows of an earlier (possibly partial) run."""
    try:
        data = json.loads(args.redraw.read_text())
        rows, machine = data["rows"], data["machine"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--redraw: expected a bench.json with 'machine' and 'rows': {e}")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not r.keys() >= _ROW_KEYS]
    if bad or not isinstance(machine.get("matmul_gflops"), dict):
        parser.error(
            f"--redraw {args.redraw}: rows {bad[:5]} lack the keys {sorted(_ROW_KEYS)}, or "
            "'machine' has no 'matmul_gflops': not a bench.json of this benchmark"
        )
    plot_path = args.plot or args.out / "bench.png"
    partial = bool(data.get("partial"))
    table, plotted = write_outputs(rows, machine, args.out, plot_path, partial=partial)
    print(table, end="")
    print(
        f"wrote {args.out / 'bench.json'}, {args.out / 'table.md'}" + _plot_note(plotted, plot_path)
    )
    return 0


def _plot_note(plotted: bool, path: Path) -> str:
    return f", {path}" if plotted else " (no PNG: matplotlib missing)"


# ------------------------------------------------------------------------- CLI


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """What is measured: sizes, modes, methods, tile edges."""
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small sweep: B in {QUICK_SIZES}, D=128 (a couple of minutes on 2 cores)",
    )
    p.add_argument(
        "--sizes", type=csv_ints, help="batch sizes B, e.g. 4096,8192 (replaces the sweep)"
    )
    p.add_argument(
        "--dims", type=csv_ints, help="embedding dims D, e.g. 128,512 (replaces the sweep)"
    )
    p.add_argument("--modes", type=csv_choices(MODES), default=list(MODES), help="one,sym")
    p.add_argument(
        "--methods",
        type=csv_choices(METHODS),
        default=None,
        help=f"subset of {','.join(METHODS)} (peers run where installed; default: all "
        f"on CUDA, {','.join(CPU_METHODS)} on CPU)",
    )
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tile edge of the chunked rows")
    p.add_argument(
        "--chunks",
        type=csv_ints,
        default=[],
        help="extra chunked rows per tile edge, e.g. 512,1024,2048 (to tune the tile)",
    )
    p.add_argument(
        "--triton-variants",
        type=_csv_variants,
        default=[],
        help="extra triton rows, each BLOCKxBLOCK_DxWARPS (tile edge, backward D slice, "
        "backward warps), e.g. 64x128x8,64x256x16; the default kernel row always runs",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """How it is measured: device, dtype, repeats, limits, inputs."""
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help=f"cuda: the GPU sweep (B in {GPU_SIZES}, D={GPU_DIM}, and (B, D) in {GPU_EXTRA})",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="default bfloat16 on CUDA, float32 on CPU",
    )
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


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """Where results go, and the runs that measure nothing (plan, redraw, worker)."""
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default OUT/bench.png)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the configurations (and which would be skipped, why) to stdout and "
        "OUT/plan.json; measure nothing (no device needed)",
    )
    p.add_argument(
        "--redraw",
        type=Path,
        default=None,
        metavar="BENCH_JSON",
        help="recompute the derived columns, table and plot of an earlier run's bench.json "
        "(also a partial one) into --out; measure nothing",
    )
    p.add_argument("--_worker", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m dist_infonce.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench",
        description="fwd+bwd time and peak memory of dense vs chunked InfoNCE vs peers.",
        epilog="Other modes: 'python -m dist_infonce.bench --world N ...' (or 'dist --world "
        "N'), the gathered loss on N gloo processes; 'python -m dist_infonce.bench cache', "
        "a trainer step with and without gradient caching. Each has its own --help.",
    )
    _add_grid_options(p)
    _add_run_options(p)
    _add_output_options(p)
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Config]:
    """The grid of valid options; ``parser.error`` (exit 2, the option named) otherwise."""
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'})"
        )
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    grid = build_grid(args)
    if not grid:
        parser.error("no configuration matches --methods / --modes")
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the loss sweep; returns the exit status (0 also when some rows failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker is not None:
        _worker_main(args._worker)
        return 0
    if args.redraw is not None:
        return _redraw(args, parser)
    grid = _check_args(parser, args)
    if args.dry_run:
        return _dry_run(grid, args)
    try:
        machine = _probe_machine(args, argv, sorted({c.dim for c in grid}))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    max_gib = args.max_dense_gib
    if max_gib is None:
        max_gib = 0.8 * machine["device_mem_gib"] if args.device == "cuda" else 14.0
    print(
        f"torch {machine['torch']}, {machine['device_name']}, {machine['threads']} threads, "
        f"matmul GFLOP/s {machine['matmul_gflops']}, load {machine['load_before']}; "
        f"{len(grid)} configurations",
        flush=True,
    )
    rows = _sweep(grid, args, machine, max_gib)
    machine["load_after"] = load_avg()
    plot_path = args.plot or args.out / "bench.png"
    table, plotted = write_outputs(rows, machine, args.out, plot_path)
    print()
    print(table, end="")
    print(
        f"\nload before {machine['load_before']}, after {machine['load_after']}; wrote "
        f"{args.out / 'bench.json'}, {args.out / 'table.md'}" + _plot_note(plotted, plot_path),
        flush=True,
    )
    return 0
