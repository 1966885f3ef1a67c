"""The data sources and the loader in this process: epoch plans, tables, shards, workers,
resume positions, bad input.

Every rank's stream is built here for ranks 0 and 1 of a 2-rank world (the streams need
no process group: the split is a pure function of seed, epoch, rank and world), with
real DataLoader worker processes. tests/test_data_train.py runs the same sources under
torchrun on real gloo ranks, with a SIGKILL and a restart.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dist_infonce.trainer.config import ConfigError, load_config
from dist_infonce.trainer.data import build_data
from dist_infonce.trainer.loader import (
    MIN_ROWS,
    EpochBatchSampler,
    EpochPlan,
    ShardPlan,
    build_stream,
)
from dist_infonce.trainer.sources import TableSource, WebDatasetSource, pair_recall
from dist_infonce.trainer.transforms import HashedNgramTokenizer
from examples.make_digits_pairs import make_digits_pairs
from tests.test_train import REPO

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """100 digits as PNGs + captions: parquet, and 3 webdataset shards of 34/34/32."""
    return make_digits_pairs(tmp_path_factory.mktemp("pairs"), shards=3, limit=100)


def table_cfg(pairs: dict[str, Path], *extra: str) -> Any:
    return load_config(
        None,
        [
            "data.name=table",
            f"data.path={pairs['table']}",
            f"data.image_root={pairs['images']}",
            "data.columns=[image,caption]",
            "data.label_column=label",
            "model.name=two_tower",
            "train.batch_size=8",
            *extra,
        ],
    )


def shard_cfg(pairs: dict[str, Path], *extra: str) -> Any:
    return load_config(
        None,
        [
            "data.name=webdataset",
            f"data.path={pairs['shards']}",
            "data.columns=[png,txt]",
            "data.label_column=cls",
            "model.name=two_tower",
            "train.batch_size=8",
            *extra,
        ],
    )


def streams(cfg: Any, world: int = 2) -> list[Any]:
    data = build_data(cfg.data, model=cfg.model)
    out = []
    for rank in range(world):
        s = build_stream(data, cfg, rank=rank, world=world, device=CPU)
        s.resume(None, step=0)
        out.append(s)
    return out


def draw(stream: Any, n: int) -> list[Any]:
    """``n`` batches, each committed as its own optimizer step."""
    out = []
    for _ in range(n):
        out.append(stream.next())
        stream.commit()
    return out


def same_batches(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.ids == y.ids and x.epoch == y.epoch and x.position == y.position
        assert torch.equal(x.x0, y.x0) and torch.equal(x.x1, y.x1)
        assert (x.labels is None) == (y.labels is None)
        if x.labels is not None:
            assert torch.equal(x.labels, y.labels)


# ------------------------------------------------------------------------ the plans


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_plan_every_row_once_per_epoch_no_tiny_rank(drop_last: bool) -> None:
    """Over a grid of sizes: each epoch covers every row once over the ranks (or, with
    drop_last, only full batches, no row twice); local sizes differ by at most one; no
    rank gets fewer than min(batch_size, 2) rows; resuming at any position continues
    the same sequence; the epochs are reshuffled."""
    cases = 0
    for n, b, world in itertools.product(range(2, 60, 3), (1, 2, 5, 8), (1, 2, 3)):
        try:
            plan = EpochPlan(n, b, world, seed=3, drop_last=drop_last)
        except ConfigError:
            assert n < (b * world if drop_last else MIN_ROWS * world)
            continue
        cases += 1
        steps = len(plan.offsets)
        its = [iter(EpochBatchSampler(plan, r, (0, 0))) for r in range(world)]
        orders = []
        for epoch in range(2):
            seen: list[int] = []
            for _ in range(steps):
                keys = [next(it) for it in its]
                assert {k.epoch for k in keys} == {epoch}
                sizes = [len(k.rows) for k in keys]
                assert max(sizes) - min(sizes) <= 1 and min(sizes) >= min(b, MIN_ROWS), sizes
                if drop_last:
                    assert sizes == [b] * world
                seen += [r for k in keys for r in k.rows]
            assert len(seen) == len(set(seen))
            if not drop_last:
                assert sorted(seen) == list(range(n))
            orders.append(seen)
        if n >= 8:
            assert orders[0] != orders[1], "epochs are not reshuffled"
        for k in range(0, 2 * steps):
            resumed = next(iter(EpochBatchSampler(plan, world - 1, plan.advance(k))))
            uninterrupted = next(
                itertools.islice(iter(EpochBatchSampler(plan, world - 1, (0, 0))), k, None)
            )
            assert resumed == uninterrupted
            assert plan.batches_left(*plan.advance(k), 2) == 2 * steps - k
    assert cases > 100


def test_epoch_plan_order_is_a_function_of_seed_and_epoch() -> None:
    plan = EpochPlan(50, 4, 2, seed=1)
    assert np.array_equal(plan.order(3), EpochPlan(50, 4, 2, seed=1).order(3))
    assert not np.array_equal(plan.order(3), plan.order(4))
    assert not np.array_equal(plan.order(3), EpochPlan(50, 4, 2, seed=2).order(3))


def test_shard_plan_deals_every_shard_once_and_equal_steps() -> None:
    counts = (34, 34, 32, 5, 17)
    for world, b in itertools.product((1, 2, 3), (4, 8)):
        plan = ShardPlan(counts, b, world, seed=0)
        for epoch in range(3):
            dealt = sorted(s for r in range(world) for s in plan.shards(epoch, r))
            assert dealt == list(range(len(counts)))
            steps = plan.steps(epoch)
            for r in range(world):
                sizes = plan.sizes(epoch, r)
                assert len(sizes) == steps and max(sizes) <= b
                assert sum(sizes) == plan.rows(epoch)[r] and max(sizes) - min(sizes) <= 1
        assert plan.shards(0, 0) != plan.shards(1, 0) or world == len(counts)
    with pytest.raises(ConfigError, match=r"data.path: 2 shard\(s\) for 3 ranks"):
        ShardPlan((10, 10), 4, 3, seed=0)


# ------------------------------------------------------------------------ the tables


def test_table_formats_read_the_same_rows(pairs: dict[str, Path], tmp_path: Path) -> None:
    """csv, tsv, jsonl, parquet, a glob of two files and a save_to_disk folder: same rows."""
    import datasets
    import pyarrow.parquet as pq

    df = pq.read_table(pairs["table"]).to_pandas()
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    df.iloc[:40].to_parquet(tmp_path / "part-0.parquet")
    df.iloc[40:].to_parquet(tmp_path / "part-1.parquet")
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "saved"))
    ref = TableSource(table_cfg(pairs).data)
    rows = [3, 0, 99, 41]
    want = ref.fetch(rows, [], torch.Generator())
    for path in ("t.csv", "t.tsv", "t.jsonl", "part-*.parquet", "saved"):
        cfg = table_cfg(pairs, f"data.path={tmp_path / path}")
        src = TableSource(cfg.data)
        assert src.num_rows == 100 and src.input_kinds == ("image", "text"), path
        with torch.random.fork_rng():
            torch.manual_seed(0)
            got = src.fetch(rows, [], torch.Generator())
            torch.manual_seed(0)
            again = ref.fetch(rows, [], torch.Generator())
        assert torch.equal(got.x1, again.x1) and torch.equal(got.x0, again.x0), path
        assert torch.equal(got.labels, want.labels) and got.ids == rows, path
    assert "part-1.parquet' row 1" in TableSource(
        table_cfg(pairs, f"data.path={tmp_path / 'part-*.parquet'}").data
    ).where(41)


def test_image_columns_of_bytes_and_paths(pairs: dict[str, Path], tmp_path: Path) -> None:
    """A datasets Image() column (save_to_disk stores the bytes), a binary column, and an
    (bytes, path) struct column holding paths only: the same pixels as the PNG files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pq.read_table(pairs["table"]).to_pandas().iloc[:6]
    files = [str(pairs["images"] / n) for n in df["image"]]
    blobs = [Path(f).read_bytes() for f in files]
    captions = list(df["caption"])
    for name, value in (("image", datasets.Image()), ("binary", datasets.Value("binary"))):
        features = datasets.Features({"image": value, "caption": datasets.Value("string")})
        column = [{"bytes": b, "path": None} for b in blobs] if name == "image" else blobs
        ds = datasets.Dataset.from_dict({"image": column, "caption": captions}, features=features)
        ds.save_to_disk(str(tmp_path / name))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name, paths in (("paths", files), ("missing", [str(tmp_path / "gone.png"), *files[1:]])):
        column = pa.array([{"bytes": None, "path": f} for f in paths], type=struct)
        pq.write_table(
            pa.table({"image": column, "caption": captions}), tmp_path / f"{name}.parquet"
        )
    ref = TableSource(table_cfg(pairs, "data.label_column=null").data)
    for path in ("image", "binary", "paths.parquet"):
        cfg = table_cfg(
            pairs, f"data.path={tmp_path / path}", "data.image_root=null", "data.label_column=null"
        )
        src = TableSource(cfg.data)
        assert src.input_kinds == ("image", "text"), path
        with torch.random.fork_rng():
            torch.manual_seed(1)
            got = src.fetch(range(6), [], torch.Generator())
            torch.manual_seed(1)
            want = ref.fetch(range(6), [], torch.Generator())
        assert torch.equal(got.x0, want.x0) and torch.equal(got.x1, want.x1), path
    cfg = table_cfg(
        pairs,
        f"data.path={tmp_path / 'missing.parquet'}",
        "data.image_root=null",
        "data.label_column=null",
    )
    with pytest.raises(
        ConfigError, match=r"1 of 6 images of column 'image' are missing; the first, .* row 0"
    ):
        TableSource(cfg.data)


