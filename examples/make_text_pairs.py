"""Write a small text-pair table for sentence-embedding training, with no download: each
row is a sentence and a paraphrase of it, built from templates over a few attributes
(colour, animal, action, place), so that a pair matches on all four at once.

    python examples/make_text_pairs.py --out data/text_pairs

writes ``OUT/train.csv`` and ``OUT/heldout.csv`` (columns ``sentence``, ``paraphrase``;
the held-out rows are attribute combinations the training rows never show) and
``OUT/corpus.txt`` (every text, one a line: a tokenizer's vocabulary,
``examples/make_tiny_text_model.py --corpus``). Train on it with
``model.name=hf:<dir> data.name=table data.columns=[sentence,paraphrase]``
(scripts/sentence_pairs.py runs the whole example).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["make_text_pairs"]

COLOURS = ("red", "blue", "green", "black", "white", "yellow")
ANIMALS = ("cat", "dog", "horse", "bird", "fox", "cow")
ACTIONS = (
    ("sleeps", "sleeping"),
    ("runs", "running"),
    ("eats", "eating"),
    ("sits", "sitting"),
    ("plays", "playing"),
)
PLACES = ("garden", "kitchen", "forest", "street", "field")


def _pair(c: str, a: str, act: tuple[str, str], p: str, rng: random.Random) -> tuple[str, str]:
    first = f"a {c} {a} {act[0]} in the {p}"
    second = rng.choice(
        [
            f"in the {p} there is a {c} {a} {act[1]}",
            f"the {a} in the {p} is {c} and {act[1]}",
            f"{act[1]} in the {p}: a {c} {a}",
        ]
    )
    return first, second


def make_text_pairs(out: str | Path, *, heldout: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Write the train / held-out tables and the corpus (see the module doc).

    Returns:
        ``{"train": csv, "heldout": csv, "corpus": txt}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, ANIMALS, ACTIONS, PLACES))
    rng.shuffle(combos)
    cut = int(len(combos) * (1 - heldout))
    paths = {
        "train": out / "train.csv",
        "heldout": out / "heldout.csv",
        "corpus": out / "corpus.txt",
    }
    texts = []
    for name, part in (("train", combos[:cut]), ("heldout", combos[cut:])):
        with paths[name].open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "paraphrase"])
            for combo in part:
                row = _pair(*combo, rng)
                w.writerow(row)
                texts.extend(row)
    paths["corpus"].write_text("\n".join(texts) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--heldout", type=float, default=0.2)
    args = parser.parse_args(argv)
    paths = make_text_pairs(args.out, heldout=args.heldout)
    print(f"wrote {paths['train']}, {paths['heldout']}, {paths['corpus']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
