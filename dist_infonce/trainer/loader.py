"""Epochs, ranks and DataLoader workers: the batch of every training step, and where it stands.

The trainer draws its batches from a *stream* (:func:`build_stream`), one of:

- :class:`LoaderStream` for map-style sources (digits, tables): a torch ``DataLoader``
  whose batch sampler is :class:`EpochBatchSampler`. Each epoch the rows are permuted
  from ``(seed, epoch)``; consecutive global batches of ``batch_size x world`` rows are
  cut from that order and each is split over the ranks in rank order, evenly when it is
  the smaller last one (:class:`EpochPlan`). Every row is seen once per epoch over all
  ranks, and no rank ever gets fewer than 2 rows (BatchNorm needs 2 in training): a tail
  that would give some rank fewer joins the batch before it.
- :class:`ShardStream` for webdataset shards (:class:`ShardPlan`): the shards are
  permuted from ``(seed, epoch)`` and dealt to the ranks; each rank reads its shards in
  that order through a seeded shuffle buffer and cuts its epoch into the same number of
  batches as every other rank.
- :class:`SampledStream` for sources that only ``sample(generator, batch_size)`` (the
  synthetic pairs, older user data sets): the batch of ``(seed, step, rank, micro)``.

Whatever the number of workers, batch ``i`` of a rank is the same: its rows (and its
position in the run) are fixed by the sampler or the plan, and its randomness
(augmentation) by :func:`batch_seed` of the batch's identity, seeded into the global
RNGs around the preprocessing (:func:`seeded_rngs`). The training process's own RNG
streams do not move, so 0 and N workers give the same losses.

Exact resume: the trainer calls :meth:`commit` at every optimizer-step boundary and
puts :meth:`state_dict` (epoch, position in the epoch, rows consumed per rank) into
the checkpoint; :meth:`resume` starts the stream exactly there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from dist_infonce.trainer.config import Config, ConfigError
from dist_infonce.trainer.resilience import StopTraining

__all__ = [
    "MIN_ROWS",
    "RECORD_ENV",
    "BadSampleError",
    "Batch",
    "BatchKey",
    "EpochBatchSampler",
    "EpochPlan",
    "LoaderStream",
    "MapSource",
    "SampledStream",
    "ShardPlan",
    "ShardStream",
    "Stream",
    "batch_seed",
    "build_stream",
    "record_batches",
    "seeded_rngs",
    "steps_for_epochs",
]

#: Fewest rows a rank gets in any batch (BatchNorm needs 2 values per channel in training).
MIN_ROWS = 2

#: Environment variable of the batch recorder (tests only; see :func:`record_batches`).
RECORD_ENV = "DIST_INFONCE_TEST_RECORD_BATCHES"

#: Distinguish the streams drawn from one seed (the order, the negatives, augmentation).
_ORDER, _NEGATIVES, _AUGMENT, _SHARDS, _SHUFFLE = range(5)


class BadSampleError(StopTraining):
    """A sample could not be read mid-epoch with ``data.on_bad_sample=stop``; every rank
    stops after the last good step's checkpoint (exit 2: a problem in the user's data)."""

    exit_code = 2

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class Batch:
    """One rank's batch of one micro-step, with where it came from.

    Attributes:
        x0, x1: the two views (x1 followed by the explicit negatives, if any); a view is
            a tensor, or a dict of tensors (a tokenizer's ``input_ids`` and
            ``attention_mask``; :mod:`~dist_infonce.trainer.views`).
        labels: int64 class labels (``loss.supervised``), else None.
        ids: the rows' identities (table rows, digits indices, ``shard:key``).
        skipped: the bad samples left out of it (``data.on_bad_sample=skip``), named.
        error: a bad sample that stops the run (``data.on_bad_sample=stop``), named; "".
        epoch: the epoch it belongs to (None: a source without epochs).
        position: the stream position after it (what :meth:`Stream.state_dict` stores).

    Shape:
        x0: (B, *in0); x1: (B + M, *in1); labels: (B,). B may be 0 only for webdataset
        ranks whose shards ran out (the gather handles it).
    """

    x0: Any  # torch.Tensor | dict[str, torch.Tensor] (views.View)
    x1: Any
    labels: torch.Tensor | None
    ids: list[Any] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str = ""
    epoch: int | None = None
    position: dict[str, int] | None = None

    def pin_memory(self) -> Batch:
        """Pinned copies of the tensors (the DataLoader's pin-memory thread calls this)."""
        from dist_infonce.trainer.views import pin

        labels = None if self.labels is None else self.labels.pin_memory()
        return dataclasses.replace(self, x0=pin(self.x0), x1=pin(self.x1), labels=labels)


def batch_seed(seed: int, *identity: int) -> int:
    """A 63-bit seed for the batch named by ``identity`` (numpy's SeedSequence hashes them:
    nearby identities give unrelated streams)."""
    state = np.random.SeedSequence([seed, *identity]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[torch.Generator]:
    """Seed torch's, Python's and numpy's global RNGs from ``seed`` for the block, then put
    them back; yields a torch generator seeded the same way.

    torchvision, timm and friends draw their augmentation from the global RNGs. Seeding
    them per batch makes the augmentation a function of the batch (not of the worker
    that made it); restoring them keeps the training process's streams (dropout, the
    checkpointed RNG state) where they were when the batch is made in that process.
    """
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


# ----------------------------------------------------------------- map-style sources


@runtime_checkable
class MapSource(Protocol):
    """A source of numbered rows (digits, a table): what :class:`LoaderStream` reads.

    Attributes:
        num_rows: rows per epoch.
        input_shapes: per-sample shapes of view 0 and view 1.
        has_labels: whether :meth:`fetch` returns class labels.
        may_fail: whether a row can turn out unreadable mid-epoch (images).
    """

    num_rows: int
    input_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    has_labels: bool
    may_fail: bool

    def fetch(
        self, rows: Sequence[int], negatives: Sequence[int], generator: torch.Generator
    ) -> Batch:
        """The batch of ``rows`` (view 1 of ``negatives`` appended to ``x1``). Randomness
        from ``generator`` or the global RNGs only (both seeded per batch by the loader).
        Bad rows are skipped (named in ``skipped``) or reported in ``error``."""
        ...


@dataclass(frozen=True)
class BatchKey:
    """What :class:`EpochBatchSampler` hands a DataLoader worker: one rank's batch.

    Attributes:
        epoch: the epoch.
        offset: where this step's global batch starts in the epoch's order.
        rows: this rank's rows.
        negatives: rows whose view 1 serves as explicit negatives.
        seed: the batch's randomness (:func:`batch_seed` of seed, epoch, offset, rank).
        after: the stream position after this batch.
    """

    epoch: int
    offset: int
    rows: tuple[int, ...]
    negatives: tuple[int, ...]
    seed: int
    after: tuple[int, int]


@dataclass(frozen=True)
class EpochPlan:
    """How every epoch of ``num_rows`` rows is cut into steps and split over ranks.

    A pure function of its fields (the same on every rank and in every run):
    :meth:`order` is the epoch's permutation; the global batch of a step that starts
    at ``offset`` of that order holds :meth:`take` rows, of which rank ``r`` gets the
    consecutive slice :meth:`span`.

    Args:
        num_rows: rows per epoch.
        batch_size: rows per rank of a full batch (``train.batch_size``).
        world: ranks.
        seed: the run's seed (``seed``).
        drop_last: drop the last incomplete global batch (``loader.drop_last``).

    Raises:
        ConfigError: too few rows for one batch.
    """

    num_rows: int
    batch_size: int
    world: int
    seed: int
    drop_last: bool = False

    def __post_init__(self) -> None:
        full = self.batch_size * self.world
        if self.drop_last and self.num_rows < full:
            raise ConfigError(
                f"loader.drop_last: the data has {self.num_rows} rows, fewer than one global "
                f"batch (train.batch_size {self.batch_size} x {self.world} ranks = {full}): "
                "every epoch would be empty"
            )
        if not self.drop_last and self.num_rows < MIN_ROWS * self.world:
            raise ConfigError(
                f"data: {self.num_rows} rows cannot give each of the {self.world} ranks "
                f"{MIN_ROWS} rows per batch (BatchNorm needs {MIN_ROWS} in training)"
            )

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the rows that epoch ``epoch`` reads, from ``(seed, epoch)``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _ORDER]))
        return rng.permutation(self.num_rows)

    def take(self, offset: int) -> int:
        """Rows of the global batch that starts at ``offset``; 0 when the epoch is over."""
        full = self.batch_size * self.world
        left = self.num_rows - offset
        if left <= 0 or (self.drop_last and left < full):
            return 0
        if left <= full:
            return left
        # A tail that would leave some rank with fewer than MIN_ROWS rows joins this batch
        # (at most 2 x world - 1 extra rows): never a 1-row rank, every row still once.
        if not self.drop_last and left - full < MIN_ROWS * self.world:
            return left
        return full

    def span(self, offset: int, take: int, rank: int) -> tuple[int, int]:
        """``[lo, hi)`` in the epoch's order: rank ``rank``'s part of the global batch of
        ``take`` rows at ``offset`` (consecutive slices in rank order; sizes differ by at
        most one)."""
        base, extra = divmod(take, self.world)
        lo = offset + rank * base + min(rank, extra)
        return lo, lo + base + int(rank < extra)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Where each batch of an epoch starts (the same for every epoch)."""
        out, offset = [], 0
        while take := self.take(offset):
            out.append(offset)
            offset += take
        return tuple(out)

    def after(self, epoch: int, offset: int) -> tuple[int, int]:
        """The position after the batch at ``(epoch, offset)``: the next batch's start."""
        nxt = offset + self.take(offset)
        return (epoch, nxt) if self.take(nxt) else (epoch + 1, 0)

    def batches_left(self, epoch: int, offset: int, epochs: int) -> int:
        """Batches from position ``(epoch, offset)`` to the end of epoch ``epochs - 1``."""
        if epoch >= epochs:
            return 0
        here = 0
        while take := self.take(offset):
            here += 1
            offset += take
        return here + (epochs - 1 - epoch) * len(self.offsets)

    def advance(self, batches: int) -> tuple[int, int]:
        """The position after ``batches`` batches from the start of the run."""
        epoch, index = divmod(batches, len(self.offsets))
        return epoch, self.offsets[index]

    def rows_by_rank(self, offset: int) -> list[int]:
        """Rows each rank has read in an epoch up to ``offset`` (a batch start)."""
        seen, at = [0] * self.world, 0
        while at < offset and (take := self.take(at)):
            for r in range(self.world):
                lo, hi = self.span(at, take, r)
                seen[r] += hi - lo
            at += take
        return seen

    def fingerprint(self) -> dict[str, int]:
        """What must match for a resumed stream to continue exactly."""
        return {
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "world": self.world,
            "seed": self.seed,
            "drop_last": int(self.drop_last),
        }


