"""The file sources: ``data.name: table`` (csv, tsv, jsonl, parquet, a datasets folder) and
``data.name: webdataset`` (tar shards).

Everything that can be known before training is checked when the source is built, and
a problem is a :class:`~dist_infonce.trainer.config.ConfigError` (exit 2) naming the
file, the column and the row: a missing file, a missing column, a ragged or non-finite
vector column, an empty cell, a missing image file, an empty shard list, a sample
without one of the keys. What can only be known by decoding (an image file that is
there but unreadable) is met in the DataLoader workers and handled by
``data.on_bad_sample`` (see :mod:`~dist_infonce.trainer.loader`).

A table is read with pyarrow (files) or ``datasets.load_from_disk`` (a folder) and
held as Arrow arrays and numpy matrices: DataLoader workers forked from the training
process share them without copying Python objects (a list of a million strings
would be copied page by page as reference counts change). Shards are read through
the ``webdataset`` package; their samples are counted from the tar headers at the
start (no data is read), so every rank knows every epoch's steps.
"""

from __future__ import annotations

import bisect
import glob
import io
import itertools
import os
import random
import re
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_infonce.trainer.config import ConfigError, DataConfig, ModelConfig
from dist_infonce.trainer.loader import Batch
from dist_infonce.trainer.transforms import (
    IMAGE_EXTENSIONS,
    BadSample,
    Kind,
    ViewTransform,
    view_transform,
)
from dist_infonce.trainer.views import stack

__all__ = [
    "DEFAULT_SHARD_KEYS",
    "EVAL_ROWS",
    "SHUFFLE_BUFFER",
    "EvalSamples",
    "TableSource",
    "WebDatasetSource",
    "expand_shards",
    "pair_recall",
    "read_table",
]

#: Rows of a table that its evaluation (retrieval recall@1) embeds: the first ones.
EVAL_ROWS = 1000
#: Samples in each rank's webdataset shuffle buffer (webdataset's own default size).
SHUFFLE_BUFFER = 1000
#: The two views of a webdataset sample when ``data.columns`` is empty (OpenCLIP's layout).
DEFAULT_SHARD_KEYS = ("jpg;png;jpeg;webp", "txt")

_TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
_IMAGE_NAME = r"(?i)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$"


# --------------------------------------------------------------------------- batches


def _stack(samples: list[Any], transform: ViewTransform) -> Any:
    """``(B, *shape)``, or a dict of them for a transform with ``keys`` (a tokenizer's
    ``input_ids`` and ``attention_mask``); B may be 0 (every sample skipped, or a rank's
    shards ran out)."""
    keys = getattr(transform, "keys", None)
    if not samples:
        empty = lambda: torch.zeros((0, *transform.shape), dtype=transform.dtype)
        return {k: empty() for k in keys} if keys else empty()
    return stack(samples)


def _labels(values: list[int], has: bool) -> torch.Tensor | None:
    return torch.tensor(values, dtype=torch.int64) if has else None


# ----------------------------------------------------------------------------- tables


def _table_files(path: str) -> list[Path]:
    """The files ``data.path`` names (a file or a glob), sorted.

    Raises:
        ConfigError: nothing there, or a file of a format we do not read.
    """
    has_magic = glob.has_magic(path)
    files = sorted(Path(p) for p in glob.glob(path, recursive=True)) if has_magic else [Path(path)]
    files = [f for f in files if not f.is_dir()]
    if not files:
        raise ConfigError(f"data.path: no file matches {path!r}")
    if not has_magic and not files[0].is_file():
        raise ConfigError(f"data.path: no such file or folder {path!r}")
    for f in files:
        if f.suffix.lower() not in _TABLE_SUFFIXES:
            raise ConfigError(
                f"data.path: {str(f)!r} is not a table file we read "
                f"({', '.join(_TABLE_SUFFIXES)}; or a datasets save_to_disk folder)"
            )
    return files


