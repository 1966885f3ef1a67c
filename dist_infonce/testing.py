"""What a multi-rank check needs to see the collectives a computation really issues.

:func:`record_collectives` intercepts the ``torch.distributed`` collectives (the real
call still runs) and records one measurement per call; :func:`collective_bytes` is
the measurement the benchmark uses, the bytes one rank sends under ring algorithms.
The tests use the recorder to check which collectives a loss issues and how large
they are; the distributed benchmark uses it to count the bytes a pass sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["COUNTED", "collective_bytes", "record_collectives"]

#: The ``torch.distributed`` functions :func:`record_collectives` intercepts.
COUNTED = (
    "all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
    "reduce_scatter_tensor", "reduce_scatter", "all_reduce", "all_to_all", "all_to_all_single",
    "broadcast", "scatter", "batch_isend_irecv",
)  # fmt: skip

Measure = Callable[[str, tuple[Any, ...], dict[str, Any]], int]


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, *names: str) -> Any:
    """The argument at position ``index`` or under the first of ``names`` given by keyword."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[index] if len(args) > index else None


def collective_bytes(name: str, args: Sequence[Any], kwargs: dict[str, Any], world: int) -> int:
    """Bytes one rank sends in one call of collective ``name`` (ring algorithms).

    Args:
        name: The ``torch.distributed`` function, one of :data:`COUNTED`.
        args: The call's positional arguments (tensors or lists of tensors).
        kwargs: The call's keyword arguments.
        world: Ranks in the group.

    Returns:
        All-gather: ``(W - 1)`` times the local input; reduce-scatter and all-to-all:
        ``(W - 1) / W`` of the input; all-reduce: ``2 (W - 1) / W`` of the tensor;
        scatter: on the source, the other ranks' tensors, elsewhere nothing;
        broadcast: the tensor (an upper bound: only the root's tree sends it all);
        batch_isend_irecv (point-to-point, e.g. OpenCLIP's neighbour exchanges): the
        tensors of its ``isend`` operations.

    Raises:
        ValueError: ``name`` is not a collective this function knows.
    """
    if name in ("all_gather_single", "all_gather_into_tensor"):
        return (world - 1) * _nbytes(_arg(args, kwargs, 1, "input_tensor"))
    if name == "all_gather":
        return (world - 1) * _nbytes(_arg(args, kwargs, 1, "tensor"))
    if name in ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter"):
        return (world - 1) * _nbytes(_arg(args, kwargs, 1, "input")) // world
    if name in ("all_to_all", "all_to_all_single"):
        src = _arg(args, kwargs, 1, "input_tensor_list", "input")
        return (world - 1) * _nbytes(src) // world
    if name == "all_reduce":
        return 2 * (world - 1) * _nbytes(_arg(args, kwargs, 0, "tensor")) // world
    if name == "scatter":
        # Only the source sends: every tensor of its list but its own.
        src = _arg(args, kwargs, 1, "scatter_list")
        return (world - 1) * _nbytes(src) // world if src else 0
    if name == "broadcast":
        return _nbytes(_arg(args, kwargs, 0, "tensor"))
    if name == "batch_isend_irecv":
        ops = _arg(args, kwargs, 0, "p2p_op_list") or []
        # isend itself is not wrapped (P2POp accepts only the original functions).
        return sum(_nbytes(op.tensor) for op in ops if op.op is dist.isend)
    raise ValueError(f"collective_bytes: unknown collective {name!r}; expected one of {COUNTED}")


@contextmanager
def record_collectives(measure: Measure) -> Iterator[list[tuple[str, int]]]:
    """Record ``(collective, measure(name, args, kwargs))`` for every collective this
    process issues through ``torch.distributed`` inside the block; the real call
    still runs, and the originals are restored on exit (also when the block raises).

    Args:
        measure: Called with the collective's name and its arguments before the call.

    Yields:
        The list the calls are appended to, in the order they were issued.

    Example:
        >>> with record_collectives(lambda name, args, kwargs: 0) as calls:
        ...     pass
        >>> calls
        []
    """
    calls: list[tuple[str, int]] = []
    originals = {n: getattr(dist, n) for n in COUNTED if hasattr(dist, n)}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, measure(name, args, kwargs)))
            return fn(*args, **kwargs)

        return counted

    for n, fn in originals.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