class EpochBatchSampler(Sampler[BatchKey]):
    """The batches of one rank, epoch after epoch, from a position on (endless).

    Args:
        plan: the split of every epoch.
        rank: this rank.
        start: ``(epoch, offset)`` of the first batch.
        num_negatives: explicit negatives per batch (rows drawn with replacement from the
            whole source, seeded by the batch).
    """

    def __init__(
        self, plan: EpochPlan, rank: int, start: tuple[int, int], num_negatives: int = 0
    ) -> None:
        self.plan, self.rank, self.start, self.num_negatives = plan, rank, start, num_negatives

    def __iter__(self) -> Iterator[BatchKey]:
        plan, rank = self.plan, self.rank
        epoch, offset = self.start
        while True:
            order = plan.order(epoch)
            while take := plan.take(offset):
                lo, hi = plan.span(offset, take, rank)
                negatives: tuple[int, ...] = ()
                if self.num_negatives:
                    rng = np.random.default_rng(
                        np.random.SeedSequence([plan.seed, epoch, offset, rank, _NEGATIVES])
                    )
                    negatives = tuple(rng.integers(0, plan.num_rows, self.num_negatives).tolist())
                yield BatchKey(
                    epoch=epoch,
                    offset=offset,
                    rows=tuple(order[lo:hi].tolist()),
                    negatives=negatives,
                    seed=batch_seed(plan.seed, epoch, offset, rank, _AUGMENT),
                    after=plan.after(epoch, offset),
                )
                offset += take
            epoch, offset = epoch + 1, 0