def _read_file(f: Path, columns: Sequence[str]) -> Any:
    """One table file as a pyarrow Table of ``columns``.

    Raises:
        ConfigError: a missing column (the columns it has are listed) or a file pyarrow
            cannot parse.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    kind = _TABLE_SUFFIXES[f.suffix.lower()]
    try:
        if kind == "parquet":
            names = pq.read_schema(f).names
            _require(columns, names, f)
            return pq.read_table(f, columns=list(dict.fromkeys(columns)))
        if kind in ("csv", "tsv"):
            # CSV has no list type; every view column is read as text (a caption "7"
            # stays "7"), the label column as whatever it holds.
            parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            names = pacsv.open_csv(f, parse_options=parse).schema.names
            _require(columns, names, f)
            table = pacsv.read_csv(
                f,
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(dict.fromkeys(columns)),
                    column_types={c: pa.string() for c in columns[:2]},
                    strings_can_be_null=False,
                ),
            )
            return table
        table = pajson.read_json(f)
    except ConfigError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.path: cannot read {str(f)!r} as {kind}: {e}") from None
    _require(columns, table.column_names, f)
    return table.select(list(dict.fromkeys(columns)))


def _require(columns: Sequence[str], names: Sequence[str], where: Any) -> None:
    for c in columns:
        if c not in names:
            key = "data.label_column" if c == columns[-1] and len(columns) == 3 else "data.columns"
            raise ConfigError(
                f"{key}: no column {c!r} in {str(where)!r} (it has: {', '.join(names)})"
            )


def read_table(path: str, columns: Sequence[str]) -> tuple[Any, list[tuple[str, int]]]:
    """``columns`` of the table at ``path``, and ``(file, rows)`` of every file read.

    ``path`` is a .csv / .tsv / .jsonl / .parquet file, a glob of them (concatenated in
    sorted order), or a folder that ``datasets``' ``save_to_disk`` wrote.

    Raises:
        ConfigError: naming the file and column (see :func:`_read_file`).
    """
    import pyarrow as pa

    p = Path(path)
    if p.is_dir():
        return _read_saved_dataset(p, columns)
    tables, files = [], []
    for f in _table_files(path):
        t = _read_file(f, columns)
        tables.append(t)
        files.append((str(f), t.num_rows))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ConfigError(
            f"data.path: the files of {path!r} do not share their column types: {e}"
        ) from None
    if table.num_rows == 0:
        raise ConfigError(f"data.path: {path!r} holds no rows")
    return table, files


def _read_saved_dataset(p: Path, columns: Sequence[str]) -> tuple[Any, list[tuple[str, int]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(
            f"data.path: {str(p)!r} is a folder but not one datasets' save_to_disk wrote: {e}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(
            f"data.path: {str(p)!r} holds the splits {list(ds)}; point data.path at one of "
            f"them ({str(p / next(iter(ds)))!r})"
        )
    _require(columns, ds.column_names, p)
    table = ds.select_columns(list(dict.fromkeys(columns))).with_format("arrow")[:]
    if table.num_rows == 0:
        raise ConfigError(f"data.path: {str(p)!r} holds no rows")
    return table, [(str(p), table.num_rows)]


class _Column:
    """One view's column: its kind and a way to get one row's raw value."""

    def __init__(self, kind: Kind, get: Callable[[int], Any], dim: int | None = None) -> None:
        self.kind, self.get, self.dim = kind, get, dim


class TableSource:
    """Rows of a table (``data.name: table``): a map-style source with epochs.

    ``data.columns`` names the two views, ``data.label_column`` an optional integer
    label. A numeric-list column is a float32 vector per row; a string column is text,
    or image file names when ``data.image_root`` is set (relative to it; ``/`` for
    absolute paths); a binary column holds encoded images; a ``datasets`` Image column
    (bytes, path) is an image too. Rows are numbered from 0 in file order (files of a
    glob in sorted order), header excluded: that number is the row's id.

    Args:
        cfg: the ``data`` section.
        model: the ``model`` section (the towers choose their preprocessing:
            :func:`~dist_infonce.trainer.transforms.view_transform`).

    Raises:
        ConfigError: a file, column or row that cannot be used (named).
    """

    def __init__(self, cfg: DataConfig, model: ModelConfig | None = None) -> None:
        model = model or ModelConfig()
        self.columns = list(cfg.columns)
        self.skip_bad = cfg.on_bad_sample == "skip"
        wanted = [*self.columns, *([cfg.label_column] if cfg.label_column else [])]
        table, self.files = read_table(str(cfg.path), wanted)
        self._starts = np.cumsum([0] + [n for _, n in self.files]).tolist()
        self.num_rows = table.num_rows
        root = Path(cfg.image_root) if cfg.image_root else None
        views = [self._column(table, c, root) for c in self.columns]
        self.input_kinds: tuple[Kind, Kind] = (views[0].kind, views[1].kind)
        self._views = views
        self.transforms = [
            view_transform(v.kind, view=i, train=True, model=model, dim=v.dim)
            for i, v in enumerate(views)
        ]
        self.eval_transforms = [
            view_transform(v.kind, view=i, train=False, model=model, dim=v.dim)
            for i, v in enumerate(views)
        ]
        self.input_shapes = (self.transforms[0].shape, self.transforms[1].shape)
        self.has_labels = cfg.label_column is not None
        self._label_values = (
            self._label_array(table, cfg.label_column) if cfg.label_column else None
        )
        self.may_fail = "image" in self.input_kinds

    # ---------------------------------------------------------------- checks

    def where(self, row: int) -> str:
        """``'FILE' row N`` of a global row number."""
        i = bisect.bisect_right(self._starts, row) - 1
        return f"{self.files[i][0]!r} row {row - self._starts[i]}"

    def _first(self, mask: np.ndarray) -> int:
        return int(np.flatnonzero(mask)[0])

    def _column(self, table: Any, name: str, root: Path | None) -> _Column:
        import pyarrow as pa
        import pyarrow.compute as pc

        col = table.column(name).combine_chunks()
        tp = col.type
        if col.null_count:
            row = self._first(col.is_null().to_numpy(zero_copy_only=False))
            raise ConfigError(f"data.columns: column {name!r} is empty at {self.where(row)}")
        if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
            if not (pa.types.is_integer(tp.value_type) or pa.types.is_floating(tp.value_type)):
                raise ConfigError(
                    f"data.columns: column {name!r} holds lists of {tp.value_type}; a vector "
                    "column holds lists of numbers"
                )
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if (lengths != lengths[0]).any():
                row = self._first(lengths != lengths[0])
                raise ConfigError(
                    f"data.columns: column {name!r} is ragged: {self.where(0)} has "
                    f"{lengths[0]} numbers, {self.where(row)} has {lengths[row]}"
                )
            dim = int(lengths[0])
            if dim == 0:
                raise ConfigError(f"data.columns: column {name!r} holds empty vectors")
            flat = pc.list_flatten(col)
            values = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                raise ConfigError(
                    f"data.columns: column {name!r} has a missing or non-finite number at "
                    f"{self.where(self._first(bad))}"
                )
            return _Column("vector", lambda r, v=values: v[r], dim)
        if pa.types.is_string(tp) or pa.types.is_large_string(tp):
            looks = pc.match_substring_regex(col, _IMAGE_NAME).to_numpy(zero_copy_only=False)
            if root is None:
                if looks.all():
                    raise ConfigError(
                        f"data.columns: column {name!r} holds image file names "
                        f"(e.g. {col[0].as_py()!r}); set data.image_root to the folder they "
                        "are relative to ('/' for absolute paths)"
                    )
                return _Column("text", lambda r, c=col: c[r].as_py())
            if not looks.any():
                return _Column("text", lambda r, c=col: c[r].as_py())
            if not looks.all():
                row = self._first(~looks)
                raise ConfigError(
                    f"data.columns: column {name!r} mixes image file names and other text: "
                    f"{self.where(row)} is {col[row].as_py()!r}"
                )
            self._check_files(name, [str(root / p) for p in col.to_pylist()])
            # The names stay in Arrow (see the module doc); the path is joined per row.
            return _Column("image", lambda r, c=col, d=root: str(d / c[r].as_py()))
        if pa.types.is_binary(tp) or pa.types.is_large_binary(tp):
            return _Column("image", lambda r, c=col: c[r].as_py())
        if pa.types.is_struct(tp) and {"bytes", "path"} <= {f.name for f in tp}:
            # A datasets Image() column: the encoded bytes, or a path when there are none.
            base = root or Path("/")
            blobs, names = col.field("bytes"), col.field("path")
            no_bytes = blobs.is_null().to_numpy(zero_copy_only=False)
            empty = no_bytes & names.is_null().to_numpy(zero_copy_only=False)
            if empty.any():
                row = self._first(empty)
                raise ConfigError(
                    f"data.columns: image column {name!r} is empty at {self.where(row)}"
                )
            wanted = [
                str(base / n) if use else ""
                for n, use in zip(names.to_pylist(), no_bytes, strict=True)
            ]
            self._check_files(name, wanted)

            def image(r: int, b: Any = blobs, n: Any = names, d: Path = base) -> Any:
                value = b[r].as_py()
                return value if value is not None else str(d / n[r].as_py())

            return _Column("image", image)
        raise ConfigError(
            f"data.columns: column {name!r} is {tp}; a view is a list of numbers (vector), "
            "a string (text, or image file names with data.image_root) or image bytes"
        )

    def _check_files(self, name: str, paths: Sequence[str]) -> None:
        """Every image file is there (``""``: a row whose image is held as bytes). Whether
        it reads is known only when it is decoded."""
        missing = [i for i, p in enumerate(paths) if p and not os.path.isfile(p)]
        if missing:
            first = missing[0]
            raise ConfigError(
                f"data.image_root: {len(missing)} of {sum(map(bool, paths))} images of column "
                f"{name!r} are missing; the first, {self.where(first)}: {paths[first]!r}"
            )

    def _label_array(self, table: Any, name: str) -> np.ndarray:
        import pyarrow as pa

        col = table.column(name).combine_chunks()
        if not pa.types.is_integer(col.type):
            raise ConfigError(
                f"data.label_column: column {name!r} is {col.type}; labels are integers (class ids)"
            )
        if col.null_count:
            row = self._first(col.is_null().to_numpy(zero_copy_only=False))
            raise ConfigError(f"data.label_column: column {name!r} is empty at {self.where(row)}")
        return col.to_numpy().astype(np.int64)

    # ----------------------------------------------------------------- batches

    def _sample(self, row: int, views: Sequence[int], transforms: Sequence[ViewTransform]) -> list:
        out = []
        for v in views:
            try:
                out.append(transforms[v](self._views[v].get(row)))
            except BadSample as e:
                raise BadSample(f"{self.where(row)}, column {self.columns[v]!r}: {e}") from None
        return out

    def fetch(
        self, rows: Sequence[int], negatives: Sequence[int], generator: torch.Generator
    ) -> Batch:
        """The batch of ``rows`` (and view 1 of ``negatives``), preprocessed in this process
        (a DataLoader worker); see :class:`~dist_infonce.trainer.loader.MapSource`."""
        t = self.transforms
        x0: list[torch.Tensor] = []
        x1: list[torch.Tensor] = []
        neg: list[torch.Tensor] = []
        kept: list[int] = []
        skipped: list[str] = []
        for row in rows:
            try:
                a, b = self._sample(row, (0, 1), t)
            except BadSample as e:
                if not self.skip_bad:
                    return self._failed(str(e))
                skipped.append(str(e))
                continue
            x0.append(a)
            x1.append(b)
            kept.append(row)
        for row in negatives:
            try:
                neg.extend(self._sample(row, (1,), t))
            except BadSample as e:
                if not self.skip_bad:
                    return self._failed(str(e))
                skipped.append(str(e))
        labels = None
        if self._label_values is not None:
            labels = torch.from_numpy(self._label_values[kept])
        return Batch(
            x0=_stack(x0, t[0]), x1=_stack(x1 + neg, t[1]), labels=labels, ids=kept, skipped=skipped
        )

    def _failed(self, message: str) -> Batch:
        t = self.transforms
        return Batch(
            x0=_stack([], t[0]),
            x1=_stack([], t[1]),
            labels=None if self._label_values is None else torch.zeros(0, dtype=torch.int64),
            error=message,
        )

    # -------------------------------------------------------------- evaluation

    def evaluate(self, embed: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[str, float]:
        """Retrieval recall@1/5/10 between the two views over the first :data:`EVAL_ROWS`
        rows (:func:`pair_recall`).

        These are training rows (a table has no held-out split; ``eval.path`` adds one):
        a check that the towers learnt to match the pairs, not a generalisation score;
        unreadable rows are left out.
        """
        s = self.eval_samples(EVAL_ROWS)
        return pair_recall(embed, s.x0, s.x1, s.keys0, s.keys1)

    def eval_samples(self, limit: int) -> EvalSamples:
        """The first ``limit`` rows, preprocessed for evaluation (unreadable rows left out),
        with their raw values' keys and their labels."""
        t, out = self.eval_transforms, EvalSamples()
        for row in range(min(self.num_rows, limit)):
            try:
                a, b = self._sample(row, (0, 1), t)
            except BadSample:
                continue
            label = None if self._label_values is None else int(self._label_values[row])
            out.add(a, b, _key(self._views[0].get(row)), _key(self._views[1].get(row)), label)
        return out


