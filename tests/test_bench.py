"""The benchmark measures what it says: same losses across methods, sane rows, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_infonce.bench import Config, build_grid, build_parser, dense_estimate_gib, run_config


@pytest.mark.parametrize("mode", ["one", "sym"])
def test_worker_chunked_matches_dense(mode: str) -> None:
    # A tile edge that does not divide B, so the chunked rows span partial tiles.
    rows = {
        method: run_config(
            Config(method, mode, 256, 16, 96 if method == "chunked" else None, repeats=1)
        )
        for method in ("dense", "chunked")
    }
    for row in rows.values():
        assert row["time_s"] > 0 and row["warmup_s"] > 0
        assert row["repeats_used"] == 1 and row["extra_mib"] >= 0
    ref = rows["dense"]["loss"]
    assert abs(rows["chunked"]["loss"] - ref) <= 1e-4 * abs(ref)


def test_grid_and_skip_rule() -> None:
    args = build_parser().parse_args(["--quick", "--chunks", "512,1024"])
    grid = build_grid(args)
    assert {c.batch for c in grid} == {2048, 4096, 8192} and {c.dim for c in grid} == {128}
    # Peers only in the mode they implement; one chunked row per distinct tile edge.
    assert not [c for c in grid if c.method == "open_clip" and c.mode == "one"]
    assert not [c for c in grid if c.method == "info_nce_pytorch" and c.mode == "sym"]
    chunks = sorted(
        c.chunk for c in grid if c.method == "chunked" and c.batch == 2048 and c.mode == "one"
    )
    assert chunks == sorted({args.chunk, 512, 1024})
    full = build_grid(build_parser().parse_args([]))
    assert {c.method for c in full if c.batch == 131072} == {"chunked"}
    assert {c.mode for c in full if c.batch == 131072} == {"one"}
    assert {(c.batch, c.dim) for c in full if c.dim == 512} == {(16384, 512)}
    big = Config("dense", "one", 65536, 128, None)
    assert (
        dense_estimate_gib(big) > 14
        and dense_estimate_gib(Config("chunked", "one", 65536, 128, 1024)) is None
    )


def test_cli_writes_json_table_png(tmp_path: Path) -> None:
    # Three fresh interpreters (probe + 2 configurations): the slow part of this file.
    cmd = [
        sys.executable, "-m", "dist_infonce.bench", "--sizes", "256", "--dims", "16",
        "--repeats", "1", "--chunk", "96", "--methods", "dense,chunked", "--modes", "one",
        "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine"]["matmul_gflops"]["16"] > 0 and data["machine"]["torch"]
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "chunked"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["time_s"] > 0 and row["floor_fraction"] > 0
    assert abs(rows["chunked"]["loss"] - rows["dense"]["loss"]) <= 1e-4 * abs(rows["dense"]["loss"])
    assert rows["dense"]["speedup_vs_dense"] == pytest.approx(1.0)
    table = (tmp_path / "table.md").read_text()
    assert "| 256 | 16 | one | chunked[96] |" in table and table in proc.stdout
    assert "[2/2] B=256 D=16 one" in proc.stdout  # one progress line per configuration
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_cli_rejects_unknown_method() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--methods", "dense,fast"])
    assert exc.value.code == 2