def _as_is(batch: Batch) -> Batch:
    """The DataLoader's collate_fn: the source already made the batch."""
    return batch


class _MapBatches(Dataset):
    """A map-style source seen by the DataLoader: ``__getitems__(BatchKey) -> Batch``."""

    def __init__(self, source: MapSource, labels: bool) -> None:
        self.source, self.labels = source, labels

    def __getitems__(self, key: BatchKey) -> Batch:
        with seeded_rngs(key.seed) as generator:
            batch = self.source.fetch(key.rows, key.negatives, generator)
        return dataclasses.replace(
            batch,
            labels=batch.labels if self.labels else None,
            epoch=key.epoch,
            position={"epoch": key.after[0], "offset": key.after[1]},
        )

    def __getitem__(self, index: int) -> Any:
        raise TypeError("read through EpochBatchSampler: __getitems__(BatchKey)")

    def __len__(self) -> int:
        return self.source.num_rows


# ------------------------------------------------------------------------- streams


class Stream(Protocol):
    """What the trainer draws batches from (one per rank).

    Attributes:
        may_fail: batches can carry bad samples (the trainer then agrees across ranks
            on every batch, so that a stop is taken by all of them at once).
        has_epochs: batches belong to epochs (``train.epochs`` is allowed).
    """

    may_fail: bool
    has_epochs: bool

    def next(self) -> Batch:
        """The next batch of this rank."""
        ...

    def commit(self) -> None:
        """Mark the batches drawn so far as one finished optimizer step."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The committed position (plain values: a weights-only checkpoint holds it)."""
        ...

    def resume(self, state: Mapping[str, Any] | None, *, step: int) -> str:
        """Continue from ``state`` (None: derive the position from ``step`` optimizer
        steps). Call before the first :meth:`next`. Returns a warning, or ``""``."""
        ...

    def batches_left(self, epochs: int) -> int:
        """Batches from the committed position to the end of epoch ``epochs - 1``."""
        ...

    def close(self) -> None:
        """Stop the worker processes."""
        ...