@dataclass
class EvalSamples:
    """Preprocessed evaluation rows of a source: both views, the keys of their raw values
    (equal values, equal keys: :func:`pair_recall`'s hit rule) and the labels (or None)."""

    x0: list[Any] = field(default_factory=list)
    x1: list[Any] = field(default_factory=list)
    keys0: list[Any] = field(default_factory=list)
    keys1: list[Any] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)

    def add(self, a: Any, b: Any, key0: Any, key1: Any, label: int | None) -> None:
        self.x0.append(a)
        self.x1.append(b)
        self.keys0.append(key0)
        self.keys1.append(key1)
        self.labels.append(label)


def pair_recall(
    embed: Callable[[torch.Tensor, int], torch.Tensor],
    x0: Sequence[Any],
    x1: Sequence[Any],
    keys0: Sequence[Any],
    keys1: Sequence[Any],
    prefix: str = "eval/train_",
) -> dict[str, float]:
    """Retrieval recall@1/5/10 between the views of pairs (the sources' evaluation).

    A retrieved row counts as a hit when it has the query row's view-0 or view-1 value
    (``keys0``, ``keys1``: every image captioned "a photo of the digit seven" answers
    that caption).

    Returns:
        ``{prefix}recall@k`` (mean of both directions), ``..._a2b`` (view 0 queries
        view 1), ``..._b2a``, k = 1, 5, 10; fractions in [0, 1]. The prefix is
        ``eval/train_`` for training rows.
    """
    from dist_infonce.trainer.retrieval import retrieval_metrics, value_ids

    e0, e1 = embed(stack(x0), 0), embed(stack(x1), 1)
    return retrieval_metrics(e0, e1, value_ids(keys0), value_ids(keys1), prefix=prefix)


