"""cached_backward with FSDP2 (``fully_shard``) models on every rank of a real gloo world.

The model and the data are those of tests/cache_cases.py, so the float64 one-process
reference of tests/test_cache_dist.py applies unchanged: every rank builds the same
model from a seed, shards it, and takes its slice of the global batch.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dist_infonce import cached_backward
from dist_infonce.cache_fsdp import _GroupSettings
from dist_infonce.testing import record_collectives
from tests import cache_cases

#: Codes of the dtypes the recorder reports (bits).
_BITS = {torch.float64: 64, torch.float32: 32, torch.bfloat16: 16}


def _fsdp_measure(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The input's dtype in bits for a collective FSDP issues; 0 for any other (the
    loss's gather runs the same torch.distributed functions, so the origin is told by
    the call stack)."""
    if not any("/distributed/fsdp/" in f.filename for f in traceback.extract_stack()):
        return 0
    x = args[1] if len(args) > 1 else kwargs.get("input")
    return _BITS.get(getattr(x, "dtype", None), -1)


def sharded_model(
    seed: int, p: float, mixed: bool, root_params: bool = False
) -> cache_cases.TwoTower:
    """The two-tower model of cache_cases, each Linear, each tower and the root
    ``fully_shard``-ed on a CPU mesh (6 parameter groups: 2 Linear + the LayerNorm left
    in its tower, per tower; the root holds no parameter of its own). ``root_params``:
    the towers are not units, so the root holds both LayerNorms (5 groups)."""
    model = cache_cases.make_model(seed, "layer", p, False)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kw: dict[str, Any] = {"mesh": mesh}
    if mixed:
        model.float()
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for tower in (model.a, model.b):
        fully_shard(tower[0], **kw)
        fully_shard(tower[4], **kw)
        if not root_params:
            fully_shard(tower, **kw)
    fully_shard(model, **kw)
    if root_params:
        # FSDP's lazy initialisation (the root keeps its parameters after forward) in a
        # plain step first, so that the settings compared after each call are settled.
        x0, x1 = cache_cases.global_batch(999, [2])
        sum(z.sum() for z in model(x0.to(next(model.a.parameters()).dtype), x1)).backward()
        model.zero_grad(set_to_none=True)
    return model


def _settings(model: torch.nn.Module) -> list[tuple[Any, ...]]:
    return [
        (s.post_forward_mesh_info, s.reshard_after_backward, s.reduce_grads, s.all_reduce_grads)
        for m in model.modules()
        if isinstance(m, FSDPModule)
        for s in map(_GroupSettings.save, m._get_fsdp_state()._fsdp_param_groups)
    ]