def test_table_column_kinds(tmp_path: Path) -> None:
    """Numeric lists are vectors, strings text, bytes images; text tokenises the same in a
    process with another hash seed (the n-gram hash is not Python's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vec = np.arange(12, dtype=np.float32).reshape(4, 3)
    pq.write_table(
        pa.table({"a": vec.tolist(), "t": ["x y", "zz", "", "Straße"], "l": [1, 2, 3, 4]}),
        tmp_path / "v.parquet",
    )
    cfg = load_config(
        None,
        ["data.name=table", f"data.path={tmp_path / 'v.parquet'}", "data.columns=[a,t]"],
    )
    src = TableSource(cfg.data)
    assert src.input_kinds == ("vector", "text") and src.input_shapes == ((3,), (128,))
    batch = src.fetch([2, 0], [1], torch.Generator())
    assert torch.equal(batch.x0, torch.from_numpy(vec[[2, 0]]))
    assert batch.x1.shape == (3, 128) and batch.x1.dtype == torch.int64
    assert batch.x1[0].eq(0).all()  # the empty text: padding only
    assert batch.labels is None and not src.may_fail
    tok = HashedNgramTokenizer()
    code = (
        "from dist_infonce.trainer.transforms import HashedNgramTokenizer as T; "
        "print(T()('Straße 7').tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(other.stdout) == tok("Straße 7").tolist()
    assert tok("ab").tolist()[:4] == [*tok.ids("ab").tolist(), 0]  # a, b, ab, then padding


def _bad(tmp_path: Path, table: dict[str, list], *overrides: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    cfg = load_config(
        None,
        [
            "data.name=table",
            f"data.path={tmp_path / 'bad.parquet'}",
            "data.columns=[a,b]",
            *overrides,
        ],
    )
    with pytest.raises(ConfigError) as e:
        TableSource(cfg.data)
    return str(e.value)


def test_table_bad_input_is_named(tmp_path: Path, pairs: dict[str, Path]) -> None:
    """Each bad input found before training names the file, the column and the row."""
    f = str(tmp_path / "bad.parquet")
    msg = _bad(tmp_path, {"a": [[1.0, 2.0], [3.0]], "b": ["x", "y"]})
    assert (
        msg == f"data.columns: column 'a' is ragged: '{f}' row 0 has 2 numbers, '{f}' row 1 has 1"
    )
    msg = _bad(tmp_path, {"a": [[1.0], [float("nan")]], "b": ["x", "y"]})
    assert "column 'a' has a missing or non-finite number at" in msg and "row 1" in msg
    msg = _bad(tmp_path, {"a": [[1.0], [2.0]], "b": ["x", None]})
    assert msg == f"data.columns: column 'b' is empty at '{f}' row 1"
    msg = _bad(tmp_path, {"a": [[1.0], [2.0]], "c": ["x", "y"]})
    assert msg == f"data.columns: no column 'b' in '{f}' (it has: a, c)"
    msg = _bad(tmp_path, {"a": [[1.0], [2.0]], "b": ["x", "y"]}, "data.label_column=l")
    assert msg == f"data.label_column: no column 'l' in '{f}' (it has: a, b)"
    msg = _bad(
        tmp_path, {"a": [[1.0], [2.0]], "b": ["x", "y"], "l": ["x", "y"]}, "data.label_column=l"
    )
    assert "data.label_column: column 'l' is string; labels are integers" in msg
    msg = _bad(tmp_path, {"a": [[1.0], [2.0]], "b": [1, 2]})
    assert "data.columns: column 'b' is int64; a view is a list of numbers" in msg
    msg = _bad(tmp_path, {"a": [[1.0], [2.0]], "b": ["p/x.png", "y.jpg"]})
    assert "column 'b' holds image file names (e.g. 'p/x.png'); set data.image_root" in msg
    msg = _bad(
        tmp_path, {"a": [[1.0], [2.0]], "b": ["x.png", "a cat"]}, f"data.image_root={tmp_path}"
    )
    assert msg.endswith(f"mixes image file names and other text: '{f}' row 1 is 'a cat'")
    msg = _bad(
        tmp_path,
        {"a": [[1.0], [2.0]], "b": ["00000.png", "gone.png"]},
        f"data.image_root={pairs['images']}",
    )
    assert msg == (
        f"data.image_root: 1 of 2 images of column 'b' are missing; the first, '{f}' row 1: "
        f"'{pairs['images'] / 'gone.png'}'"
    )
    for path, want in (
        (tmp_path / "nope.parquet", "data.path: no such file or folder"),
        (tmp_path / "*.csv", "data.path: no file matches"),
        (tmp_path / "bad.parquet.txt", "data.path: no such file"),
    ):
        cfg = load_config(None, ["data.name=table", f"data.path={path}", "data.columns=[a,b]"])
        with pytest.raises(ConfigError, match=want):
            TableSource(cfg.data)
    (tmp_path / "t.xlsx").write_text("x")
    cfg = load_config(
        None, ["data.name=table", f"data.path={tmp_path / 't.xlsx'}", "data.columns=[a,b]"]
    )
    with pytest.raises(
        ConfigError, match=r"is not a table file we read \(.csv, .tsv, .jsonl, .parquet"
    ):
        TableSource(cfg.data)


def test_config_rules_for_the_file_keys() -> None:
    with pytest.raises(ConfigError, match=r"data.path: data.name=table reads files: set data.path"):
        load_config(None, ["data.name=table", "data.columns=[a,b]"])
    with pytest.raises(ConfigError, match=r"data.columns: expected two table column names"):
        load_config(None, ["data.name=table", "data.path=x.csv", "data.columns=[a]"])
    with pytest.raises(
        ConfigError, match=r"data.path: is read by data.name=table\|webdataset only"
    ):
        load_config(None, ["data.path=x.csv"])
    with pytest.raises(ConfigError, match=r"train.epochs: data.name=synthetic_pairs draws fresh"):
        load_config(None, ["data.name=synthetic_pairs", "train.epochs=2"])
    with pytest.raises(ConfigError, match=r"loader.num_workers: must be >= 0"):
        load_config(None, ["loader.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"data.on_bad_sample: 'ignore' is not one of stop, skip"):
        load_config(None, ["data.on_bad_sample=ignore"])
    cfg = load_config(None, ["data.name=webdataset", "data.path=s/{0..3}.tar"])
    assert cfg.data.columns == [] and cfg.loader.num_workers == 0 and not cfg.loader.drop_last


# ------------------------------------------------------------------- the streams


@pytest.mark.parametrize("source", ["digits", "table", "webdataset"])
def test_two_ranks_see_every_row_once_per_epoch_with_workers(
    source: str, pairs: dict[str, Path]
) -> None:
    """Ranks 0 and 1, two DataLoader workers each: every row once per epoch over the ranks,
    another order next epoch, the same number of steps on both ranks."""
    if source == "digits":
        cfg = load_config(None, ["train.batch_size=200", "loader.num_workers=2"])
        n = 1347
    elif source == "table":
        cfg, n = table_cfg(pairs, "loader.num_workers=2"), 100
    else:
        cfg, n = shard_cfg(pairs, "loader.num_workers=2"), 100
    pair = streams(cfg)
    if source == "webdataset":
        steps = pair[0].plan.steps(0)
        assert pair[0].plan.steps(1) == steps
    else:
        steps = len(pair[0].plan.offsets)
    by_epoch: dict[int, list] = {0: [], 1: []}
    try:
        for _ in range(2 * steps):
            for s in pair:
                b = s.next()
                s.commit()
                by_epoch[b.epoch] += b.ids
                assert len(b.x0) == len(b.x1) == len(b.ids) >= 1
    finally:
        for s in pair:
            s.close()
    for epoch, ids in by_epoch.items():
        assert len(ids) == n and len(set(ids)) == n, epoch
    assert by_epoch[0] != by_epoch[1]
    assert set(by_epoch[0]) == set(by_epoch[1])


@pytest.mark.parametrize("source", ["digits", "table", "webdataset"])
def test_workers_do_not_change_the_batches_and_resume_is_exact(
    source: str, pairs: dict[str, Path]
) -> None:
    """0 vs 2 workers: the same batches (rows, augmentation, order), and the training
    process's RNG state untouched by the preprocessing. A stream resumed from a mid-epoch
    state_dict continues with exactly the batches of the uninterrupted one."""
    make = {
        "digits": lambda *o: load_config(None, ["train.batch_size=300", *o]),
        "table": lambda *o: table_cfg(pairs, *o),
        "webdataset": lambda *o: shard_cfg(pairs, *o),
    }[source]
    total, cut = 12, 5  # the cut is mid-epoch, and the batches cross an epoch boundary
    rank1 = lambda *o: streams(make(*o))[1]
    before = torch.get_rng_state()
    s0 = rank1("loader.num_workers=0")
    zero = draw(s0, total)
    assert torch.equal(torch.get_rng_state(), before), "the preprocessing moved the global RNG"
    s2 = rank1("loader.num_workers=2")
    two = draw(s2, cut)
    state = s2.state_dict()
    s2.close()
    assert state["epoch"] == zero[cut - 1].position["epoch"]
    resumed = rank1("loader.num_workers=2")
    resumed.resume(json.loads(json.dumps(state)), step=cut)  # as plain values (a checkpoint)
    two += draw(resumed, total - cut)
    resumed.close()
    same_batches(zero, two)
    assert len({b.epoch for b in zero}) >= 2
    if source != "digits":
        assert zero[0].labels is None  # labels only with loss.supervised
    s0.close()


def test_resume_from_the_step_alone_matches(pairs: dict[str, Path]) -> None:
    """Without a stored position (older checkpoints) the step gives the same place."""
    cfg = table_cfg(pairs, "train.grad_accum_steps=2")
    a = streams(cfg)[0]
    drawn = [a.next() for _ in range(8)]  # 4 optimizer steps of 2 batches
    b = streams(cfg)[0]
    b.resume(None, step=3)
    same_batches(drawn[6:], [b.next(), b.next()])


def test_supervised_labels_and_negatives(pairs: dict[str, Path]) -> None:
    cfg = table_cfg(pairs, "loss.supervised=true")
    batch = streams(cfg)[0].next()
    assert batch.labels is not None and batch.labels.dtype == torch.int64
    assert len(batch.labels) == len(batch.x0)
    cfg = table_cfg(pairs, "loss.kind=info_nce", "loss.num_negatives=5")
    batch = streams(cfg)[1].next()
    assert len(batch.x1) == len(batch.x0) + 5
    with pytest.raises(
        ConfigError, match=r"loss.supervised: data.name='table' has no class labels"
    ):
        cfg = table_cfg(pairs, "loss.supervised=true")
        cfg.data.label_column = None
        streams(cfg)
    with pytest.raises(ConfigError, match=r"loss.num_negatives: explicit negatives are drawn"):
        streams(shard_cfg(pairs, "loss.kind=info_nce", "loss.num_negatives=5"))


# -------------------------------------------------------------------- bad samples


def _corrupt(pairs: dict[str, Path], tmp_path: Path, row: int) -> Path:
    """A copy of the image folder with image ``row`` truncated (there, but unreadable)."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(pairs["images"], images)
    png = images / f"{row:05d}.png"
    png.write_bytes(png.read_bytes()[:40])
    return images


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_unreadable_image_mid_epoch(policy: str, pairs: dict[str, Path], tmp_path: Path) -> None:
    """stop: the batch holding the row carries the error naming it; skip: it is left out
    and named, and the stream counts it."""
    images = _corrupt(pairs, tmp_path, 7)
    cfg = table_cfg(pairs, f"data.image_root={images}", f"data.on_bad_sample={policy}")
    pair = streams(cfg)
    seen = []
    for s in pair:
        for _ in range(len(s.plan.offsets)):
            seen.append(s.next())
    hit = [b for b in seen if b.error or b.skipped]
    assert len(hit) == 1
    where = f"'{pairs['table']}' row 7, column 'image': cannot read image '{images / '00007.png'}'"
    if policy == "stop":
        assert hit[0].error.startswith(where) and len(hit[0].x0) == 0
    else:
        assert hit[0].skipped[0].startswith(where) and 7 not in hit[0].ids
        assert sum(len(b.ids) for b in seen) == 99
        assert sum(s.skipped for s in pair) == 1