def _key(value: Any) -> Any:
    """A comparable stand-in for a raw value (numpy rows compare as bytes)."""
    return value.tobytes() if isinstance(value, np.ndarray) else value


# ------------------------------------------------------------------------- webdataset


def expand_shards(pattern: str) -> list[str]:
    """The shard files of a brace pattern (``shards/{0000..0099}.tar``; globs work too),
    in the pattern's order.

    Raises:
        ConfigError: the pattern gives no file, or one of its files is missing.
    """
    import braceexpand

    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        urls.extend(sorted(glob.glob(item)) if glob.has_magic(item) else [item])
    if not urls:
        raise ConfigError(f"data.path: no shard matches {pattern!r} (an empty shard list)")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ConfigError(
            f"data.path: {len(missing)} of the {len(urls)} shards of {pattern!r} are missing, "
            f"the first: {missing[0]!r}"
        )
    return urls


def _shard_samples(url: str) -> list[tuple[str, set[str]]]:
    """``(key, suffixes)`` of every sample of a shard, from its tar headers only.

    webdataset's own grouping (``group_by_keys``) runs on the member names, with the
    members it skips skipped here too, so the count is what the training reads.

    Raises:
        ConfigError: the shard is not a readable tar file.
    """
    from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix

    meta = re.compile(r"__[^/]*__($|/)")
    try:
        with tarfile.open(url, "r:*") as tf:  # seekable: headers are read, data skipped
            names = [
                m.name
                for m in tf
                if m.isreg()
                and not (
                    "/" not in m.name
                    and m.name.startswith(meta_prefix)
                    and m.name.endswith(meta_suffix)
                )
                and not meta.match(m.name)
            ]
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"data.path: shard {url!r} is not a readable tar file: {e}") from None
    files = ({"fname": n, "data": b"", "__url__": url} for n in names)
    return [(s["__key__"], {k for k in s if not k.startswith("__")}) for s in group_by_keys(files)]


