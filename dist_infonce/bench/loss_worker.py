"""The loss sweep's worker: one configuration measured in this process.

:func:`run_config` is what ``python -m dist_infonce.bench --_worker REQUEST`` runs in a
fresh interpreter for every row of the sweep (:mod:`dist_infonce.bench.loss`), so
that each row's peak memory is its own. :class:`Config` is the row's configuration.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dist_infonce.bench.common import (
    DTYPES,
    Timer,
    emit_result,
    load_open_clip_loss,
    machine_probe,
    measure_matmul_rate,
    sync,
)
from dist_infonce.memory import peak_memory_mb, reset_peak

__all__ = ["METHODS", "METHOD_MODES", "Config", "parse_variant", "run_config", "worker_main"]

#: The methods the worker can measure.
METHODS = ("dense", "chunked", "torch_lce", "info_nce_pytorch", "open_clip", "triton", "inf_cl")
#: Modes each method implements: info-nce-pytorch has no symmetric loss, OpenCLIP's
#: ClipLoss is symmetric only (its SigLipLoss is the "siglip" mode), torch's
#: ``F.linear_cross_entropy`` is one direction (symmetric: two calls).
METHOD_MODES: dict[str, tuple[str, ...]] = {
    "dense": ("one", "sym", "siglip"),
    "chunked": ("one", "sym", "siglip"),
    "torch_lce": ("one", "sym"),
    "info_nce_pytorch": ("one",),
    "open_clip": ("sym", "siglip"),
    "triton": ("one", "sym", "siglip"),
    "inf_cl": ("one", "sym"),
}
#: SigLIP's initial scale t and bias b: every "siglip" row computes the loss there.
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
#: Rows of random inputs generated at a time, so that setting up the inputs
#: leaves no large temporaries behind the baseline.
_INPUT_BLOCK = 8192


@dataclass(frozen=True)
class Config:
    """One benchmark configuration, run in its own process.

    Attributes:
        method: One of ``METHODS``.
        mode: ``"one"`` (in-batch, one direction), ``"sym"`` (symmetric / CLIP) or
            ``"siglip"`` (SigLIP's sigmoid loss at t = 10, b = -10, both learnable).
        batch: B, rows of the query and of the key matrices.
        dim: D, the embedding dimension.
        chunk: Tile edge of the chunked kernel; None for other methods.
        dtype: Name of the input dtype, a key of ``DTYPES``.
        device: ``"cpu"`` or ``"cuda"``.
        repeats: Timed forward + backward passes after the warm-up.
        budget_s: Seconds a configuration may spend on warm-up + timed passes;
            when one pass is long, fewer than ``repeats`` are timed (at least
            one). 0 disables the cap.
        temperature: Softmax temperature (``1 / logit_scale`` for OpenCLIP).
        seed: Seed of the inputs: every method sees the same matrices.
        variant: Triton rows only: ``"BLOCKxBLOCK_DxWARPS"`` (tile edge, D slice
            of the backward, backward warps); None for the kernel's defaults.
    """

    method: str
    mode: str
    batch: int
    dim: int
    chunk: int | None
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    budget_s: float = 0.0
    temperature: float = 0.1
    seed: int = 0
    variant: str | None = None

    @property
    def label(self) -> str:
        """Method name for tables and legends; tiled rows carry their tile edge."""
        if self.variant is not None:
            return f"{self.method}[{self.variant}]"
        if self.method in ("chunked", "triton") and self.chunk is not None:
            return f"{self.method}[{self.chunk}]"
        return self.method


# --------------------------------------------------------------------- worker

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _dense_loss(t: float, symmetric: bool) -> LossFn:
    def dense(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = q @ k.T / t
        labels = torch.arange(q.shape[0], device=q.device)
        if not symmetric:
            return F.cross_entropy(logits, labels)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    return dense


def _triton_loss(cfg: Config) -> LossFn:
    from dist_infonce import info_nce
    from dist_infonce.kernels import triton_lse

    chunk, t, symmetric = cfg.chunk, cfg.temperature, cfg.mode == "sym"
    if cfg.variant is not None:
        # This worker process runs one configuration: set the module's knobs.
        chunk, triton_lse.BLOCK_D_MAX, triton_lse.BWD_WARPS = parse_variant(cfg.variant)
    return lambda q, k: info_nce(
        q, k, temperature=t, symmetric=symmetric, chunk_size=chunk, kernel="triton"
    )


def _inf_cl_loss(t: float, symmetric: bool) -> LossFn:
    cal_inf_loss = importlib.import_module("inf_cl").cal_inf_loss

    def inf_cl(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # Its logit scale multiplies q; its head_dim must divide D (<= 256).
        scale = torch.tensor(1.0 / t, device=q.device)
        head_dim = math.gcd(q.shape[1], 256)
        loss = cal_inf_loss(q, k, scale=scale, head_dim=head_dim)
        if not symmetric:
            return loss
        return 0.5 * (loss + cal_inf_loss(k, q, scale=scale, head_dim=head_dim))

    return inf_cl


def _torch_lce_loss(t: float, symmetric: bool) -> LossFn:
    options = torch.nn.LinearCrossEntropyOptions()

    def lce(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # One direction is a linear layer with weight k over the inputs q / t.
        labels = torch.arange(q.shape[0], device=q.device)
        loss = F.linear_cross_entropy(q / t, k, labels, options=options)
        if not symmetric:
            return loss
        return 0.5 * (loss + F.linear_cross_entropy(k / t, q, labels, options=options))

    return lce


def _siglip_loss_fn(cfg: Config) -> LossFn:
    """SigLIP rows: t and b are leaves that require grad (learnable, as SigLIP trains)."""
    device = torch.device(cfg.device)
    scale = torch.tensor(SIGLIP_SCALE, device=device, requires_grad=True)
    bias = torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True)
    if cfg.method == "open_clip":
        peer = load_open_clip_loss("SigLipLoss")()
        return lambda x, y: peer(x, y, scale, bias)
    from dist_infonce import siglip_loss

    kernel = {"dense": "dense", "chunked": "chunked", "triton": "triton"}[cfg.method]
    chunk = None if kernel == "dense" else cfg.chunk
    return lambda x, y: siglip_loss(x, y, scale, bias, kernel=kernel, chunk_size=chunk)


def _loss_fn(cfg: Config) -> LossFn:
    """The loss under test, as ``fn(query, key) -> scalar``."""
    if cfg.mode == "siglip":
        return _siglip_loss_fn(cfg)
    t, symmetric = cfg.temperature, cfg.mode == "sym"
    if cfg.method == "dense":
        return _dense_loss(t, symmetric)
    if cfg.method == "chunked":
        from dist_infonce import info_nce

        chunk = cfg.chunk
        return lambda q, k: info_nce(q, k, temperature=t, symmetric=symmetric, chunk_size=chunk)
    if cfg.method == "triton":
        return _triton_loss(cfg)
    if cfg.method == "inf_cl":
        return _inf_cl_loss(t, symmetric)
    if cfg.method == "torch_lce":
        return _torch_lce_loss(t, symmetric)
    if cfg.method == "info_nce_pytorch":
        # Imported by name: ``info_nce`` the package, not dist_infonce's function.
        peer = importlib.import_module("info_nce")
        return lambda q, k: peer.info_nce(q, k, temperature=t)
    if cfg.method == "open_clip":
        clip_loss = load_open_clip_loss()()
        return lambda q, k: clip_loss(q, k, torch.tensor(1.0 / t, device=q.device))
    raise ValueError(f"unknown method {cfg.method!r}; expected one of {METHODS}")


def parse_variant(text: str) -> tuple[int, int, int]:
    """``"64x128x8"`` -> (tile edge 64, backward D slice 128, backward warps 8).

    Raises:
        argparse.ArgumentTypeError: not three numbers, BLOCK or BLOCK_D not a power of
            two >= 16, or WARPS not one of 1, 2, 4, 8, 16.
    """
    try:
        block, block_d, warps = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BLOCKxBLOCK_DxWARPS such as 64x128x8, got {text!r}"
        ) from None
    if min(block, block_d) < 16 or block & (block - 1) or block_d & (block_d - 1):
        raise argparse.ArgumentTypeError(f"BLOCK and BLOCK_D must be powers of two >= 16: {text!r}")
    if warps not in (1, 2, 4, 8, 16):
        raise argparse.ArgumentTypeError(f"WARPS must be 1, 2, 4, 8 or 16: {text!r}")
    return block, block_d, warps


def _make_inputs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Random L2-normalised (B, D) query and key leaves that require grad.

    Generated in float32 on the CPU block by block from one seed, then cast: the
    same seed gives the same matrices for every method, dtype and device, and no
    full-size temporary stays behind the baseline.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    for _ in range(2):
        x = torch.empty(cfg.batch, cfg.dim, dtype=DTYPES[cfg.dtype], device=cfg.device)
        for i0 in range(0, cfg.batch, _INPUT_BLOCK):
            block = torch.randn(min(_INPUT_BLOCK, cfg.batch - i0), cfg.dim, generator=gen)
            block /= block.norm(dim=1, keepdim=True)
            x[i0 : i0 + block.shape[0]].copy_(block)
        out.append(x.requires_grad_(True))
    return out[0], out[1]


def _triton_knobs() -> dict[str, Any]:
    from dist_infonce.kernels import triton_lse

    return {"block_d_max": triton_lse.BLOCK_D_MAX, "bwd_warps": triton_lse.BWD_WARPS}


def run_config(cfg: Config) -> dict[str, Any]:
    """Measure one configuration in this process; see the module docstring.

    Returns:
        ``time_s`` (median), ``times_s``, ``warmup_s``, ``repeats_used``,
        ``extra_mib``, ``loss`` (the warm-up's loss value), ``rate_gflops`` (the
        matmul rate measured in this process just after the timed passes) and, for
        triton rows, ``triton_knobs`` (the kernel module's settings during the run).
    """
    fn = _loss_fn(cfg)
    device = torch.device(cfg.device)
    # Start the BLAS / OpenMP thread pools (and the CUDA context) before the
    # baseline: they are not part of any loss's memory.
    warm = torch.ones(64, 64, device=device)
    (warm @ warm).sum().item()
    # One call on 8 rows loads what a method imports on first use (torch's
    # linear_cross_entropy: ~900 modules, 170 MiB of RSS), also not its memory.
    small = [
        F.normalize(torch.randn(8, cfg.dim), dim=1).to(device=device, dtype=DTYPES[cfg.dtype])
        for _ in range(2)
    ]
    fn(*(x.requires_grad_() for x in small)).backward()
    q, k = _make_inputs(cfg)
    sync(cfg.device)
    # Right after the reset the peak is what is in use now: the inputs and the
    # process itself, not the imports' transient high-water mark.
    reset_peak(device)
    base_mib = peak_memory_mb(device)

    def step() -> tuple[float, torch.Tensor]:
        # Fresh gradients each pass, so every pass allocates the same.
        q.grad = None
        k.grad = None
        with Timer(cfg.device) as timer:
            loss = fn(q, k)
            loss.backward()
        return timer.seconds, loss.detach()

    warmup_s, loss = step()
    if cfg.device == "cuda":
        # The first CUDA pass also JIT-compiles (Triton) and tunes (cuBLAS); the
        # second one is the cost the time budget should plan with.
        warmup_s, loss = step()
    extra_mib = max(0.0, peak_memory_mb(device) - base_mib)
    repeats = cfg.repeats
    if cfg.budget_s > 0:
        # Long passes (B = 131072 takes minutes on a CPU) get fewer repeats.
        repeats = min(cfg.repeats, max(1, int((cfg.budget_s - warmup_s) // warmup_s)))
    times = [step()[0] for _ in range(repeats)]
    result: dict[str, Any] = {
        # The matmul rate this process gets right now (after the memory reading: the
        # probe's buffers would raise the high-water mark). On a shared machine it
        # tracks the contention the timed passes saw.
        "rate_gflops": measure_matmul_rate(cfg.dim, cfg.dtype, cfg.device, runs=5),
        "time_s": statistics.median(times),
        "times_s": times,
        "warmup_s": warmup_s,
        "repeats_used": repeats,
        "extra_mib": extra_mib,
        "loss": float(loss),
    }
    if cfg.method == "triton":
        result["triton_knobs"] = _triton_knobs()
    return result


def worker_main(payload: str) -> None:
    """Measure the JSON ``payload`` (a probe or one configuration); print the result."""
    request = json.loads(payload)
    if request.get("kind") == "probe":
        emit_result(machine_probe(request["dims"], request["dtype"], request["device"]))
    else:
        emit_result(run_config(Config(**request["config"])))