# ---------------------------------------------------------------------- webdataset


def test_webdataset_bad_input(pairs: dict[str, Path], tmp_path: Path) -> None:
    import tarfile

    def cfg(path: Any, *extra: str) -> Any:
        return load_config(None, ["data.name=webdataset", f"data.path={path}", *extra]).data

    with pytest.raises(
        ConfigError, match=r"data.path: no shard matches .* \(an empty shard list\)"
    ):
        WebDatasetSource(cfg(tmp_path / "none-*.tar"))
    pattern = str(pairs["shards"]).replace("0002}", "0005}")
    with pytest.raises(
        ConfigError, match=r"3 of the 6 shards of .* are missing, the first: .*pairs-0003.tar"
    ):
        WebDatasetSource(cfg(pattern))
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ConfigError, match=r"shard '.*junk.tar' is not a readable tar file"):
        WebDatasetSource(cfg(tmp_path / "junk.tar"))
    # A sample without its caption: named before training, or left out with skip.
    broken = tmp_path / "broken.tar"
    with (
        tarfile.open(pairs["shards"].parent / "pairs-0000.tar") as src,
        tarfile.open(broken, "w") as dst,
    ):
        for m in src:
            if m.name != "00003.txt":
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(
        ConfigError,
        match=rf"1 sample\(s\) lack a key; the first, '00003' in '{broken}', has no txt",
    ):
        WebDatasetSource(cfg(broken))
    src = WebDatasetSource(cfg(broken, "data.on_bad_sample=skip"))
    assert src.counts == (33,)
    ids = [s["__key__"] for s in src.samples([0], seed=0, shuffle=False)]
    assert len(ids) == 33 and "00003" not in ids
    with pytest.raises(ConfigError, match=r"webdataset key 'json' of 'json' is not an image"):
        WebDatasetSource(cfg(pairs["shards"], "data.columns=[png,json]"))