def _kind_of(alternatives: Sequence[str], key: str) -> Kind:
    kinds = set()
    for ext in alternatives:
        if ext in IMAGE_EXTENSIONS:
            kinds.add("image")
        elif ext in ("txt", "text"):
            kinds.add("text")
        elif ext == "npy":
            kinds.add("vector")
        else:
            raise ConfigError(
                f"data.columns: webdataset key {ext!r} of {key!r} is not an image "
                f"({', '.join(IMAGE_EXTENSIONS)}), txt or npy"
            )
    if len(kinds) > 1:
        raise ConfigError(f"data.columns: the alternatives of {key!r} mix {sorted(kinds)}")
    return kinds.pop()  # type: ignore[return-value]


class WebDatasetSource:
    """Tar shards in webdataset's layout (``data.name: webdataset``): samples grouped by
    key, one file per view (``0001.png`` + ``0001.txt``, OpenCLIP's layout).

    ``data.columns`` names the two views' keys (file extensions; ``;`` separates
    alternatives, the first present is used), ``data.label_column`` an optional key
    holding an integer (``cls``). Images (``png``, ``jpg``, ...) are decoded and
    augmented, ``txt`` is text, ``npy`` a float vector. A sample's id is
    ``shard-file-name:key``.

    Args:
        cfg: the ``data`` section (``path`` is a shard pattern).
        model: the ``model`` section (the towers choose their preprocessing).

    Raises:
        ConfigError: no shards, a missing or unreadable shard, a sample without one of
            the keys (with ``data.on_bad_sample=stop``; skipped and counted with ``skip``).
    """

    def __init__(self, cfg: DataConfig, model: ModelConfig | None = None) -> None:
        model = model or ModelConfig()
        self.urls = expand_shards(str(cfg.path))
        names = list(cfg.columns) or list(DEFAULT_SHARD_KEYS)
        self.views = [tuple(a.strip().lower() for a in n.split(";") if a.strip()) for n in names]
        self.label_key = cfg.label_column.lower() if cfg.label_column else None
        self.skip_bad = cfg.on_bad_sample == "skip"
        kinds = [_kind_of(alts, n) for alts, n in zip(self.views, names, strict=True)]
        self.input_kinds: tuple[Kind, Kind] = (kinds[0], kinds[1])
        self.counts, incomplete, first = self._count()
        if incomplete:
            url, key, what = first
            if not self.skip_bad:
                raise ConfigError(
                    f"data.columns: {incomplete} sample(s) lack a key; the first, {key!r} in "
                    f"{url!r}, has no {what} (data.on_bad_sample=skip leaves them out)"
                )
            print(
                f"warning: data: {incomplete} webdataset sample(s) lack a key and are left "
                f"out (the first, {key!r} in {url!r}, has no {what})",
                file=sys.stderr,
                flush=True,
            )
        if not sum(self.counts):
            raise ConfigError(f"data.path: the shards of {cfg.path!r} hold no complete sample")
        dims = [self._vector_dim(v) if k == "vector" else None for v, k in enumerate(kinds)]
        self.transforms = [
            view_transform(k, view=i, train=True, model=model, dim=d)
            for i, (k, d) in enumerate(zip(kinds, dims, strict=True))
        ]
        self.eval_transforms = [
            view_transform(k, view=i, train=False, model=model, dim=d)
            for i, (k, d) in enumerate(zip(kinds, dims, strict=True))
        ]
        self.input_shapes = (self.transforms[0].shape, self.transforms[1].shape)
        self.has_labels = self.label_key is not None
        self.may_fail = True

    def _missing(self, suffixes: set[str]) -> str:
        """What a sample with these files lacks, or ``""``."""
        for alts in self.views:
            if not suffixes.intersection(alts):
                return " or ".join(alts)
        if self.label_key and self.label_key not in suffixes:
            return self.label_key
        return ""

    def _count(self) -> tuple[tuple[int, ...], int, tuple[str, str, str]]:
        counts, incomplete, first = [], 0, ("", "", "")
        for url in self.urls:
            n = 0
            for key, suffixes in _shard_samples(url):
                what = self._missing(suffixes)
                if what:
                    incomplete += 1
                    first = first if first[0] else (url, key, what)
                else:
                    n += 1
            counts.append(n)
        return tuple(counts), incomplete, first

    def _vector_dim(self, view: int) -> int:
        sample = next(self.samples(range(len(self.urls)), seed=0, shuffle=False))
        try:
            return len(self._vector(self._raw(sample, view)))
        except BadSample as e:
            raise ConfigError(f"data.columns: {self._name(sample)}: {e}") from None

    @staticmethod
    def _vector(raw: bytes) -> np.ndarray:
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadSample(f"not a .npy array: {e}") from None
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.number):
            raise BadSample(f"expected a 1-d numeric array, got {arr.dtype} {arr.shape}")
        return arr

    def _raw(self, sample: dict[str, Any], view: int) -> Any:
        ext = next(a for a in self.views[view] if a in sample)
        return sample[ext]

    @staticmethod
    def _name(sample: dict[str, Any]) -> str:
        return f"{os.path.basename(sample.get('__url__', '?'))}:{sample.get('__key__', '?')}"

    def samples(
        self, shards: Sequence[int], seed: int, *, shuffle: bool = True
    ) -> Iterator[dict[str, Any]]:
        """The complete raw samples of ``shards`` in order, through a shuffle buffer of
        :data:`SHUFFLE_BUFFER` samples seeded by ``seed`` (webdataset's ``shuffle``)."""
        import webdataset as wds

        stream = wds.tarfile_samples(iter([{"url": self.urls[i]} for i in shards]))
        complete = (s for s in stream if not self._missing(set(s)))
        if not shuffle:
            return complete
        return iter(
            wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=random.Random(seed))(complete)
        )

    def evaluate(self, embed: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[str, float]:
        """Retrieval recall@1/5/10 between the two views over the first :data:`EVAL_ROWS`
        samples of the shard list, in its order (training samples: see
        :func:`pair_recall`); unreadable samples are left out."""
        s = self.eval_samples(EVAL_ROWS)
        return pair_recall(embed, s.x0, s.x1, s.keys0, s.keys1)

    def eval_samples(self, limit: int) -> EvalSamples:
        """The first ``limit`` samples of the shard list, in its order, preprocessed for
        evaluation (unreadable ones left out), with their raw values and labels."""
        out = EvalSamples()
        samples = self.samples(range(len(self.urls)), seed=0, shuffle=False)
        for sample in itertools.islice(samples, limit):
            try:
                a, b, label = self._decode(sample, self.eval_transforms)
            except BadSample:
                continue
            out.add(
                a, b, self._raw(sample, 0), self._raw(sample, 1), label if self.label_key else None
            )
        return out

    def _decode(
        self, sample: dict[str, Any], transforms: Sequence[ViewTransform] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        transforms = self.transforms if transforms is None else transforms
        out = []
        for view, kind in enumerate(self.input_kinds):
            raw = self._raw(sample, view)
            try:
                if kind == "text":
                    try:
                        value: Any = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise BadSample(f"text is not UTF-8: {e}") from None
                elif kind == "vector":
                    value = self._vector(raw)
                else:
                    value = raw
                out.append(transforms[view](value))
            except BadSample as e:
                key = next(a for a in self.views[view] if a in sample)
                raise BadSample(f"{self._name(sample)}.{key}: {e}") from None
        label = 0
        if self.label_key:
            try:
                label = int(sample[self.label_key].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                raise BadSample(
                    f"{self._name(sample)}.{self.label_key}: not an integer label"
                ) from None
        return out[0], out[1], label

    def make_batch(self, samples: Sequence[dict[str, Any]]) -> Batch:
        """Decode and preprocess ``samples``; see
        :meth:`~dist_infonce.trainer.loader.ShardSource.make_batch`."""
        t = self.transforms
        x0, x1, labels, ids, skipped = [], [], [], [], []
        for s in samples:
            try:
                a, b, label = self._decode(s)
            except BadSample as e:
                if not self.skip_bad:
                    return Batch(
                        _stack([], t[0]),
                        _stack([], t[1]),
                        _labels([], self.has_labels),
                        error=str(e),
                    )
                skipped.append(str(e))
                continue
            x0.append(a)
            x1.append(b)
            labels.append(label)
            ids.append(self._name(s))
        return Batch(
            _stack(x0, t[0]),
            _stack(x1, t[1]),
            _labels(labels, self.has_labels),
            ids=ids,
            skipped=skipped,
        )
