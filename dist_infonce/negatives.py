"""A queue of negatives shared by every rank (MoCo's queue), correct under DDP.

:class:`NegativeQueue` holds the last ``size`` keys pushed by all ranks of a process
group. ``push`` all-gathers each rank's keys (sizes may differ, 0 rows included) and
appends them in rank order; once ``size`` rows are held the oldest are overwritten.
Every rank writes the same gathered bytes, so the queue is byte-identical on every
rank without ever being broadcast, and ``negatives()`` returns the same rows (oldest
first) everywhere. With these rows as unpaired negatives, ``info_nce(q, k,
queue.negatives())`` is MoCo's loss, and with the chunked kernel it never holds the
N x size logits.

What the peers get wrong, and what this module does instead:

- a bank per rank (each rank enqueues only its own keys): here ``push`` gathers;
- a push that does not fit before the end of the buffer, or ``size`` not a multiple of
  the global batch (MoCo asserts it): here the rows wrap around, any ``size``, and a
  push larger than ``size`` keeps its newest ``size`` rows; nothing else is dropped;
- the queue as a DDP buffer, re-broadcast from rank 0 at every forward (MoCo: 32 MiB
  per step): here the rows are not registered buffers, so DDP (and gradient caching's
  buffer sync) never sees them, yet they are in ``state_dict()`` (see below);
- a queue lost on resume: the rows, the write position and the push count are in
  ``state_dict()``.

The tensors are kept out of ``named_buffers()`` on purpose: DDP broadcasts every
registered buffer, persistent or not, unless the *root* module lists it in
``_ddp_params_and_buffers_to_ignore``, which a submodule cannot do for itself. So
the queue overrides the three hooks torch offers subclasses for state it manages
itself: ``_save_to_state_dict`` and ``_load_from_state_dict`` (as ``BatchNorm`` does),
and ``_apply`` (as ``RNNBase`` does), so that ``.to(device)``, ``.cuda()`` and
``.double()`` move and cast the rows like a buffer.
"""

from __future__ import annotations

import operator
from contextlib import suppress
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from dist_infonce.dist import GatherInfo, _comm_device, _gather_forward, is_distributed

__all__ = ["NegativeQueue"]

# state_dict entries, in this order, below the module's prefix.
_KEYS = ("rows", "stamps", "position", "filled", "pushes")

# Codes of the push-time check, exchanged so that every rank can name the bad one.
_OK, _NOT_TENSOR, _NOT_2D, _WRONG_DIM, _NOT_FLOAT = range(5)


def _positive_int(name: str, value: object) -> int:
    out = None
    if not isinstance(value, bool):
        with suppress(TypeError):
            out = operator.index(value)  # type: ignore[arg-type]
    if out is None or out < 1:
        raise ValueError(f"NegativeQueue: {name} must be an int >= 1, got {value!r}")
    return out


