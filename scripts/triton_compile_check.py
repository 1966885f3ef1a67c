"""Compile the fused kernels for Hopper (sm_90a) without a GPU and report their resources.

    python scripts/triton_compile_check.py [--block 64] [--block-d 128] [--warps 8]

Triton compiles to PTX and then to a cubin with the ptxas it ships, no driver
needed: this shows, on any machine, that every kernel variant compiles for the
H100, whether its matmuls became ``wgmma`` (Hopper's warpgroup MMA), and its
registers and spills (``ptxas -v``). Timing still needs the GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dist_infonce.kernels import _triton_kernels as K
from dist_infonce.kernels import _triton_sigmoid_kernels as S

# Pointers in the input dtype; the other pointers are float32 (mask_ptr: int64).
_PTR = {"a_ptr", "b_ptr", "db_ptr"}
_F32_PTRS = {
    "t_ptr", "lse_ptr", "csum_ptr", "rshift_ptr", "rcoef_ptr", "cshift_ptr", "ccoef_ptr",
    "u_ptr", "dt_ptr", "c_ptr", "out_ptr", "g_ptr", "dc_ptr",
}  # fmt: skip


def _signature(fn: triton.JITFunction, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _PTR:
            sig[name] = f"*{dtype}"
        elif name in _F32_PTRS:
            sig[name] = "*fp32"
        elif name == "mask_ptr":
            sig[name] = "*i64"
        elif name == "shift":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_report(ptx: str) -> str:
    """Registers and spills from ptxas -v (the newest ptxas triton ships)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    candidates = sorted(bin_dir.glob("ptxas*"), key=lambda p: -len(p.name))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for ptxas in candidates:
            proc = subprocess.run(
                [str(ptxas), "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.o")],
                capture_output=True,
                text=True,
            )
            if proc.returncode == 0:
                regs = re.search(r"Used (\d+) registers", proc.stderr)
                spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
                return f"regs {regs.group(1) if regs else '?'}, spill {spill.group(1) if spill else '?'} B"
    return "ptxas -v unavailable"


def compile_one(
    fn: triton.JITFunction,
    dtype: str,
    constexprs: dict,
    warps: int,
    ptxas_report: bool = True,
    stages: int = 3,
) -> dict:
    """Compile one variant for sm_90a; returns its resources (``ptxas -v`` if asked)."""
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    k = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    ptx = k.asm["ptx"]
    return {
        "shared_bytes": k.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "ptxas": _ptxas_report(ptx) if ptxas_report else "",
    }


def variants(block: int, block_d: int, dtypes: list[str]) -> list[tuple]:
    out = []
    for dtype in dtypes:
        precision = "tf32x3" if dtype == "fp32" else "tf32"
        common = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": 64, "PRECISION": precision,
                  "DOT_F32": False}  # fmt: skip
        for shifted, cols in itertools.product((True, False), (True, False)):
            if cols and not shifted:
                continue  # the online forward computes columns by a second row launch
            c = {**common, "HAS_MASK": not cols, "SHIFTED": shifted, "COLS": cols}
            out.append((K.lse_fwd_kernel, dtype, c))
        for one_exp, cols in itertools.product((True, False), (True, False)):
            c = {**common, "HAS_MASK": not cols, "ONE_EXP": one_exp, "COLS": cols,
                 "BLOCK_D": block_d}  # fmt: skip
            out.append((K.lse_bwd_kernel, dtype, c))
    return out


def sigmoid_variants(block: int, block_d: int, dtypes: list[str]) -> list[tuple]:
    """The SigLIP kernels (:mod:`dist_infonce.kernels._triton_sigmoid_kernels`)."""
    out = []
    for dtype in dtypes:
        precision = "tf32x3" if dtype == "fp32" else "tf32"
        common = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": 64, "PRECISION": precision,
                  "DOT_F32": False}  # fmt: skip
        out.append((S.sigmoid_fwd_kernel, dtype, common))
        out.append((S.sigmoid_bwd_kernel, dtype, {**common, "BLOCK_D": block_d}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--block-d", type=int, default=128)
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--kernels", default="fwd,bwd", help="which kernels: fwd,bwd")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    every = variants(args.block, args.block_d, dtypes)
    every += sigmoid_variants(args.block, args.block_d, dtypes)
    for fn, dtype, c in every:
        if fn.__name__.split("_")[1] not in args.kernels.split(","):
            continue
        r = compile_one(fn, dtype, c, args.warps, stages=args.stages)
        flags = " ".join(f"{k}={v}" for k, v in c.items() if k not in ("BLOCK_K", "DOT_F32"))
        print(
            f"{fn.__name__:<15} {dtype:<5} {flags}: shared {r['shared_bytes']} B, "
            f"wgmma {r['wgmma']}, mma.sync {r['mma_sync']}, {r['ptxas']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
