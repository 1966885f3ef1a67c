"""Loss kernels. ``chunked`` is pure torch (CPU and CUDA); a fused Triton kernel may follow."""

from dist_infonce.kernels.chunked import (
    DEFAULT_CHUNK,
    chunked_lse,
    compute_dtype,
    dense_lse,
    no_autocast,
)

__all__ = ["DEFAULT_CHUNK", "chunked_lse", "compute_dtype", "dense_lse", "no_autocast"]