class _LoaderBase:
    """The DataLoader plumbing and the committed position shared by the file streams."""

    may_fail = False
    has_epochs = True

    def __init__(self, *, num_workers: int, pin_memory: bool, grad_accum: int) -> None:
        self.num_workers, self.pin_memory, self.grad_accum = num_workers, pin_memory, grad_accum
        self._iter: Iterator[Batch] | None = None
        self._loader: DataLoader | None = None
        self._skipped = 0  # bad samples skipped by this rank (committed with the position)
        self._pending_skipped = 0

    def _make_loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        extra: dict[str, Any] = {}
        if self.num_workers:
            extra["prefetch_factor"] = 2
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            pin_memory=self.pin_memory,
            # A private generator: the iterator's base seed must not come from (and so
            # move) the global RNG, which the checkpoint restores for the training itself.
            generator=torch.Generator().manual_seed(0),
            **extra,
            **kwargs,
        )

    def _next_batch(self) -> Batch:
        if self._iter is None:
            self._loader = self._build()
            self._iter = iter(self._loader)
        batch = next(self._iter)
        self._pending_skipped += len(batch.skipped)
        return batch

    def _build(self) -> DataLoader:
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Bad samples this rank has skipped so far (the drawn batches included)."""
        return self._pending_skipped

    def close(self) -> None:
        # Dropping the iterator shuts its workers down (and joins them).
        self._iter = self._loader = None


class LoaderStream(_LoaderBase):
    """Batches of a map-style source through a torch DataLoader (see the module doc).

    Args:
        source: digits or a table (:class:`MapSource`).
        plan: how epochs are split.
        rank: this rank.
        num_workers: ``loader.num_workers``.
        pin_memory: pin batches (CUDA).
        num_negatives: ``loss.num_negatives``.
        labels: pass labels on (``loss.supervised``).
        grad_accum: batches per optimizer step.
    """

    def __init__(
        self,
        source: MapSource,
        plan: EpochPlan,
        *,
        rank: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        num_negatives: int = 0,
        labels: bool = False,
        grad_accum: int = 1,
    ) -> None:
        super().__init__(num_workers=num_workers, pin_memory=pin_memory, grad_accum=grad_accum)
        self.source, self.plan, self.rank = source, plan, rank
        self.num_negatives, self.labels = num_negatives, labels
        self.may_fail = bool(source.may_fail)
        self._position = self._committed = (0, 0)

    def _build(self) -> DataLoader:
        sampler = EpochBatchSampler(self.plan, self.rank, self._committed, self.num_negatives)
        return self._make_loader(_MapBatches(self.source, self.labels), batch_sampler=sampler)

    def next(self) -> Batch:
        batch = self._next_batch()
        assert batch.position is not None
        self._position = (batch.position["epoch"], batch.position["offset"])
        return batch

    def commit(self) -> None:
        self._committed = self._position
        self._skipped = self._pending_skipped

    def state_dict(self) -> dict[str, Any]:
        epoch, offset = self._committed
        return {
            "kind": "epochs",
            "epoch": epoch,
            "offset": offset,
            "rows_by_rank": self.plan.rows_by_rank(offset),
            "skipped": self._skipped,
            "plan": self.plan.fingerprint(),
        }

    def resume(self, state: Mapping[str, Any] | None, *, step: int) -> str:
        plan, warning = self.plan, ""
        if state is None or state.get("kind") != "epochs":
            position = plan.advance(step * self.grad_accum)
        else:
            position = (int(state["epoch"]), int(state["offset"]))
            self._skipped = self._pending_skipped = int(state.get("skipped", 0))
            old = dict(state.get("plan", {}))
            if old != plan.fingerprint():
                if old.get("num_rows") == plan.num_rows and old.get("seed") == plan.seed:
                    warning = (
                        f"the checkpoint's loader had {old}, this run {plan.fingerprint()}: "
                        f"continuing epoch {position[0]} from row {position[1]} of its order "
                        "(every row still once per epoch; not the batches the old run would "
                        "have drawn)"
                    )
                else:
                    warning = (
                        f"the data changed since the checkpoint ({old.get('num_rows')} rows, "
                        f"now {plan.num_rows}): epoch {position[0]} starts over"
                    )
                    position = (position[0], 0)
        if not plan.take(position[1]):  # an old world's batch start may end this one's epoch
            position = (position[0] + 1, 0)
        self._position = self._committed = position
        return warning

    def batches_left(self, epochs: int) -> int:
        return self.plan.batches_left(*self._committed, epochs)


class SampledStream:
    """The batch of ``(seed, step, rank, micro)`` from a source's ``sample()``: no epochs,
    no workers, nothing to store but the step (the synthetic pairs, older user data sets).

    Args:
        data: has ``sample(generator, batch_size)``.
        cfg: the run's config.
        rank: this rank.
    """

    may_fail = False
    has_epochs = False

    def __init__(self, data: Any, cfg: Config, rank: int) -> None:
        self.data, self.cfg, self.rank = data, cfg, rank
        self.step = self.micro = self._committed = 0

    def next(self) -> Batch:
        from dist_infonce.trainer.data import sample_batch

        x0, x1, labels = sample_batch(
            self.data, self.cfg, step=self.step, rank=self.rank, micro=self.micro
        )
        self.micro += 1
        if self.micro == self.cfg.train.grad_accum_steps:
            self.step, self.micro = self.step + 1, 0
        return Batch(x0, x1, labels, position={"step": self.step})

    def commit(self) -> None:
        self._committed = self.step

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sampled", "step": self._committed}

    def resume(self, state: Mapping[str, Any] | None, *, step: int) -> str:
        self.step = self._committed = step
        self.micro = 0
        return ""

    def batches_left(self, epochs: int) -> int:
        raise ConfigError(f"train.epochs: data.name={self.cfg.data.name!r} has no epochs")

    @property
    def skipped(self) -> int:
        return 0

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------- webdataset


@runtime_checkable
class ShardSource(Protocol):
    """Tar shards (webdataset): what :class:`ShardStream` reads.

    Attributes:
        counts: complete samples per shard, in the order of the shard list.
        input_shapes: per-sample shapes of view 0 and view 1.
        has_labels: whether samples carry labels.
    """

    counts: tuple[int, ...]
    input_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    has_labels: bool

    def samples(self, shards: Sequence[int], seed: int) -> Iterator[dict[str, Any]]:
        """The raw samples of ``shards`` in that order, through a shuffle buffer seeded by
        ``seed``: the same sequence in every process."""
        ...

    def make_batch(self, samples: Sequence[dict[str, Any]]) -> Batch:
        """Decode and preprocess raw samples (randomness from the global RNGs, seeded per
        batch by the loader); bad ones skipped or reported as in :meth:`MapSource.fetch`."""
        ...


@dataclass(frozen=True)
class ShardPlan:
    """How every epoch of a shard list is dealt to ranks and cut into steps.

    Epoch ``e`` permutes the shards from ``(seed, e)`` and deals them out in turn
    (shard ``i`` of that order to rank ``i % world``); rank ``r`` then holds ``n_r``
    samples. Every rank takes the same number of steps,
    ``S = max_r ceil(n_r / batch_size)``, and cuts its samples into ``S`` batches of
    near-equal size (so no rank runs dry while another still has full batches).
    With ``drop_last``, ``S = min_r floor(n_r / batch_size)`` full batches and the
    rest of each rank's epoch is left out.

    Raises:
        ConfigError: fewer shards than ranks, or an epoch with no step.
    """

    counts: tuple[int, ...]
    batch_size: int
    world: int
    seed: int
    drop_last: bool = False

    def __post_init__(self) -> None:
        if len(self.counts) < self.world:
            raise ConfigError(
                f"data.path: {len(self.counts)} shard(s) for {self.world} ranks; webdataset "
                "deals whole shards to ranks, so every rank needs at least one (write more, "
                "smaller shards)"
            )
        self.steps(0)

    @functools.lru_cache(maxsize=4)  # noqa: B019  # a few epochs' plans; the plan lives as long as the run
    def _epoch(self, epoch: int) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...], int]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _SHARDS]))
        order = rng.permutation(len(self.counts)).tolist()
        shards = tuple(tuple(order[r :: self.world]) for r in range(self.world))
        rows = tuple(sum(self.counts[s] for s in mine) for mine in shards)
        if self.drop_last:
            steps = min(n // self.batch_size for n in rows)
        else:
            steps = max(-(-n // self.batch_size) for n in rows)
        if steps == 0:
            raise ConfigError(
                f"data: in epoch {epoch} the shards give the ranks {list(rows)} samples, "
                f"fewer than train.batch_size={self.batch_size} on some rank "
                + ("with loader.drop_last=true" if self.drop_last else "")
            )
        return shards, rows, steps

    def shards(self, epoch: int, rank: int) -> tuple[int, ...]:
        """Indices (into the shard list) of the shards rank ``rank`` reads in ``epoch``."""
        return self._epoch(epoch)[0][rank]

    def rows(self, epoch: int) -> tuple[int, ...]:
        """Samples of every rank in ``epoch``."""
        return self._epoch(epoch)[1]

    def steps(self, epoch: int) -> int:
        """Batches (per rank) of ``epoch``."""
        return self._epoch(epoch)[2]

    def sizes(self, epoch: int, rank: int) -> list[int]:
        """Rank ``rank``'s batch sizes in ``epoch`` (sum: its samples; drop_last: full)."""
        steps, n = self.steps(epoch), self.rows(epoch)[rank]
        if self.drop_last:
            return [self.batch_size] * steps
        base, extra = divmod(n, steps)
        return [base + int(k < extra) for k in range(steps)]

    def batches_left(self, epoch: int, batch: int, epochs: int) -> int:
        """Batches from position ``(epoch, batch)`` to the end of epoch ``epochs - 1``."""
        return sum(self.steps(e) for e in range(epoch, epochs)) - batch * (epoch < epochs)

    def advance(self, batches: int) -> tuple[int, int]:
        """The position after ``batches`` batches from the start of the run."""
        epoch = 0
        while batches >= self.steps(epoch):
            batches -= self.steps(epoch)
            epoch += 1
        return epoch, batches

    def fingerprint(self) -> dict[str, int]:
        """What must match for a resumed stream to continue exactly."""
        return {
            "shards": len(self.counts),
            "samples": sum(self.counts),
            "batch_size": self.batch_size,
            "world": self.world,
            "seed": self.seed,
            "drop_last": int(self.drop_last),
        }