def test_webdataset_corrupt_image_mid_epoch(pairs: dict[str, Path], tmp_path: Path) -> None:
    import tarfile

    shard = tmp_path / "s.tar"
    with (
        tarfile.open(pairs["shards"].parent / "pairs-0000.tar") as src,
        tarfile.open(shard, "w") as dst,
    ):
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "00005.png":
                data = data[:30]
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    for policy in ("stop", "skip"):
        cfg = shard_cfg(pairs, f"data.path={shard}", f"data.on_bad_sample={policy}")
        (s,) = streams(cfg, world=1)
        batches = [s.next() for _ in range(s.plan.steps(0))]
        hit = [b for b in batches if b.error or b.skipped]
        assert len(hit) == 1, policy
        text = hit[0].error or hit[0].skipped[0]
        assert text.startswith("s.tar:00005.png: cannot read image bytes"), text
        if policy == "skip":
            assert sum(len(b.ids) for b in batches) == 33 and s.skipped == 1


def test_webdataset_shard_list_order_and_uneven_ranks(pairs: dict[str, Path]) -> None:
    """3 shards on 2 ranks: one rank reads 2 shards, the other 1, in the same number of
    steps (smaller batches on the rank with fewer samples, none empty)."""
    (s0, s1) = streams(shard_cfg(pairs))
    plan = s0.plan
    steps = plan.steps(0)
    sizes = [plan.sizes(0, r) for r in range(2)]
    assert sorted(sum(x) for x in sizes) == [32, 68] or sorted(sum(x) for x in sizes) == [34, 66]
    got = [[len(s.next().ids) for _ in range(steps)] for s in (s0, s1)]
    assert got == sizes and min(min(x) for x in got) >= 1


