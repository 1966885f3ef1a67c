"""The benchmark measures what it says: same losses across methods, sane rows, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_infonce.bench import (
    CPU_METHODS,
    GPU_DIM,
    GPU_EXTRA,
    GPU_SIZES,
    METHODS,
    Config,
    _row,
    build_grid,
    build_parser,
    dense_estimate_gib,
    main,
    peer_missing,
    run_config,
    write_outputs,
)


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


# ------------------------------------------------------------------ GPU sweep


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_gpu_grid_and_cpu_defaults() -> None:
    grid = build_grid(build_parser().parse_args(["--device", "cuda"]))
    assert {c.dtype for c in grid} == {"bfloat16"} and {c.device for c in grid} == {"cuda"}
    assert {(c.batch, c.dim) for c in grid} == {(b, GPU_DIM) for b in GPU_SIZES} | set(GPU_EXTRA)
    assert {c.method for c in grid} == set(METHODS)
    assert {c.mode for c in grid if c.method in ("triton", "inf_cl")} == {"one", "sym"}
    # Dense B x B logits at B = 256k in bf16 cannot fit an 80 GB GPU: skipped by estimate.
    assert dense_estimate_gib(Config("dense", "sym", 262144, 512, None, "bfloat16")) > 80
    cpu = build_grid(build_parser().parse_args(["--quick"]))
    assert {c.method for c in cpu} <= set(CPU_METHODS) and {c.dtype for c in cpu} == {"float32"}
    assert peer_missing("triton", "cpu") is not None and peer_missing("inf_cl", "cpu") is not None


def _synthetic_rows() -> list[dict]:
    # Rows shaped as main() builds them, with made-up measurements: the writer's
    # derived columns are checked against their definitions, not fixed numbers.
    rows = []
    for i, method in enumerate(("dense", "chunked", "triton", "inf_cl")):
        cfg = Config(method, "sym", 16384, 512, None, "bfloat16", "cuda")
        row = _row(cfg)
        row.update(
            time_s=0.01 * (4 - i), times_s=[0.01 * (4 - i)], warmup_s=0.5, repeats_used=3,
            extra_mib=100.0 * (4 - i), loss=9.7, rate_gflops=600_000.0 + i, load_before=[0.1],
        )  # fmt: skip
        rows.append(row)
    skipped = _row(Config("dense", "sym", 262144, 512, None, "bfloat16", "cuda"))
    skipped.update(status="skipped", reason="dense estimate 512.0 GiB > --max-dense-gib 64.0")
    failed = _row(Config("inf_cl", "sym", 1048576, 512, None, "bfloat16", "cuda"))
    failed.update(status="failed", reason="timeout after 90 s")
    return [*rows, skipped, failed]


def test_writer_derives_rates_and_writes_table_json_png(tmp_path: Path) -> None:
    rows = _synthetic_rows()
    machine = {
        "matmul_gflops": {"512": 550_000.0}, "device_name": "a GPU", "dtype": "bfloat16",
        "threads": 16,
    }  # fmt: skip
    table, plotted = write_outputs(rows, machine, tmp_path, tmp_path / "bench_gpu.png")
    best_rate = 600_003.0  # the best of the probe and every row's own rate
    for r in rows[:4]:
        flops = 4 * 2.0 * r["B"] * r["B"] * r["D"]
        assert r["achieved_gflops"] == pytest.approx(flops / r["time_s"] / 1e9)
        assert r["floor_fraction"] == pytest.approx(r["achieved_gflops"] / best_rate)
        assert r["speedup_vs_dense"] == pytest.approx(rows[0]["time_s"] / r["time_s"])
        assert f"| 16384 | 512 | sym | {r['label']} | {r['time_s']:.3g} |" in table
    assert "skipped: dense estimate 512.0 GiB" in table and "failed: timeout after 90 s" in table
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == len(rows) and (tmp_path / "table.md").read_text() == table
    assert plotted and (tmp_path / "bench_gpu.png").stat().st_size > 0


def test_triton_variants_become_rows_and_set_the_kernel_knobs() -> None:
    from dist_infonce.bench import _loss_fn
    from dist_infonce.kernels import triton_lse

    args = ["--device", "cuda", "--sizes", "16384", "--triton-variants", "64x256x16,32X64x4"]
    grid = build_grid(build_parser().parse_args(args))
    labels = {c.label for c in grid if c.method == "triton"}
    assert labels == {"triton", "triton[64x256x16]", "triton[32x64x4]"}
    saved = triton_lse.BLOCK_D_MAX, triton_lse.BWD_WARPS
    try:
        _loss_fn(Config("triton", "one", 256, 16, 32, variant="32x64x4"))
        assert (triton_lse.BLOCK_D_MAX, triton_lse.BWD_WARPS) == (64, 4)
    finally:
        triton_lse.BLOCK_D_MAX, triton_lse.BWD_WARPS = saved
    for bad in ("64x100x8", "64x128", "8x128x8", "64x128x3"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--triton-variants", bad])
