"""FSDP2 (``fully_shard``) modules inside :func:`dist_infonce.cached_backward`.

Gradient caching runs a model many times per optimizer step (every micro-batch twice).
Left to its defaults, FSDP2 would all-gather a module's parameters before every one
of those forwards (and again in every backward) and reduce-scatter its gradients after
every backward. Worse, those collectives sit *inside* the micro-batch loop: ranks with
different numbers of micro-batches (uneven local batches) would issue different
numbers of them, and the collectives would pair up wrongly or hang.

So, for the span of one call, the FSDP modules of the model are put into a state in
which nothing communicates inside the loop (torchtitan's ``ChunkedLossWrapper`` uses
the same three switches for its chunked head):

- resharding after forward and after backward is off, and every module is unsharded
  explicitly before pass 1: one all-gather per parameter group per call, on every
  rank at the same point;
- gradient reduction is off: the micro-batches' gradients accumulate, unsharded (in
  the reduce dtype under a ``MixedPrecisionPolicy``), in FSDP's own buffers;
- it is switched back on (:meth:`CachedPasses.sync_next`) just before the last
  micro-batch of the last tower that uses a module: one reduce-scatter per parameter
  group per call, also issued by every rank exactly once.

Afterwards every module is resharded and its settings are as before.

FSDP2 has setters for these switches but no getters, so restoring what the caller had
set (``reshard_after_forward=False``, a disabled gradient sync for accumulation over
several calls) reads FSDP's per-parameter-group state. That is done here only, in
:class:`_GroupSettings`; a torch whose internals differ fails loudly there.

Memory: during the call a module holds its unsharded parameters and, from the first
backward on, its unsharded gradients, as DDP does for the whole model; what FSDP still
saves is the sharded optimizer state and the parameters between steps. Gathering per
micro-batch instead would free the parameters between forwards, but would put
collectives back inside the loop (see above).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch: no FSDP2 module can exist
    try:
        from torch.distributed._composable.fsdp import FSDPModule  # type: ignore[no-redef]
    except ImportError:
        FSDPModule = None  # type: ignore[assignment,misc]

__all__ = ["CachedPasses", "fsdp_group", "fsdp_modules"]


def fsdp_modules(module: nn.Module | None) -> list[nn.Module]:
    """The ``fully_shard``-ed modules in ``module`` (itself included), in module order."""
    if module is None or FSDPModule is None:
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def fsdp_group(modules: Sequence[nn.Module]) -> ProcessGroup | None:
    """The process group whose ranks all take part in the collectives of ``modules``.

    A 1-D mesh (FSDP): its group. A 2-D mesh (HSDP: replicate x shard) spans the
    whole mesh, which this takes to be the world (None).
    """
    for m in modules:
        for p in m.parameters():
            mesh = getattr(p, "device_mesh", None)
            if mesh is not None:
                return mesh.get_group() if mesh.ndim == 1 else None
    return None


@dataclass
class _GroupSettings:
    """One FSDP parameter group's communication switches, as the caller left them."""

    group: Any  # FSDPParamGroup (private to torch)
    post_forward_mesh_info: Any  # None: no reshard after forward
    reshard_after_backward: bool
    reduce_grads: bool
    all_reduce_grads: bool

    @classmethod
    def save(cls, group: Any) -> _GroupSettings:
        try:
            return cls(
                group=group,
                post_forward_mesh_info=group.post_forward_mesh_info,
                reshard_after_backward=group.reshard_after_backward,
                reduce_grads=group.reduce_grads,
                all_reduce_grads=group.all_reduce_grads,
            )
        except AttributeError as e:
            raise RuntimeError(
                f"cached_backward: this torch ({torch.__version__}) keeps FSDP2's "
                f"parameter-group settings differently ({e}); FSDP2 models are tested "
                "with torch 2.14"
            ) from None

    def quiet(self) -> None:
        """No reshard after forward or backward, no gradient reduction."""
        self.group.post_forward_mesh_info = None
        self.group.reshard_after_backward = False
        self.group.reduce_grads = False
        self.group.all_reduce_grads = False

    def sync(self) -> None:
        """Gradient reduction as the caller had it (off stays off: their accumulation)."""
        self.group.reduce_grads = self.reduce_grads
        self.group.all_reduce_grads = self.all_reduce_grads

    def restore(self) -> None:
        self.group.post_forward_mesh_info = self.post_forward_mesh_info
        self.group.reshard_after_backward = self.reshard_after_backward
        self.sync()


class CachedPasses:
    """The FSDP modules of one ``cached_backward`` call, quiet inside its loops.

    Use as a context manager around both passes; see the module docstring.

    Args:
        modules: every FSDP module of the call's towers (duplicates allowed).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list({id(m): m for m in modules}.values())
        self._settings: dict[int, list[_GroupSettings]] = {}

    def __enter__(self) -> CachedPasses:
        for m in self.modules:
            groups = m._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
            self._settings[id(m)] = [_GroupSettings.save(g) for g in groups]
        try:
            for settings in self._settings.values():
                for s in settings:
                    s.quiet()
            # One all-gather per parameter group, every rank here at the same point;
            # FSDP's pre-forward unshard is then a no-op in every micro-batch.
            for m in self.modules:
                m.unshard()  # type: ignore[operator]
        except BaseException:
            self._restore()
            raise
        return self

    def sync_next(self, modules: Iterable[nn.Module]) -> None:
        """Let the next backward reduce-scatter the gradients of ``modules`` (accumulated
        over the call's micro-batches, this one included)."""
        for m in modules:
            for s in self._settings.get(id(m), []):
                s.sync()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self._restore()
            return
        # A forward or backward raised: FSDP's own state may be mid-pass (torch asks for
        # reset_iter_state() on the root then); restore what can be, keep the error.
        with suppress(Exception):
            self._restore()

    def _restore(self) -> None:
        for m in self.modules:
            state = m._get_fsdp_state()  # type: ignore[operator]
            for s in self._settings.get(id(m), []):
                s.restore()
                # FSDP's rule for a root, applied at its lazy initialisation (which
                # may have happened during this call): keep its parameters after
                # forward, unless the caller chose otherwise.
                if state._is_root and state._auto_reshard_after_forward:
                    s.group.post_forward_mesh_info = None
        self._settings.clear()
        for m in self.modules:
            m.reshard()  # type: ignore[operator]
