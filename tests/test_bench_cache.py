"""python -m dist_infonce.bench cache measures real trainer steps and writes its outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.bench_cli import REPO, read_json, run_bench


@pytest.mark.slow
def test_grad_cache_bench_small_run(tmp_path: Path) -> None:
    """End to end on two gloo processes per row, tiny sizes, run outside the checkout."""
    out, png = tmp_path / "out", tmp_path / "gc.png"
    proc = run_bench(
        "cache", "--sizes", "64", "--tasks", "clip", "--micro", "16", "--out", str(out),
        "--plot", str(png), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_json(out / "grad_cache.json")["rows"]
    assert [(r["mode"], r["micro"]) for r in rows] == [("uncached", None), ("cached", 16)]
    for r in rows:
        assert r["peak_mib"] >= r["base_mib"] > 50 and r["us_per_sample"] > 0, r
    assert "| clip | 64 |" in proc.stdout and png.stat().st_size > 10_000
    # The task is an override list (no file is read); it is the step of
    # configs/clip_synthetic.yaml: the same model, loss and data.
    task = yaml.safe_load((REPO / "configs" / "clip_synthetic.yaml").read_text())
    for r in rows:
        for section in ("model", "loss", "data"):
            for key, value in task[section].items():
                assert r["config"][section][key] == value, (section, key)


def test_grad_cache_bench_rejects_bad_sizes(tmp_path: Path) -> None:
    proc = run_bench("cache", "--sizes", "63", "--world", "2", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "multiples of --world 2" in proc.stderr
