"""The fused Triton kernel (``kernel="triton"``) and the ``kernel=`` argument.

Numerics on CPU run under Triton's interpreter in one spawned worker (the
interpreter must be switched on before the kernels are decorated, and the rest
of the session must not see it); the same cases run on CUDA in the gpu-marked
tests. Everything is compared with the float64 reference of tests/reference.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_infonce import InfoNCE, NTXent, info_nce, nt_xent
from tests import triton_cases
from tests.bench_cli import read_json, run_bench
from tests.conftest import record_error

CASE_TIMEOUT_S = 120
# Input gradients of half inputs: G is rounded to the input dtype before its
# matmuls (2^-9 relative for bf16) and the result is rounded again on return.
# Seen under the interpreter: bf16 <= 7.2e-3, fp16 <= 6.3e-4.
HALF_GRAD_TOL = {"bfloat16": 1.5e-2, "float16": 2e-3}


@pytest.fixture(scope="module")
def interpreter() -> Iterator[Any]:
    """One spawned process with ``TRITON_INTERPRET=1``, reused by every CPU case."""
    pytest.importorskip("triton")
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS")}
    os.environ.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    try:
        # A spawned child copies os.environ when it starts, i.e. in Pool().
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


def check(
    results: triton_cases.Result, family: str, dtype: str, temperature: float, s_max: float
) -> None:
    """Assert every quantity of one case against the reference and record the worst error.

    float32: the logits carry float32 rounding of ~6e-8 |s| (|s| <= s_max), so
    values and gradients are measured against the scale of their terms, as in
    test_losses (gradients: s_max; the temperature's: s_max / temperature).
    Half inputs: the reference sees the same (already rounded) inputs, so the
    loss and the temperature gradient carry float32 accuracy; input gradients
    come back rounded to the input dtype.
    """
    for name, got, ref in results:
        if name == "loss":
            assert got.dtype == torch.float32
            floor, tol = 1.0, 1e-6 * max(s_max, 10.0)
        elif name == "grad temperature":
            floor, tol = s_max / temperature, 1e-6 * max(s_max, 10.0)
        else:
            assert str(got.dtype) == f"torch.{dtype}"
            floor = 1e-6  # relative to the largest gradient entry
            tol = 1e-6 * max(s_max, 10.0) if dtype == "float32" else HALF_GRAD_TOL[dtype]
        err = record_error(
            f"triton {family} vs float64 ({dtype}, {_QUANTITY[name.split()[1] if ' ' in name else name]})",
            got,
            ref,
            floor,
        )
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.1e}"


_QUANTITY = {"loss": "loss", "temperature": "temperature grad"} | {
    f"x{i}": "input grads" for i in range(3)
}


def _run(pool: Any, **kw: Any) -> triton_cases.Result:
    return pool.apply_async(triton_cases.compare, kwds=kw).get(timeout=CASE_TIMEOUT_S)


# ------------------------------------------------- interpreter (CPU) numerics


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", triton_cases.MODES)
@pytest.mark.parametrize("temperature", [0.1, 0.02])
def test_interpreted_kernel_matches_float64(
    interpreter: Any, mode: str, dtype: str, temperature: float
) -> None:
    # 40 rows in 16-row tiles (the last one partial), D = 20 in 16-wide slices
    # (partial too). temperature 0.1: bounded logits, one shared exp (fixed
    # shift); 0.02: |s| up to 50 > 32, the online-maximum path (for sym: a
    # second launch for the column statistic).
    res = _run(
        interpreter, mode=mode, dtype=dtype, n=40, m=27, d=20, temperature=temperature,
        chunk_size=16, seed=1,
    )  # fmt: skip
    path = "shift" if temperature == 0.1 else "online"
    check(res, f"{mode} {path}", dtype, temperature, 1.0 / temperature)


@pytest.mark.parametrize("mode", triton_cases.MODES)
def test_interpreted_unnormalised_inputs_and_per_row_losses(interpreter: Any, mode: str) -> None:
    # Norms ~3: logits up to 90 (online path); reduction="none" weighs every row
    # differently; D = 9 < the 16-wide slice; one tile of 32 holds every row.
    res = _run(
        interpreter, mode=mode, dtype="float32", n=23, m=11, d=9, temperature=0.1,
        chunk_size=32, seed=2, scale=3.0, reduction="none",
    )  # fmt: skip
    check(res, f"{mode} unnormalised", "float32", 0.1, 9.0 / 0.1)


def test_interpreted_default_tile_and_normalize(interpreter: Any) -> None:
    # chunk_size=None (DEFAULT_BLOCK) and normalize=True on the kernel's path.
    res = _run(
        interpreter, mode="sym", dtype="float32", n=70, m=0, d=24, temperature=0.07,
        chunk_size=None, seed=3, normalize=True,
    )  # fmt: skip
    check(res, "sym default tile", "float32", 0.07, 1.0 / 0.07)


# ------------------------------------------------------ argument checks (CPU)


def test_kernel_argument_is_checked() -> None:
    q = torch.randn(8, 4)
    with pytest.raises(ValueError, match="kernel must be one of"):
        info_nce(q, q, kernel="fast")
    with pytest.raises(ValueError, match="kernel must be one of"):
        NTXent(kernel=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernel='dense' takes none"):
        nt_xent(q, q, kernel="dense", chunk_size=4)
    with pytest.raises(ValueError, match="power of two >= 16 with kernel='triton'"):
        InfoNCE(kernel="triton", chunk_size=48)
    with pytest.raises(ValueError, match="kernel='triton' takes float32, bfloat16 or float16"):
        info_nce(q.double(), q.double(), kernel="triton")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter is on")
def test_triton_on_cpu_without_interpreter_is_a_clear_error() -> None:
    pytest.importorskip("triton")
    q = torch.randn(8, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        info_nce(q, q, kernel="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        NTXent(kernel="triton")(q, q)


def _kernel_names(n: int, **kw: Any) -> set[str]:
    q, k = torch.randn(n, 4, requires_grad=True), torch.randn(n, 4)
    names, stack = set(), [info_nce(q, k, symmetric=True, **kw).grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    return names


def test_auto_keeps_dense_or_chunked_and_explicit_kernels_are_obeyed() -> None:
    def has(names: set[str], word: str) -> bool:
        return any(word in n for n in names)

    big, small = _kernel_names(2100), _kernel_names(100)
    assert has(big, "Chunked") and not has(big, "Triton")  # auto never picks triton yet
    assert not has(small, "Chunked") and not has(small, "Triton")
    assert not has(_kernel_names(2100, kernel="dense"), "Chunked")
    assert has(_kernel_names(100, kernel="chunked"), "Chunked")
    assert has(_kernel_names(100, kernel="auto", chunk_size=32), "Chunked")


def test_dense_and_chunked_kernels_agree() -> None:
    q, k = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    dense = nt_xent(q, k, kernel="dense")
    chunked = nt_xent(q, k, kernel="chunked", chunk_size=7)
    assert record_error("kernel=dense vs chunked (float64)", chunked, dense) <= 1e-12


def test_package_imports_and_runs_without_triton() -> None:
    # A finder that refuses triton stands in for an environment without it.
    code = textwrap.dedent(
        """
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError("No module named 'triton'", name=name)
        sys.meta_path.insert(0, NoTriton())
        import torch
        from dist_infonce import InfoNCE, info_nce, nt_xent
        q = torch.randn(30, 5)
        info_nce(q, q + 1, symmetric=True).item()
        nt_xent(q, q, kernel="chunked", chunk_size=8).item()
        try:
            InfoNCE(kernel="triton")(q, q)
        except ImportError as e:
            assert "pip install triton" in str(e), e
            print("refused:", e)
        else:
            raise SystemExit("kernel='triton' ran without triton")
        assert "triton" not in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused: kernel='triton' needs the triton package" in proc.stdout


def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    # Triton compiles to PTX and a cubin with its own ptxas, no driver needed: this
    # catches what the interpreter accepts but the compiler refuses, and shows
    # that the bf16 matmuls become Hopper's wgmma.
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        import triton_compile_check as cc
    finally:
        sys.path.pop(0)
    picked = [v for v in cc.variants(64, 128, ["bf16"]) if v[2].get("COLS")]
    picked += [v for v in cc.variants(64, 128, ["fp32"]) if v[2]["HAS_MASK"]][:2]
    for fn, dtype, consts in picked:
        res = cc.compile_one(fn, dtype, consts, warps=8, ptxas_report=False)
        if dtype == "bf16":
            assert res["wgmma"] > 0, (fn.__name__, consts, res)


# -------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", triton_cases.MODES)
@pytest.mark.parametrize("temperature", [0.07, 0.02])
@pytest.mark.parametrize("chunk_size", [None, 128])
def test_cuda_kernel_matches_float64(
    mode: str, dtype: str, temperature: float, chunk_size: int | None
) -> None:
    pytest.importorskip("triton")
    res = triton_cases.compare(
        mode=mode, dtype=dtype, n=1000, m=700, d=200, temperature=temperature,
        chunk_size=chunk_size, seed=4, device="cuda",
    )  # fmt: skip
    check(res, f"CUDA {mode} N=1000", dtype, temperature, 1.0 / temperature)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["one", "sym"])
