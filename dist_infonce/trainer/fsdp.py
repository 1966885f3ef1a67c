"""``dist.strategy: fsdp``: the encoders ``fully_shard``-ed (FSDP2) beside accelerate.

What is sharded: every tower of the model (a child module of the
:class:`~dist_infonce.trainer.models.PairModel` that holds parameters: ``encoder``
and ``head``, or ``encoder0``/``head0``/``encoder1``/``head1``), each block of each
tower (:func:`tower_blocks`) and the model itself, the root. Parameters, gradients
and optimizer state are then split over the ranks; a block's parameters are gathered
for its forward and freed after it (``dist.fsdp_reshard_after_forward``).

What is not: the loss module. Its learnable temperature stays a plain replicated
tensor, and the loss averages its gradient over the ranks itself (as it does beside
DDP under gradient caching; :mod:`dist_infonce.losses.learnable`), while FSDP averages
the sharded ones: each parameter is averaged exactly once. (``fully_shard`` would
also refuse the 0-dim temperature.)

Why beside accelerate and not through its FSDP plugin: accelerate 1.15 selects its
FSDP path only for GPU-like backends (on CPU with gloo the run stays ``MULTI_CPU`` and
the plugin is ignored), and it would shard the module it prepares as one unit tree,
the loss included. Here the same code runs on CPU and CUDA, with an explicit device
mesh (on a machine with GPUs a gloo group alone moved the model to CUDA); accelerate
still starts the processes, places the device and wraps the optimizer.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dist_infonce.trainer.config import ConfigError

__all__ = [
    "broadcast_buffers",
    "clip_grad_norm_",
    "local_grads",
    "shard_model",
    "tower_blocks",
    "unsharded_copy",
]


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The blocks of ``tower``: the children with parameters of its first (breadth
    first) ``nn.ModuleList`` / ``nn.Sequential`` that has two or more such children.

    That is the layer list of a transformer (timm's ``blocks``, Hugging Face's
    ``encoder.layer``, OpenCLIP's ``resblocks``) and the layers of the built-in MLPs
    and CNN. None for a tower without such a list (it is one unit).
    """
    queue = collections.deque([tower])
    while queue:
        module = queue.popleft()
        if isinstance(module, nn.ModuleList | nn.Sequential):
            children = [c for c in module.children() if any(True for _ in c.parameters())]
            if len(children) >= 2:
                return children
        queue.extend(module.children())
    return []


def shard_model(
    model: nn.Module, *, device: torch.device, reshard_after_forward: bool, precision: str
) -> list[nn.Module]:
    """``fully_shard`` the blocks, the towers and the root ``model`` (in place), on a
    1-D mesh of every rank; returns the sharded modules, root last.

    Args:
        model: the trainer's pair model (``encode`` and ``embed`` become FSDP forward
            methods, so that calling them gathers the parameters too).
        device: this rank's device (the mesh's device type).
        reshard_after_forward: ``dist.fsdp_reshard_after_forward`` for blocks and towers
            (the root keeps FSDP's default: its parameters stay for the backward).
        precision: ``train.precision``; bf16: bf16 parameters in forward and backward,
            gradients reduced in float32, the model's outputs given in float32;
            BatchNorm layers (their own units then) compute in float32, as their float32
            running statistics need, and hand bf16 on.

    Raises:
        ConfigError: a 0-dim parameter (``fully_shard`` needs a first dimension to
            shard).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(
            f"dist.strategy=fsdp: fully_shard cannot shard 0-dim parameters {scalars[:3]}; "
            "give them shape [1] (or learn the temperature with loss.learn_temperature, "
            "which stays outside the sharded model)"
        )
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy()
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units: list[nn.Module] = []
    towers = [c for c in model.children() if any(True for _ in c.parameters())]
    for tower in towers:
        if precision == "bf16":
            norm_mp = MixedPrecisionPolicy(
                param_dtype=torch.float32,
                reduce_dtype=torch.float32,
                output_dtype=torch.bfloat16,
            )
            for m in tower.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    fully_shard(
                        m, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=norm_mp
                    )
                    units.append(m)
        for block in tower_blocks(tower):
            if block in units:  # a BatchNorm block, sharded above
                continue
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
            units.append(block)
        fully_shard(tower, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        units.append(tower)
    # The loss sees float32 embeddings, as under DDP's autocast and gradient caching.
    root_mp = MixedPrecisionPolicy(
        param_dtype=mp.param_dtype,
        reduce_dtype=mp.reduce_dtype,
        output_dtype=torch.float32 if precision == "bf16" else None,
    )
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    units.append(model)
    for method in ("encode", "embed"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return units


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers on every rank: DDP's rule (``broadcast_buffers``), which FSDP
    does not apply (buffers are not sharded; each rank's BatchNorm statistics would drift
    apart). The trainer calls it at the start of every step, as DDP sends them at the
    first forward of a step, and before a checkpoint, so that the copy a sharded
    checkpoint keeps of a replicated tensor is rank 0's. One broadcast per dtype.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for b in bufs:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()


def _is_dtensor(x: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


class _LocalGrad:
    """What the step guard reads of a parameter (``.grad``): this rank's shard of it."""

    def __init__(self, grad: torch.Tensor | None) -> None:
        self.grad = grad


def local_grads(parameters: Iterable[nn.Parameter]) -> list[Any]:
    """``parameters`` with ``.grad`` as this rank's local tensor (its shard for a sharded
    one): the non-finite check looks at local values, and the ranks agree on the
    result, so a bad value in any shard is seen."""
    return [
        _LocalGrad(p.grad.to_local() if _is_dtensor(p.grad) else p.grad)
        for p in parameters
        if p.grad is not None
    ]


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded (FSDP) and replicated (the loss's)
    parameters together; returns the norm before clipping (0-dim, local tensor).

    ``torch.nn.utils.clip_grad_norm_`` needs all gradients of one kind (it stacks
    their norms); here the sharded part's norm is completed over the ranks (its
    squares summed by DTensor) and the replicated part's, already equal on every rank,
    is added once.

    Shape:
        Output: ().
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    squares = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        squares.append(norm.full_tensor() ** 2 if _is_dtensor(norm) else norm**2)
    if plain:
        squares.append(
            torch.nn.utils.get_total_norm(plain).to(squares[0].device if squares else None) ** 2
        )
    if not squares:
        return torch.zeros(())
    total = torch.stack([s.float() for s in squares]).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = g.to_local() if _is_dtensor(g) else g
        local.mul_(scale.to(device=local.device, dtype=local.dtype))
    return total


def unsharded_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """A plain (unsharded) copy of the sharded ``model`` on rank 0, on CPU; None on the
    other ranks. A collective: every rank calls it.

    Args:
        model: the sharded model.
        build: makes an unsharded model of the same architecture (its initial values
            are overwritten; the global RNG is left as it was).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if torch.distributed.get_rank() != 0:
        return None
    with torch.random.fork_rng(devices=[]):
        copy = build()
    copy.load_state_dict(state)
    return copy
