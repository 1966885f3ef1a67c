"""The trainer's configuration: typed dataclasses (the schema), YAML files, ``key=value`` overrides.

Resolution order (dinov2 style): the defaults below (the *embedded default*: SimCLR
on scikit-learn's digits) -> the YAML file given with ``--config`` -> ``key=value``
overrides, applied in order. Every field carries a docstring;
``python -m dist_infonce.train --help`` lists them.

OmegaConf structured configs (built from the dataclasses below) parse the YAML and
the override values, merge them and check and convert every value against its
field's type (``int``, ``float``, ``bool``, ``Literal``, ``X | None``, ``list[str]``,
``dict[str, Any]``); :func:`load_config` returns the plain dataclasses. What this
module adds on top, because OmegaConf does not do it: the aliases, an unknown key
named with the nearest valid one (aliases included), messages that name the key
and the expected type, string fields kept verbatim from the command line
(``wandb.name=007`` stays ``"007"``; YAML would read 7), ``tags=a,b`` as a list,
and :func:`validate` (ranges and cross-field rules).

The seed fields of the tutorial's config are accepted as top-level aliases
(:data:`ALIASES`): ``batch_size`` -> ``train.batch_size``, ``learning_rate`` ->
``train.lr``, ``embedding_dim`` -> ``model.embedding_dim``, ``negative_samples``
-> ``loss.num_negatives``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import itertools
import math
import signal
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ALIASES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "LoaderConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "WandbConfig",
    "all_keys",
    "field_docs",
    "import_object",
    "load_config",
    "to_dict",
    "to_yaml",
    "validate",
]


class ConfigError(ValueError):
    """A user error in the configuration (unknown key, bad value, bad file)."""


@dataclass
class TrainConfig:
    """Optimisation."""

    steps: int = 400
    """Optimizer steps in total (a resumed run continues up to this number)."""
    batch_size: int = 256
    """Samples per rank per micro-step; the contrastive pool is batch_size x world_size."""
    lr: float = 2e-3
    """Peak learning rate (before the linear scaling rule, if ``scale_lr``)."""
    scale_lr: bool = False
    """Linear scaling rule: use ``lr x global_batch / 256`` as the peak learning rate."""
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    """adamw | sgd (momentum) | lars (SGD + layer-wise trust ratio, for large batches)."""
    weight_decay: float = 1e-4
    """Decoupled (adamw) or L2 (sgd, lars) weight decay; biases and norm weights are exempt."""
    momentum: float = 0.9
    """Momentum of sgd and lars (adamw uses betas (0.9, 0.999))."""
    warmup_steps: int = 20
    """Linear warm-up steps; a cosine decay to ``min_lr_ratio x lr`` follows."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule, as a fraction of the peak."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step (accelerate's accumulation). Negatives are not
    shared across micro-steps: the contrastive pool stays batch_size x world_size."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision through accelerate; on CPU use bf16 (fp16 needs CUDA)."""
    micro_batch_size: int | None = None
    """Rows per encoder pass (gradient caching, dist_infonce.cache): the loss still sees
    batch_size x world_size rows, the encoder holds activations of this many; null =
    the whole per-rank batch in one pass. BatchNorm then normalises per micro-batch."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient on any rank: stop = write the last good state as a
    checkpoint and exit 3 naming the step (the default: a NaN usually means divergence,
    and every later step would repeat it); skip = drop that optimizer step on every rank
    and log it (``nonfinite_skipped`` in metrics.jsonl), for rare bad batches."""
    epochs: int | None = None
    """Passes over the data (digits, table, webdataset: each epoch reshuffled from
    ``(seed, epoch)``, every row once over all ranks); null = ``train.steps`` rules and the
    data is cycled epoch after epoch. Set, it replaces ``train.steps``: the run takes the
    optimizer steps these epochs hold."""


@dataclass
class LossConfig:
    """The contrastive loss (dist_infonce.InfoNCE, dist_infonce.NTXent, dist_infonce.SigLIP)."""

    kind: Literal["nt_xent", "info_nce", "clip", "siglip"] = "nt_xent"
    """nt_xent (SimCLR, 2N views) | info_nce (view 0 queries view 1) | clip (symmetric InfoNCE) |
    siglip (SigLIP's sigmoid loss: learnable scale t = 10 and bias b = -10 at init, as SigLIP;
    temperature and learn_temperature do not apply, the logged temperature is 1/t)."""
    temperature: float = 0.2
    """Softmax temperature (the initial value when ``learn_temperature``)."""
    learn_temperature: bool = False
    """Learn the temperature as CLIP's log-parametrised logit scale (clamped at 1/100)."""
    chunk_size: int | None = None
    """Tile edge of the tiled kernels (chunked, triton); null lets the loss choose."""
    kernel: Literal["auto", "dense", "chunked", "triton"] = "auto"
    """auto (dense when small, chunked otherwise) | dense (the N x M logits at once) |
    chunked (pure torch tiles, memory linear in N + M) | triton (the fused kernel; CUDA)."""
    normalize: bool = True
    """L2-normalise the embeddings inside the loss (cosine similarity); false compares
    them as the model gives them (dot product)."""
    gather: bool = True
    """Pool the negatives of all ranks (the global batch); false uses local negatives only."""
    num_negatives: int = 0
    """Extra explicit negatives per rank for kind=info_nce, drawn from the data's view 1
    and shared by all queries (pooled over ranks with ``gather``); 0 = in-batch only."""
    queue_size: int = 0
    """MoCo's queue (kind=info_nce): > 0 keeps the last this many keys of every rank in a
    dist_infonce.NegativeQueue and uses them as the negatives (positive + queue), pushed
    once per optimizer step; 0 = off (in-batch negatives). See docs/moco.md."""
    supervised: bool = False
    """Supervised contrastive (SupCon): samples with the same class label are positives
    of each other (the loss's ``labels=``); needs a data set with labels (digits)."""


@dataclass
class DataConfig:
    """The training data (dist_infonce.trainer.data)."""

    name: str = "digits"
    """digits | synthetic_pairs | table (``data.path``: csv/tsv/jsonl/parquet or a datasets
    save_to_disk folder) | webdataset (``data.path``: tar shards) | a user data set
    ``module:callable`` (see data.py and docs/data.md)."""
    seed: int = 0
    """Fixes the data set itself (the digits split, the synthetic maps), not the batches."""
    eval_fraction: float = 0.25
    """digits: held-out share for the linear probe and kNN."""
    noise: float = 0.08
    """digits: noise std of the augmentation; synthetic_pairs: observation noise std."""
    latent_dim: int = 16
    """synthetic_pairs: dimension of the shared latent."""
    dim_a: int = 64
    """synthetic_pairs: dimension of modality A (view 0)."""
    dim_b: int = 48
    """synthetic_pairs: dimension of modality B (view 1)."""
    num_eval: int = 1000
    """synthetic_pairs: held-out pairs for retrieval recall@1."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to a user ``module:callable`` data set."""
    path: str | None = None
    """table: a .csv / .tsv / .jsonl / .parquet file, a glob of them, or a folder written by
    datasets' save_to_disk; webdataset: a tar shard pattern (``shards/{0000..0099}.tar``)."""
    columns: list[str] = field(default_factory=list)
    """The two views: table column names; webdataset sample keys (file extensions, ``;``
    between alternatives; default ``[jpg;png;jpeg;webp, txt]``). A numeric-list column is a
    float32 vector, a string column text (or, with ``data.image_root``, image paths), a
    binary column encoded images."""
    label_column: str | None = None
    """An integer class label per row (table column, webdataset key such as ``cls``), for
    ``loss.supervised``."""
    image_root: str | None = None
    """table: the folder that relative image paths are read from (``/`` for absolute
    paths); it makes string columns of image file names images."""
    on_bad_sample: Literal["stop", "skip"] = "stop"
    """A sample that cannot be decoded mid-epoch (an unreadable image): stop = write the
    last good state as a checkpoint and exit 2 naming the row; skip = leave it out of its
    batch and count it (``bad_samples_skipped`` in metrics.jsonl)."""


@dataclass
class LoaderConfig:
    """How batches are read (dist_infonce.trainer.loader): a torch DataLoader per rank."""

    num_workers: int = 0
    """DataLoader worker processes per rank that read, decode, augment and tokenise the
    batches (0: in the training process). The batches do not depend on it."""
    drop_last: bool = False
    """Drop the last, incomplete global batch of every epoch; false = it is split evenly over
    the ranks (uneven local batches: the gather handles them)."""


@dataclass
class ModelConfig:
    """The encoder(s) and projection head(s) (dist_infonce.trainer.models)."""

    name: str = "digits_cnn"
    """digits_cnn | mlp (one MLP encoder shared by both views) | two_tower (one encoder per
    view: an MLP for vectors, a small CNN for images, an embedding bag for text; or the
    two ``model.towers``) | ``hf:<dir>`` (a Hugging Face model directory: AutoModel +
    AutoTokenizer, one text encoder shared by both views) | ``timm:<arch>`` (one timm image
    encoder shared by both views) | ``open_clip:<arch>`` (an OpenCLIP model: its image and
    text towers and tokenizer) | a user encoder ``module:callable`` (see models.py).
    ``timm:`` and ``open_clip:`` also take their libraries' ``local-dir:<dir>``. See
    docs/models.md."""
    embedding_dim: int = 64
    """Output dimension of the projection head: the vectors the loss compares."""
    momentum: float = 0.0
    """MoCo's momentum (EMA) key encoder: > 0 computes view 1's keys with an EMA copy of
    the model (no gradient), updated after every optimizer step as
    ``ema = momentum * ema + (1 - momentum) * online`` (e.g. 0.99, 0.999); 0 = off."""
    feature_dim: int = 128
    """Encoder output dimension (the frozen features of the digits linear probe and kNN)."""
    hidden_dim: int = 256
    """Hidden width of the MLPs (encoders and heads)."""
    depth: int = 2
    """Linear layers of the MLP encoders (mlp, two_tower)."""
    width: int = 32
    """Channels of the first convolution of digits_cnn and of two_tower's image encoder."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to a user ``module:callable`` encoder, or to the library's
    constructor of ``timm:`` / ``open_clip:`` towers (e.g. ``{img_size: 32, patch_size: 4}``)."""
    towers: list[str] = field(default_factory=list)
    """model.name=two_tower with towers from the ecosystem: the tower of view 0 and of
    view 1, each ``hf:<dir>`` or ``timm:<arch>`` (e.g. ``[timm:vit_tiny_patch16_224,
    hf:/models/bert]``); empty = the built-in encoders."""
    pooling: Literal["mean", "cls"] = "mean"
    """Hugging Face text towers: the sentence embedding is the mean of the token states
    under the attention mask, or the first ([CLS]) token's state."""
    pretrained: str | None = None
    """A local weights file for the timm or OpenCLIP tower (``timm.create_model(...,
    pretrained_cfg_overlay={file: ...})``, ``open_clip ... pretrained=<file>``); null =
    random initialisation. Hugging Face towers load the weights of their directory."""
    freeze: list[int] = field(default_factory=list)
    """Tower indices whose parameters are not trained (and stay in eval mode), e.g. [0]:
    a locked image tower (LiT). Ecosystem towers only."""
    projection: Literal["linear", "none"] = "linear"
    """hf / timm towers: linear = a linear map to ``model.embedding_dim`` (timm: its own
    classifier head with ``num_classes=embedding_dim``; HF: a linear layer exported as a
    sentence-transformers Dense module) | none = the pooled features as they are.
    OpenCLIP towers keep their own projections."""
    max_length: int = 64
    """Hugging Face towers: tokens per text (padded and cut to it in the DataLoader
    workers; each encoder pass drops the columns that are padding in all its rows).
    OpenCLIP uses its model's context length."""
    grad_checkpointing: bool = False
    """Activation checkpointing inside ecosystem towers, where the library offers it
    (timm and OpenCLIP ``set_grad_checkpointing``, HF ``gradient_checkpointing_enable``)."""


@dataclass
class EvalConfig:
    """The evaluation (rank 0, frozen features): at the end, and every ``eval.every`` steps."""

    enabled: bool = True
    """Run the data set's evaluation after training (digits: linear probe + kNN)."""
    knn_k: int = 5
    """Neighbours of the digits kNN classifier."""
    batch_size: int = 1024
    """Samples per forward pass when embedding the evaluation sets."""
    every: int = 0
    """Also evaluate every this many optimizer steps (logged as ``eval/*`` rows of that
    step in metrics.jsonl and W&B); 0 = only after training."""
    path: str | None = None
    """Held-out data for the evaluation of table / webdataset runs: a file or shard pattern
    of the same format as ``data.path`` (same columns; labels in ``data.label_column`` for
    zero-shot and the probes); null = the first rows of the training data (recall only)."""
    zeroshot_classes: list[str] = field(default_factory=list)
    """Zero-shot classification of the held-out images: the class names, label ``i`` being
    ``zeroshot_classes[i]``; each becomes the text ``eval.prompt`` for the text tower."""
    prompt: str = "a photo of a {}."
    """The text of a class for zero-shot classification: ``{}`` is the class name."""


@dataclass
class CheckpointConfig:
    """Checkpoints in ``output_dir/checkpoints``."""

    every: int = 100
    """Save every this many steps (and always at the last step); 0 saves only at the end."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    resume: bool = True
    """Resume from the newest readable checkpoint in output_dir when there is one."""


@dataclass
class LogConfig:
    """metrics.jsonl and the progress bar."""

    every: int = 10
    """Log every this many steps (and at the first and last step)."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""


@dataclass
class WandbConfig:
    """Weights & Biases (rank 0 only)."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = $WANDB_MODE if set, else online when an API key is configured
    (WANDB_API_KEY or ~/.netrc), else offline."""
    project: str = "dist_infonce"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team); null = the default of the API key."""
    name: str | None = None
    """Run name; null = the name of output_dir."""
    group: str | None = None
    """Run group (sweeps put their runs in one group)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""


