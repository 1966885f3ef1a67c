"""Gradient caching: a global batch bounded by neither the loss's memory nor the encoder's.

A contrastive loss couples every row of the batch with every other, so the batch
cannot simply be split into independent micro-steps (their negatives would not be
shared). Gradient caching splits the *encoder* work instead and keeps the loss whole:

1. pass 1: every micro-batch through the model without grad (its RNG state saved);
2. the loss once, on the outputs of all micro-batches, and its backward down to
   those outputs: one gradient per output row, kept (the "cache");
3. pass 2: every micro-batch again, with grad and the saved RNG state, and its
   outputs back-propagated with their cached gradients.

Peak memory is the inputs, the outputs and their gradients (O(B * D)), plus one
micro-batch's activations, plus the loss (linear in B with the chunked kernel),
instead of the activations of the whole batch. The price is one extra forward.

The parameter gradients are exactly those of ``loss.backward()`` on the plain
computation over the same micro-batch forwards: the chain rule splits at the
outputs, and pass 2 recomputes the very same outputs (same weights, same dropout
masks, same buffers). What a micro-batch changes is what normalisation layers see:
BatchNorm normalises with the statistics of its micro-batch, in both passes alike.

Models may be DDP-wrapped, or contain ``fully_shard``-ed (FSDP2) modules: their
gradients are reduced once per call, on the last micro-batch, and FSDP's parameters
are gathered once per call (:mod:`dist_infonce.cache_fsdp`). Inputs may be a dict of
tensors (a Hugging Face model's ``input_ids`` and ``attention_mask``), passed as
keyword arguments.

Entry point: :func:`cached_backward`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

from dist_infonce.cache_fsdp import CachedPasses, fsdp_group, fsdp_modules
from dist_infonce.dist import _comm_device, all_reduce_mean

__all__ = ["cached_backward"]

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@dataclass
class _Tower:
    """One callable and its inputs; ``cached_backward`` runs one or several of them."""

    fn: Callable[..., Any]
    inputs: tuple[torch.Tensor, ...]
    name: str  # how error messages refer to its inputs ("inputs" or "inputs[1]")
    keys: tuple[str, ...] | None = None  # dict inputs: passed as these keywords
    # Filled by pass 1:
    rng: list[tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)
    outputs: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def ddp(self) -> DistributedDataParallel | None:
        return _as_ddp(self.fn)

    @property
    def module(self) -> nn.Module | None:
        """The module behind the callable (DDP and torch.compile unwrapped; a bound
        method's owner)."""
        return _module_of(self.fn)

    @property
    def fsdp(self) -> list[nn.Module]:
        """The ``fully_shard``-ed modules of this tower (itself included)."""
        return fsdp_modules(self.module)

    def __call__(self, chunk: Sequence[torch.Tensor], fn: Callable[..., Any] | None = None) -> Any:
        """``fn`` (default: the tower's callable) on one micro-batch: ``fn(*chunk)``, or
        ``fn(**{key: part})`` for dict inputs."""
        fn = self.fn if fn is None else fn
        if self.keys is None:
            return fn(*chunk)
        return fn(**dict(zip(self.keys, chunk, strict=True)))

    @property
    def trainable(self) -> bool:
        """False for a frozen tower (no parameter and no input needs a gradient)."""
        if any(x.requires_grad for x in self.inputs):
            return True
        module = self.module
        if module is None:
            return True  # a plain function: nothing tells, so run it
        return any(p.requires_grad for p in module.parameters())


def _as_ddp(fn: object) -> DistributedDataParallel | None:
    """The DDP model ``fn`` is, also under ``torch.compile``; None for anything else.

    A DDP model hidden inside a lambda or wrapper function cannot be seen: it would
    run without ``no_sync`` (every micro-batch all-reduces). Pass it as it is.
    """
    fn = getattr(fn, "_orig_mod", fn)
    return fn if isinstance(fn, DistributedDataParallel) else None


def _module_of(fn: object) -> nn.Module | None:
    """The module behind a callable (DDP and torch.compile unwrapped; a bound method's
    owner); None for a plain function."""
    ddp = _as_ddp(fn)
    fn = ddp.module if ddp is not None else getattr(fn, "_orig_mod", fn)
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


# --------------------------------------------------------------------------- checks


def _check_micro_batch_size(micro_batch_size: object) -> int:
    value = None
    if not isinstance(micro_batch_size, bool):
        # operator.index: Python and NumPy integers, 0-dim integer tensors.
        with suppress(TypeError):
            value = operator.index(micro_batch_size)  # type: ignore[arg-type]
    if value is None or value < 1:
        raise ValueError(f"micro_batch_size must be an int >= 1, got {micro_batch_size!r}")
    return value


def _as_inputs(
    name: str, inputs: object
) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """``inputs`` as a non-empty tuple of tensors with one common first dimension B
    (B = 0 is refused later, after the ranks have agreed on it), and the keywords they
    are passed as (a dict), or None (positional)."""
    keys = None
    if isinstance(inputs, Mapping):
        if not inputs or not all(isinstance(k, str) for k in inputs):
            raise ValueError(
                f"{name}: a dict of inputs needs at least one entry and str keys (the "
                f"model's keyword arguments), got keys {list(inputs)[:4]}"
            )
        keys = tuple(inputs)
        wrong = {k: type(v).__name__ for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        if wrong:
            raise ValueError(
                f"{name}: every value of a dict of inputs must be a Tensor with a batch "
                f"dimension, got {wrong}"
            )
        xs: Any = tuple(inputs.values())
    else:
        xs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    if (
        not isinstance(xs, list | tuple)
        or not xs
        or not all(isinstance(x, torch.Tensor) for x in xs)
    ):
        raise ValueError(
            f"{name} must be a Tensor or a non-empty tuple of Tensors (or a dict of "
            f"Tensors), got {type(inputs).__name__}"
        )
    rows = [x.shape[0] if x.dim() > 0 else None for x in xs]
    if None in rows:
        raise ValueError(
            f"{name}: every tensor needs a first (batch) dimension, got a 0-dim tensor"
        )
    if len(set(rows)) > 1:
        shown = dict(zip(keys, rows, strict=True)) if keys is not None else rows
        raise ValueError(f"{name}: all tensors must have the same first dimension B, got {shown}")
    return tuple(xs), keys


def _towers(model: object, inputs: object) -> list[_Tower]:
    if isinstance(model, list | tuple):
        if not model:
            raise ValueError("model must be a callable or a non-empty sequence of callables")
        if not isinstance(inputs, list | tuple) or len(inputs) != len(model):
            raise ValueError(
                f"inputs must hold one entry per tower when model is a sequence of "
                f"{len(model)} callables, got {type(inputs).__name__}"
                + (f" of length {len(inputs)}" if isinstance(inputs, list | tuple) else "")
            )
        pairs = [(m, x, f"inputs[{i}]") for i, (m, x) in enumerate(zip(model, inputs, strict=True))]
    else:
        pairs = [(model, inputs, "inputs")]
    towers = []
    for i, (fn, xs, name) in enumerate(pairs):
        if not callable(fn):
            label = "model" if len(pairs) == 1 else f"model[{i}]"
            raise ValueError(f"{label} must be callable, got {type(fn).__name__}")
        tensors, keys = _as_inputs(name, xs)
        towers.append(_Tower(fn=fn, inputs=tensors, name=name, keys=keys))
    return towers


def _rows(x: torch.Tensor, micro_rows: int, tower: _Tower, k: int) -> bool:
    """True for a per-row output; False for a 0-dim one (a per-batch scalar)."""
    if x.dim() == 0:
        return False
    if x.shape[0] != micro_rows:
        raise ValueError(
            f"model output {k} (for {tower.name}) has {x.shape[0]} rows for a micro-batch "
            f"of {micro_rows} rows; every output needs one row per input row (or 0 dims)"
        )
    return True


def _as_tuple(out: object, tower: _Tower) -> tuple[Any, ...]:
    outs = (out,) if isinstance(out, torch.Tensor) else out
    if not isinstance(outs, tuple | list) or not all(isinstance(o, torch.Tensor) for o in outs):
        raise ValueError(
            f"model (for {tower.name}) must return a Tensor or a tuple of Tensors, "
            f"got {type(out).__name__}"
        )
    return tuple(outs)


# ------------------------------------------------------------------------- RNG state


def _cuda_devices(towers: Sequence[_Tower]) -> list[int]:
    """The CUDA devices whose generators a forward may draw from: inputs' and parameters'."""
    devices = {x.device.index for t in towers for x in t.inputs if x.is_cuda}
    for t in towers:
        module = t.module
        if module is not None:
            devices |= {p.device.index for p in module.parameters() if p.is_cuda}
    if devices and torch.cuda.is_available():
        devices.add(torch.cuda.current_device())  # where an unplaced randn would draw
    return sorted(d for d in devices if d is not None)


def _get_rng(devices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


@contextmanager
def _replayed_rng(
    state: tuple[torch.Tensor, list[torch.Tensor]], devices: Sequence[int]
) -> Iterator[None]:
    """Run with the generators as pass 1 saw them; afterwards they are as before.

    Pass 1 already advanced the generators once per micro-batch, exactly as the
    plain forwards would; forking keeps pass 2 from advancing them a second time.
    """
    with torch.random.fork_rng(devices=list(devices), device_type="cuda"):
        torch.set_rng_state(state[0])
        for d, s in zip(devices, state[1], strict=True):
            torch.cuda.set_rng_state(s, d)
        yield


# --------------------------------------------------------------------------- buffers


def _buffer_slots(towers: Sequence[_Tower]) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Every buffer of the towers' modules, with the module and name that hold it."""
    slots: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
    for t in towers:
        module = t.module
        for mod in module.modules() if module is not None else ():
            for name, b in mod._buffers.items():
                if b is not None:
                    slots.setdefault((id(mod), name), (mod, name, b))
    return list(slots.values())


class _PassOneBuffers:
    """Undoes, after pass 1, what pass 1 did to the buffers of the towers pass 2 re-runs.

    Every buffer of a re-run tower is saved before any forward of pass 1 (a plain
    callable's module is invisible, but when it shares a DDP tower's module, saving up
    front covers both). Pass 2 then updates running statistics once per micro-batch and
    sees, micro-batch by micro-batch, the buffers pass 1 saw. A forward that reassigns a
    buffer (``self.center = ...``) rather than updating it in place gets its original
    tensor back too (DDP broadcasts that one).

    A frozen tower is not re-run: its pass-1 forward is its only forward, so the updates
    it makes to buffers of its own (BatchNorm's running statistics in train mode) stay,
    as plain autograd leaves them. One that changes a buffer it shares with a re-run
    tower is refused: the restore would undo its update.
    """

    def __init__(self, towers: Sequence[_Tower]) -> None:
        self._saved = {
            (id(mod), name): (mod, name, b, b.detach().clone())
            for mod, name, b in _buffer_slots([t for t in towers if t.trainable])
        }
        self._shared: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []

    def before(self, tower: _Tower) -> None:
        """Call before ``tower``'s pass 1: a frozen tower's shared buffers are watched."""
        self._shared = []
        if not tower.trainable:
            self._shared = [
                (mod, name, b, b.detach().clone())
                for mod, name, b in _buffer_slots([tower])
                if (id(mod), name) in self._saved
            ]

    def after(self, tower: _Tower) -> None:
        """Call after ``tower``'s pass 1.

        Raises:
            ValueError: a frozen tower changed a buffer it shares with a re-run tower.
        """
        changed = [
            name
            for mod, name, b, value in self._shared
            if mod._buffers.get(name) is not b or not torch.equal(b, value)
        ]
        if changed:
            raise ValueError(
                f"model (for {tower.name}) is frozen (not re-run in pass 2) but updates "
                f"buffers {changed[:3]} it shares with a tower that is re-run; restoring "
                "them for pass 2 would drop its update. Give the frozen tower buffers of "
                "its own, or put it in eval mode"
            )

    def restore(self) -> None:
        """Put back every saved buffer (also after a forward of pass 1 raised)."""
        with torch.no_grad():
            for mod, name, original, value in self._saved.values():
                mod._buffers[name] = original
                original.copy_(value)
        self._saved.clear()


def _broadcast_buffers(ddp: DistributedDataParallel) -> None:
    """Send rank 0's buffers now if DDP would send them at its next forward.

    DDP (``broadcast_buffers=True``) overwrites every rank's buffers with rank 0's at
    the start of a forward that follows a synced one. Pass 1 bypasses DDP (it has
    nothing to reduce), so the send happens here, before both passes see the buffers.
    DDP's own send at the first forward of pass 2 would carry the same values again
    (pass 1 restores them), so it is switched off; the synced forward at the end of
    pass 2 re-arms it for the next step. One send per dtype, on every rank.
    """
    if not ddp.will_sync_module_buffers():
        return
    # What DDP's own post-forward sets after a no-grad or no_sync forward.
    ddp.require_forward_param_sync = False
    group = ddp.process_group
    src = dist.get_global_rank(group, 0)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in ddp.module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        with torch.no_grad():
            for b in bufs:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()


def _agreement_group(model: object, loss_fn: object) -> tuple[bool, ProcessGroup | None]:
    """Whether every rank of a group is known to be in this call, and that group.

    This call runs a collective on every rank of a group when the model is DDP (its
    gradient all-reduce) or contains FSDP2 modules (their all-gathers and
    reduce-scatters), when the loss gathers (``gather=True``), or when learnable
    loss parameters get their gradient averaged over the loss's ``group``: by
    :func:`_averaged_over_ranks`, or by the loss module itself in its backward
    (``averages_own_gradients``). There one tiny all-gather first lets all ranks fail
    together on bad input (a rank that raised alone would leave the others waiting in
    that collective). Otherwise the ranks may call this independently, and nothing is
    exchanged: neither this all-gather nor an average of loss parameters.
    """
    if not dist.is_available() or not dist.is_initialized():
        return False, None
    fns = model if isinstance(model, list | tuple) else [model]
    ddp = next((d for d in map(_as_ddp, fns) if d is not None), None)
    sharded = [m for fn in fns for m in fsdp_modules(_module_of(fn))]
    loss = _loss_module(loss_fn)
    if ddp is not None:
        group = ddp.process_group
    elif sharded:
        group = fsdp_group(sharded)
    elif isinstance(loss, DistributedDataParallel):
        group = loss.process_group
    elif getattr(loss, "gather", False) or _loss_params(loss_fn) or _self_averaging(loss_fn):
        group = getattr(loss, "group", None)
        # A module that averages its own parameters does so over its own group.
        group = next((getattr(m, "group", None) for m in _self_averaging(loss_fn)), group)
    else:
        return False, None
    return dist.get_world_size(group) > 1, group


def _agree(
    towers: list[_Tower] | None,
    error: ValueError | None,
    micro: int,
    group: ProcessGroup | None,
) -> None:
    """Every rank raises if any rank has bad or empty input, or, with SyncBatchNorm
    (one collective per forward), a different number of micro-batches."""
    rows = min((t.inputs[0].shape[0] for t in towers), default=0) if towers else 0
    calls = sum(-(-t.inputs[0].shape[0] // micro) for t in towers) if towers else 0
    device = _comm_device(torch.empty(0), group)
    mine = torch.tensor([int(error is not None), rows, calls], device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    bad = [r for r, v in enumerate(everyone) if int(v[0])]
    if error is not None:
        raise error
    if bad:
        raise ValueError(
            f"cached_backward: rank(s) {bad} of the group passed invalid inputs (see their "
            "error); every rank stops here rather than waiting in a collective"
        )
    empty = [r for r, v in enumerate(everyone) if int(v[1]) == 0]
    if empty:
        raise ValueError(
            f"inputs is an empty batch (B = 0) on rank(s) {empty} of the group; "
            "cached_backward needs B >= 1 on every rank"
        )
    counts = [int(v[2]) for v in everyone]
    modules = [t.module for t in towers or [] if t.module is not None]
    sync_bn = any(isinstance(m, nn.SyncBatchNorm) for mod in modules for m in mod.modules())
    if sync_bn and len(set(counts)) > 1:
        raise ValueError(
            f"micro_batch_size: SyncBatchNorm runs a collective in every forward, and ranks "
            f"would make {counts} model calls; give every rank the same number of "
            "micro-batches (equal local batches) or convert SyncBatchNorm to BatchNorm"
        )


# --------------------------------------------------------------------------- loss


def _loss_module(loss_fn: object) -> object:
    """The callable behind ``functools.partial`` layers (a loss module with bound labels)."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return loss_fn


def _self_averaging(loss_fn: object) -> list[nn.Module]:
    """The modules of ``loss_fn`` with trainable parameters that average their gradients
    themselves.

    Protocol: a module whose class sets ``averages_own_gradients = True`` (this
    package's ``InfoNCE`` and ``NTXent``) all-reduces, in its own backward, the mean of
    its parameters' gradients over the ranks of its ``group`` whenever no DDP forward
    owns them (:mod:`dist_infonce.losses.learnable`); ``cached_backward`` calls the loss
    outside any DDP forward, so it always does here.
    """
    loss_fn = _loss_module(loss_fn)
    if not isinstance(loss_fn, nn.Module) or isinstance(loss_fn, DistributedDataParallel):
        return []
    return [
        m
        for m in loss_fn.modules()
        if getattr(m, "averages_own_gradients", False) and m.self_averaged_parameters()
    ]


def _loss_params(loss_fn: object) -> list[nn.Parameter]:
    """The trainable parameters of a loss module that this call averages over the ranks:
    all of them but those of :func:`_self_averaging` modules (one average, not two)."""
    loss_fn = _loss_module(loss_fn)
    if not isinstance(loss_fn, nn.Module) or isinstance(loss_fn, DistributedDataParallel):
        return []
    own = {id(p) for m in _self_averaging(loss_fn) for p in m.self_averaged_parameters()}
    return [p for p in loss_fn.parameters() if p.requires_grad and id(p) not in own]


@contextmanager
def _averaged_over_ranks(params: Sequence[nn.Parameter], group: Any) -> Iterator[None]:
    """Average over ``group`` the gradient that the block adds to ``params``.

    The loss module lives outside DDP, so nothing else would average its gradient
    (a learnable parameter of the user's loss module); without this, each rank would
    step with its own share, world_size times the convention of DESIGN.md. One
    all-reduce, exactly when :func:`_agreement_group` counts on it (``params``
    non-empty and more than one rank), so every rank of ``group`` is in it.
    """
    if not params or not dist.is_initialized() or dist.get_world_size(group) == 1:
        yield
        return
    # Set earlier gradients aside so that the block's part is exact, not a difference.
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        added = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        for p, b in zip(params, before, strict=True):
            p.grad = b
    flat = all_reduce_mean(torch.cat([a.reshape(-1) for a in added]), group)
    offset = 0
    for p, b in zip(params, before, strict=True):
        avg = flat[offset : offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
        p.grad = avg if b is None else b + avg
        offset += p.numel()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    # Half-precision outputs reach the loss upcast: the cached gradients stay float32
    # (and, with a grad scaler, keep their scale without overflowing fp16); they are
    # rounded to the output's dtype only where pass 2 hands them to the model.
    leaf = x.detach()
    if leaf.dtype in (torch.float16, torch.bfloat16):
        leaf = leaf.float()
    return leaf.requires_grad_(leaf.is_floating_point())


# ---------------------------------------------------------------------------- entry


def cached_backward(
    model: Callable[..., Any] | Sequence[Callable[..., Any]],
    loss_fn: Callable[..., torch.Tensor],
    inputs: Inputs | Sequence[Inputs],
    micro_batch_size: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Back-propagate ``loss_fn(*model(*inputs))`` running the model in micro-batches.

    The loss sees every row at once (all negatives shared); the model only ever holds
    the activations of ``micro_batch_size`` rows. Every parameter's ``.grad``
    accumulates exactly what ``loss.backward()`` of the plain computation over the
    same micro-batch forwards would give.

    Args:
        model: called as ``model(*micro)``, ``micro`` the row slices of ``inputs``
            (``model(**micro)`` for a dict of inputs);
            returns a Tensor or a tuple of Tensors with one row per input row. A 0-dim
            output (a per-batch scalar such as OpenCLIP's ``logit_scale.exp()``) must
            be the same in every micro-batch: the loss gets it once and its gradient is
            back-propagated once, in the last micro-batch. May be DDP-wrapped (also
            under ``torch.compile``; not hidden in a lambda, which this cannot see):
            its gradients are then all-reduced once per call (``no_sync`` on every
            micro-batch but the last, also when ranks hold different numbers of rows).
            It may be or contain ``fully_shard``-ed (FSDP2) modules: each parameter group
            is all-gathered once per call and reduce-scattered once per call, on the
            last micro-batch of the last tower that uses it, so the collectives pair up
            also when ranks run different numbers of micro-batches
            (:mod:`dist_infonce.cache_fsdp`); pass the FSDP module itself (or a module
            holding it), not a function that hides it.
            A sequence of callables (towers) runs each on its own entry of ``inputs``
            (their row counts may differ); a tower without trainable parameters (and
            with inputs that need no gradient) is not re-run in pass 2.
        loss_fn: called once as ``loss_fn(*outputs)`` on the outputs concatenated over
            the micro-batches (the outputs of all towers, in order); returns a 0-dim
            tensor. If it is an ``nn.Module`` with trainable parameters (also behind
            ``functools.partial``, e.g. with bound ``labels``, but not inside a lambda)
            and torch.distributed is initialised, the gradient this call adds to them
            is averaged over the ranks of ``loss_fn.group`` (the world if it has none),
            so they follow the same convention as DDP's parameters. Modules that
            average their own (``averages_own_gradients = True``: this package's
            ``InfoNCE`` / ``NTXent`` with a learnable temperature) do it in their
            backward, over their ``group``, and are left alone here.
        inputs: a Tensor, a tuple of Tensors, or a dict of Tensors (keyword arguments,
            e.g. ``input_ids`` and ``attention_mask``), with one first dimension B >= 1
            (B may differ between ranks), split row-wise key by key; with towers, one
            such entry per tower (``tower(**entry)`` for a dict entry).
        micro_batch_size: rows per model call; consecutive slices, the remainder last.
        scaler: an fp16 ``torch.amp.GradScaler``: the loss is scaled once, before its
            backward, so the cached gradients and every ``.grad`` carry the scale.

    Returns:
        The loss, detached (unscaled). Shape: ().

    Raises:
        ValueError: naming the argument, for ``micro_batch_size < 1``, inputs whose
            first dimensions differ, an empty batch, outputs whose row count differs
            from their micro-batch's, 0-dim outputs that differ between micro-batches,
            or a loss that is not 0-dim. With a DDP or FSDP2 model or a gathering loss
            (``gather=True``), bad or empty inputs on one rank make every rank of the
            group raise (one small all-gather first) instead of leaving them waiting;
            so does SyncBatchNorm with different numbers of micro-batches per rank.

    Semantics worth knowing:
        Dropout masks are replayed from the CPU and CUDA generator states saved in
        pass 1; afterwards the generators are where the plain forwards leave them.
        BatchNorm normalises each micro-batch with its own statistics (both passes),
        and its running buffers are updated exactly once per micro-batch: pass 1
        leaves the buffers of the towers pass 2 re-runs as it found them, and a frozen
        tower (not re-run) keeps the updates of its one forward. Outputs in float16/bfloat16 reach
        ``loss_fn`` as float32.

    Example:
        >>> loss_fn = InfoNCE(symmetric=True, gather=True, learn_temperature=True)
        >>> loss = cached_backward(ddp_model, loss_fn, (images, texts), micro_batch_size=256)
        >>> optimizer.step()
    """
    micro = _check_micro_batch_size(micro_batch_size)
    agree, group = _agreement_group(model, loss_fn)
    try:
        towers, error = _towers(model, inputs), None
    except ValueError as e:
        towers, error = None, e
    if agree:
        _agree(towers, error, micro, group)
    if error is not None:
        raise error
    assert towers is not None
    for t in towers:
        if t.inputs[0].shape[0] == 0:
            raise ValueError(f"{t.name} is an empty batch (B = 0); cached_backward needs B >= 1")
    # Sharded towers last (FSDP, then DDP): a plain callable sharing their parameters
    # (the trainer's explicit negatives go through the model's inner module) must
    # finish its backward before the synced one that reduces them. Pass 1 and pass 2
    # keep the same order, so the buffers evolve identically in both.
    rank_of = lambda i: 2 if towers[i].ddp is not None else 1 if towers[i].fsdp else 0
    order = sorted(range(len(towers)), key=rank_of)
    # Each DDP model all-reduces once: in the last micro-batch of its last tower.
    synced = {id(towers[i].ddp): i for i in order if towers[i].ddp is not None}
    # Each FSDP module reduce-scatters once: in the last micro-batch of the last tower
    # that uses it and is re-run in pass 2.
    fsdp_last = {id(m): i for i in order if towers[i].trainable for m in towers[i].fsdp}
    devices = _cuda_devices(towers)
    for ddp in {id(t.ddp): t.ddp for t in towers if t.ddp is not None}.values():
        _broadcast_buffers(ddp)
    with CachedPasses(m for t in towers for m in t.fsdp) as passes:
        return _both_passes(
            towers=towers,
            order=order,
            loss_fn=loss_fn,
            micro=micro,
            scaler=scaler,
            devices=devices,
            synced=synced,
            fsdp_last=fsdp_last,
            passes=passes,
        )


def _both_passes(
    *,
    towers: list[_Tower],
    order: list[int],
    loss_fn: Callable[..., torch.Tensor],
    micro: int,
    scaler: torch.amp.GradScaler | None,
    devices: list[int],
    synced: dict[int, int],
    fsdp_last: dict[int, int],
    passes: CachedPasses,
) -> torch.Tensor:
    """Pass 1, the loss and its backward, pass 2 (see the module docstring); the
    detached loss. ``synced`` / ``fsdp_last``: the tower whose last micro-batch reduces
    the gradients of each DDP model / FSDP module (by id)."""
    # Pass 1: outputs without grad, generator states saved per micro-batch.
    buffers = _PassOneBuffers(towers)
    try:
        with torch.no_grad():
            for i in order:
                t = towers[i]
                buffers.before(t)
                # A DDP model's own forward only matters for the synced pass 2 call; its
                # inner module gives the same outputs (accelerate puts autocast there).
                fn = t.ddp.module if t.ddp is not None else t.fn
                for chunk in zip(*(x.split(micro) for x in t.inputs), strict=True):
                    t.rng.append(_get_rng(devices))
                    t.outputs.append(_as_tuple(t(chunk, fn), t))
                buffers.after(t)
    finally:  # also when a forward raised: the model stays as the caller gave it
        buffers.restore()

    # The loss, once, over every row; its backward fills the cache.
    leaves: list[list[torch.Tensor]] = []
    for t in towers:
        leaves.append([_leaf(part) for part in _joined_outputs(t, micro)])
        t.outputs.clear()  # only the leaves are kept (O(B * D))
    params = _loss_params(loss_fn)
    with _averaged_over_ranks(params, getattr(_loss_module(loss_fn), "group", None)):
        loss = loss_fn(*(leaf for tower_leaves in leaves for leaf in tower_leaves))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                "loss_fn must return a 0-dim tensor, got "
                + (
                    f"shape {tuple(loss.shape)}"
                    if isinstance(loss, torch.Tensor)
                    else type(loss).__name__
                )
            )
        (scaler.scale(loss) if scaler is not None else loss).backward()

    # Pass 2: each micro-batch again, with grad, back-propagating its cached rows.
    for i in order:
        t = towers[i]
        if not t.trainable:
            continue
        grads = [leaf.grad for leaf in leaves[i]]
        chunks = list(zip(*(x.split(micro) for x in t.inputs), strict=True))
        start = 0
        for j, chunk in enumerate(chunks):
            last = j == len(chunks) - 1
            sync_now = t.ddp is None or (last and synced[id(t.ddp)] == i)
            sync = nullcontext() if sync_now else t.ddp.no_sync()  # type: ignore[union-attr]
            if last:
                passes.sync_next(m for m in t.fsdp if fsdp_last.get(id(m)) == i)
            rows = chunk[0].shape[0]
            with sync, _replayed_rng(t.rng[j], devices):
                out = _as_tuple(t(chunk), t)
                targets, grad_outputs = [], []
                for k, (o, g) in enumerate(zip(out, grads, strict=True)):
                    if g is None or not o.requires_grad:
                        continue
                    if _rows(o, rows, t, k):
                        targets.append(o)
                        grad_outputs.append(g[start : start + rows].to(o.dtype))
                    elif last:  # a per-batch scalar: its gradient counted once
                        targets.append(o)
                        grad_outputs.append(g.to(o.dtype))
                if targets:
                    torch.autograd.backward(targets, grad_outputs)
            start += rows
    return loss.detach()


def _joined_outputs(tower: _Tower, micro: int) -> list[torch.Tensor]:
    """Pass 1's outputs of ``tower``, concatenated over micro-batches (0-dim: one copy)."""
    b = tower.inputs[0].shape[0]
    rows = [min(micro, b - s) for s in range(0, b, micro)]
    if len({len(out) for out in tower.outputs}) > 1:
        raise ValueError(
            f"model (for {tower.name}) returned different numbers of outputs for different "
            "micro-batches"
        )
    joined = []
    for k in range(len(tower.outputs[0])):
        parts = [out[k] for out in tower.outputs]
        per_row = [_rows(p, r, tower, k) for p, r in zip(parts, rows, strict=True)]
        if all(per_row):
            joined.append(torch.cat(parts))
        elif any(per_row) or any(not torch.equal(p, parts[0]) for p in parts[1:]):
            raise ValueError(
                f"model output {k} (for {tower.name}) is 0-dim but differs between "
                "micro-batches; a 0-dim output must be a per-batch constant"
            )
        else:
            joined.append(parts[0])
    return joined
