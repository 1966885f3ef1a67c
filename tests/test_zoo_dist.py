"""A timm image tower + a Hugging Face text tower (dict views: ids and attention mask)
trained as the trainer trains them, on real gloo worlds of 2 ranks with uneven batches:
one DDP step without and with gradient caching gives the gradients of one float64
process on the global batch (every parameter: both towers, the projections, the
learnable temperature). tests/zoo_cases.py holds the cases.
"""

from __future__ import annotations

import pytest

from examples.make_tiny_text_model import make_tiny_text_model
from tests import zoo_cases
from tests._world import Worlds
from tests.conftest import record_error

pytest.importorskip("timm")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_text_model(tmp_path_factory.mktemp("bert") / "bert", max_length=32))


@pytest.mark.parametrize("micro", [None, 2], ids=["plain", "cached-micro2"])
def test_ddp_step_equals_one_process(worlds: Worlds, hf_dir: str, micro: int | None) -> None:
    sizes, seed = [3, 5], 4
    res = worlds.run(2, zoo_cases.ddp_case, hf_dir, sizes, seed, micro)
    learner = zoo_cases.build(hf_dir, seed)
    images, texts = zoo_cases.global_batch(hf_dir, sum(sizes), seed)
    ref = learner(images, texts)
    ref.backward()
    expected = zoo_cases.grads(learner)
    assert any(n.startswith("model.tower0.") for n in expected)
    assert any(n.startswith("model.tower1.model.") for n in expected)
    assert "loss_fn.logit_scale" in expected
    assert not any("pooler" in n for n in expected)  # unused by the pooling: frozen
    family = "zoo towers DDP vs 1 process (float64)"
    mean = sum(r["loss"] for r in res) / len(res)
    assert abs(mean - ref.item()) <= 1e-12 * abs(ref.item())
    for rank, r in enumerate(res):
        assert set(r["grads"]) == set(expected)
        for name, want in expected.items():
            err = record_error(family, r["grads"][name], want, floor=1e-3)
            assert err <= 1e-9, f"rank {rank} {name}: {err:.2e}"
