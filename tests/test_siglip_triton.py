"""The fused Triton SigLIP kernel (``siglip_loss(kernel="triton")``) against float64.

On CPU under Triton's interpreter in one spawned worker (as tests/test_triton.py does
for the softmax kernel); the same cases on CUDA in the gpu-marked tests; and the
kernels compiled for Hopper without a GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import siglip_cases, triton_cases
from tests.bench_cli import read_json, run_bench
from tests.conftest import record_error

CASE_TIMEOUT_S = 120
# Input gradients come back in the input dtype, after G is rounded to it for its two
# matmuls (as in the softmax kernel; tests/test_triton.py).
GRAD_TOL = {"float32": 2e-6, "bfloat16": 1.5e-2, "float16": 2e-3}


@pytest.fixture(scope="module")
def interpreter() -> Iterator[Any]:
    """One spawned process with ``TRITON_INTERPRET=1``, reused by every CPU case."""
    pytest.importorskip("triton")
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS")}
    os.environ.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    try:
        pool = mp.get_context("spawn").Pool(1, initializer=triton_cases.init_worker)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield pool
    pool.close()
    pool.join()


def check(results: list, family: str, dtype: str) -> None:
    """Loss, t and b gradients carry float32 accumulation; x, y gradients the input dtype."""
    for name, got, ref in results:
        if name in ("grad x", "grad y"):
            assert str(got.dtype) == f"torch.{dtype}", name
            tol, floor = GRAD_TOL[dtype], 1e-6
        else:
            assert got.dtype == torch.float32, name
            tol, floor = 2e-6, 1.0
        err = record_error(f"siglip triton {family} vs float64 ({dtype})", got, ref, floor)
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.1e}"


def _run(pool: Any, fn: Any, *args: Any, **kw: Any) -> Any:
    return pool.apply_async(fn, args, kw).get(timeout=CASE_TIMEOUT_S)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("labeled", [False, True], ids=["pairs", "labels"])
def test_interpreted_kernel_matches_float64(interpreter: Any, dtype: str, labeled: bool) -> None:
    # 40 rows in 16-row tiles (the last one partial), D = 20 in 16-wide slices (partial
    # too); reduction="none" with per-row weights: every row's cotangent differs.
    res = _run(
        interpreter, siglip_cases.triton_compare, dtype, 40, 20, 16, 1,
        reduction="none", labeled=labeled,
    )  # fmt: skip
    check(res, "tiles", dtype)


def test_interpreted_unnormalised_large_logits_and_default_tile(interpreter: Any) -> None:
    # Norms 3, t = 20, b = 4: |z| up to 184, both signs (softplus's two branches); the
    # default tile (64) holds every row.
    res = _run(
        interpreter, siglip_cases.triton_compare, "float32", 30, 9, None, 2,
        scale=3.0, t=20.0, b=4.0,
    )  # fmt: skip
    check(res, "large logits", "float32")


@pytest.mark.parametrize("n,m", [(40, 23), (0, 23), (17, 0)])
def test_interpreted_uneven_and_empty_sides_match_chunked(interpreter: Any, n: int, m: int) -> None:
    for name, got, ref in _run(interpreter, siglip_cases.triton_uneven_sides, n, m):
        err = record_error("siglip triton vs chunked, uneven sides", got, ref, 1e-6)
        assert err <= 2e-6, f"{name}: {err:.2e}"


def test_sigmoid_kernels_compile_for_hopper_without_a_gpu() -> None:
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        import triton_compile_check as cc
    finally:
        sys.path.pop(0)
    for fn, dtype, consts in cc.sigmoid_variants(64, 128, ["bf16", "fp32"]):
        res = cc.compile_one(fn, dtype, consts, warps=8, ptxas_report=False)
        if dtype == "bf16":
            assert res["wgmma"] > 0, (fn.__name__, consts, res)


def test_bench_siglip_triton_rows_compute_the_same_loss(tmp_path: Path) -> None:
    # The benchmark's SigLIP triton rows (its worker path), interpreted on CPU, against
    # its chunked rows on the same inputs.
    pytest.importorskip("triton")
    out = tmp_path / "out"
    proc = run_bench(
        "--methods", "chunked,triton", "--modes", "siglip", "--sizes", "80", "--dims", "24",
        "--chunk", "32", "--repeats", "1", "--out", str(out), cwd=tmp_path,
        env={"TRITON_INTERPRET": "1"}, timeout=CASE_TIMEOUT_S * 3,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["label"]: r for r in read_json(out / "bench.json")["rows"]}
    assert set(rows) == {"chunked[32]", "triton"}
    assert rows["triton"]["status"] == "ok", rows["triton"]
    got, ref = (torch.tensor(rows[k]["loss"]) for k in ("triton", "chunked[32]"))
    assert record_error("bench siglip triton row vs chunked", got, ref) <= 1e-6


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("chunk_size", [None, 128])
def test_cuda_kernel_matches_float64(dtype: str, chunk_size: int | None) -> None:
    pytest.importorskip("triton")
    res = siglip_cases.triton_compare(
        dtype, 1000, 200, chunk_size, 4, reduction="none", labeled=True, device="cuda"
    )
    check(res, "CUDA N=1000", dtype)
