"""cached_backward with dict inputs (``input_ids``, ``attention_mask``): split row-wise
key by key and passed as keyword arguments, for a plain model, towers and DDP (FSDP2:
tests/test_cache_fsdp.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_infonce import InfoNCE, cached_backward
from tests import dict_cases
from tests._world import Worlds
from tests.conftest import record_error
from tests.test_cache import TwoTower, compare, data
from tests.test_cache_dist import MICRO, SIZES, reference


class TextEncoder(nn.Module):
    """Token embeddings, dropout, the mean over unmasked tokens, a projection: a Hugging
    Face-style text tower that needs its mask."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.drop = nn.Dropout(0.3)
        self.proj = nn.Linear(8, dim)
        self.double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.embed(input_ids))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.proj((h * m).sum(1) / m.sum(1))


def tokens(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (b,), generator=g)
    return {
        "input_ids": torch.randint(0, 11, (b, 5), generator=g),
        "attention_mask": (torch.arange(5) < lengths[:, None]).long(),
    }


@pytest.mark.parametrize("micro", [1, 3, 8])
def test_text_tower_with_dict_inputs_beside_a_tensor_tower(micro: int) -> None:
    torch.manual_seed(0)
    text, image = TextEncoder(), nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.3)).double()
    loss_fn = InfoNCE(0.2, symmetric=True, learn_temperature=True).double()
    refs = copy.deepcopy(nn.ModuleList([text, image, loss_fn]))
    batch, pixels = tokens(8), data(8)[0]
    torch.manual_seed(4)
    loss = cached_backward([text, image], loss_fn, [batch, pixels], micro)
    torch.manual_seed(4)
    # The reference: the same micro-batch forwards (tower by tower), kept in one graph.
    parts = [
        refs[0](input_ids=i, attention_mask=m)
        for i, m in zip(
            batch["input_ids"].split(micro), batch["attention_mask"].split(micro), strict=True
        )
    ]
    zt = torch.cat(parts)
    zi = torch.cat([refs[1](c) for c in pixels.split(micro)])
    ref = refs[2](zt, zi)
    ref.backward()
    assert record_error("cache: loss vs plain (float64)", loss, ref) < 1e-12
    compare(
        "cache: grads vs plain, dict inputs (float64)", nn.ModuleList([text, image, loss_fn]), refs
    )
    assert text.embed.weight.grad.abs().sum() > 0


def test_dict_inputs_equal_positional_inputs() -> None:
    x0, x1 = data(7)
    got = TwoTower()
    want = copy.deepcopy(got)
    loss_a, loss_b = InfoNCE(0.2, symmetric=True), InfoNCE(0.2, symmetric=True)
    torch.manual_seed(1)
    cached_backward(got, loss_a, {"x1": x1, "x0": x0}, 3)  # keywords: any order
    torch.manual_seed(1)
    cached_backward(want, loss_b, (x0, x1), 3)
    for p, q in zip(got.parameters(), want.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_bad_dict_inputs() -> None:
    model, loss_fn = TwoTower(), InfoNCE()
    x0, x1 = data(4)
    with pytest.raises(ValueError, match=r"same first dimension B, got \{'x0': 4, 'x1': 3\}"):
        cached_backward(model, loss_fn, {"x0": x0, "x1": x1[:3]}, 2)
    with pytest.raises(
        ValueError, match=r"every value of a dict of inputs must be a Tensor.*'x1': 'list'"
    ):
        cached_backward(model, loss_fn, {"x0": x0, "x1": [1, 2]}, 2)
    with pytest.raises(ValueError, match=r"at least one entry and str keys"):
        cached_backward(model, loss_fn, {}, 2)
    with pytest.raises(ValueError, match=r"inputs\[1\]: a dict of inputs needs .* str keys"):
        cached_backward([model.a, model.b], loss_fn, [x0, {0: x1}], 2)


def test_ddp_dict_inputs_equal_one_process(worlds: Worlds) -> None:
    sizes, seed, p = SIZES[2], 11, 0.25
    res = worlds.run(2, dict_cases.ddp_dict_case, sizes, MICRO, seed, p)
    grads, _, _ = reference(sizes, seed, "layer", p, False, 1)
    for r in res:
        assert set(r) == set(grads)
        for name, g in grads.items():
            err = record_error("cache DDP: grads vs one process (float64)", r[name], g)
            assert err < 1e-12, name