class _ShardBatches(IterableDataset):
    """One rank's webdataset batches from a position on, split over DataLoader workers.

    The DataLoader asks its workers in turn and yields their items in that order, so
    item ``i`` comes from worker ``i % num_workers``. Every worker therefore reads the
    rank's whole stream of raw samples (tar bytes: the order depends on the shuffle
    buffer, which sees every sample) and decodes only the batches ``i`` that are its
    own: the decoded batches, the expensive part, are split; the output is the same
    sequence for any number of workers.
    """

    def __init__(
        self, source: ShardSource, plan: ShardPlan, rank: int, start: tuple[int, int]
    ) -> None:
        self.source, self.plan, self.rank, self.start = source, plan, rank, start

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan, rank = self.plan, self.rank
        i = 0  # batches since this iterator started (the DataLoader's item number)
        epoch, first = self.start
        while True:
            sizes = plan.sizes(epoch, rank)
            raw = self.source.samples(
                plan.shards(epoch, rank), batch_seed(plan.seed, epoch, rank, _SHUFFLE)
            )
            for k, size in enumerate(sizes):
                chunk, problem = _read(raw, size)
                if problem or len(chunk) < size:
                    yield from self._failed(
                        problem
                        or f"webdataset: rank {rank} read {len(chunk)} samples for a batch of "
                        f"{size} in epoch {epoch}: the shards changed since the run started",
                        epoch,
                    )
                if k < first:
                    continue  # before the resume point: read, not decoded
                mine, i = i % workers == worker, i + 1
                if not mine:
                    continue
                with seeded_rngs(batch_seed(plan.seed, epoch, rank, k, _AUGMENT)):
                    batch = self.source.make_batch(chunk)
                after = (epoch, k + 1) if k + 1 < len(sizes) else (epoch + 1, 0)
                yield dataclasses.replace(
                    batch, epoch=epoch, position={"epoch": after[0], "batch": after[1]}
                )
            if not plan.drop_last:
                extra, problem = _read(raw, 1)
                if problem or extra:
                    yield from self._failed(
                        problem
                        or f"webdataset: rank {rank} has more samples in epoch {epoch} than "
                        "counted at the start: the shards changed since the run started",
                        epoch,
                    )
            epoch, first = epoch + 1, 0

    def _failed(self, message: str, epoch: int) -> Iterator[Batch]:
        """Error batches from here on: the trainer stops at the first (every worker that
        reads the broken stream ends up here, so every later item says so)."""
        empty = self.source.make_batch([])
        while True:
            yield dataclasses.replace(empty, error=message, epoch=epoch)