def test_pair_recall_counts_repeated_values_as_hits(pairs: dict[str, Path]) -> None:
    """A retrieved row is a hit when it shares the query row's view-0 or view-1 value; the
    table's and the shards' evaluations run on their first rows with the eval transforms."""
    t = torch.tensor
    x0 = [t([1.0, 0.0]), t([0.0, 1.0]), t([1.0, 0.0])]
    x1 = [t([1.0, 0.0]), t([0.0, 1.0]), t([0.6, 0.8])]
    res = pair_recall(lambda x, v: x, x0, x1, ["a", "b", "c"], ["seven", "one", "seven"])
    # a2b: row 2 retrieves caption 0 ("seven" too): a hit. b2a: caption 2 retrieves image 1.
    assert res["eval/train_recall@1_a2b"] == 1.0
    assert res["eval/train_recall@1_b2a"] == pytest.approx(2 / 3)
    assert res["eval/train_recall@1"] == pytest.approx(5 / 6)
    g = torch.Generator().manual_seed(0)
    table = {}
    for cfg in (table_cfg(pairs), shard_cfg(pairs)):
        src = build_data(cfg.data, model=cfg.model)
        shapes = []
        table[cfg.data.name] = src.evaluate(
            lambda x, v, s=shapes: s.append(tuple(x.shape)) or torch.randn(len(x), 4, generator=g)
        )
        assert shapes == [(100, 3, 32, 32), (100, 128)], cfg.data.name
    for res in table.values():
        assert 0.0 <= res["eval/train_recall@1"] <= 1.0


