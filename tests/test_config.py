"""Config resolution: defaults -> YAML -> overrides, aliases, errors with suggestions, the CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_infonce.trainer.config import (
    ALIASES,
    Config,
    ConfigError,
    all_keys,
    field_docs,
    import_object,
    load_config,
    to_dict,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_order_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    """The file overrides the defaults; overrides override the file, the last one winning."""
    path = write(tmp_path, "seed: 3\ntrain:\n  lr: 0.5\n  steps: 7\nloss: {temperature: 0.3}\n")
    cfg = load_config(path, ["train.lr=0.25", "train.steps=9", "train.steps=11"])
    assert cfg.seed == 3  # from the file
    assert cfg.loss.temperature == 0.3
    assert cfg.train.lr == 0.25 and cfg.train.steps == 11  # overrides, in order
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default
    # Dotted keys work in the file too.
    path = write(tmp_path, "train.lr: 0.125\n")
    assert load_config(path).train.lr == 0.125


def test_value_types() -> None:
    """Overrides are YAML scalars checked against the field type."""
    cfg = load_config(
        None,
        [
            "train.lr=1e-3",
            "train.scale_lr=true",
            "loss.chunk_size=null",
            "loss.chunk_size=128",
            "wandb.name=007",  # a string field keeps the text
            "wandb.tags=a,b",
            "wandb.entity=none",
            "data.kwargs.n=5",
            "data.kwargs.nested.x=[1, 2]",
        ],
    )
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.scale_lr is True
    assert cfg.loss.chunk_size == 128
    assert cfg.wandb.name == "007" and cfg.wandb.tags == ["a", "b"] and cfg.wandb.entity is None
    assert cfg.data.kwargs == {"n": 5, "nested": {"x": [1, 2]}}
    assert load_config(None, ["wandb.tags=[x, y]"]).wandb.tags == ["x", "y"]


def test_aliases_of_the_tutorial_config(tmp_path: Path) -> None:
    """batch_size, learning_rate, embedding_dim, negative_samples map onto our keys."""
    path = write(
        tmp_path,
        "batch_size: 96\nlearning_rate: 0.01\nembedding_dim: 32\nnegative_samples: 8\n"
        "loss: {kind: info_nce}\n",
    )
    cfg = load_config(path, ["precision=bf16", "temperature=0.07"])
    assert cfg.train.batch_size == 96
    assert cfg.train.lr == 0.01
    assert cfg.model.embedding_dim == 32
    assert cfg.loss.num_negatives == 8
    assert cfg.train.precision == "bf16" and cfg.loss.temperature == 0.07
    assert set(ALIASES.values()) <= set(all_keys())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.steps=3", "(did you mean 'train.steps'?)"),
        ("batchsize=3", "(did you mean 'batch_size'?)"),
        ("checkpoint.evrey=3", "(did you mean 'checkpoint.every'?)"),
        ("train.steps=abc", "train.steps: expected int, got 'abc'"),
        ("train.steps=2.5", "train.steps: expected int"),
        # OmegaConf takes no float for an int field, integral or not (the old hand-written
        # coercion took 10.0); refused with the key named, never silently truncated.
        ("train.steps=10.0", "train.steps: expected int, got 10.0"),
        ("train.steps=0", "train.steps: must be > 0"),
        ("train.lr=-1", "train.lr: must be > 0"),
        ("train.scale_lr=maybe", "train.scale_lr: expected bool"),
        ("train.optimizer=adam", "not one of adamw, sgd, lars (did you mean 'adamw'?)"),
        ("wandb.mode=ofline", "(did you mean 'offline'?)"),
        ("loss.kind=ntxent", "(did you mean 'nt_xent'?)"),
        ("loss.temperature=nan", "loss.temperature: must be finite"),
        ("loss.num_negatives=4", "explicit negatives need loss.kind=info_nce"),
        ("train=3", "train is a section"),
        ("model.name=no_colon_or_builtin", None),  # checked when built, see test_train_options
        ("data.name=my module:f", "data.name: expected a built-in name or module:callable"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str | None) -> None:
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.stepz'"):
        load_config(write(tmp_path, "train:\n  stepz: 3\n"))


def test_resolved_yaml_round_trips_and_default_file_matches() -> None:
    """config.yaml reloads to the same config; configs/default.yaml is the embedded default."""
    cfg = load_config(None, ["train.lr=0.3", "wandb.tags=a", "data.kwargs.k=1"])
    text = to_yaml(cfg)
    assert load_config(_tmp_file(text)) == cfg
    shipped = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert shipped == to_dict(Config())


def _tmp_file(text: str) -> Path:
    import tempfile

    fd, name = tempfile.mkstemp(suffix=".yaml")
    os.close(fd)
    Path(name).write_text(text)
    return Path(name)


def test_shipped_configs_load() -> None:
    """Every YAML in configs/ resolves without error."""
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in files} >= {"default.yaml", "clip_synthetic.yaml", "large_batch.yaml"}
    for p in files:
        load_config(p)
    clip = load_config(REPO / "configs" / "clip_synthetic.yaml")
    assert (clip.loss.kind, clip.loss.learn_temperature, clip.loss.gather) == ("clip", True, True)
    big = load_config(REPO / "configs" / "large_batch.yaml")
    assert big.train.optimizer == "lars" and big.train.scale_lr


def test_every_field_has_a_docstring() -> None:
    """torchtitan style: one docstring per field (they feed --help and the README)."""
    docs = field_docs()
    assert set(docs) == set(all_keys())
    assert [k for k, d in docs.items() if not d] == []
    for section in dataclasses.fields(Config):
        assert section.name in {k.split(".")[0] for k in all_keys()}


def test_import_object_errors() -> None:
    assert import_object("os.path:join", "model.name") is os.path.join
    with pytest.raises(ConfigError, match="cannot import module 'no_such_mod'"):
        import_object("no_such_mod:f", "data.name")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        import_object("os:nope", "data.name")
    with pytest.raises(ConfigError, match="unknown built-in 'cnn'"):
        import_object("cnn", "model.name")


def _cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dist_infonce.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, time.monotonic() - start


def test_cli_user_errors_exit_fast_without_traceback(tmp_path: Path) -> None:
    """The real entry point: exit 2, the key and a suggestion on stderr, no traceback."""
    proc, seconds = _cli("train.lrr=0.1", f"output_dir={tmp_path / 'x'}")
    assert proc.returncode == 2
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert seconds < 30
    assert not (tmp_path / "x").exists()  # nothing started

    proc, _ = _cli("--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr

    # Found only when building: still a clean user error.
    proc, _ = _cli(
        "model.name=no_such_module:f", f"output_dir={tmp_path / 'y'}", "log.progress=false"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.name: cannot import module 'no_such_module'" in proc.stderr
    assert "Traceback" not in proc.stderr

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc, _ = _cli(f"output_dir={blocker / 'run'}", "log.progress=false")
    assert proc.returncode == 2 and "output_dir: cannot write to" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_every_key() -> None:
    proc, _ = _cli("--help")
    assert proc.returncode == 0
    for key in all_keys():
        assert key in proc.stdout
