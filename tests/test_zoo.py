"""Ecosystem towers in one process: what they are built from, what they refuse, what their
preprocessing gives, and the metrics of the evaluation while training.

The multi-rank exactness is in tests/test_zoo_dist.py, the trainer end to end (torchrun,
export, reload) in tests/test_zoo_train.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_infonce.trainer.config import ConfigError, load_config
from dist_infonce.trainer.learner import FlatViews, build_learner
from dist_infonce.trainer.retrieval import recall_at_k, value_ids, zero_shot_accuracy
from dist_infonce.trainer.views import cat, rows, stack, take
from examples.make_tiny_text_model import make_tiny_text_model
from tests import zoo_cases

pytest.importorskip("timm")
pytest.importorskip("transformers")

IMAGE_TEXT = SimpleNamespace(input_shapes=((3, 16, 16), (16,)), input_kinds=("image", "text"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_text_model(tmp_path_factory.mktemp("bert") / "bert", max_length=32))


def _learner(overrides: list[str], data: object = IMAGE_TEXT) -> object:
    torch.manual_seed(0)
    return build_learner(load_config(None, overrides), data)


def test_tower_pair_shapes_views_and_freeze(hf_dir: str) -> None:
    learner = _learner([*zoo_cases.zoo_overrides(hf_dir), "model.freeze=[0]"])
    model = learner.model
    assert model.dict_views and isinstance(learner.cache_tower(), FlatViews)
    images, texts = zoo_cases.global_batch(hf_dir, 5, seed=1)
    z0, z1 = model(images.float(), texts)
    assert z0.shape == z1.shape == (5, 8)
    # The locked image tower: no trainable parameter, and eval mode after train().
    learner.train()
    assert not any(p.requires_grad for p in model.tower0.parameters())
    assert not model.tower0.training and model.tower1.training
    learner(images.float(), texts).backward()
    assert all(p.grad is None for p in model.tower0.parameters())
    assert model.tower1.proj.weight.grad is not None


def test_hf_tower_drops_padding_columns_exactly(hf_dir: str) -> None:
    """Padding to max_length and cutting to the longest row give the same embedding."""
    from dist_infonce.trainer.zoo_hf import HFTextTower, HFTokenize

    torch.manual_seed(0)
    tower = (
        HFTextTower(hf_dir, key="model.name", pooling="mean", out_dim=None, max_length=32)
        .double()
        .eval()
    )
    long = stack([HFTokenize(hf_dir, max_length=32)(t) for t in zoo_cases.TEXTS])
    short = stack([HFTokenize(hf_dir, max_length=12)(t) for t in zoo_cases.TEXTS])
    assert long["attention_mask"][:, 12:].sum() == 0 and short["input_ids"].shape == (6, 12)
    with torch.no_grad():
        a, b = tower(**long), tower(**short)
    assert (a - b).abs().max() <= 1e-12
    # The mask travels: the same ids with a mask cut short give another embedding.
    cut = {**long, "attention_mask": long["attention_mask"].clone()}
    cut["attention_mask"][:, 3:] = 0
    with torch.no_grad():
        assert (tower(**cut) - a).abs().max() > 1e-3


def test_tokenizer_transform_survives_pickling(hf_dir: str) -> None:
    from dist_infonce.trainer.zoo_hf import HFTokenize

    t = HFTokenize(hf_dir, max_length=16)
    again = pickle.loads(pickle.dumps(t))  # as a DataLoader worker receives it
    assert again._tokenizer is None
    out, ref = again("a photo of a cat"), t("a photo of a cat")
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].shape == (16,)
    assert all(torch.equal(out[k], ref[k]) for k in out)


def test_timm_preprocessing_follows_the_data_config() -> None:
    from PIL import Image

    from dist_infonce.trainer.zoo_timm import TimmImageTransform

    state = torch.get_rng_state()
    t = TimmImageTransform("vit_tiny_patch16_224", kwargs=zoo_cases.TIMM_KWARGS, train=False)
    assert torch.equal(state, torch.get_rng_state())  # building it drew nothing
    assert t.shape == (3, 16, 16)
    out = t(_png(Image.new("L", (20, 24), 128)))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def _png(image: object) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return buf.getvalue()


def test_views_helpers_on_dicts() -> None:
    a = {"input_ids": torch.arange(6).view(3, 2), "attention_mask": torch.ones(3, 2)}
    assert rows(a) == 3 and rows(take(a, slice(1, None))) == 2
    both = cat([a, take(a, slice(0, 1))])
    assert both["input_ids"].shape == (4, 2)
    flat = FlatViews.flatten(torch.zeros(3, 1), a)
    assert sorted(flat) == ["x0", "x1.attention_mask", "x1.input_ids"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["model.towers=[timm:vit_tiny_patch16_224,hf:/x]"],
            r"model\.towers: .*model\.name=two_tower",
        ),
        (["model.name=two_tower", "model.towers=[hf:/x]"], r"model\.towers: expected two towers"),
        (
            ["model.name=two_tower", "model.towers=[open_clip:ViT-B-32,hf:/x]"],
            r"model\.towers\[0\].*model\.name=open_clip",
        ),
        (["model.name=hf:"], r"model\.name: 'hf:' names no model"),
        (["model.name=hf:/x", "model.freeze=[0]"], r"model\.freeze: one shared tower"),
        (
            ["model.name=two_tower", "model.towers=[timm:a,hf:/x]", "model.freeze=[2]"],
            r"model\.freeze: no tower 2",
        ),
        (["model.freeze=[0]"], r"model\.freeze: freezes ecosystem towers"),
        (
            ["model.name=hf:/x", "model.pretrained=/w.pt"],
            r"model\.pretrained: is a weights file for a timm",
        ),
        (["model.name=hf:/x", "model.momentum=0.9", "loss.kind=info_nce"], r"model\.momentum"),
        (["model.name=open_clip:ViT-B-32", "dist.strategy=fsdp"], r"dist\.strategy"),
        (["eval.every=-1"], r"eval\.every"),
        (["eval.prompt=no placeholder"], r"eval\.prompt"),
        (["eval.path=/x"], r"eval\.path: held-out files for data\.name=table\|webdataset"),
        (["eval.zeroshot_classes=[a,b]"], r"eval\.zeroshot_classes: classifies held-out images"),
    ],
)
def test_bad_tower_and_eval_keys_are_named(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_towers_are_refused_when_built(hf_dir: str, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model\.towers\[1\]: hf:.* not a Hugging Face model directory"
    ):
        _learner(["model.name=two_tower", f"model.towers=[{zoo_cases.TIMM},hf:{tmp_path}]"])
    with pytest.raises(
        ConfigError, match=r"model\.towers\[0\]=hf:.*encodes text; view 0 holds image"
    ):
        _learner(["model.name=two_tower", f"model.towers=[hf:{hf_dir},hf:{hf_dir}]"])
    with pytest.raises(
        ConfigError, match=r"model\.towers\[0\]: timm cannot build timm:no_such_arch"
    ):
        _learner(["model.name=two_tower", f"model.towers=[timm:no_such_arch,hf:{hf_dir}]"])
    with pytest.raises(
        ConfigError, match=r"model\.projection=none: the towers give embeddings of 32 and 32"[:40]
    ):
        _learner(
            [
                *zoo_cases.zoo_overrides(hf_dir),
                "model.projection=none",
                "model.kwargs={img_size: 16, patch_size: 8, embed_dim: 64, depth: 1, num_heads: 2}",
            ]
        )
    with pytest.raises(
        ConfigError, match=r"model\.name=hf:.*shares one tower, but view 0 holds image"
    ):
        _learner([f"model.name=hf:{hf_dir}"])


def test_export_refuses_builtin_models(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.test_train import REPO, clean_env

    out = tmp_path / "run"
    env = clean_env(tmp_path)
    args = [
        "train.steps=1",
        "train.batch_size=16",
        "eval.enabled=false",
        "log.progress=false",
        "wandb.mode=disabled",
        f"output_dir={out}",
    ]
    subprocess.run(
        [sys.executable, "-m", "dist_infonce.train", *args],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dist_infonce.export", str(out), "--out", str(tmp_path / "x")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "built-in model" in proc.stderr, proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_infonce.export",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "neither a run directory" in proc.stderr, proc.stderr


def test_recall_at_k_against_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(300, 5, generator=g), torch.randn(300, 5, generator=g)
    values1 = [i % 40 for i in range(300)]  # repeated view-1 values (shared captions)
    ids0, ids1 = value_ids(list(range(300))), value_ids(values1)
    got = recall_at_k(q, k, ids0, ids1, ks=(1, 5, 10))
    sim = q @ k.T
    for kk in (1, 5, 10):
        top = sim.topk(kk, dim=1).indices
        want = (
            sum(
                any(values1[j] == values1[i] or j == i for j in top[i].tolist()) for i in range(300)
            )
            / 300
        )
        assert got[kk] == pytest.approx(want)
    unit = torch.nn.functional.normalize(k, dim=1)
    assert recall_at_k(unit, unit, ids0, ids0, ks=(1,))[1] == 1.0  # each row finds itself


def test_zero_shot_accuracy() -> None:
    classes = torch.eye(4)
    images = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 1, 0.5], [0, 0.9, 0, 0.2]])
    acc = zero_shot_accuracy(images, classes, torch.tensor([0, 3, 1]), ks=(1, 2, 5))
    assert acc == {1: pytest.approx(2 / 3), 2: pytest.approx(1.0)}  # no top-5 of 4 classes
