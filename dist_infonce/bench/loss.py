"""The loss sweep: dense losses vs our tiled kernels vs peers, forward + backward.

Run ``python -m dist_infonce.bench --quick`` (a few minutes on a 2-core CPU)
or ``python -m dist_infonce.bench`` for the full sweep. Every row is one
configuration (method x mode x B x D) measured in a fresh subprocess, so its peak
memory is its own:

- time: median of ``--repeats`` timed forward + backward passes after one
  warm-up (``time.perf_counter`` on CPU; CUDA events on CUDA);
- extra memory: the peak after the first forward + backward minus the memory in
  use once the inputs exist, the peak being reset just before the pass
  (:mod:`dist_infonce.memory`: the RSS high-water mark on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA);
- floor fraction: the time of the matmuls an exact tiled kernel cannot avoid, each
  2*N*M*D flops, at the machine's measured matmul rate, divided by the measured
  time (1.0 is the floor): 3 for one direction and for SigLIP (logits, dq, dk: the
  gradient formed in the forward), 4 for the symmetric loss (whose column statistic
  needs every row before any gradient: logits, then recompute, dq, dk).

Methods: ``dense`` (our reference: ``q @ k.T / t`` and ``F.cross_entropy``; SigLIP:
``siglip_loss(kernel="dense")``), ``chunked`` (``info_nce`` / ``siglip_loss`` with a
tile edge), ``torch_lce`` (torch's chunked ``F.linear_cross_entropy(q / t, k, arange)``,
torch >= 2.13; symmetric = two calls), and, where installed, ``info_nce_pytorch``
(one direction) and ``open_clip`` (``ClipLoss``, symmetric; ``SigLipLoss`` for SigLIP).
On CUDA also ``triton`` (``kernel="triton"``, the fused kernels; also on CPU under
``TRITON_INTERPRET=1``, slowly, to check its rows) and ``inf_cl`` (Inf-CL's
``cal_inf_loss``; symmetric = its two calls, as its authors do). Modes: ``one``
(in-batch, one direction), ``sym`` (symmetric / CLIP) and ``siglip`` (SigLIP's
sigmoid loss at t = 10, b = -10, both requiring grad).

``--device cuda`` runs the GPU sweep: bf16, D = 512 at B = 16k..1M (each method up
to the size that fits its memory and time) and D = 1024 at B = 64k. The achieved
rate is the floor's flops over the measured time; the floor fraction is
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
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dist_infonce.bench.common import (
    DTYPES,
    csv_choices,
    csv_ints,
    load_avg,
    peer_missing,
    run_worker,
    write_json,
)
from dist_infonce.bench.loss_report import floor_flops, write_outputs
from dist_infonce.bench.loss_worker import (
    METHOD_MODES,
    METHODS,
    Config,
    parse_variant,
    worker_main,
)
from dist_infonce.kernels import DEFAULT_CHUNK

__all__ = ["build_grid", "build_parser", "main"]

#: What runs on CPU: the fused kernel and Inf-CL need CUDA.
CPU_METHODS = ("dense", "chunked", "torch_lce", "info_nce_pytorch", "open_clip")
MODES = ("one", "sym", "siglip")
#: Modes the sizes past the dense methods' reach run in (the chunked kernel only).
CHUNKED_ONLY_MODES = ("one", "siglip")
#: Copies of the (B, B) logits a dense method keeps alive at its peak; the skip
#: rule multiplies B * B * itemsize by this. Measured (extra RSS / (B*B*4) at
#: B=8192, float32, on the project machine): dense one-direction 3.0 (matmul
#: output, scaled logits, log-softmax saved by cross_entropy; its gradient
#: reuses freed blocks), info-nce-pytorch 3.05, dense symmetric 4.0 (the
#: transposed direction's log-softmax), OpenCLIP ClipLoss 4.05; rounded up.
#: SigLIP at B=16384: our dense path 4.05 (logits, softplus, their gradients),
#: OpenCLIP's SigLipLoss 5.06 (it also builds the +-1 label matrix).
DENSE_COPIES: dict[tuple[str, str], float] = {
    ("dense", "one"): 3.1,
    ("dense", "sym"): 4.1,
    ("dense", "siglip"): 4.1,
    ("info_nce_pytorch", "one"): 3.1,
    ("open_clip", "sym"): 4.1,
    ("open_clip", "siglip"): 5.1,
}

QUICK_SIZES = (2048, 4096, 8192)
FULL_SIZES = (4096, 8192, 16384, 32768)
#: Sizes only the chunked kernel runs (one direction, SigLIP) in the full sweep: dense
#: would need 64 GiB and 256 GiB.
FULL_CHUNKED_ONLY_SIZES = (65536, 131072)
#: (B, D) added to the full sweep for every method and mode: a wider embedding.
FULL_EXTRA = ((16384, 512),)
#: The CUDA sweep (issue 9): D = 512 at these B, plus D = 1024 at GPU_EXTRA.
GPU_SIZES = (16384, 65536, 262144, 1048576)
GPU_DIM = 512
GPU_EXTRA = ((65536, 1024),)


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
            if chunked_only and mode not in CHUNKED_ONLY_MODES:
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


# ------------------------------------------------------------------- the sweep


def _probe_machine(
    *, dims: list[int], dtype: str, device: str, timeout: float, argv: Sequence[str]
) -> dict[str, Any]:
    """The machine facts and matmul rates, measured in a worker like every row."""
    load_before = load_avg()
    request = {"kind": "probe", "dims": dims, "dtype": dtype, "device": device}
    probe, why = run_worker([], request, timeout)
    if probe is None:
        raise RuntimeError(f"matmul-rate probe failed: {why}")
    return {
        **probe,
        "dtype": dtype,
        "device": device,
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
    cfg: Config, *, max_gib: float, failed_at: dict[Any, int], timeout: float
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
    row["floor_fraction_now"] = floor_flops(cfg) / (row["rate_gflops"] * 1e9) / row["time_s"]
    return row


def _sweep(
    grid: list[Config], *, machine: dict[str, Any], max_gib: float, timeout: float, out: Path
) -> list[dict[str, Any]]:
    """Every configuration's row, in order; ``out/bench.json`` rewritten after each."""
    rows: list[dict[str, Any]] = []
    failed_at: dict[Any, int] = {}
    for i, cfg in enumerate(grid, 1):
        rows.append(_measure(cfg, max_gib=max_gib, failed_at=failed_at, timeout=timeout))
        print(_progress(i, len(grid), rows[-1]), flush=True)
        # A run killed from outside (a device lease ending) keeps what it measured.
        write_json(out / "bench.json", {"machine": machine, "rows": rows, "partial": True})
    return rows


