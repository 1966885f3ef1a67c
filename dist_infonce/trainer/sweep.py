"""Run a grid of short training runs and print a table of their final evaluation.

Example::

    python -m dist_infonce.sweep --config configs/default.yaml \\
        --grid train.lr=0.1,0.3 train.batch_size=64,128 -- train.steps=200

runs the four combinations one after the other, each as its own process
(``python -m dist_infonce.train``, or torchrun with ``--launcher torchrun
--nproc N``) with its own ``output_dir`` under the sweep root and the W&B group
named after the sweep, then prints one row per run with the final ``eval/*``
values read back from each run's ``metrics.jsonl``. The table is also written to
``<root>/summary.md`` and the rows to ``<root>/summary.json``.

Overrides that every run shares go before ``--grid`` or after ``--``; a grid axis
with a single value is the same thing. A failed run does not stop the sweep: the
others still run, the table marks it, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

#: Keys the sweep sets per run; a user value would make runs share a directory.
RESERVED_KEYS = ("output_dir",)
#: Seconds a run gets to exit after SIGTERM (torchrun forwards it to the workers).
TERM_GRACE_S = 15.0


@dataclass(frozen=True)
class Axis:
    """One grid dimension: a dotted config key and the values it takes."""

    key: str
    values: tuple[str, ...]


@dataclass
class RunResult:
    """What one run of the sweep produced.

    Attributes:
        name: Label of the run (its grid values), also its directory name.
        params: The grid values of this run, by key.
        output_dir: The run's ``output_dir``.
        returncode: Exit status of the run's process (negative: killed by signal).
        seconds: Wall time of the run.
        timed_out: Whether the sweep stopped the run at ``--timeout``.
        final: The last logged training metrics (``step``, ``loss``, ...).
        evals: The final ``eval/*`` metrics.
    """

    name: str
    params: dict[str, str]
    output_dir: str
    returncode: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    final: dict[str, float] = field(default_factory=dict)
    evals: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """A run succeeded when it exited 0 and wrote its metrics."""
        return self.returncode == 0 and bool(self.final or self.evals)

    @property
    def status(self) -> str:
        """Short status for the table."""
        if self.returncode is None:
            return "not run"
        if self.timed_out:
            return "timeout"
        if self.returncode != 0:
            return f"failed ({self.returncode})"
        return "ok" if self.ok else "no metrics"


def parse_axis(text: str) -> Axis:
    """Parse ``key=v1,v2,...`` into an :class:`Axis`.

    Raises:
        argparse.ArgumentTypeError: The text is not ``key=value[,value...]``.
    """
    key, sep, values = text.partition("=")
    key = key.strip()
    parts = tuple(v.strip() for v in values.split(","))
    if not sep or not key or not all(parts):
        raise argparse.ArgumentTypeError(f"expected key=v1,v2,... (got {text!r})")
    if key in RESERVED_KEYS:
        raise argparse.ArgumentTypeError(f"{key} is set per run; use --root for the sweep root")
    return Axis(key, parts)


def parse_override(text: str) -> str:
    """Check a shared ``key=value`` override.

    Raises:
        argparse.ArgumentTypeError: Not ``key=value``, or a key the sweep sets itself.
    """
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value (got {text!r})")
    if key.strip() in RESERVED_KEYS:
        raise argparse.ArgumentTypeError(f"{key} is set per run; use --root for the sweep root")
    return text


def grid_points(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """Return the cartesian product of the axes, the last axis varying fastest."""
    keys = [a.key for a in axes]
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(a.values for a in axes))
    ]


def run_label(index: int, params: dict[str, str], varying: Sequence[str]) -> str:
    """Return a file-name-safe label such as ``03-lr=0.3-batch_size=128``.

    Only keys that take more than one value appear; the last dotted component
    names a key unless two varying keys share it.
    """
    tails = [k.rsplit(".", 1)[-1] for k in varying]
    parts = [f"{index:02d}"]
    for key, tail in zip(varying, tails, strict=True):
        name = tail if tails.count(tail) == 1 else key
        parts.append(f"{name}={params[key]}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def train_command(
    launcher: str, nproc: int, config: str | None, overrides: Sequence[str]
) -> list[str]:
    """Build the command line of one run.

    Args:
        launcher: ``python`` (one process) or ``torchrun`` (``nproc`` processes on
            this machine, standalone rendezvous on a free port).
        nproc: Processes per run for torchrun.
        config: YAML config file, or None for the trainer's embedded default.
        overrides: ``key=value`` overrides, applied in order.

    Returns:
        The argv list, using this interpreter (``sys.executable``).
    """
    cmd = [sys.executable]
    if launcher == "torchrun":
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "dist_infonce.train"]
    if config:
        cmd += ["--config", config]
    return cmd + list(overrides)


def read_metrics(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Read a run's ``metrics.jsonl``.

    Returns:
        ``(final, evals)``: the last line that has a ``loss`` (training metrics),
        and the ``eval/*`` values of the last line that has any. Empty dicts when
        the file is missing; unparsable lines (a run killed mid-write) are skipped.
    """
    final: dict[str, float] = {}
    evals: dict[str, float] = {}
    if not path.is_file():
        return final, evals
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        if "loss" in row:
            final = row
        found = {k: v for k, v in row.items() if k.startswith("eval/")}
        if found:
            evals = found
    return final, evals


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a run's whole process group: SIGTERM, then SIGKILL after a grace."""
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


def run_one(cmd: Sequence[str], log_path: Path, timeout: float | None) -> tuple[int, bool]:
    """Run one training process with its output in ``log_path``.

    The run gets its own process group so that a timeout or Ctrl-C stops torchrun
    and all of its workers, not only the launcher.

    Returns:
        ``(returncode, timed_out)``.
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _stop(proc)
            return proc.returncode if proc.returncode is not None else -9, True
        except BaseException:
            _stop(proc)
            raise


def _fmt(value: object) -> str:
    """Format a table cell: 4 significant digits for floats, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def summary_table(results: Sequence[RunResult], keys: Sequence[str]) -> str:
    """Return a Markdown table: grid values, status, final loss, eval metrics, time."""
    eval_keys = sorted({k for r in results for k in r.evals})
    header = ["run", *keys, "status", "step", "loss", "samples/s", *eval_keys, "time (s)"]
    rows = [
        [
            r.name,
            *(r.params[k] for k in keys),
            r.status,
            _fmt(r.final.get("step")),
            _fmt(r.final.get("loss")),
            _fmt(r.final.get("samples_per_s")),
            *(_fmt(r.evals.get(k)) for k in eval_keys),
            f"{r.seconds:.1f}",
        ]
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m dist_infonce.sweep",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=(
            "example: python -m dist_infonce.sweep --config configs/default.yaml "
            "--grid train.lr=0.1,0.3 train.batch_size=64,128 -- train.steps=200"
        ),
    )
    p.add_argument("--config", help="YAML config of every run (default: the embedded default)")
    p.add_argument(
        "--grid",
        nargs="+",
        type=parse_axis,
        required=True,
        metavar="KEY=V1,V2",
        help="grid axes; every combination runs once",
    )
    p.add_argument(
        "--launcher",
        choices=("python", "torchrun"),
        default="python",
        help="how each run starts (default: python, one process)",
    )
    p.add_argument(
        "--nproc", type=int, default=2, help="processes per run with --launcher torchrun"
    )
    p.add_argument(
        "--root",
        type=Path,
        help="sweep directory (default: runs/sweep-<config>-<time>); run i writes <root>/<label>",
    )
    p.add_argument("--name", help="sweep name, used as W&B group (default: the root's name)")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds after which a run is stopped"
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument(
        "overrides",
        nargs="*",
        type=parse_override,
        metavar="KEY=VALUE",
        help="overrides shared by all runs (before --grid or after --)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; return 0 when every run succeeded, 1 otherwise, 2 on bad usage."""
    parser = build_parser()
    # Intermixed: shared overrides may stand before --grid as well as after `--`.
    args = parser.parse_intermixed_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    axes: list[Axis] = args.grid
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        parser.error(f"a key appears twice in --grid: {keys}")
    varying = [a.key for a in axes if len(a.values) > 1]
    stem = Path(args.config).stem if args.config else "default"
    root: Path = args.root or Path("runs") / f"sweep-{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    name: str = args.name or root.name

    points = grid_points(axes)
    results: list[RunResult] = []
    for i, params in enumerate(points):
        label = run_label(i, params, varying)
        out = root / label
        results.append(RunResult(name=label, params=params, output_dir=str(out)))

    print(f"sweep {name}: {len(points)} run(s) in {root}", flush=True)
    if not args.dry_run:
        (root / "logs").mkdir(parents=True, exist_ok=True)
    interrupted = False
    for i, res in enumerate(results):
        # Order matters: the user's shared overrides may replace the W&B names,
        # and the grid values come last so they always win.
        overrides = [
            f"output_dir={res.output_dir}",
            f"wandb.group={name}",
            f"wandb.name={name}-{res.name}",
            *args.overrides,
            *(f"{k}={v}" for k, v in res.params.items()),
        ]
        cmd = train_command(args.launcher, args.nproc, args.config, overrides)
        print(f"[{i + 1}/{len(results)}] {res.name}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        log_path = root / "logs" / f"{res.name}.log"
        start = time.monotonic()
        try:
            res.returncode, res.timed_out = run_one(cmd, log_path, args.timeout)
        except KeyboardInterrupt:
            res.returncode, interrupted = 130, True
        res.seconds = time.monotonic() - start
        res.final, res.evals = read_metrics(Path(res.output_dir) / "metrics.jsonl")
        print(f"    {res.status} in {res.seconds:.1f} s (log: {log_path})", flush=True)
        if not res.ok:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            print("\n".join("    | " + t for t in tail), flush=True)
        if interrupted:
            print("interrupted: remaining runs skipped", flush=True)
            break
    if args.dry_run:
        return 0

    table = summary_table(results, keys)
    print(f"\nsweep {name} ({root}):\n{table}", flush=True)
    (root / "summary.md").write_text(table + "\n")
    (root / "summary.json").write_text(
        json.dumps([{**asdict(r), "status": r.status} for r in results], indent=2) + "\n"
    )
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} run(s) failed: {', '.join(failed)}", flush=True)
        return 130 if interrupted else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
