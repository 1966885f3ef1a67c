"""python -m dist_infonce.bench data measures each source's loader and the trainer on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_cli import read_json, run_bench


@pytest.mark.slow
def test_data_bench_small_run(tmp_path: Path) -> None:
    """Tiny sizes, two sources, 0 and 1 workers, outside the checkout: every row measured."""
    out = tmp_path / "out"
    proc = run_bench(
        "data", "--sources", "vectors,shards", "--workers", "0,1", "--rows", "128",
        "--batch", "32", "--batches", "2", "--trainer-steps", "5", "--out", str(out),
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = read_json(out / "data_bench.json")
    assert [r["source"] for r in result["rows"]] == ["vectors", "shards"]
    for r in result["rows"]:
        assert set(r["loader"]) == {"0", "1"}
        for cell in r["loader"].values():
            assert cell["rows_per_s"] > 0 and cell["rows"] == 64 and cell["first_batch_s"] >= 0
        assert r["trainer"]["rows_per_s"] > 0
    assert "| vectors |" in proc.stdout and "| shards |" in proc.stdout
    assert (out / "table.md").read_text().startswith("| source | loader, 0 workers")


def test_data_bench_rejects_bad_options(tmp_path: Path) -> None:
    proc = run_bench("data", "--sources", "audio", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "expected a comma-separated subset of" in proc.stderr
    proc = run_bench("data", "--rows", "100", "--batch", "64", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "--rows 100 must hold at least two batches" in proc.stderr