def test_cuda_kernel_matches_chunked_at_d512(mode: str) -> None:
    # The benchmark's D (several D slices in backward), bf16, against our chunked torch.
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k = (
        torch.randn(4096, 512, device="cuda", generator=g).bfloat16().requires_grad_()
        for _ in range(2)
    )
    out = {}
    for kernel in ("chunked", "triton"):
        loss = info_nce(q, k, temperature=0.05, symmetric=mode == "sym", kernel=kernel)
        out[kernel] = [loss.detach(), *torch.autograd.grad(loss, [q, k])]
    loss_t, *grads_t = out["triton"]
    loss_c, *grads_c = out["chunked"]
    assert record_error(f"CUDA triton vs chunked D=512 bf16 ({mode}, loss)", loss_t, loss_c) <= 1e-5
    for a, b in zip(grads_t, grads_c, strict=True):
        # Relative to the largest entry: both round to bf16, triton also rounds G.
        err = record_error(f"CUDA triton vs chunked D=512 bf16 ({mode}, grads)", a, b, 1e-9)
        assert err <= 2 * HALF_GRAD_TOL["bfloat16"]


@pytest.mark.parametrize(("n", "m"), [(0, 5), (5, 0)])
def test_interpreted_empty_side_matches_chunked(interpreter: Any, n: int, m: int) -> None:
    # gather=True lets a rank hold 0 rows; an empty pool gives log(0) = -inf rows.
    res = interpreter.apply_async(triton_cases.empty_side, (n, m)).get(timeout=CASE_TIMEOUT_S)
    for name, got, ref in res:
        if ref is None:
            assert got is None or not got.any(), name
        else:
            assert got.shape == ref.shape and torch.equal(got, ref.to(got.dtype)), name


