"""Benchmark: dense vs chunked InfoNCE vs peers, time and peak memory of fwd+bwd.

    python -m dist_infonce.bench --quick          # ~1-2 min on a 2-core CPU
    python -m dist_infonce.bench                  # the full sweep of the README table
    python -m dist_infonce.bench --device cuda --dtype bfloat16 --sizes 65536 --dims 512

Every configuration runs in a fresh subprocess, so its peak memory is its own:
on CPU the rise of peak RSS (``ru_maxrss``) over the reading taken after the
inputs exist; on CUDA ``max_memory_allocated`` over the allocated inputs. Time is
the median of timed fwd+bwd repeats after one warm-up run (the one that measures
memory). Each row also reports ``floor_fraction``: the time of the 4 matmuls an
exact chunked kernel cannot avoid (forward logits; backward recompute, dA, dB:
4 x 2·N·M·D flops) at this machine's measured matmul rate, divided by the
measured time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

METHODS = ("dense", "chunked", "info_nce_pytorch", "open_clip")
MODES = ("one", "sym")
# Which modes each method implements: info-nce-pytorch is one-directional,
# OpenCLIP's ClipLoss is the symmetric CLIP loss.
SUPPORTS = {
    "dense": MODES,
    "chunked": MODES,
    "info_nce_pytorch": ("one",),
    "open_clip": ("sym",),
}
DENSE_METHODS = ("dense", "info_nce_pytorch", "open_clip")
# Peak bytes of the dense methods per logit, measured here (DESIGN.md: B=32768
# one-direction ~12 GiB, symmetric ~16 GiB): skip configurations that cannot fit.
DENSE_BYTES_PER_LOGIT = {"one": 12.0, "sym": 16.0}
TEMPERATURE = 0.1


# --------------------------------------------------------------------- worker side


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _loss(method: str, mode: str, q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
    labels = torch.arange(q.shape[0], device=q.device)
    if method == "dense":
        logits = (q @ k.T).float() / TEMPERATURE
        loss = F.cross_entropy(logits, labels)
        if mode == "sym":
            loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
        return loss
    if method == "chunked":
        from dist_infonce import info_nce

        return info_nce(q, k, temperature=TEMPERATURE, symmetric=mode == "sym", chunk_size=chunk)
    if method == "info_nce_pytorch":
        import info_nce as peer

        return peer.info_nce(q, k, temperature=TEMPERATURE)
    if method == "open_clip":
        ClipLoss = _open_clip_loss_module().ClipLoss

        scale = torch.tensor(1.0 / TEMPERATURE, device=q.device)
        return ClipLoss()(q, k, scale)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _open_clip_loss_module() -> Any:
    """``open_clip/loss.py`` loaded on its own.

    The package's ``__init__`` imports torchvision (for its image towers), which
    has no CPU build here; the loss module itself needs only torch.
    """
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # locates; does not import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    if loss_spec is None or loss_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process. Keys of ``cfg``: method, mode, B, D,
    chunk, device, dtype, repeats."""
    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    cuda = device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(cfg["B"], cfg["D"], generator=g), dim=-1)
    k = F.normalize(q + 0.3 * torch.randn(cfg["B"], cfg["D"], generator=g), dim=-1)
    q = q.to(device=device, dtype=dtype).requires_grad_()
    k = k.to(device=device, dtype=dtype).requires_grad_()

    def step() -> float:
        q.grad = k.grad = None
        loss = _loss(cfg["method"], cfg["mode"], q, k, cfg["chunk"])
        loss.backward()
        return float(loss.detach())

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_rss_bytes()
    sync()
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()) - base
    # Long configurations (tens of seconds) are timed once; short ones repeatedly.
    repeats = cfg["repeats"] if first < 10.0 else 1
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "time_s": statistics.median(times),
        "times_s": times,
        "first_s": first,
        "extra_mib": max(extra, 0) / 2**20,
        "loss": loss,
    }


