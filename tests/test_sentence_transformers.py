"""The sentence-transformers adapter (dist_infonce.integrations.sentence_transformers).

- On 2 real gloo ranks (torchrun), SentenceTransformerTrainer with InfoNCELoss
  (learnable scale, hard negatives; with and without gradient caching) trains a tiny
  SentenceTransformer to the same parameters, scale and logged losses as one process
  on the same global batches (tests/st_train.py).
- In one process: the loss equals sentence-transformers' own
  MultipleNegativesRankingLoss (same scale, same columns); under caching the gradients
  it hands to the trainer's ``backward()`` are the plain ones times the trainer's scale.
- The library imports no sentence_transformers at import time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.make_tiny_text_model import make_tiny_text_model
from tests.test_train import REPO, clean_env, torchrun

pytest.importorskip("sentence_transformers")

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def st_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT (dropout 0) with mean pooling, saved as a SentenceTransformer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tmp = tmp_path_factory.mktemp("st")
    bert = make_tiny_text_model(tmp / "bert")
    t = Transformer(str(bert), max_seq_length=16)
    out = tmp / "model"
    SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), "mean")]).save(str(out))
    return out


def _train(tmp: Path, name: str, nproc: int, *args: str) -> dict:
    out = tmp / f"{name}.pt"
    script = [str(REPO / "tests" / "st_train.py"), "--out", str(out), *args]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:  # torchrun with a script instead of the trainer's module
        cmd = [*torchrun(nproc)[:-2], *script]
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(tmp), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_ranks_train_like_one_process(st_model: Path, tmp_path: Path) -> None:
    common = ["--model", str(st_model), "--learn-scale", "--steps", "3"]
    ref = _train(tmp_path, "one", 1, *common, "--batch", "8")
    for name, extra in (("cached", ["--micro", "3"]), ("plain", [])):
        got = _train(tmp_path, name, 2, *common, "--batch", "4", *extra)
        keys = [k for k, v in ref["params"].items() if v.is_floating_point()]
        diff = max((got["params"][k] - ref["params"][k]).abs().max().item() for k in keys)
        assert diff <= 2e-6, (name, diff)  # fp32 rounding; the updates are ~0.15
        assert abs(got["scale"] - ref["scale"]) <= 1e-5 * ref["scale"], name
        assert got["scale"] != pytest.approx(10.0, abs=1e-3)  # the scale was learnt
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), name


def _features(model: torch.nn.Module, texts: list[list[str]]) -> list[dict]:
    return [model.tokenize(column) for column in texts]


COLUMNS = [
    ["a photo of the digit one", "a photo of a cat", "what is the capital of france"],
    ["the digit one", "a picture of a cat", "paris is the capital of france"],
    ["a photo of the digit two", "a picture of a dog on the grass", "how do I train a model"],
]


def test_equals_multiple_negatives_ranking_loss(st_model: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from dist_infonce.integrations.sentence_transformers import InfoNCELoss

    model = SentenceTransformer(str(st_model), device="cpu")
    ours = InfoNCELoss(model, scale=20.0)(_features(model, COLUMNS))
    theirs = MultipleNegativesRankingLoss(model, scale=20.0)(_features(model, COLUMNS), None)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)


def test_cached_gradients_carry_the_trainers_scale(st_model: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from dist_infonce.integrations.sentence_transformers import InfoNCELoss

    model = SentenceTransformer(str(st_model), device="cpu")
    plain = InfoNCELoss(model, scale=20.0, learn_scale=True)
    plain(_features(model, COLUMNS)).backward()
    expected = {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}
    plain.zero_grad(set_to_none=True)
    cached = InfoNCELoss(model, scale=20.0, learn_scale=True, micro_batch_size=2)
    before = {n: torch.full_like(p, 0.25) for n, p in cached.named_parameters()}
    for n, p in cached.named_parameters():
        p.grad = before[n].clone()  # what an earlier accumulation step left
    loss = cached(_features(model, COLUMNS))
    # The gradients are handed over in backward(): untouched until then.
    assert all(torch.equal(p.grad, before[n]) for n, p in cached.named_parameters())
    (0.5 * loss).backward()  # e.g. gradient accumulation over 2 steps
    assert set(expected) <= {n for n, _ in cached.named_parameters()}
    for n, p in cached.named_parameters():
        want = before[n] + 0.5 * expected[n] if n in expected else before[n]
        assert torch.allclose(p.grad, want, atol=1e-6), n


def test_library_imports_no_sentence_transformers() -> None:
    code = (
        "import sys, dist_infonce, dist_infonce.integrations.sentence_transformers, "
        "dist_infonce.trainer.trainer\n"
        "bad = [m for m in ('sentence_transformers', 'transformers', 'timm', 'open_clip') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