def _dry_run(grid: list[Config], *, max_gib: float | None, device: str, out: Path) -> int:
    """Print and write (``out/plan.json``) the configurations; nothing is measured."""
    if max_gib is None and device == "cpu":
        max_gib = 14.0
    elif max_gib is None and torch.cuda.is_available():
        max_gib = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30
    rows = [_planned_row(cfg, max_gib) for cfg in grid]
    for i, row in enumerate(rows, 1):
        if row["status"] == "ok":
            row["status"] = "planned"
        what = row["status"] if not row["reason"] else f"{row['status']} ({row['reason']})"
        print(f"[{i}/{len(rows)}] B={row['B']} D={row['D']} {row['mode']} {row['label']}: {what}")
    write_json(out / "plan.json", {"max_dense_gib": max_gib, "rows": rows})
    print(f"{len(rows)} configurations; wrote {out / 'plan.json'}")
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
    p.add_argument("--modes", type=csv_choices(MODES), default=list(MODES), help=",".join(MODES))
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
        description="fwd+bwd time and peak memory of dense vs tiled InfoNCE / SigLIP vs peers.",
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
        worker_main(args._worker)
        return 0
    if args.redraw is not None:
        return _redraw(args, parser)
    grid = _check_args(parser, args)
    if args.dry_run:
        return _dry_run(grid, max_gib=args.max_dense_gib, device=args.device, out=args.out)
    try:
        dims = sorted({c.dim for c in grid})
        machine = _probe_machine(
            dims=dims, dtype=args.dtype, device=args.device, timeout=args.timeout, argv=argv
        )
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
    rows = _sweep(grid, machine=machine, max_gib=max_gib, timeout=args.timeout, out=args.out)
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