# ----------------------------------------------------------------------- driver side


def matmul_gflops(d: int, device: str, dtype: str, n: int = 4096, runs: int = 5) -> float:
    """Best observed rate of an (n x d) @ (d x n) matmul, the shape of a logits tile."""
    dev = torch.device(device)
    a = torch.randn(n, d, device=dev).to(getattr(torch, dtype))
    b = torch.randn(n, d, device=dev).to(getattr(torch, dtype))
    best = math.inf
    for _ in range(runs + 1):  # the first run warms up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        a @ b.T
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * n * d / best / 1e9


def _available(method: str) -> str | None:
    """None if the method can run here, else why not."""
    try:
        if method == "info_nce_pytorch":
            import info_nce  # noqa: F401
        elif method == "open_clip":
            _open_clip_loss_module()
    except Exception as e:  # a peer may fail to import for reasons of its own
        return f"{method} not importable: {type(e).__name__}: {e}"
    return None


def _run_subprocess(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dist_infonce.bench", "--_worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        reason = "killed (out of memory?)" if proc.returncode < 0 else tail[0][:200]
        return {"status": "failed", "reason": reason}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configurations to measure, in order."""
    if args.sizes:
        grid = [(b, d, args.methods) for b in args.sizes for d in args.dims]
    elif args.quick:
        grid = [(b, 128, args.methods) for b in (2048, 4096, 8192)]
    else:
        grid = [(b, 128, args.methods) for b in (4096, 8192, 16384, 32768)]
        grid += [(b, 128, ("chunked",)) for b in (65536, 131072)]
        grid += [(16384, 512, args.methods)]
    configs = []
    for b, d, methods in grid:
        for mode in args.modes:
            for method in methods:
                if mode not in SUPPORTS[method]:
                    continue
                # Beyond 32768 only the one-direction chunked row is in the default sweep.
                if b > 32768 and mode == "sym" and not args.sizes:
                    continue
                chunks = args.chunks if (method == "chunked" and args.chunks) else [args.chunk]
                for chunk in chunks:
                    configs.append(
                        {"method": method, "mode": mode, "B": b, "D": d, "chunk": chunk,
                         "device": args.device, "dtype": args.dtype, "repeats": args.repeats}
                    )  # fmt: skip
    return configs


def _table(rows: list[dict[str, Any]]) -> str:
    dense_time = {
        (r["B"], r["D"], r["mode"]): r["time_s"]
        for r in rows
        if r["method"] == "dense" and r["status"] == "ok"
    }
    lines = [
        "| B | D | mode | method | chunk | time (s) | extra memory (MiB) | floor fraction | vs dense |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        chunk = str(r["chunk"]) if r["method"] == "chunked" else ""
        if r["status"] != "ok":
            lines.append(
                f"| {r['B']} | {r['D']} | {r['mode']} | {r['method']} | {chunk} | "
                f"{r['status']}: {r['reason']} | | | |"
            )
            continue
        ref = dense_time.get((r["B"], r["D"], r["mode"]))
        ratio = f"{r['time_s'] / ref:.2f}x" if ref else ""
        lines.append(
            f"| {r['B']} | {r['D']} | {r['mode']} | {r['method']} | {chunk} | "
            f"{r['time_s']:.3f} | {r['extra_mib']:.0f} | {r['floor_fraction']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            series.setdefault((r["method"], r["mode"], r["D"], r["chunk"]), []).append(r)
    for (method, mode, d, chunk), pts in sorted(series.items()):
        pts.sort(key=lambda r: r["B"])
        label = f"{method} {mode} D={d}" + (f" chunk={chunk}" if method == "chunked" else "")
        style = "-" if method == "chunked" else "--"
        bs = [r["B"] for r in pts]
        ax_t.plot(bs, [r["time_s"] for r in pts], style, marker="o", label=label)
        ax_m.plot(bs, [max(r["extra_mib"], 1e-1) for r in pts], style, marker="o", label=label)
    for ax, ylabel in ((ax_t, "fwd+bwd time (s)"), (ax_m, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (N = M)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("InfoNCE fwd+bwd: dense vs chunked (one process)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _csv(kind: type, value: str) -> list[Any]:
    return [kind(v) for v in value.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.bench",
        description="Time and peak memory of InfoNCE fwd+bwd: dense vs chunked vs peers.",
    )
    p.add_argument("--quick", action="store_true", help="small sweep (B = 2048..8192, D = 128)")
    p.add_argument("--sizes", type=lambda s: _csv(int, s), help="batch sizes, e.g. 4096,8192")
    p.add_argument("--dims", type=lambda s: _csv(int, s), default=[128], help="embedding dims")
    p.add_argument("--modes", type=lambda s: _csv(str, s), default=list(MODES), help="one,sym")
    p.add_argument(
        "--methods", type=lambda s: _csv(str, s), default=list(METHODS), help=",".join(METHODS)
    )
    p.add_argument("--chunk", type=int, default=None, help="tile edge (default: the kernel's)")
    p.add_argument("--chunks", type=lambda s: _csv(int, s), help="one chunked row per tile edge")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs (1 when a run takes >10 s)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument(
        "--max-dense-gib", type=float, default=18.0,
        help="skip dense configurations whose estimated memory exceeds this",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; expected some of {', '.join(METHODS)}")
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; expected some of {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if args.chunk is None:
        from dist_infonce.kernels import DEFAULT_CHUNK

        args.chunk = DEFAULT_CHUNK
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--_worker"]:
        print(json.dumps(run_config(json.loads(raw[1]))))
        return 0
    args = parse_args(raw)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = plan(args)
    rates = {
        d: matmul_gflops(d, args.device, args.dtype) for d in sorted({c["D"] for c in configs})
    }
    print(
        "matmul rate: " + ", ".join(f"D={d}: {r:.0f} GFLOP/s" for d, r in rates.items()),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for i, cfg in enumerate(configs, 1):
        row: dict[str, Any] = {k: cfg[k] for k in ("method", "mode", "B", "D", "chunk")}
        why_not = _available(cfg["method"])
        est_gib = DENSE_BYTES_PER_LOGIT[cfg["mode"]] * cfg["B"] ** 2 / 2**30
        if why_not:
            row |= {"status": "skipped", "reason": why_not}
        elif cfg["method"] in DENSE_METHODS and est_gib > args.max_dense_gib:
            row |= {"status": "skipped", "reason": f"needs ~{est_gib:.0f} GiB"}
        else:
            row |= _run_subprocess(cfg, args.timeout)
        if row["status"] == "ok":
            floor_s = 4 * 2 * cfg["B"] ** 2 * cfg["D"] / (rates[cfg["D"]] * 1e9)
            row["floor_fraction"] = floor_s / row["time_s"]
            detail = (
                f"{row['time_s']:.3f} s, +{row['extra_mib']:.0f} MiB, "
                f"floor {row['floor_fraction']:.2f}, loss {row['loss']:.5f}"
            )
        else:
            detail = f"{row['status']}: {row['reason']}"
        label = f"{cfg['method']} {cfg['mode']} B={cfg['B']} D={cfg['D']}"
        print(f"[{i}/{len(configs)}] {label}: {detail}", flush=True)
        rows.append(row)

    table = _table(rows)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "dtype": args.dtype,
        "temperature": TEMPERATURE,
        "matmul_gflops": rates,
    }
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "table.md").write_text(table + "\n")
    plotted = _plot(rows, args.out / "bench.png")
    print()
    print(table)
    print(
        f"\nwrote {args.out / 'bench.json'}, {args.out / 'table.md'}"
        + (f", {args.out / 'bench.png'}" if plotted else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