@dataclass
class DistConfig:
    """Process group settings."""

    timeout_s: float = 600.0
    """Collective timeout: a rank that died makes the others fail after this, not hang."""
    requeue_signal: str = "SIGUSR1"
    """On this signal (Slurm's ``--signal=USR1@T`` warning, ``scancel --signal=USR1``) every
    rank finishes its step, rank 0 writes a checkpoint and runs ``scontrol requeue``, and
    the run exits 75; outside Slurm it only saves and exits 75. Empty: no handler."""
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM"])
    """On these signals every rank finishes its step, rank 0 writes a checkpoint, and the
    run exits 75 without requeueing (a plain ``kill``, ``scancel``, torchrun's shutdown)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model (DistributedDataParallel) | fsdp: each tower
    and its blocks ``fully_shard``-ed (FSDP2): parameters, gradients and optimizer state
    split over the ranks, sharded checkpoints (torch.distributed.checkpoint; docs/fsdp.md)."""
    find_unused_parameters: bool = False
    """DDP's ``find_unused_parameters``: true when some parameters get no gradient in a step
    (DDP otherwise fails at the next step, "Expected to have finished reduction")."""
    fsdp_reshard_after_forward: bool = True
    """fsdp: free a block's gathered parameters after its forward and gather them again
    for its backward (less memory, more communication); false keeps them until backward.
    Under gradient caching the parameters are gathered once per step either way."""


