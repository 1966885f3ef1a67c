"""python -m dist_infonce.bench_cache measures real steps and writes its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grad_cache_bench_small_run(tmp_path: Path) -> None:
    """End to end on two gloo processes per row, tiny sizes."""
    out, png = tmp_path / "out", tmp_path / "gc.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dist_infonce.bench_cache", "--sizes", "64", "--tasks", "clip"]
    cmd += ["--micro", "16", "--out", str(out), "--plot", str(png)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((out / "grad_cache.json").read_text())["rows"]
    assert [(r["mode"], r["micro"]) for r in rows] == [("uncached", None), ("cached", 16)]
    for r in rows:
        assert r["peak_mib"] >= r["base_mib"] > 50 and r["us_per_sample"] > 0, r
    assert "| clip | 64 |" in proc.stdout and png.stat().st_size > 10_000


def test_grad_cache_bench_rejects_bad_sizes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_infonce.bench_cache", "--sizes", "63", "--world", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "multiples of --world 2" in proc.stderr