def _read(raw: Iterator[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], str]:
    """Up to ``n`` raw samples, and what went wrong reading the shards (``""``: nothing)."""
    try:
        return list(itertools.islice(raw, n)), ""
    except Exception as e:  # tarfile / OSError from a shard that cannot be read
        return [], f"webdataset: cannot read the shards: {type(e).__name__}: {e}"


class ShardStream(_LoaderBase):
    """Batches of webdataset shards through a torch DataLoader (see :class:`ShardPlan` and
    :class:`_ShardBatches`).

    Args:
        source: the shards (:class:`ShardSource`).
        plan: how epochs are dealt out.
        rank: this rank.
        num_workers: ``loader.num_workers``.
        pin_memory: pin batches (CUDA).
        labels: pass labels on (``loss.supervised``).
        grad_accum: batches per optimizer step.
    """

    may_fail = True

    def __init__(
        self,
        source: ShardSource,
        plan: ShardPlan,
        *,
        rank: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        labels: bool = False,
        grad_accum: int = 1,
    ) -> None:
        super().__init__(num_workers=num_workers, pin_memory=pin_memory, grad_accum=grad_accum)
        self.source, self.plan, self.rank, self.labels = source, plan, rank, labels
        self._position = self._committed = (0, 0)

    def _build(self) -> DataLoader:
        dataset = _ShardBatches(self.source, self.plan, self.rank, self._committed)
        return self._make_loader(dataset, batch_size=None)

    def next(self) -> Batch:
        batch = self._next_batch()
        if not self.labels:
            batch.labels = None
        if batch.position is not None:
            self._position = (batch.position["epoch"], batch.position["batch"])
        return batch

    def commit(self) -> None:
        self._committed = self._position
        self._skipped = self._pending_skipped

    def state_dict(self) -> dict[str, Any]:
        epoch, batch = self._committed
        sizes = self.plan.sizes(epoch, self.rank)
        return {
            "kind": "shards",
            "epoch": epoch,
            "batch": batch,
            "rows": sum(sizes[:batch]),
            "skipped": self._skipped,
            "plan": self.plan.fingerprint(),
        }

    def resume(self, state: Mapping[str, Any] | None, *, step: int) -> str:
        warning = ""
        if state is None or state.get("kind") != "shards":
            position = self.plan.advance(step * self.grad_accum)
        else:
            position = (int(state["epoch"]), int(state["batch"]))
            self._skipped = self._pending_skipped = int(state.get("skipped", 0))
            old = dict(state.get("plan", {}))
            if old != self.plan.fingerprint():
                warning = (
                    f"the checkpoint's shard plan was {old}, this run's "
                    f"{self.plan.fingerprint()}: epoch {position[0]} starts over"
                )
                position = (position[0], 0)
        self._position = self._committed = position
        return warning

    def batches_left(self, epochs: int) -> int:
        return self.plan.batches_left(*self._committed, epochs)