@dataclass
class Config:
    """The whole run. Defaults are the embedded default: SimCLR on digits."""

    output_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl and checkpoints/ go; re-using it resumes."""
    seed: int = 0
    """Seeds model init, every epoch's order and every batch's augmentation (batches are a
    function of seed, epoch and position; without epochs, of seed, step and rank)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The contrastive loss."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """Batch loading."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The encoders."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The final evaluation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group."""


#: Top-level aliases: the seed fields of the tutorial's config, and ``precision``.
ALIASES: dict[str, str] = {
    "batch_size": "train.batch_size",
    "learning_rate": "train.lr",
    "embedding_dim": "model.embedding_dim",
    "negative_samples": "loss.num_negatives",
    "temperature": "loss.temperature",
    "precision": "train.precision",
}


# ----------------------------------------------------------------------- introspection


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted key, type)`` for every leaf field of a config dataclass."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            yield f"{prefix}{f.name}", tp


def all_keys() -> list[str]:
    """Every valid dotted key, in declaration order."""
    return [k for k, _ in _walk(Config)]


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """The docstring of every leaf field, by dotted key (read from the source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    out: dict[str, str] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(field_docs(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            out[f"{prefix}{f.name}"] = docs.get(f.name, "")
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (config.yaml); loading it gives back the same config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ------------------------------------------------------------------------- key names


@functools.cache
def _leaf_types() -> dict[str, Any]:
    """The type of every leaf field, by dotted key."""
    return dict(_walk(Config))


@functools.cache
def _sections() -> frozenset[str]:
    """Every dotted key that names a section (a nested dataclass), not a value."""
    return frozenset(k.rsplit(".", i)[0] for k in all_keys() for i in range(1, k.count(".") + 1))


def _is_mapping_field(tp: Any) -> bool:
    return typing.get_origin(tp) is dict


def _suggest(key: str, choices: Sequence[str]) -> str:
    """``' (did you mean 'x'?)'`` for the nearest key, or ``''``."""
    # Compare both the full dotted key and its last component: `train.lrr` and
    # `lrr` should both find `train.lr`.
    hit = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if not hit:
        tail = key.rsplit(".", 1)[-1]
        by_tail: dict[str, str] = {}
        for c in choices:
            by_tail.setdefault(c.rsplit(".", 1)[-1], c)
        near = difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)
        hit = [by_tail[near[0]]] if near else []
    return f" (did you mean {hit[0]!r}?)" if hit else ""


def _resolve_key(key: str, source: str) -> tuple[str, str]:
    """``(full key, what it is)``: an alias resolved, and ``"leaf"``, ``"section"`` or
    ``"free"`` (below a dict field such as ``data.kwargs``, where any key goes).

    Raises:
        ConfigError: an unknown key, with the nearest valid one.
    """
    key = ALIASES.get(key.strip(), key.strip())
    if key in _leaf_types():
        return key, "leaf"
    if key in _sections():
        return key, "section"
    parts = key.split(".")
    for i in range(1, len(parts)):
        if _is_mapping_field(_leaf_types().get(".".join(parts[:i]))):
            return key, "free"
    raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, all_keys() + list(ALIASES))}")