@pytest.mark.parametrize("source", ["table", "webdataset"])
def test_trainer_with_gradient_caching_and_labels(
    source: str, pairs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer in this process on a file source with train.micro_batch_size (image and
    token-id batches through cached_backward) and loss.supervised (the label column):
    finite losses, the epochs' step count, the epoch logged."""
    from dist_infonce.trainer import Trainer

    monkeypatch.delenv("DIST_INFONCE_TEST_FAULT", raising=False)
    make = table_cfg if source == "table" else shard_cfg
    cfg = make(
        pairs,
        "train.micro_batch_size=3",
        "loss.supervised=true",
        "loss.kind=clip",
        "train.epochs=1",
        "model.hidden_dim=16",
        "model.feature_dim=16",
        "model.embedding_dim=8",
        "model.width=4",
        "log.every=1",
        "log.progress=false",
        "eval.enabled=false",
        "wandb.mode=disabled",
        f"output_dir={tmp_path / 'run'}",
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.fit()
        steps = trainer.cfg.train.steps
    finally:
        trainer.close()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == 13  # one process: 100 rows in batches of 8 (12 full, a tail of 4)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(np.isfinite(r["loss"]) and r["epoch"] == 0 for r in rows)


def test_micro_for_never_leaves_a_one_row_micro_batch() -> None:
    from dist_infonce.trainer.learner import micro_for

    assert micro_for(12, 4) == 4 and micro_for(10, 4) == 4 and micro_for(3, 8) == 8
    assert micro_for(4, 3) == 2 and micro_for(7, 3) == 4  # 7 = 3+3+1 = 2+2+2+1 -> 4+3
    for rows in range(2, 200):
        for micro in range(1, 40):
            m = micro_for(rows, micro)
            assert rows % m != 1 or m >= rows or (micro == 1 and m == 1), (rows, micro, m)
            if rows % micro != 1:
                assert m == micro


@pytest.mark.parametrize("source,module", [("table", "pyarrow"), ("webdataset", "webdataset")])
def test_missing_reader_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, module: str
) -> None:
    # A user without the [data] extra gets the key and the install line, not an ImportError.
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    cfg = load_config(
        None, [f"data.name={source}", f"data.path={tmp_path / 'x.parquet'}", "data.columns=[a,b]"]
    )
    with pytest.raises(ConfigError, match=rf"data.name={source}: needs the {module} package: "
                       r"pip install 'dist_infonce\[data\]'"):  # fmt: skip
        build_data(cfg.data, model=cfg.model)