# ------------------------------------------------------------------------- factory


def build_stream(
    data: Any, cfg: Config, *, rank: int, world: int, device: torch.device
) -> SampledStream | LoaderStream | ShardStream:
    """The stream of ``data`` for this rank (see the module doc).

    Raises:
        ConfigError: a combination the source cannot serve (labels it lacks, epochs of a
            source without them, too few rows or shards for the world).
    """
    t = cfg.train
    pin = device.type == "cuda"
    labels = cfg.loss.supervised
    if labels and isinstance(data, MapSource | ShardSource) and not data.has_labels:
        raise ConfigError(
            f"loss.supervised: data.name={cfg.data.name!r} has no class labels"
            + (" (set data.label_column)" if cfg.data.name in ("table", "webdataset") else "")
        )
    common = {
        "rank": rank,
        "num_workers": cfg.loader.num_workers,
        "pin_memory": pin,
        "labels": labels,
        "grad_accum": t.grad_accum_steps,
    }
    if isinstance(data, MapSource):
        plan = EpochPlan(data.num_rows, t.batch_size, world, cfg.seed, cfg.loader.drop_last)
        return LoaderStream(data, plan, num_negatives=cfg.loss.num_negatives, **common)
    if isinstance(data, ShardSource):
        if cfg.loss.num_negatives:
            raise ConfigError(
                "loss.num_negatives: explicit negatives are drawn from numbered rows "
                "(digits, table, synthetic_pairs); webdataset streams its samples"
            )
        plan = ShardPlan(data.counts, t.batch_size, world, cfg.seed, cfg.loader.drop_last)
        return ShardStream(data, plan, **common)
    if t.epochs is not None:
        raise ConfigError(
            f"train.epochs: data.name={cfg.data.name!r} only samples batches "
            "(sample(generator, batch_size)); it has no epochs: use train.steps"
        )
    return SampledStream(data, cfg, rank)


