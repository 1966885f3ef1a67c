"""The loss sweep's report: derived columns, the Markdown table, the plot, the files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_infonce.bench.common import fmt, log_log_axes, pyplot, save_figure, write_json
from dist_infonce.bench.loss_worker import METHODS, Config

__all__ = ["FLOOR_MATMULS", "floor_flops", "format_table", "plot", "write_outputs"]


#: Matmuls of 2*N*M*D flops an exact tiled kernel cannot avoid, per mode: one
#: direction and SigLIP form their gradients in the forward (logits, dq, dk); the
#: symmetric loss's column statistic needs every row first (logits; recompute, dq, dk).
FLOOR_MATMULS = {"one": 3, "sym": 4, "siglip": 3}


def floor_flops(cfg: Config) -> float:
    """Flops of the mode's matmul floor: ``FLOOR_MATMULS[mode] x 2*N*M*D``, N = M = B."""
    return FLOOR_MATMULS[cfg.mode] * 2.0 * cfg.batch * cfg.batch * cfg.dim


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
        r["floor_s"] = floor_flops(cfg) / (rate * 1e9) if rate else None
        if r["status"] == "ok" and rate:
            r["floor_fraction"] = r["floor_s"] / r["time_s"]
            r["achieved_gflops"] = floor_flops(cfg) / r["time_s"] / 1e9


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
        # The floor depends on (B, D) and the mode's matmul count; rows of any method
        # carry it. One line per count present (3: one direction, SigLIP; 4: symmetric).
        for units in sorted({FLOOR_MATMULS[r["mode"]] for r in ok if r["D"] == d}):
            floor_by_b = {
                r["B"]: r["floor_s"]
                for r in ok
                if r["D"] == d and r.get("floor_s") and FLOOR_MATMULS[r["mode"]] == units
            }
            bs = sorted(floor_by_b)
            ax_t.plot(
                bs, [floor_by_b[b] for b in bs], color="black", linestyle=style,
                linewidth=0.8 if units == 4 else 1.4, alpha=0.6,
                label=f"{units}-matmul floor D={d}",
            )  # fmt: skip
    rates = ", ".join(f"D={d}: {g:.0f}" for d, g in machine["matmul_gflops"].items())
    fig.suptitle(
        f"contrastive losses fwd+bwd, {machine.get('device_name', '?')}, {machine.get('dtype', '?')}, "
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
