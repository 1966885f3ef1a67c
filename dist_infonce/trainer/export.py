"""Trained encoders out: a run's towers, each in its own library's format.

``python -m dist_infonce.export RUN_DIR_OR_CHECKPOINT --out DIR`` (:func:`export_run`)
reads the newest checkpoint of a run (or the checkpoint file or sharded directory given),
rebuilds the model from the config stored in it, loads the weights and writes:

- ``DIR/encoder/`` for one model that serves both views (``model.name: hf:<dir>`` or
  ``timm:<arch>``: the shared tower; ``open_clip:<arch>``: the whole OpenCLIP model);
- ``DIR/tower0/`` and ``DIR/tower1/`` for ``model.towers`` (one per view);
- ``DIR/export.json``: which library each folder is for, how to load it, the view it
  encodes, whether the embeddings are compared normalised, the temperature, the step.

Formats (each loads with one line of its library; docs/models.md):
Hugging Face: ``save_pretrained`` + the sentence-transformers modules
(``AutoModel.from_pretrained(d)``, ``SentenceTransformer(d)``); timm: ``save_for_hf``
(``timm.create_model("local-dir:" + d)``); OpenCLIP: ``open_clip_config.json`` + the state
dict (``open_clip.create_model_and_transforms("local-dir:" + d)``).

The built-in models (digits_cnn, mlp, two_tower without ``model.towers``, user callables)
have no library format: their weights are the checkpoint's ``model`` state.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

from dist_infonce.trainer.checkpoint import load_latest
from dist_infonce.trainer.config import Config, ConfigError
from dist_infonce.trainer.learner import Learner, build_learner
from dist_infonce.trainer.zoo import is_zoo

__all__ = ["export_run", "load_learner"]

#: How each library's folder is loaded again (written to export.json).
_LOAD = {
    "hf": "sentence_transformers.SentenceTransformer({path!r}) or transformers.AutoModel.from_pretrained({path!r})",
    "timm": "timm.create_model('local-dir:{path}')",
    "open_clip": "open_clip.create_model_and_transforms('local-dir:{path}')",
}


def _config(state: dict[str, Any]) -> Config:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), state["config"]))
    assert isinstance(cfg, Config)
    return cfg


def _read(path: Path) -> tuple[dict[str, Any], Path]:
    """The trainer state and the weights' location of a run dir, a file or a .dcp dir."""
    from dist_infonce.trainer.sharded_checkpoint import TRAINER_STATE, newest_sharded

    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True), path
    if path.is_dir() and path.suffix == ".dcp":
        return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True), path
    ckpts = path / "checkpoints"
    if path.is_dir() and ckpts.is_dir():
        latest = load_latest(ckpts)
        if latest is not None:
            return latest
        sharded = newest_sharded(ckpts)
        if sharded is not None:
            return _read(sharded)
    raise ConfigError(
        f"export: {str(path)!r} is neither a run directory with checkpoints, nor a "
        "checkpoint file (step_*.pt), nor a sharded checkpoint directory (step_*.dcp)"
    )


def load_learner(path: str | Path) -> tuple[Learner, Config, dict[str, Any]]:
    """The trained :class:`~dist_infonce.trainer.learner.Learner` of a run (its newest
    checkpoint), a checkpoint file or a sharded checkpoint directory, in eval mode.

    Returns:
        ``(learner, config, trainer state)``.

    Raises:
        ConfigError: nothing to read there; a checkpoint without the data's input kinds
            whose data cannot be read to find them.
    """
    state, where = _read(Path(path))
    cfg = _config(state)
    inputs = state.get("inputs")
    if inputs:
        data: Any = SimpleNamespace(
            input_shapes=tuple(tuple(s) for s in inputs["shapes"]),
            input_kinds=tuple(inputs["kinds"]) if inputs.get("kinds") else None,
        )
    else:  # an older checkpoint: read the data set to learn its views
        from dist_infonce.trainer.data import build_data

        data = build_data(cfg.data, knn_k=cfg.eval.knn_k, model=cfg.model)
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg, data)
    if where.is_dir():  # a sharded checkpoint: DCP reads it into the plain model
        import torch.distributed.checkpoint as dcp

        model_state = learner.state_dict()
        dcp.load({"model": model_state}, checkpoint_id=str(where))
        learner.load_state_dict(model_state)
    else:
        learner.load_state_dict(state["model"])
    learner.eval()
    return learner, cfg, state


def export_run(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the towers of the run at ``path`` to ``out`` (see the module doc).

    Returns:
        The manifest written to ``out/export.json``.

    Raises:
        ConfigError: no checkpoint there, or a built-in model (no library format).
    """
    learner, cfg, state = load_learner(path)
    if not is_zoo(cfg.model):
        raise ConfigError(
            f"export: model.name={cfg.model.name} is a built-in model, which has no library "
            "format; its weights are the 'model' entry of the checkpoint. export writes "
            "hf:, timm: and open_clip: towers"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = learner.model
    normalize = cfg.loss.normalize
    manifest: dict[str, Any] = {
        "step": int(state["step"]),
        "normalize_embeddings": normalize,
        "temperature": learner.temperature,
        "towers": {},
    }
    if cfg.model.name.startswith("open_clip:"):
        folder = out / "encoder"
        model.export(folder, normalize=normalize, temperature=learner.temperature)  # type: ignore[operator]
        entries = [("encoder", "open_clip", [0, 1])]
    else:
        names = cfg.model.towers or [cfg.model.name]
        entries = []
        for i, tower in enumerate(model.towers()):  # type: ignore[operator]
            name = "encoder" if len(names) == 1 else f"tower{i}"
            tower.export(out / name, normalize=normalize)
            entries.append((name, names[i].partition(":")[0], [0, 1] if len(names) == 1 else [i]))
    for name, library, views in entries:
        folder = (out / name).resolve()
        manifest["towers"][name] = {
            "library": library,
            "views": views,
            "load": _LOAD[library].format(path=str(folder)),
        }
    (out / "export.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m dist_infonce.export RUN_DIR_OR_CHECKPOINT --out DIR``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dist_infonce.export",
        description="Write a run's trained towers, each in its library's format.",
    )
    parser.add_argument("run", help="a run's output_dir, a step_*.pt file or a step_*.dcp folder")
    parser.add_argument("--out", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    try:
        manifest = export_run(args.run, args.out)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    for name, entry in manifest["towers"].items():
        print(f"{name} ({entry['library']}, view {entry['views']}): {entry['load']}")
    print(f"wrote {Path(args.out) / 'export.json'}", file=sys.stderr)
    return 0