def fsdp_cache_case(
    sizes: list[int],
    micro: int,
    seed: int,
    p: float,
    calls: int,
    mixed: bool,
    as_dict: bool,
    root_params: bool = False,
) -> dict[str, Any]:
    """``calls`` cached_backward calls (data seed + i) on the sharded model; the full
    gradients of the last call, FSDP's collectives per call (dtype bits), the losses,
    and whether FSDP's settings and sharding are as before each call."""
    rank = dist.get_rank()
    model = sharded_model(seed, p, mixed, root_params)
    loss_fn = cache_cases.make_loss(False)
    if mixed:
        loss_fn.float()
    per_call, losses, kept = [], [], []
    for i in range(calls):
        model.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
        x0, x1 = cache_cases.global_batch(seed + i, sizes)
        x0, x1 = cache_cases.local_slice(x0, sizes, rank), cache_cases.local_slice(x1, sizes, rank)
        if mixed:
            x0, x1 = x0.float(), x1.float()
        inputs: Any = {"x0": x0, "x1": x1} if as_dict else (x0, x1)
        torch.manual_seed(seed * 100 + 10 * i + rank)  # this rank's dropout stream
        before = _settings(model)
        with record_collectives(_fsdp_measure) as recorded:
            loss = cached_backward(model, loss_fn, inputs, micro)
        # After the call: the same settings, and the sharded parameters registered.
        kept.append(
            _settings(model) == before
            and all(type(q).__name__ == "DTensor" for q in model.parameters())
        )
        per_call.append([(n, bits) for n, bits in recorded if bits])
        losses.append(float(loss))
    grads: dict[str, torch.Tensor] = {
        n: q.grad.full_tensor().double() for n, q in model.named_parameters() if q.grad is not None
    }
    grads.update({f"loss.{n}": q.grad.double().clone() for n, q in loss_fn.named_parameters()})
    return {
        "grads": grads,
        "grad_dtypes": sorted({str(q.grad.dtype) for q in model.parameters()}),
        "collectives": per_call,
        "losses": losses,
        "kept": kept,
        "micro_batches": -(-sizes[rank] // micro),
    }


def fsdp_bad_input_case() -> str:
    """Rank 1 passes inputs with different first dimensions to an FSDP model whose loss
    does not gather: every rank raises (none waits in FSDP's all-gather)."""
    rank = dist.get_rank()
    model = sharded_model(0, 0.0, False)
    x0, x1 = cache_cases.global_batch(0, [4])
    if rank == 1:
        x1 = x1[:3]
    loss_fn = lambda za, zb: (za * zb).sum()
    try:
        cached_backward(model, loss_fn, (x0, x1), 2)
    except ValueError as e:
        return str(e)
    return "no error"


# ----------------------------------------------------------------- the trainer's pieces


def _learner(seed: int) -> Any:
    """The trainer's two-tower learner (BatchNorm MLPs, learnable temperature), sharded by
    the trainer's policy, and an AdamW over it."""
    from dist_infonce.trainer.config import load_config
    from dist_infonce.trainer.fsdp import shard_model
    from dist_infonce.trainer.learner import Learner, build_loss
    from dist_infonce.trainer.models import build_model

    cfg = load_config(
        None,
        ["model.name=two_tower", "loss.kind=clip", "loss.learn_temperature=true",
         "model.hidden_dim=12", "model.feature_dim=10", "model.embedding_dim=6"],
    )  # fmt: skip
    torch.manual_seed(seed)
    learner = Learner(build_model(cfg.model, ((7,), (5,))), build_loss(cfg.loss), cfg.loss.kind)
    shard_model(
        learner.model, device=torch.device("cpu"), reshard_after_forward=True, precision="fp32"
    )
    return learner, torch.optim.AdamW(learner.parameters(), lr=0.1)


def _full_state(learner: Any, optimizer: Any) -> dict[str, Any] | None:
    """Rank 0: the model and optimizer state, unsharded, by name; None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(learner, optimizer, options=opts)
    if dist.get_rank() != 0:
        return None
    flat = {f"model.{k}": v.clone() for k, v in model_state.items()}
    for name, moments in optim_state["state"].items():
        flat.update({f"optim.{name}.{k}": torch.as_tensor(v).clone() for k, v in moments.items()})
    return flat


def save_sharded_case(directory: str, seed: int) -> dict[str, Any] | None:
    """Two AdamW steps on random batches, then a sharded checkpoint of step 2."""
    from pathlib import Path

    from dist_infonce.trainer.fsdp import broadcast_buffers
    from dist_infonce.trainer.sharded_checkpoint import save_sharded

    learner, optimizer = _learner(seed)
    rank = dist.get_rank()
    for step in range(2):
        g = torch.Generator().manual_seed(100 * step + rank)
        x0, x1 = torch.randn(6, 7, generator=g), torch.randn(6, 5, generator=g)
        learner(x0, x1).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    broadcast_buffers(learner)  # as the trainer does before saving
    trainer_state = {"step": 2, "note": "rank 0's"} if rank == 0 else None
    error = save_sharded(Path(directory), 2, learner, optimizer, trainer_state, keep=1)
    assert error == "", error
    return _full_state(learner, optimizer)


def load_sharded_case(directory: str, seed: int) -> dict[str, Any] | None:
    """A fresh learner (another seed), loaded from the checkpoint of save_sharded_case."""
    from pathlib import Path

    from dist_infonce.trainer.sharded_checkpoint import load_sharded, sharded_path

    learner, optimizer = _learner(seed)
    state = load_sharded(sharded_path(Path(directory), 2), learner, optimizer)
    full = _full_state(learner, optimizer)
    return None if full is None else {"trainer": state, **full}


def clip_case(max_norm: float) -> dict[str, Any]:
    """Gradients of the sharded learner (and its replicated temperature), clipped by the
    trainer's FSDP clipping; the full gradients before and after, and the norm."""
    from dist_infonce.trainer.fsdp import clip_grad_norm_, local_grads

    learner, _ = _learner(3)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    learner(torch.randn(6, 7, generator=g), torch.randn(6, 5, generator=g)).backward()
    params = list(learner.parameters())
    full = lambda: [
        p.grad.full_tensor().clone() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        for p in params
    ]
    before = full()
    local = [h.grad for h in local_grads(params)]
    norm = clip_grad_norm_(params, max_norm)
    return {
        "before": before,
        "after": full(),
        "norm": norm.clone(),
        "local_numel": sum(x.numel() for x in local),
        "full_numel": sum(x.numel() for x in before),
    }