class NegativeQueue(nn.Module):
    """The last ``size`` keys pushed by every rank of ``group``, identical on every rank.

    Args:
        size: rows held (K); any value >= 1, no relation to the batch size required.
        dim: embedding dimension D of the keys.
        group: the ranks that share the queue; None: the world. Every rank of it
            must call :meth:`push` the same number of times (it is a collective).
        dtype: the dtype the rows are stored (and gathered) in; keys are cast to it.

    Shape:
        push: keys (N_local, D), N_local may differ between ranks (0 allowed).
        negatives(): (M, D) with M = :attr:`filled` <= size.

    Raises:
        ValueError: ``size`` or ``dim`` not an int >= 1, ``dtype`` not floating point.

    Example:
        >>> queue = NegativeQueue(65536, 128).to(device)
        >>> loss = info_nce(q, k, queue.negatives(), chunk_size=1024)  # MoCo's loss
        >>> loss.backward(); optimizer.step()
        >>> queue.push(k)   # once per optimizer step, after the loss read negatives()
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        group: ProcessGroup | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"NegativeQueue: dtype must be a floating-point dtype, got {dtype!r}")
        self.size = _positive_int("size", size)
        self.dim = _positive_int("dim", dim)
        self.group = group
        # Not register_buffer: see the module docstring (DDP would broadcast them).
        self._rows = torch.zeros(self.size, self.dim, dtype=dtype)
        # The push (1-based count) that wrote each row; 0 for a row never written. Only
        # the age reads it, so it stays on the CPU whatever device the rows are on.
        self._stamps = torch.zeros(self.size, dtype=torch.int64)
        # Python ints: no host sync per push on CUDA; tensors only in state_dict.
        self._position = 0  # where the next row goes
        self._filled = 0
        self._pushes = 0

    # ------------------------------------------------------------------ the queue

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored rows."""
        return self._rows.dtype

    @property
    def device(self) -> torch.device:
        """Where the rows are (``.to()`` moves them)."""
        return self._rows.device

    @property
    def filled(self) -> int:
        """Rows held: ``min(rows pushed so far, size)``."""
        return self._filled

    @property
    def position(self) -> int:
        """Index of the row the next push writes first (the oldest row once full)."""
        return self._position

    @property
    def pushes(self) -> int:
        """Calls of :meth:`push` so far (a resumed queue continues the count)."""
        return self._pushes

    @property
    def age(self) -> int:
        """Pushes since the oldest row held was written: 0 after one push, and, once the
        queue is full, how many optimizer steps old its stalest negatives are."""
        if self._filled == 0:
            return 0
        oldest = 0 if self._filled < self.size else self._position
        return self._pushes - int(self._stamps[oldest])

    def negatives(self) -> torch.Tensor:
        """The rows held, oldest first: a detached copy that later pushes do not change.

        Shape:
            (M, D), M = :attr:`filled` (0 before the first push), on :attr:`device`
            in :attr:`dtype`.
        """
        rows = self._rows.detach()
        if self._filled < self.size:
            return rows[: self._filled].clone()
        if self._position == 0:
            return rows.clone()
        return torch.cat([rows[self._position :], rows[: self._position]])

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Append the keys of every rank of the group, in rank order (a collective).

        Without gradient: the keys are detached, cast to :attr:`dtype` and all-gathered
        (one small exchange of the row counts, then the rows). Every rank writes the same
        gathered bytes, so the queue stays byte-identical on every rank. Once ``size``
        rows are held, the oldest are overwritten; a push of more than ``size`` rows in
        total keeps its newest ``size``.

        Args:
            keys: this rank's keys. Shape: (N_local, D); N_local may differ between
                ranks and may be 0. Any floating dtype and device.

        Raises:
            ValueError: on every rank of the group, naming the rank, if a rank passed
                something other than a floating-point tensor of shape (N, D); the
                group stays usable (nothing was written anywhere).
        """
        problem = self._check(keys)
        if not is_distributed(self.group):
            if problem[0] != _OK:
                raise ValueError(self._message(problem, rank=None))
            self._write(keys.detach().to(device=self.device, dtype=self.dtype))
            return
        table = self._exchange(problem, keys)
        bad = [(r, row) for r, row in enumerate(table) if row[0] != _OK]
        if bad:
            r, row = bad[0]
            raise ValueError(self._message(tuple(row), rank=r, others=[b[0] for b in bad]))
        sizes = tuple(row[1] for row in table)
        if sum(sizes) == 0:  # nothing to send anywhere; the push still counts
            self._write(self._rows[:0])
            return
        info = GatherInfo(
            sizes=sizes,
            counts=sizes,
            rank=dist.get_rank(self.group),
            group=self.group,
        )
        # Cast before sending: every rank then receives (and stores) the same bytes.
        device = _comm_device(keys, self.group)
        local = keys.detach().to(device=device, dtype=self.dtype).contiguous()
        self._write(_gather_forward(local, info).to(self.device))

    # ------------------------------------------------------------------ internals

    def _check(self, keys: object) -> tuple[int, int, int]:
        """``(code, rows, trailing dim)`` of this rank's keys; code ``_OK`` if usable."""
        if not isinstance(keys, torch.Tensor):
            return (_NOT_TENSOR, 0, -1)
        if keys.dim() != 2:
            return (_NOT_2D, 0, keys.dim())
        if not keys.is_floating_point():
            return (_NOT_FLOAT, keys.shape[0], keys.shape[1])
        if keys.shape[1] != self.dim:
            return (_WRONG_DIM, keys.shape[0], keys.shape[1])
        return (_OK, keys.shape[0], keys.shape[1])

    def _message(
        self, row: tuple[int, ...], rank: int | None, others: list[int] | None = None
    ) -> str:
        code, _, detail = row[0], row[1], row[2]
        where = "" if rank is None else f" on rank {rank}"
        what = {
            _NOT_TENSOR: "is not a torch.Tensor",
            _NOT_2D: f"has {detail} dimensions",
            _NOT_FLOAT: "is not a floating-point tensor",
            _WRONG_DIM: f"has D={detail}",
        }[code]
        also = f" (bad on ranks {others}; nothing was pushed)" if others and len(others) > 1 else ""
        return (
            f"NegativeQueue.push: keys{where} {what}; expected a floating-point tensor of "
            f"shape (N, {self.dim}){also}"
        )

    def _exchange(self, problem: tuple[int, int, int], keys: object) -> list[list[int]]:
        """Every rank's ``(code, rows, dim)``: one all-gather of three int64 per rank."""
        world = dist.get_world_size(self.group)
        ref = keys if isinstance(keys, torch.Tensor) else torch.empty(0)
        device = _comm_device(ref, self.group)
        mine = torch.tensor(problem, dtype=torch.int64, device=device)
        everyone = torch.empty(world * 3, dtype=torch.int64, device=device)
        dist.all_gather_single(everyone, mine, group=self.group)
        return everyone.view(world, 3).cpu().tolist()

    def _write(self, rows: torch.Tensor) -> None:
        """Append ``rows`` (every rank's keys, in order) to the ring. Shape: (T, D)."""
        self._pushes += 1
        total = rows.shape[0]
        keep = min(total, self.size)
        if keep == 0:
            return
        # Of a push larger than the queue only the newest `size` rows survive; writing
        # them where the whole push would have put them keeps the ring in order.
        start = (self._position + total - keep) % self.size
        first = min(keep, self.size - start)
        src = rows[total - keep :]
        self._rows[start : start + first] = src[:first]
        self._stamps[start : start + first] = self._pushes
        if keep > first:  # wrap around to the front
            self._rows[: keep - first] = src[first:]
            self._stamps[: keep - first] = self._pushes
        self._position = (self._position + total) % self.size
        self._filled = min(self._filled + total, self.size)

    # ------------------------------------------------- module state (see the docstring)

    def _apply(self, fn: Any, recurse: bool = True) -> NegativeQueue:
        super()._apply(fn, recurse)
        # The rows follow the module like a buffer (device and floating dtype); the
        # integer stamps stay on the CPU, where the age is read.
        self._rows = fn(self._rows)
        return self

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "rows"] = self._rows
        destination[prefix + "stamps"] = self._stamps
        for name in ("position", "filled", "pushes"):
            destination[prefix + name] = torch.tensor(getattr(self, "_" + name))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        mine = {prefix + name for name in _KEYS}
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        found = {name: state_dict[prefix + name] for name in _KEYS if prefix + name in state_dict}
        if len(found) < len(_KEYS):
            if found or strict:
                # A partial queue cannot be restored consistently: report every absent key.
                missing_keys.extend(prefix + n for n in _KEYS if n not in found)
            return
        problem = self._state_problem(found)
        if problem:
            error_msgs.append(f"NegativeQueue ({prefix or 'root'}): {problem}")
            return
        with torch.no_grad():
            self._rows.copy_(found["rows"])
            self._stamps.copy_(found["stamps"])
        self._position = int(found["position"])
        self._filled = int(found["filled"])
        self._pushes = int(found["pushes"])

    def _state_problem(self, found: dict[str, Any]) -> str:
        """What makes a saved queue unusable here (shapes, ranges), or ``""``."""
        rows, stamps = found["rows"], found["stamps"]
        if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (self.size, self.dim):
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            return (
                f"rows has shape {shape}, this queue holds ({self.size}, {self.dim}) "
                "(size, dim); build it with the size and dim it was saved with"
            )
        if not isinstance(stamps, torch.Tensor) or tuple(stamps.shape) != (self.size,):
            return f"stamps must have shape ({self.size},)"
        values = {}
        for name in ("position", "filled", "pushes"):
            v = found[name]
            if not isinstance(v, torch.Tensor) or v.numel() != 1 or v.is_floating_point():
                return f"{name} must be a one-element integer tensor"
            values[name] = int(v)
        pos, filled, pushes = values["position"], values["filled"], values["pushes"]
        if not (0 <= pos < self.size and 0 <= filled <= self.size and pushes >= 0):
            return f"position={pos}, filled={filled}, pushes={pushes} out of range for size {self.size}"
        if filled < self.size and pos != filled:
            return f"position={pos} must equal filled={filled} until the queue is full"
        return ""

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}, filled={self._filled}"
