"""Ecosystem towers through the trainer end to end: ``torchrun --nproc_per_node=2`` (gloo),
then ``python -m dist_infonce.export``, then each export loaded back by its own library.

1. timm image tower + Hugging Face text tower, CLIP on the digits webdataset shards, with
   gradient caching and activation checkpointing, evaluated every 2 steps on held-out
   digits (``eval.path``: recall@1/5/10 both ways, probes, zero-shot with class prompts).
2. An OpenCLIP model (a tiny config in a local directory) on the digits table, its image
   tower locked (``model.freeze=[0]``: LiT).
3. One Hugging Face encoder shared by both views of a text-pair csv (sentence embeddings).

Each export gives the trainer's embeddings (``Learner.model.embed`` of the checkpoint) to
1e-6: timm's ``local-dir:`` model and ``create_model(..., checkpoint_path=...)``,
``SentenceTransformer(dir)`` (normalised, as the loss compares them) and ``AutoModel``,
OpenCLIP's ``local-dir:`` model (its logit scale the trained temperature's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from examples.make_digits_pairs import make_digits_pairs
from examples.make_tiny_text_model import make_tiny_text_model
from tests import zoo_cases
from tests.test_train import REPO, clean_env, read_rows, torchrun

pytestmark = pytest.mark.slow
pytest.importorskip("timm")
pytest.importorskip("sentence_transformers")
pytest.importorskip("open_clip")

TIMEOUT_S = 300
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COMMON = (
    "train.steps=3",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "log.every=1",
    "log.progress=false",
    "checkpoint.every=0",
    "wandb.mode=disabled",
    "dist.timeout_s=120",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("zoo")
    pairs = make_digits_pairs(tmp / "pairs", size=16, shards=4, limit=120, heldout=0.25)
    return {
        **pairs,
        "bert": make_tiny_text_model(tmp / "bert", max_length=32),
        "open_clip": zoo_cases.tiny_open_clip_dir(tmp / "open_clip"),
        "tmp": tmp,
    }


def _run(cmd: list[str], tmp: Path) -> str:
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(tmp), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return proc.stdout


def _train_and_export(name: str, files: dict[str, Path], args: list[str]) -> tuple[Path, Path]:
    tmp = files["tmp"]
    out, exported = tmp / name, tmp / f"{name}-export"
    _run([*torchrun(2), *COMMON, *args, f"output_dir={out}"], tmp)
    printed = _run(
        [sys.executable, "-m", "dist_infonce.export", str(out), "--out", str(exported)], tmp
    )
    assert "export.json" not in printed and printed.strip()  # one load line per folder
    return out, exported


def _heldout(path: Path, cfg: Any) -> tuple[torch.Tensor, Any, list[str], list[int]]:
    """The held-out images and captions of ``path`` as the trainer's evaluation
    preprocesses them for the run of ``cfg``."""
    from dist_infonce.trainer.heldout import _heldout_source
    from dist_infonce.trainer.views import stack

    source = _heldout_source(replace(cfg, eval=replace(cfg.eval, path=str(path))))
    s = source.eval_samples(1000)
    texts = [k.decode() if isinstance(k, bytes) else k for k in s.keys1]
    return stack(s.x0), stack(s.x1), texts, s.labels


def test_timm_and_hf_towers_cached_with_evaluation_and_export(files: dict[str, Path]) -> None:
    import timm
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from dist_infonce.trainer.export import load_learner

    args = [
        *zoo_cases.zoo_overrides(str(files["bert"])),
        "data.name=webdataset",
        f"data.path={files['shards']}",
        "data.columns=[png,txt]",
        "data.label_column=cls",
        f"eval.path={files['heldout_shards']}",
        f"eval.zeroshot_classes=[{','.join(DIGITS)}]",
        "eval.prompt=a photo of the digit {}",
        "eval.every=2",
        "train.micro_batch_size=3",
        "model.grad_checkpointing=true",
    ]
    out, exported = _train_and_export("timm-hf", files, args)
    evals = {r["step"]: r for r in read_rows(out) if "eval/time_s" in r}
    assert sorted(evals) == [2, 3]  # every 2 steps, and after the last
    for row in evals.values():
        for k in (1, 5, 10):
            for d in ("", "_a2b", "_b2a"):
                assert 0 <= row[f"eval/recall@{k}{d}"] <= 1
        for key in ("eval/zeroshot_acc", "eval/zeroshot_top5", "eval/linear_acc", "eval/knn_acc"):
            assert 0 <= row[key] <= 1, key
    manifest = json.loads((exported / "export.json").read_text())
    assert {k: v["library"] for k, v in manifest["towers"].items()} == {
        "tower0": "timm",
        "tower1": "hf",
    }

    learner, cfg, _ = load_learner(out)
    images, texts_in, texts, labels = _heldout(files["heldout_shards"], cfg)
    prompts = [f"a photo of the digit {d}" for d in DIGITS]
    with torch.no_grad():
        e_img, e_txt = learner.model.embed(images, 0), learner.model.embed(texts_in, 1)
        got = timm.create_model(f"local-dir:{exported / 'tower0'}", pretrained=True).eval()(images)
        same_arch = timm.create_model(
            "vit_tiny_patch16_224",
            checkpoint_path=str(exported / "tower0" / "model.safetensors"),
            num_classes=8,
            **zoo_cases.TIMM_KWARGS,
        ).eval()(images)
    assert (got - e_img).abs().max() <= 1e-6 * e_img.abs().max()
    assert (same_arch - e_img).abs().max() <= 1e-6 * e_img.abs().max()
    st = SentenceTransformer(str(exported / "tower1"), device="cpu")
    got_txt = st.encode(texts, convert_to_tensor=True)
    assert (got_txt - F.normalize(e_txt, dim=-1)).abs().max() <= 1e-6
    AutoModel.from_pretrained(str(exported / "tower1"))
    # The logged zero-shot accuracy of the last step, recomputed from the exports alone.
    classes = st.encode(prompts, convert_to_tensor=True)
    pred = (F.normalize(got, dim=-1) @ classes.T).argmax(1)
    acc = (pred == torch.tensor(labels)).float().mean().item()
    assert acc == pytest.approx(evals[3]["eval/zeroshot_acc"], abs=1e-6)


def test_open_clip_locked_image_tower_and_export(files: dict[str, Path]) -> None:
    import math

    import open_clip

    from dist_infonce.trainer.export import load_learner

    args = [
        f"model.name=open_clip:local-dir:{files['open_clip']}",
        "data.name=table",
        f"data.path={files['table']}",
        f"data.image_root={files['images']}",
        "data.columns=[image,caption]",
        "loss.kind=clip",
        "loss.learn_temperature=true",
        "model.freeze=[0]",
        "train.lr=0.01",
    ]
    # Known initial weights: OpenCLIP loads them from the local-dir folder.
    initial, _, _ = open_clip.create_model_and_transforms(f"local-dir:{files['open_clip']}")
    torch.save(initial.state_dict(), files["open_clip"] / "open_clip_pytorch_model.bin")
    out, exported = _train_and_export("open-clip", files, args)
    learner, cfg, _ = load_learner(out)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{exported / 'encoder'}")
    model.eval()
    for (name, p), (_, p0) in zip(
        model.named_parameters(), initial.named_parameters(), strict=True
    ):
        if name.startswith("visual."):
            assert torch.equal(p, p0), f"{name} trained although locked"
    text_moved = [
        n
        for (n, p), (_, p0) in zip(
            model.named_parameters(), initial.named_parameters(), strict=True
        )
        if n.startswith("transformer.") and not torch.equal(p, p0)
    ]
    assert text_moved
    images, tokens, texts, _ = _heldout(files["heldout_table"], cfg)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{exported / 'encoder'}")
    with torch.no_grad():
        assert (model.encode_image(images) - learner.model.embed(images, 0)).abs().max() <= 1e-6
        assert (
            model.encode_text(tokenizer(texts)) - learner.model.embed(tokens, 1)
        ).abs().max() <= 1e-6
    assert model.logit_scale.item() == pytest.approx(math.log(1 / learner.temperature), rel=1e-6)


def test_shared_hf_encoder_sentence_pairs_and_export(files: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    from dist_infonce.trainer.export import load_learner
    from dist_infonce.trainer.views import stack
    from dist_infonce.trainer.zoo_hf import HFTokenize

    table = files["tmp"] / "qa.csv"
    lines = ["question,answer"] + [
        f"{a},{b}"
        for a, b in zip(zoo_cases.TEXTS, zoo_cases.TEXTS[1:] + zoo_cases.TEXTS[:1], strict=True)
    ] * 4
    table.write_text("\n".join(lines) + "\n")
    args = [
        f"model.name=hf:{files['bert']}",
        "model.pooling=cls",
        "model.projection=none",
        "data.name=table",
        f"data.path={table}",
        "data.columns=[question,answer]",
        "loss.kind=info_nce",
        "train.batch_size=4",
    ]
    out, exported = _train_and_export("shared-hf", files, args)
    learner, cfg, _ = load_learner(out)
    assert cfg.model.pooling == "cls"
    tokenize = HFTokenize(str(files["bert"]), max_length=cfg.model.max_length)
    with torch.no_grad():
        want = learner.model.embed(stack([tokenize(t) for t in zoo_cases.TEXTS]), 0)
    st = SentenceTransformer(str(exported / "encoder"), device="cpu")
    got = st.encode(list(zoo_cases.TEXTS), convert_to_tensor=True)
    assert (got - F.normalize(want, dim=-1)).abs().max() <= 1e-6
