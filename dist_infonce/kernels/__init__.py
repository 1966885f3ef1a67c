"""Loss kernels. ``chunked`` is pure torch (CPU and CUDA); ``triton_lse`` is the fused
Triton kernel (CUDA; imports triton only when it runs, so it is not re-exported here)."""

from dist_infonce.kernels.chunked import (
    DEFAULT_CHUNK,
    chunked_lse,
    compute_dtype,
    dense_lse,
    no_autocast,
)

__all__ = ["DEFAULT_CHUNK", "chunked_lse", "compute_dtype", "dense_lse", "no_autocast"]
