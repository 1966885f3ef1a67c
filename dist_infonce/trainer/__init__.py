"""The trainer: the application on top of the library (``python -m dist_infonce.train``).

The library (:mod:`dist_infonce`: losses, gather, kernels, cache) never imports this
package. Its layout:

- :mod:`.config`: the schema (typed dataclasses, one docstring per key), YAML files
  and ``key=value`` overrides through OmegaConf; :func:`load_config`.
- :mod:`.data`: the data sets (digits, synthetic pairs, a user ``module:callable``)
  and :func:`sample_batch`, the batch of ``(seed, step, rank, micro)``.
- :mod:`.models`: the encoders and heads; :mod:`.learner`: model + loss as one module.
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

from dist_infonce.trainer.config import Config, ConfigError, load_config
from dist_infonce.trainer.data import ContrastiveData, build_data, sample_batch
from dist_infonce.trainer.learner import Learner, build_learner, build_loss
from dist_infonce.trainer.models import PairModel, build_model
from dist_infonce.trainer.trainer import StepResult, Trainer

__all__ = [
    "Config",
    "ConfigError",
    "ContrastiveData",
    "Learner",
    "PairModel",
    "StepResult",
    "Trainer",
    "build_data",
    "build_learner",
    "build_loss",
    "build_model",
    "load_config",
    "sample_batch",
]