def test_bench_triton_rows_compute_the_same_loss(tmp_path: Path) -> None:
    # The benchmark's triton rows (its worker path), interpreted on CPU, against its
    # chunked rows: same inputs, same loss; a variant row sets the kernel's knobs in
    # its worker. Driven through the command line (tests do not import the benchmark).
    pytest.importorskip("triton")
    out = tmp_path / "out"
    proc = run_bench(
        "--methods", "chunked,triton", "--modes", "one,sym", "--sizes", "80", "--dims", "24",
        "--chunk", "32", "--repeats", "1", "--triton-variants", "32x64x4", "--out", str(out),
        cwd=tmp_path, env={"TRITON_INTERPRET": "1"}, timeout=CASE_TIMEOUT_S * 3,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {(r["label"], r["mode"]): r for r in read_json(out / "bench.json")["rows"]}
    labels = {"chunked[32]", "triton", "triton[32x64x4]"}
    assert set(rows) == {(label, mode) for label in labels for mode in ("one", "sym")}
    for mode in ("one", "sym"):
        ref = torch.tensor(rows[("chunked[32]", mode)]["loss"])
        for label in ("triton", "triton[32x64x4]"):
            row = rows[(label, mode)]
            assert row["status"] == "ok" and row["time_s"] > 0, row
            err = record_error(
                f"bench triton row vs chunked ({mode})", torch.tensor(row["loss"]), ref
            )
            assert err <= 1e-6
        assert rows[("triton", mode)]["triton_knobs"] == {"block_d_max": 128, "bwd_warps": None}
        variant = rows[("triton[32x64x4]", mode)]
        assert variant["chunk"] == 32
        assert variant["triton_knobs"] == {"block_d_max": 64, "bwd_warps": 4}


@pytest.mark.parametrize("temperature", [0.1, 0.02], ids=["shift", "online"])
def test_interpreted_column_statistic_keeps_the_mask(interpreter: Any, temperature: float) -> None:
    # cols=True with mask_idx: every masked entry leaves the column's statistic too.
    # At 1/temperature = 50 > 32 the online path computes the columns as the
    # transposed problem, which once ran without the mask (column lse off by ~100%).
    res = interpreter.apply_async(triton_cases.masked_columns, (temperature, 8)).get(
        timeout=CASE_TIMEOUT_S
    )
    s_max = 1.0 / temperature
    path = "shift" if temperature == 0.1 else "online"
    for name, got, ref in res:
        floor = s_max if name == "grad t" else 1.0
        err = record_error(f"triton masked cols vs chunked float64 ({path})", got, ref, floor)
        assert err <= 1e-6 * s_max, f"{name}: error {err:.2e}"


def test_interpreted_mask_shared_by_two_rows_is_refused_with_cols(interpreter: Any) -> None:
    # The transposed problem takes one masked row per column; the chunked kernel
    # takes any mask, the fused one says what it cannot do.
    refused = interpreter.apply_async(triton_cases.shared_mask_column, (True,)).get(
        timeout=CASE_TIMEOUT_S
    )
    assert refused.startswith("ValueError: mask_idx:") and "2 rows mask column 2" in refused
    rows_only = interpreter.apply_async(triton_cases.shared_mask_column, (False,)).get(
        timeout=CASE_TIMEOUT_S
    )
    assert rows_only == "accepted"