def steps_for_epochs(stream: Stream, epochs: int, done: int, grad_accum: int) -> int:
    """Total optimizer steps of a run of ``epochs`` epochs that has done ``done`` steps and
    stands at the stream's committed position."""
    return done + math.ceil(stream.batches_left(epochs) / grad_accum)


# ----------------------------------------------------------------------- test hook


class _Recorded:
    """A stream that also appends every batch it hands out to a JSON-lines file."""

    def __init__(self, stream: Any, path: Path, rank: int) -> None:
        self._stream, self._path, self._rank = stream, path, rank

    def next(self) -> Batch:
        batch = self._stream.next()
        row = {
            "rank": self._rank,
            "epoch": batch.epoch,
            "position": batch.position,
            "ids": batch.ids,
            "rows": len(batch.x0),
            "skipped": batch.skipped,
        }
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def record_batches(stream: Any, rank: int, env: Mapping[str, str] | None = None) -> Any:
    """FOR TESTS ONLY: with ``DIST_INFONCE_TEST_RECORD_BATCHES=DIR`` set, ``stream``
    wrapped so that every batch the trainer draws is appended (ids, epoch, position) to
    ``DIR/batches-rank<rank>.jsonl``; unset (always, outside the tests): ``stream``."""
    folder = (os.environ if env is None else env).get(RECORD_ENV)
    if not folder:
        return stream
    Path(folder).mkdir(parents=True, exist_ok=True)
    print(f"{RECORD_ENV}: recording batches of rank {rank} in {folder}", file=sys.stderr)
    return _Recorded(stream, Path(folder) / f"batches-rank{rank}.jsonl", rank)