def _nested(key: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _normalise(data: Mapping[Any, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """A YAML mapping as nested dicts of canonical keys from the root: aliases resolved,
    dotted keys (``train.lr: 0.1``) split, every key checked. Below a dict field
    (``data.kwargs``) the mapping is kept as it is (free-form keys)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if not isinstance(k, str):
            raise ConfigError(f"{source}: keys must be strings, got {k!r}")
        full, kind = _resolve_key(prefix + k, source)
        if kind == "section":
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: {_section_message(full)}")
            _merge_dicts(out, _normalise(v, source, prefix=f"{full}."))
        else:
            _merge_dicts(out, _nested(full, v))
    return out


def _merge_dicts(a: dict[str, Any], b: Mapping[str, Any]) -> None:
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(a.get(k), dict):
            _merge_dicts(a[k], v)
        else:
            a[k] = v


def _section_message(key: str) -> str:
    example = next(k for k in all_keys() if k.startswith(key + "."))
    return f"{key} is a section; set one of its keys, e.g. {example}"


# -------------------------------------------------------------------------- merging


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _non_null(tp: Any) -> tuple[Any, bool]:
    """``(X, optional)`` for ``X | None``; ``(tp, False)`` otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _bad_value(key: str, value: Any) -> ConfigError:
    """The message for a value OmegaConf refused: the key, what it takes, a suggestion."""
    tp = _leaf_types().get(key)
    if tp is None:
        return ConfigError(f"{key}: invalid value {value!r}")
    inner, _ = _non_null(tp)
    if typing.get_origin(inner) is Literal:
        choices = [str(c) for c in typing.get_args(inner)]
        hint = difflib.get_close_matches(str(value), choices, n=1)
        near = f" (did you mean {hint[0]!r}?)" if hint else ""
        return ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}{near}")
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _merge(base: DictConfig, update: DictConfig) -> DictConfig:
    """OmegaConf's merge (it converts and checks each value against the schema).

    Raises:
        ConfigError: a value that does not fit its field, naming the key.
    """
    try:
        return typing.cast(DictConfig, OmegaConf.merge(base, update))
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        value = OmegaConf.select(update, key, default=None) if key else None
        raise _bad_value(key, value) from None


def _override(text: str) -> DictConfig:
    """One ``key=value`` override as a config to merge.

    The value is parsed by OmegaConf (YAML scalars and lists: ``0.1``, ``true``,
    ``null``, ``[a, b]``), except for a string field, which takes the text as it is
    (``null`` / ``none`` for an optional one), and a list field given without
    brackets (``tags=a,b``: friendlier on a shell command line than ``tags=[a,b]``).

    Raises:
        ConfigError: not ``key=value``, or an unknown key or a section.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value")
    key, kind = _resolve_key(key, "override")
    if kind == "section":
        raise ConfigError(f"override: {_section_message(key)}")
    inner, optional = _non_null(_leaf_types().get(key))
    if inner is str:
        null = optional and raw.strip().lower() in ("null", "none", "~")
        return OmegaConf.create(_nested(key, None if null else raw))
    if typing.get_origin(inner) is list and not raw.strip().startswith("["):
        return OmegaConf.create(_nested(key, [v.strip() for v in raw.split(",") if v.strip()]))
    try:
        return OmegaConf.from_dotlist([f"{key}={raw}"])
    except (yaml.YAMLError, OmegaConfBaseException):
        # Not YAML (`[unclosed`): the text itself; the merge then says what the key takes.
        return OmegaConf.create(_nested(key, raw))


def _read_file(path: str | Path) -> DictConfig:
    """A YAML config file as a config to merge (aliases and dotted keys resolved).

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, not a mapping, an
            unknown key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {str(p)!r}")
    try:
        loaded = OmegaConf.load(p)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"--config {p}: cannot read it: {e.strerror}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"--config {p}: expected a mapping of keys, got a list")
    data = OmegaConf.to_container(loaded, resolve=False)
    return OmegaConf.create(_normalise(typing.cast(dict, data), str(p)))


# ------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Cross-field and range checks that the types alone cannot express.

    Raises:
        ConfigError: naming the offending key.
    """
    t, lo = cfg.train, cfg.loss
    for key, tp in _leaf_types().items():
        if _non_null(tp)[0] is float:
            value = _get(cfg, key)
            _check(value is None or math.isfinite(value), key, f"must be finite, got {value!r}")
    _check(bool(cfg.output_dir.strip()), "output_dir", "must not be empty")
    _check(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    _check(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(
        0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}"
    )
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = off), got {t.grad_clip}")
    _check(
        t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}"
    )
    _check(
        t.micro_batch_size is None or t.micro_batch_size >= 1,
        "train.micro_batch_size",
        f"must be >= 1 or null, got {t.micro_batch_size}",
    )
    _check(
        t.micro_batch_size is None or t.grad_accum_steps == 1,
        "train.micro_batch_size",
        "replaces train.grad_accum_steps (the cache shares negatives across its micro-batches, "
        f"accumulation does not); set train.grad_accum_steps=1, got {t.grad_accum_steps}",
    )
    _check(lo.temperature > 0, "loss.temperature", f"must be > 0, got {lo.temperature}")
    _check_loss_options(lo)
    _check(lo.num_negatives >= 0, "loss.num_negatives", f"must be >= 0, got {lo.num_negatives}")
    _check(
        lo.num_negatives == 0 or lo.kind == "info_nce",
        "loss.num_negatives",
        f"explicit negatives need loss.kind=info_nce (got {lo.kind}: in-batch negatives only)",
    )
    _check(
        not (lo.supervised and lo.num_negatives),
        "loss.supervised",
        "labels define the positives among in-batch samples; set loss.num_negatives=0",
    )
    _check_moco(cfg)
    _check(
        t.epochs is None or t.epochs >= 1, "train.epochs", f"must be >= 1 or null, got {t.epochs}"
    )
    _validate_data(cfg)
    _check(0 < cfg.data.eval_fraction < 1, "data.eval_fraction", "must be in (0, 1)")
    _check(cfg.data.noise >= 0, "data.noise", f"must be >= 0, got {cfg.data.noise}")
    for key in ("latent_dim", "dim_a", "dim_b", "num_eval"):
        _check(getattr(cfg.data, key) > 0, f"data.{key}", "must be > 0")
    for key in ("embedding_dim", "feature_dim", "hidden_dim", "depth", "width"):
        _check(getattr(cfg.model, key) > 0, f"model.{key}", "must be > 0")
    _check(cfg.eval.knn_k > 0, "eval.knn_k", "must be > 0")
    _check(cfg.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = only at the end)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.log.every >= 1, "log.every", f"must be >= 1, got {cfg.log.every}")
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0")
    _check(
        cfg.dist.strategy != "fsdp" or t.precision != "fp16",
        "train.precision",
        "fp16 is not supported with dist.strategy=fsdp (no gradient scaler there); use bf16",
    )
    for key, names in (
        ("dist.requeue_signal", [cfg.dist.requeue_signal] if cfg.dist.requeue_signal else []),
        ("dist.stop_signals", cfg.dist.stop_signals),
    ):
        for name in names:
            _check(_is_signal(name), key, f"{name!r} is not a signal name (e.g. SIGUSR1)")
    for key, name in (("data.name", cfg.data.name), ("model.name", cfg.model.name)):
        if ":" in name and not (key == "model.name" and name.startswith(TOWER_PREFIXES)):
            _check_import_path(key, name)
    _validate_towers(cfg)
    _validate_eval(cfg)


#: ``model.name`` / ``model.towers`` prefixes of the ecosystem's towers (trainer/zoo.py).
TOWER_PREFIXES = ("hf:", "timm:", "open_clip:")


def _validate_towers(cfg: Config) -> None:
    """The ecosystem tower keys (``model.towers``, ``pooling``, ``freeze``, ...)."""
    m = cfg.model
    zoo = m.name.startswith(TOWER_PREFIXES) or bool(m.towers)
    for key, name in [("model.name", m.name)] + [
        (f"model.towers[{i}]", t) for i, t in enumerate(m.towers)
    ]:
        if name.startswith(TOWER_PREFIXES):
            _check(
                bool(name.partition(":")[2].strip()),
                key,
                f"{name!r} names no model: expected e.g. hf:/path/to/model_dir, "
                "timm:vit_tiny_patch16_224, open_clip:ViT-B-32",
            )
    if m.towers:
        _check(
            m.name == "two_tower",
            "model.towers",
            f"names one tower per view: set model.name=two_tower (got model.name={m.name})",
        )
        _check(
            len(m.towers) == 2,
            "model.towers",
            f"expected two towers (view 0, view 1), got {m.towers}",
        )
        for i, t in enumerate(m.towers):
            _check(
                t.startswith(("hf:", "timm:")),
                f"model.towers[{i}]",
                f"expected hf:<dir> or timm:<arch>, got {t!r}"
                + (
                    " (an OpenCLIP model brings both towers: model.name=open_clip:<arch>)"
                    if t.startswith("open_clip:")
                    else ""
                ),
            )
    shared = zoo and not m.towers and not m.name.startswith("open_clip:")
    for i in m.freeze:
        _check(zoo, "model.freeze", "freezes ecosystem towers (hf:, timm:, open_clip:)")
        _check(
            i in ((0,) if shared else (0, 1)),
            "model.freeze",
            f"no tower {i} (towers: {'0' if shared else '0, 1'})",
        )
    _check(
        not (shared and m.freeze),
        "model.freeze",
        f"one shared tower ({m.name}) frozen leaves nothing to train",
    )
    _check(m.max_length >= 2, "model.max_length", f"must be >= 2, got {m.max_length}")
    _check(
        not (zoo and m.momentum > 0),
        "model.momentum",
        "the momentum key encoder does not run with ecosystem towers (hf:, timm:, open_clip:) yet",
    )
    _check(
        not (m.name.startswith("open_clip:") and cfg.dist.strategy == "fsdp"),
        "dist.strategy",
        "fsdp cannot shard an OpenCLIP model (its 0-dim logit_scale parameter); use ddp",
    )
    if m.pretrained is not None:
        names = m.towers or [m.name]
        _check(
            any(n.startswith(("timm:", "open_clip:")) for n in names),
            "model.pretrained",
            "is a weights file for a timm or OpenCLIP tower (Hugging Face towers load their "
            f"directory's weights); this model has none ({m.name}{' ' + str(m.towers) if m.towers else ''})",
        )
        _check(
            sum(n.startswith(("timm:", "open_clip:")) for n in names) == 1,
            "model.pretrained",
            f"one file, but two towers take one ({m.towers}): which one is meant",
        )


def _validate_eval(cfg: Config) -> None:
    """``eval.every``, ``eval.path``, zero-shot classes and prompt."""
    e = cfg.eval
    _check(e.every >= 0, "eval.every", f"must be >= 0 (0 = only at the end), got {e.every}")
    _check(
        e.path is None or cfg.data.name in FILE_SOURCES,
        "eval.path",
        f"held-out files for data.name=table|webdataset (data.name={cfg.data.name} has its own)",
    )
    _check(
        "{}" in e.prompt,
        "eval.prompt",
        f"needs a {{}} where the class name goes, got {e.prompt!r}",
    )
    _check(
        not e.zeroshot_classes or e.path is not None,
        "eval.zeroshot_classes",
        "classifies held-out images: set eval.path (labels in data.label_column)",
    )
    _check(
        not e.zeroshot_classes or cfg.data.label_column is not None,
        "eval.zeroshot_classes",
        "needs the images' class labels: set data.label_column",
    )


def _check_moco(cfg: Config) -> None:
    """``loss.queue_size`` and ``model.momentum``: ranges and the options they combine with."""
    lo, m = cfg.loss, cfg.model.momentum
    _check(lo.queue_size >= 0, "loss.queue_size", f"must be >= 0 (0 = off), got {lo.queue_size}")
    _check(0 <= m < 1, "model.momentum", f"must be in [0, 1) (0 = off), got {m}")
    for key, on in (("loss.queue_size", lo.queue_size > 0), ("model.momentum", m > 0)):
        if not on:
            continue
        _check(
            lo.kind == "info_nce",
            key,
            f"MoCo's query -> key loss needs loss.kind=info_nce (got {lo.kind})",
        )
        _check(
            lo.num_negatives == 0,
            key,
            "explicit negatives (loss.num_negatives) and MoCo's keys do not mix; "
            "set loss.num_negatives=0",
        )
    _check(
        m == 0 or cfg.dist.strategy != "fsdp",
        "model.momentum",
        "the momentum key encoder is an unsharded EMA copy; it does not run with "
        "dist.strategy=fsdp yet (use dist.strategy=ddp, or model.momentum=0 with a queue)",
    )
    if lo.queue_size > 0:
        _check(
            not lo.supervised,
            "loss.queue_size",
            "labels define positives among in-batch samples, not in the queue; "
            "set loss.supervised=false",
        )
        _check(
            lo.gather,
            "loss.queue_size",
            "the queue holds the keys of every rank (one queue for the world); "
            "loss.gather=false has no meaning with it, set loss.gather=true",
        )


#: data.name values that read data.path (the file sources).
FILE_SOURCES = ("table", "webdataset")


def _validate_data(cfg: Config) -> None:
    """The file-source keys: present where they are read, absent where they would be ignored."""
    d = cfg.data
    _check(
        cfg.loader.num_workers >= 0,
        "loader.num_workers",
        f"must be >= 0, got {cfg.loader.num_workers}",
    )
    if d.name in FILE_SOURCES:
        _check(
            bool(d.path and d.path.strip()),
            "data.path",
            f"data.name={d.name} reads files: set data.path (see docs/data.md)",
        )
        want = "two table column names, e.g. data.columns=[image,caption]"
        if d.name == "webdataset":
            want = (
                "two sample keys, e.g. data.columns=[png,txt] (or none: [jpg;png;jpeg;webp, txt])"
            )
        _check(
            len(d.columns) == 2 or (d.name == "webdataset" and not d.columns),
            "data.columns",
            f"expected {want}, got {d.columns}",
        )
        _check(all(c.strip() for c in d.columns), "data.columns", f"empty name in {d.columns}")
        _check(
            d.label_column is None or d.label_column not in d.columns,
            "data.label_column",
            f"{d.label_column!r} is also one of data.columns",
        )
    elif d.name in ("digits", "synthetic_pairs"):
        for key in ("path", "label_column", "image_root"):
            _check(
                getattr(d, key) is None,
                f"data.{key}",
                f"is read by data.name=table|webdataset only (data.name={d.name})",
            )
        _check(
            not d.columns,
            "data.columns",
            f"is read by data.name=table|webdataset only (data.name={d.name})",
        )
    _check(
        d.image_root is None or d.name != "webdataset",
        "data.image_root",
        "webdataset shards hold the images themselves; data.image_root is for data.name=table",
    )
    _check(
        not (d.name == "synthetic_pairs" and cfg.train.epochs is not None),
        "train.epochs",
        "data.name=synthetic_pairs draws fresh pairs every step and has no epochs; use train.steps",
    )


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_loss_options(lo: LossConfig) -> None:
    """The loss's own option rules (chunk size vs kernel, Triton tiles), named by key.

    The library's :class:`~dist_infonce.losses.options.LossOptions` is the one place
    those rules live; its ValueError starts with the argument's name, the key's last
    part: ``chunk_size must be ...`` becomes ``loss.chunk_size: must be ...``.
    """
    from dist_infonce.losses.options import LossOptions

    try:
        LossOptions(chunk_size=lo.chunk_size, kernel=lo.kernel, normalize=lo.normalize)
    except ValueError as e:
        argument, _, rest = str(e).partition(" ")
        raise ConfigError(f"loss.{argument}: {rest}") from None


def _is_signal(name: str) -> bool:
    """Whether ``name`` (SIGUSR1, USR1 or a number) is a signal of this platform."""
    text = name.strip().upper()
    if text.isdigit():
        return int(text) in {s.value for s in signal.Signals}
    return (text if text.startswith("SIG") else "SIG" + text) in signal.Signals.__members__


def _check_import_path(key: str, path: str) -> None:
    module, _, attr = path.partition(":")
    _check(
        bool(module)
        and bool(attr)
        and all(p.isidentifier() for p in module.split(".") + attr.split(".")),
        key,
        f"expected a built-in name or module:callable, got {path!r}",
    )


def import_object(path: str, key: str) -> Callable[..., Any]:
    """Import ``module:attr`` (``attr`` may be dotted).

    Raises:
        ConfigError: the module or attribute does not exist, or is not callable.
    """
    if ":" not in path:
        raise ConfigError(f"{key}: unknown built-in {path!r}; use module:callable for your own")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {path!r} is not callable")
    return obj


# ------------------------------------------------------------------------------ entry


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults -> YAML file -> ``key=value`` overrides, then :func:`validate`.

    Args:
        path: YAML file (a mapping, possibly nested by section, dotted keys and
            aliases allowed), or None.
        overrides: ``dotted.key=value`` strings, applied in order (the last wins).

    Returns:
        The resolved :class:`Config` (plain dataclasses, no OmegaConf objects).

    Raises:
        ConfigError: missing/invalid file, unknown key, or bad value.
    """
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_file(path))
    for text in overrides:
        merged = _merge(merged, _override(text))
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # an interpolation (${...}) that does not resolve
        key = str(getattr(e, "full_key", "") or "")
        raise ConfigError(f"{key or 'config'}: {str(e).splitlines()[0]}") from None
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def reference_markdown() -> str:
    """A Markdown table of every key, its default and its docstring (for the README)."""
    defaults = to_dict(Config())
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, doc in field_docs().items():
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        escaped = doc.replace("|", "\\|")  # a literal | would end the cell
        lines.append(f"| `{key}` | `{shown}` | {escaped} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
