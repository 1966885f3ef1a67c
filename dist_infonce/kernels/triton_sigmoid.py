"""Fused Triton sigmoid-loss sums: the contract of
:func:`~dist_infonce.kernels.sigmoid.chunked_sigmoid_sums`, on chip.

Each tile lives in registers from the matmul that makes it to the row sum (forward) or
to the two matmuls that consume it (backward, which recomputes the tiles); only the
inputs, one float32 number per row and the float32 gradients touch device memory. The
kernels are in :mod:`dist_infonce.kernels._triton_sigmoid_kernels`; inputs, devices,
precision (``tf32x3`` for float32, gradient weights rounded to the input dtype for half
inputs, float32 atomics for the rows' gradient) are those of
:mod:`dist_infonce.kernels.triton_lse`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from dist_infonce.kernels.triton_lse import (
    _Blocks,
    _cdiv,
    _interpreted,
    _load_kernels,
    check_triton_block,
    check_triton_inputs,
)

__all__ = ["triton_sigmoid_sums"]

_kernels: ModuleType | None = None


def _load() -> ModuleType:
    global _kernels
    if _kernels is None:
        _load_kernels()  # the ImportError that names the triton package, if missing
        _kernels = importlib.import_module("dist_infonce.kernels._triton_sigmoid_kernels")
    return _kernels


def _scalar(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).reshape(1).contiguous()


class _TritonSigmoidSums(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        block: int,
    ) -> torch.Tensor:
        kernels = _load()
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        ac, bc = a.detach().contiguous(), b.detach().contiguous()
        t = _scalar(scale).to(a.device)
        c = _scalar(bias).to(a.device)
        blk = _Blocks(d, a.dtype, block, _interpreted(_load_kernels()))
        out = torch.zeros(n, dtype=torch.float32, device=a.device)
        if n > 0 and m > 0:
            kernels.sigmoid_fwd_kernel[(_cdiv(n, blk.m),)](
                ac, bc, t, c, out, n, m, d, ac.stride(0), bc.stride(0),
                BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_K=blk.k, PRECISION=blk.precision,
                DOT_F32=blk.dot_f32,
            )  # fmt: skip
        ctx.save_for_backward(a, b, scale, bias)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        a, b, scale, bias = ctx.saved_tensors
        kernels = _load()
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        ac, bc = a.detach().contiguous(), b.detach().contiguous()
        t = _scalar(scale).to(a.device)
        c = _scalar(bias).to(a.device)
        blk = _Blocks(d, a.dtype, ctx.block, _interpreted(_load_kernels()))
        g = g.to(torch.float32).contiguous()
        u = torch.zeros(n, d, dtype=torch.float32, device=a.device)
        db = torch.zeros(m, d, dtype=b.dtype, device=a.device)
        dt = torch.zeros(1, dtype=torch.float32, device=a.device)
        dc = torch.zeros(1, dtype=torch.float32, device=a.device)
        if n > 0 and m > 0:
            dt = torch.empty(_cdiv(m, blk.n), dtype=torch.float32, device=a.device)
            dc = torch.empty_like(dt)
            kernels.sigmoid_bwd_kernel[(_cdiv(m, blk.n), _cdiv(d, blk.d))](
                ac, bc, t, c, g, u, db, dt, dc, n, m, d, ac.stride(0), bc.stride(0),
                BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_K=blk.k, BLOCK_D=blk.d,
                PRECISION=blk.precision, DOT_F32=blk.dot_f32, num_warps=blk.bwd_warps,
            )  # fmt: skip
        grad_a = grad_b = grad_scale = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_a = u.mul_(t[0]).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = db
        if ctx.needs_input_grad[2]:
            grad_scale = dt.sum().to(device=scale.device, dtype=scale.dtype).reshape(scale.shape)
        if ctx.needs_input_grad[3]:
            grad_bias = dc.sum().to(device=bias.device, dtype=bias.dtype).reshape(bias.shape)
        return grad_a, grad_b, grad_scale, grad_bias, None


def triton_sigmoid_sums(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Row sums of ``softplus(scale * A @ B.T + bias)`` with fused Triton kernels.

    Args:
        a: rows. Shape: (N, D); float32, bfloat16 or float16.
        b: columns (the pool). Shape: (M, D), same dtype and device as ``a``.
        scale: the multiplier t. Shape: (); may require grad.
        bias: the bias c. Shape: (); may require grad.
        chunk_size: tile edge, a power of two >= 16; None for the softmax kernel's
            :data:`~dist_infonce.kernels.triton_lse.DEFAULT_BLOCK`.

    Returns:
        Shape: (N,), float32.

    Raises:
        ImportError: triton is not installed.
        ValueError: naming ``kernel`` for an unsupported dtype or device, or
            ``chunk_size`` that is not a power of two >= 16.
    """
    block = check_triton_block(chunk_size)
    check_triton_inputs(a)
    return _TritonSigmoidSums.apply(a, b, scale, bias, block)
