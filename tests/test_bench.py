"""The benchmark runs end to end on a tiny sweep and its rows agree with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_tiny_sweep_writes_consistent_rows(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "dist_infonce.bench", "--sizes", "300", "--dims", "8",
        "--repeats", "1", "--chunk", "64", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["method"], r["mode"]): r for r in data["rows"]}
    assert data["meta"]["matmul_gflops"]["8"] > 0
    for key in [("dense", "one"), ("chunked", "one"), ("dense", "sym"), ("chunked", "sym")]:
        row = rows[key]
        assert row["status"] == "ok", row
        assert row["time_s"] > 0 and row["floor_fraction"] > 0
    # Same inputs and temperature: every method that ran computes the same loss.
    for (method, mode), row in rows.items():
        if row["status"] == "ok":
            ref = rows[("dense", mode)]["loss"]
            assert abs(row["loss"] - ref) <= 1e-4 * abs(ref), (method, mode)
    assert "| 300 | 8 | one | chunked | 64 |" in (tmp_path / "table.md").read_text()
    assert "[1/" in proc.stdout  # a progress line per configuration


def test_bench_rejects_unknown_method() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_infonce.bench", "--methods", "dense,fast"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--methods: unknown method 'fast'" in proc.stderr
