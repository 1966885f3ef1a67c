"""How a loss of the family is computed: one frozen, validated object, passed by name.

The public functions and modules take these settings as keywords (the API of
DESIGN.md); each builds one :class:`LossOptions`, which checks every field when it is
made, and hands it to the loss body as ``options=``. A module keeps its
``LossOptions`` in ``self.options`` and shows each field as an attribute
(:class:`OptionField`): ``loss.reduction = "sum"`` replaces the options with a
re-checked copy, so a module never holds an unchecked setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch.distributed import ProcessGroup

from dist_infonce.kernels.triton_lse import check_triton_block

__all__ = ["KERNELS", "NEGATIVE_MODES", "REDUCTIONS", "LossOptions", "OptionField"]

REDUCTIONS = ("none", "mean", "sum")
NEGATIVE_MODES = ("unpaired", "paired")
KERNELS = ("auto", "dense", "chunked", "triton")


@dataclass(frozen=True)
class LossOptions:
    """The settings of one InfoNCE-family loss (see :func:`dist_infonce.info_nce`).

    Raises:
        ValueError: naming the field, for a ``reduction``, ``negative_mode`` or
            ``kernel`` outside its choices, a ``chunk_size`` that is not None or a
            positive int, a ``chunk_size`` with ``kernel="dense"``, or one that is
            not a power of two >= 16 with ``kernel="triton"``.

    Example:
        >>> opts = LossOptions(symmetric=True, gather=True)
        >>> dataclasses.replace(opts, reduction="sum")  # a checked copy
    """

    reduction: str = "mean"
    """"mean" (``sum * world_size / global_rows``, the gradient convention), "sum"
    (``sum * world_size``) or "none" (the per-row losses)."""
    negative_mode: str = "unpaired"
    """How explicit negatives are laid out: "unpaired" (M, D) or "paired" (N, M, D)."""
    symmetric: bool = False
    """CLIP's loss: the mean of the query->key and key->query directions."""
    normalize: bool = True
    """L2-normalise the inputs first (cosine similarities)."""
    chunk_size: int | None = None
    """Tile edge of the tiled kernels; None lets ``kernel="auto"`` choose."""
    kernel: str = "auto"
    """The log-sum-exp over the pool: "auto", "dense", "chunked" or "triton"."""
    gather: bool = False
    """Pool the rows of every rank of ``group`` (:func:`dist_infonce.all_gather_with_grad`)."""
    group: ProcessGroup | None = None
    """Process group of ``gather`` (and of a learnable parameter's average); None: the world."""

    def __post_init__(self) -> None:
        # The order of the checks is the order of the messages users have seen so far.
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        chunk = self.chunk_size
        if chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
        ):
            raise ValueError(f"chunk_size must be None or a positive int, got {chunk!r}")
        if not isinstance(self.kernel, str) or self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel == "dense" and chunk is not None:
            raise ValueError(
                "chunk_size is the tile edge of the tiled kernels; kernel='dense' takes none, "
                f"got chunk_size={chunk}"
            )
        if self.kernel == "triton":
            check_triton_block(chunk)
        if self.negative_mode not in NEGATIVE_MODES:
            raise ValueError(
                f"negative_mode must be one of {NEGATIVE_MODES}, got {self.negative_mode!r}"
            )


class OptionField:
    """A module attribute that is one field of the module's ``options`` (a LossOptions).

    Reading returns the field; assigning replaces ``options`` with a copy that has the
    new value, checked like the constructor's argument (a bad value raises and leaves
    the module as it was).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.options, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.options = dataclasses.replace(obj.options, **{self.name: value})
