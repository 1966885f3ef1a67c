"""Build a small image-text data set in the two real formats: PNG files with captions, as
webdataset tar shards and as a parquet table. No download: the images are
scikit-learn's bundled 8x8 digits, upscaled.

    python examples/make_digits_pairs.py --out data/digits_pairs

writes::

    OUT/images/00000.png ...          every digit as a --size x --size grey PNG
    OUT/pairs.parquet                 columns image (file name in OUT/images), caption,
                                      label (the digit), id
    OUT/shards/pairs-0000.tar ...     webdataset shards (OpenCLIP's layout): 00000.png,
                                      00000.txt (the caption), 00000.cls (the digit)

and prints the commands that train on them (docs/data.md). The captions read like
"a photo of the digit seven". From Python (other examples and
tests reuse it)::

    from examples.make_digits_pairs import make_digits_pairs
    paths = make_digits_pairs("data/digits_pairs", shards=8)
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["CAPTION", "WORDS", "caption", "main", "make_digits_pairs"]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The caption of every image: one per digit, so that image -> text retrieval is the
#: zero-shot classification of the digits (and text -> image retrieval is well posed).
CAPTION = "a photo of the digit {word}"


def caption(digit: int) -> str:
    """The caption of an image showing ``digit``."""
    return CAPTION.format(word=WORDS[digit])


def make_digits_pairs(
    out: str | Path,
    *,
    size: int = 32,
    shards: int = 8,
    limit: int | None = None,
    heldout: float = 0.0,
) -> dict[str, Path]:
    """Write the digits as PNGs + captions: a parquet table and webdataset shards.

    Args:
        out: the folder (created; existing files of the same names are replaced).
        size: the PNGs' side in pixels (the 8x8 digits are upscaled bilinearly).
        shards: number of tar shards (samples are dealt out in order, evenly).
        limit: only the first ``limit`` digits (small test sets); None = all 1797.
        heldout: the share of the digits held out for evaluation (``eval.path``), drawn
            stratified by digit with a fixed seed: they are left out of the training
            table and shards and written to ``OUT/heldout.parquet`` and
            ``OUT/heldout/pairs-0000.tar``. 0 = none.

    Returns:
        ``{"images": folder, "table": parquet file, "shards": brace pattern}``, plus
        ``"heldout_table"`` and ``"heldout_shards"`` with ``heldout``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    n = len(digits.target) if limit is None else min(limit, len(digits.target))
    if n < shards:
        raise ValueError(f"--shards {shards} needs at least as many images, got {n}")
    images_dir, shards_dir = out / "images", out / "shards"
    images_dir.mkdir(parents=True, exist_ok=True)
    shards_dir.mkdir(parents=True, exist_ok=True)
    for old in shards_dir.glob("pairs-*.tar"):
        old.unlink()
    rows: dict[str, list] = {"image": [], "caption": [], "label": [], "id": []}
    pngs = []
    for i in range(n):
        pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        name = f"{i:05d}.png"
        (images_dir / name).write_bytes(buf.getvalue())
        pngs.append(buf.getvalue())
        label = int(digits.target[i])
        rows["image"].append(name)
        rows["caption"].append(caption(label))
        rows["label"].append(label)
        rows["id"].append(i)
    keep, held = list(range(n)), []
    if heldout > 0:
        from sklearn.model_selection import train_test_split

        keep, held = train_test_split(
            list(range(n)), test_size=heldout, random_state=0, stratify=rows["label"]
        )
        keep, held = sorted(keep), sorted(held)

    def sample(i: int) -> dict:
        return {
            "__key__": f"{i:05d}",
            "png": pngs[i],
            "txt": rows["caption"][i],
            "cls": str(rows["label"][i]),
        }

    table = out / "pairs.parquet"
    pq.write_table(pa.table({k: [v[i] for i in keep] for k, v in rows.items()}), table)
    per_shard = math.ceil(len(keep) / shards)
    for s in range(shards):
        with wds.TarWriter(str(shards_dir / f"pairs-{s:04d}.tar")) as sink:
            for i in keep[s * per_shard : (s + 1) * per_shard]:
                sink.write(sample(i))
    used = min(shards, math.ceil(len(keep) / per_shard))
    pattern = shards_dir / f"pairs-{{0000..{used - 1:04d}}}.tar"
    paths = {"images": images_dir, "table": table, "shards": pattern}
    if held:
        (out / "heldout").mkdir(exist_ok=True)
        paths["heldout_table"] = out / "heldout.parquet"
        pq.write_table(
            pa.table({k: [v[i] for i in held] for k, v in rows.items()}), paths["heldout_table"]
        )
        paths["heldout_shards"] = out / "heldout" / "pairs-0000.tar"
        with wds.TarWriter(str(paths["heldout_shards"])) as sink:
            for i in held:
                sink.write(sample(i))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; prints the training commands for the data it wrote."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, default=32, help="PNG side in pixels (default 32)")
    parser.add_argument("--shards", type=int, default=8, help="webdataset shards (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N digits")
    parser.add_argument(
        "--heldout", type=float, default=0.0, help="share held out for eval.path (default 0)"
    )
    args = parser.parse_args(argv)
    paths = make_digits_pairs(
        args.out, size=args.size, shards=args.shards, limit=args.limit, heldout=args.heldout
    )
    clip = "model.name=two_tower loss.kind=clip loss.learn_temperature=true train.epochs=20"
    print(f"wrote {paths['table']}, {paths['images']}/, {paths['shards']}")
    print("train on the table:")
    print(
        "  torchrun --nproc_per_node=2 -m dist_infonce.train data.name=table "
        f"data.path={paths['table']} data.image_root={paths['images']} "
        f"'data.columns=[image,caption]' {clip}"
    )
    print("train on the shards:")
    print(
        "  torchrun --nproc_per_node=2 -m dist_infonce.train data.name=webdataset "
        f"'data.path={paths['shards']}' 'data.columns=[png,txt]' {clip}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
