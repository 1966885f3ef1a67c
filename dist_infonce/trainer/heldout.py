"""What the trainer evaluates, at the end and every ``eval.every`` steps (rank 0).

:func:`build_evaluation` returns ``evaluate(embed) -> metrics``:

- the data set's own evaluation (digits: linear probe and kNN on its held-out split;
  tables and shards: recall@1/5/10 between the views of the first training rows,
  ``eval/train_recall@k``);
- with ``eval.path`` (held-out files of the same format as ``data.path``), on those rows:
  retrieval recall@1/5/10 in both directions (``eval/recall@k``, ``..._a2b``,
  ``..._b2a``); with labels (``data.label_column``) a linear probe and a kNN classifier
  fit on the first training rows' view-0 features (``eval/linear_acc``,
  ``eval/knn_acc``, as the digits' SimCLR evaluation); and with
  ``eval.zeroshot_classes``, zero-shot classification of the held-out images by the
  text tower's embeddings of ``eval.prompt`` filled with each class name
  (``eval/zeroshot_acc``, ``eval/zeroshot_top5`` when there are more than 5 classes).

The held-out source is built (read and checked) on every rank at setup, so a problem
with it stops every rank before training, naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dist_infonce.trainer.config import Config, ConfigError
from dist_infonce.trainer.data import Embed, knn_accuracy, linear_probe_accuracy
from dist_infonce.trainer.retrieval import retrieval_metrics, value_ids, zero_shot_accuracy
from dist_infonce.trainer.views import stack

__all__ = ["HELDOUT_ROWS", "PROBE_ROWS", "build_evaluation"]

#: Held-out rows evaluated (the first ones of ``eval.path``).
HELDOUT_ROWS = 10_000
#: Training rows the probes are fit on (the first ones of ``data.path``).
PROBE_ROWS = 5_000

Evaluate = Callable[[Embed], dict[str, float]]


def _heldout_source(cfg: Config) -> Any:
    from dist_infonce.trainer.sources import TableSource, WebDatasetSource

    data = dataclasses.replace(cfg.data, path=cfg.eval.path)
    cls = TableSource if cfg.data.name == "table" else WebDatasetSource
    try:
        return cls(data, cfg.model)
    except ConfigError as e:
        raise ConfigError(f"eval.path: {str(e).partition(': ')[2] or e}") from None


def build_evaluation(cfg: Config, data: Any) -> Evaluate | None:
    """The evaluation of the run (see the module doc), or None when there is none.

    Raises:
        ConfigError: ``eval.path`` cannot be read, holds other views than the training
            data, or its labels do not index ``eval.zeroshot_classes``; zero-shot
            classification without an image and a text view.
    """
    own: Evaluate | None = getattr(data, "evaluate", None)
    if cfg.eval.path is None:
        return own
    heldout = _heldout_source(cfg)
    if tuple(heldout.input_kinds) != tuple(data.input_kinds):
        raise ConfigError(
            f"eval.path: its views hold {list(heldout.input_kinds)}, the training data's "
            f"{list(data.input_kinds)}"
        )
    classes = list(cfg.eval.zeroshot_classes)
    image_view = text_view = None
    if classes:
        kinds = list(data.input_kinds)
        if sorted(kinds) != ["image", "text"]:
            raise ConfigError(
                f"eval.zeroshot_classes: zero-shot classification needs an image view and a "
                f"text view; the views hold {kinds}"
            )
        image_view, text_view = kinds.index("image"), kinds.index("text")
    samples = heldout.eval_samples(HELDOUT_ROWS)
    labels = samples.labels
    if classes and labels and not all(lb is not None and 0 <= lb < len(classes) for lb in labels):
        bad = next(lb for lb in labels if lb is None or not 0 <= lb < len(classes))
        raise ConfigError(
            f"eval.zeroshot_classes: label {bad} of the held-out data names no class of the "
            f"{len(classes)} given (label i is eval.zeroshot_classes[i])"
        )
    prompts = [cfg.eval.prompt.format(c) for c in classes]
    text_transform = heldout.eval_transforms[text_view] if text_view is not None else None
    has_labels = bool(labels) and labels[0] is not None

    def evaluate(embed: Embed) -> dict[str, float]:
        out = dict(own(embed)) if own is not None else {}
        if not samples.x0:
            return out
        e0, e1 = embed(stack(samples.x0), 0), embed(stack(samples.x1), 1)
        ids0, ids1 = value_ids(samples.keys0), value_ids(samples.keys1)
        out.update(retrieval_metrics(e0, e1, ids0, ids1, prefix="eval/"))
        if has_labels:
            y = np.asarray(labels, dtype=np.int64)
            train = data.eval_samples(PROBE_ROWS)
            if train.x0 and train.labels[0] is not None:
                f_train = embed(stack(train.x0), 0).float().numpy()
                y_train = np.asarray(train.labels, dtype=np.int64)
                f_test = e0.float().numpy()
                if len(np.unique(y_train)) > 1:
                    out["eval/linear_acc"] = linear_probe_accuracy(f_train, y_train, f_test, y)
                k = min(cfg.eval.knn_k, len(y_train))
                out["eval/knn_acc"] = knn_accuracy(f_train, y_train, f_test, y, k=k)
        if classes:
            assert image_view is not None and text_view is not None
            texts = embed(stack([text_transform(p) for p in prompts]), text_view)
            images = e0 if image_view == 0 else e1
            acc = zero_shot_accuracy(images, texts, torch.as_tensor(labels, dtype=torch.int64))
            out["eval/zeroshot_acc"] = acc[1]
            if 5 in acc:
                out["eval/zeroshot_top5"] = acc[5]
        return out

    return evaluate
