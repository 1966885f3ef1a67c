"""The trainer: the application on top of the library (``python -m dist_infonce.train``).

The library (:mod:`dist_infonce`: losses, gather, kernels, cache) never imports this
package. Its layout:

- :mod:`.config`: the schema (typed dataclasses, one docstring per key), YAML files
  and ``key=value`` overrides through OmegaConf; :func:`load_config`.
- :mod:`.data`: the data sets (digits, synthetic pairs, a user ``module:callable``)
  and :func:`sample_batch`, the batch of ``(seed, step, rank, micro)``;
  :mod:`.sources`: the file sources (tables, webdataset shards); :mod:`.transforms`:
  the per-view preprocessing (where a tower's tokenizer plugs in); :mod:`.loader`:
  epochs, ranks and DataLoader workers, the resume position.
- :mod:`.models`: the encoders and heads (:mod:`.towers`: the built-in encoder of a
  vector, text or image view); :mod:`.learner`: model + loss as one module.
- :mod:`.optim`: optimizers (LARS) and the schedule.
- :mod:`.trainer`: :class:`Trainer` (``setup``, ``fit``, ``train_step``, ``evaluate``,
  ``save``/``resume``, ``close``); :mod:`.evaluation`: frozen features for the metrics.
- :mod:`.checkpoint` (files), :mod:`.resilience` (signals, non-finite steps, exit
  codes), :mod:`.metrics` (metrics.jsonl, W&B), :mod:`.launch` (Slurm variables, the
  rendezvous port, the Accelerator, teardown), :mod:`.sweep` (grids of runs).

One trainer step outside the :class:`Trainer` (what the gradient-caching benchmark
times)::

    cfg = load_config(None, ["train.batch_size=512"])
    data = build_data(cfg.data)
    learner = build_learner(cfg, data)        # seed torch first: it initialises weights
    x0, x1, labels = sample_batch(data, cfg, step=0, rank=rank, micro=0)
    learner(x0, x1, labels).backward()        # or cached_backward(ddp(learner.model), learner.loss_fn, (x0, x1), micro)
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, not here: `python -m dist_infonce.trainer.launch` (the sbatch
# scripts) and `-m dist_infonce.trainer.config` must not find their module imported
# already by this package (runpy warns, and the launch helper stays light).
_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "ContrastiveData": "data",
    "build_data": "data",
    "sample_batch": "data",
    "Learner": "learner",
    "build_learner": "learner",
    "build_loss": "learner",
    "PairModel": "models",
    "build_model": "models",
    "StepResult": "trainer",
    "Trainer": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
