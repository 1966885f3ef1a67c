"""The loss sweep (``python -m dist_infonce.bench``) measures what it says, checked through
its command line: the same loss across methods, rows and derived columns as defined, the
grid the options ask for, clear errors, and its outputs (JSON, table, plot)."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_infonce.kernels import DEFAULT_CHUNK
from tests.bench_cli import read_json, run_bench
from tests.conftest import record_error

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
CPU_METHODS = {"dense", "chunked", "torch_lce", "info_nce_pytorch", "open_clip"}
ALL_METHODS = CPU_METHODS | {"triton", "inf_cl"}


def _floor_flops(row: dict[str, Any]) -> float:
    # The matmul floor, N = M = B: one direction and SigLIP form their gradient in the
    # forward (3 matmuls), the symmetric loss recomputes (4).
    units = {"one": 3, "sym": 4, "siglip": 3}[row["mode"]]
    return units * 2.0 * row["B"] * row["B"] * row["D"]


def test_cli_rows_json_table_png(tmp_path: Path) -> None:
    # A tile edge that does not divide B, so the chunked rows span partial tiles.
    # Five fresh interpreters (probe + 4 configurations): the slow part of this file.
    out = tmp_path / "out"
    proc = run_bench(
        "--sizes", "256", "--dims", "16", "--repeats", "1", "--chunk", "96",
        "--methods", "dense,chunked", "--modes", "one,sym", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = read_json(out / "bench.json")
    assert "partial" not in data and data["machine"]["torch"] == torch.__version__
    best = data["machine"]["matmul_gflops"]["16"]  # the best of the probe and every row
    rows = {(r["method"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(m, mode) for m in ("dense", "chunked") for mode in ("one", "sym")}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["time_s"] > 0 and row["warmup_s"] > 0 and row["repeats_used"] == 1
        assert row["extra_mib"] >= 0 and 0 < row["rate_gflops"] <= best
        assert row["achieved_gflops"] == pytest.approx(_floor_flops(row) / row["time_s"] / 1e9)
        assert row["floor_fraction"] == pytest.approx(row["achieved_gflops"] / best)
    for mode in ("one", "sym"):
        dense, chunked = rows[("dense", mode)], rows[("chunked", mode)]
        got, ref = torch.tensor(chunked["loss"]), torch.tensor(dense["loss"])
        assert record_error(f"bench chunked row vs dense row ({mode})", got, ref) <= 1e-5
        assert dense["speedup_vs_dense"] == pytest.approx(1.0)
        assert chunked["speedup_vs_dense"] == pytest.approx(dense["time_s"] / chunked["time_s"])
    table = (out / "table.md").read_text()
    assert "| 256 | 16 | one | chunked[96] |" in table and "| 256 | 16 | sym | dense |" in table
    assert table in proc.stdout
    assert "[4/4] B=256 D=16 sym" in proc.stdout  # one progress line per configuration
    assert (out / "bench.png").stat().st_size > 0


def test_siglip_and_torch_linear_cross_entropy_rows(tmp_path: Path) -> None:
    # SigLIP rows (ours dense and tiled, OpenCLIP's SigLipLoss where installed) and
    # torch's F.linear_cross_entropy as a peer of the softmax rows: each computes the
    # loss of its mode's reference row on the same inputs.
    out = tmp_path / "out"
    methods = "dense,chunked,torch_lce" + (",open_clip" if HAS_OPEN_CLIP else "")
    proc = run_bench(
        "--sizes", "200", "--dims", "16", "--repeats", "1", "--chunk", "64",
        "--methods", methods, "--modes", "one,sym,siglip", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {(r["method"], r["mode"]): r for r in read_json(out / "bench.json")["rows"]}
    expected = {("torch_lce", "one"), ("torch_lce", "sym"), ("chunked", "siglip")}
    if HAS_OPEN_CLIP:
        expected.add(("open_clip", "siglip"))
    for key in expected:
        row = rows[key]
        assert row["status"] == "ok", row
        ref = rows[("dense", key[1])]
        got = torch.tensor(row["loss"])
        assert (
            record_error(f"bench {key[0]} row vs dense ({key[1]})", got, torch.tensor(ref["loss"]))
            <= 1e-5
        )
        assert row["achieved_gflops"] == pytest.approx(_floor_flops(row) / row["time_s"] / 1e9)
    assert "| 200 | 16 | siglip | chunked[64] |" in (out / "table.md").read_text()


# --------------------------------------------------------------- the grid (--dry-run)


def _plan(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    proc = run_bench("--dry-run", "--out", str(tmp_path), *args, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_json(tmp_path / "plan.json")["rows"]
    assert f"{len(rows)} configurations" in proc.stdout
    assert not (tmp_path / "bench.json").exists()  # nothing measured
    return rows


def test_full_cpu_grid_peer_modes_tile_edges_and_skip_rules(tmp_path: Path) -> None:
    rows = _plan(tmp_path, "--chunks", "512,1024")
    by = {(r["label"], r["mode"], r["B"], r["D"]): r for r in rows}
    # CPU defaults: the methods that run on a CPU, in float32.
    assert {r["method"] for r in rows} == CPU_METHODS and {r["dtype"] for r in rows} == {"float32"}
    # Peers only in the mode they implement; one chunked row per distinct tile edge.
    assert not [r for r in rows if r["method"] == "open_clip" and r["mode"] == "one"]
    assert not [r for r in rows if r["method"] == "info_nce_pytorch" and r["mode"] == "sym"]
    chunks = [
        r["chunk"]
        for r in rows
        if r["method"] == "chunked" and r["B"] == 4096 and r["mode"] == "one"
    ]
    assert sorted(chunks) == sorted({DEFAULT_CHUNK, 512, 1024})
    # Past B = 32768 only the chunked kernel runs (one direction, SigLIP); D = 512 at
    # B = 16384 only.
    big = {(r["method"], r["mode"]) for r in rows if r["B"] > 32768}
    assert big == {("chunked", "one"), ("chunked", "siglip")}
    assert {(r["B"], r["D"]) for r in rows if r["D"] != 128} == {(16384, 512)}
    assert {r["B"] for r in rows} == {4096, 8192, 16384, 32768, 65536, 131072}
    # The dense memory estimate (3.1 / 4.1 copies of the B x B float32 logits) against
    # the 14 GiB CPU default: one direction at 32768 runs, symmetric is skipped.
    one, sym = by[("dense", "one", 32768, 128)], by[("dense", "sym", 32768, 128)]
    assert one["est_dense_gib"] == pytest.approx(3.1 * 32768**2 * 4 / 2**30)
    assert one["status"] == "planned"
    assert sym["status"] == "skipped" and sym["reason"].startswith("dense estimate 16.4 GiB")
    assert by[(f"chunked[{DEFAULT_CHUNK}]", "one", 131072, 128)]["est_dense_gib"] is None


def test_gpu_grid_with_triton_variants(tmp_path: Path) -> None:
    # Planned without a GPU: --dry-run needs no device.
    rows = _plan(
        tmp_path, "--device", "cuda", "--max-dense-gib", "80",
        "--triton-variants", "64x256x16,32X64x4",
    )  # fmt: skip
    assert {r["dtype"] for r in rows} == {"bfloat16"} and {r["device"] for r in rows} == {"cuda"}
    points = {(b, 512) for b in (16384, 65536, 262144, 1048576)} | {(65536, 1024)}
    assert {(r["B"], r["D"]) for r in rows} == points
    assert {r["method"] for r in rows} == ALL_METHODS
    assert {r["mode"] for r in rows if r["method"] == "triton"} == {"one", "sym", "siglip"}
    assert {r["mode"] for r in rows if r["method"] == "inf_cl"} == {"one", "sym"}
    for b, d in points:
        for mode in ("one", "sym"):
            labels = {
                (r["label"], r["chunk"])
                for r in rows
                if r["method"] == "triton" and (r["B"], r["D"], r["mode"]) == (b, d, mode)
            }
            assert labels == {("triton", None), ("triton[64x256x16]", 64), ("triton[32x64x4]", 32)}
    # Dense B x B logits at B = 256k in bf16 cannot fit an 80 GB GPU: skipped by estimate.
    big = next(r for r in rows if (r["method"], r["mode"], r["B"]) == ("dense", "sym", 262144))
    assert big["status"] == "skipped" and "> --max-dense-gib 80.0" in big["reason"]


# ------------------------------------------------------------------ errors, redraw


BAD_VARIANTS = ("64x100x8", "64x128", "8x128x8", "64x128x3")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--methods", "dense,fast"], ["argument --methods", "'dense,fast'"]),
        # Every bad variant is named in the one message.
        (["--triton-variants", ",".join(BAD_VARIANTS)], [f"'{v}'" for v in BAD_VARIANTS]),
    ],
    ids=["method", "triton-variants"],
)
def test_cli_rejects_bad_options(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    proc = run_bench(*args, "--out", str(tmp_path), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for text in expected:
        assert text in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_bench("--device", "cuda", "--out", str(tmp_path), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "--device cuda: CUDA is not available" in proc.stderr


def _row(method: str, **fields: Any) -> dict[str, Any]:
    # A row shaped as the sweep writes it into bench.json (a CUDA run's, B = 16384).
    b, d, mode = fields.pop("B", 16384), 512, "sym"
    config = {"method": method, "mode": mode, "batch": b, "dim": d, "chunk": None}
    config |= {"dtype": "bfloat16", "device": "cuda", "repeats": 3}
    row = {"method": method, "label": method, "mode": mode, "B": b, "D": d, "chunk": None}
    return row | {"status": "ok", "reason": "", "config": config} | fields


def test_redraw_derives_rates_and_writes_table_json_png(tmp_path: Path) -> None:
    # Made-up measurements: the derived columns are checked against their definitions.
    rows = []
    for i, method in enumerate(("dense", "chunked", "triton", "inf_cl")):
        t = 0.01 * (4 - i)
        measured = {"time_s": t, "times_s": [t], "warmup_s": 0.5, "repeats_used": 3}
        measured |= {"extra_mib": 100.0 * (4 - i), "loss": 9.7, "load_before": [0.1]}
        rows.append(_row(method, rate_gflops=600_000.0 + i, **measured))
    rows.append(_row("dense", B=262144, status="skipped", reason="dense estimate 512.0 GiB"))
    rows.append(_row("inf_cl", B=1048576, status="failed", reason="timeout after 90 s"))
    machine = {"matmul_gflops": {"512": 550_000.0}, "device_name": "a GPU", "dtype": "bfloat16"}
    src = tmp_path / "run" / "bench.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"machine": machine, "rows": rows, "partial": True}))
    out, png = tmp_path / "out", tmp_path / "bench_gpu.png"
    proc = run_bench("--redraw", str(src), "--out", str(out), "--plot", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = read_json(out / "bench.json")
    assert len(data["rows"]) == len(rows) and data["machine"]["matmul_gflops"]["512"] == 600_003.0
    got = data["rows"]
    for r in got[:4]:
        assert r["achieved_gflops"] == pytest.approx(_floor_flops(r) / r["time_s"] / 1e9)
        assert r["floor_fraction"] == pytest.approx(r["achieved_gflops"] / 600_003.0)
        assert r["speedup_vs_dense"] == pytest.approx(got[0]["time_s"] / r["time_s"])
    table = (out / "table.md").read_text()
    for r in got[:4]:
        assert f"| 16384 | 512 | sym | {r['label']} | {r['time_s']:.3g} |" in table
    assert "skipped: dense estimate 512.0 GiB" in table and "failed: timeout after 90 s" in table
    assert table in proc.stdout and png.stat().st_size > 0


def _imports(path: Path) -> set[str]:
    """Every module a file imports (also inside functions), by absolute name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_layout_tests_drive_the_cli_and_the_modes_do_not_import_each_other() -> None:
    # Tests check the benchmark through its command line, never by importing it. Inside
    # it, each module may import only what this map allows: the modes never import
    # each other, common imports no mode, and the loss sweep's parts form a chain.
    tests = Path(__file__).parent
    bench = tests.parent / "dist_infonce" / "bench"
    offenders = [
        p.name
        for p in sorted(tests.glob("*.py"))
        if any(n.split(".")[:2] == ["dist_infonce", "bench"] for n in _imports(p))
    ]
    assert offenders == []
    allowed = {
        "__init__": set(),
        "__main__": set(),  # it imports the chosen mode by name, at run time
        "common": set(),
        "loss_worker": {"common"},
        "loss_report": {"common", "loss_worker"},
        "loss": {"common", "loss_worker", "loss_report"},
        "dist": {"common"},
        "cache": {"common"},
        "fsdp": {"common"},
        "data": {"common"},
    }
    assert {p.stem for p in bench.glob("*.py")} == set(allowed)
    for p in sorted(bench.glob("*.py")):
        names = [n.split(".") for n in _imports(p) if n.startswith("dist_infonce.bench")]
        inside = {parts[2] for parts in names if len(parts) > 2}
        assert inside <= allowed[p.stem], (p.name, inside - allowed[p.stem])
