"""Bad input: a ValueError that names the argument and what was expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from dist_infonce import InfoNCE, NTXent, info_nce, nt_xent

Q = torch.randn(4, 3)
K = torch.randn(4, 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"query": torch.randn(4)}, r"query must have 2 dimensions, shape \(N, D\); got shape \(4,\)"),
        ({"positive_key": torch.randn(4, 3, 1)}, r"positive_key must have 2 dimensions"),
        ({"query": [[1.0, 2.0]]}, r"query must be a torch.Tensor of shape \(N, D\), got list"),
        ({"query": torch.ones(4, 3, dtype=torch.long)}, r"query must be a floating-point tensor"),
        ({"positive_key": torch.randn(5, 3)}, r"query and positive_key must have the same number of rows N, got 4 and 5"),
        ({"positive_key": torch.randn(4, 2)}, r"positive_key must have the same embedding dimension as query: got D=2 and D=3"),
        ({"positive_key": K.double()}, r"positive_key must have the dtype of query"),
        ({"negative_keys": torch.randn(6, 2)}, r"negative_keys must have the same embedding dimension as query"),
        ({"negative_keys": torch.randn(4, 2, 3)}, r"negative_keys must have 2 dimensions, shape \(M, D\) for negative_mode='unpaired'"),
        ({"negative_keys": torch.randn(6, 3), "negative_mode": "paired"}, r"negative_keys must have 3 dimensions, shape \(N, M, D\) for negative_mode='paired'"),
        ({"negative_keys": torch.randn(5, 2, 3), "negative_mode": "paired"}, r"one set per query: shape \(N=4, M, D\), got \(5, 2, 3\)"),
        ({"negative_keys": torch.randn(4, 0, 3), "negative_mode": "paired"}, r"negative_keys must have at least one negative per query"),
        ({"negative_keys": torch.randn(0, 3)}, r"negative_keys must have at least one row"),
        ({"negative_mode": "mixed"}, r"negative_mode must be one of \('unpaired', 'paired'\), got 'mixed'"),
        ({"reduction": "avg"}, r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"),
        ({"temperature": 0.0}, r"temperature must be > 0 and finite, got 0.0"),
        ({"temperature": -0.1}, r"temperature must be > 0 and finite, got -0.1"),
        ({"temperature": math.inf}, r"temperature must be > 0 and finite, got inf"),
        ({"temperature": math.nan}, r"temperature must be > 0 and finite, got nan"),
        ({"temperature": torch.tensor(-1.0)}, r"temperature must be > 0 and finite, got -1.0"),
        ({"temperature": torch.tensor([0.1, 0.2])}, r"temperature must be .* one-element floating-point tensor, got a tensor of shape \(2,\)"),
        ({"temperature": "0.1"}, r"temperature must be a positive finite float .*, got str"),
        ({"temperature": True}, r"temperature must be a positive finite float .*, got bool"),
        ({"temperature": np.bool_(True)}, r"temperature must be a positive finite float .*, got bool$"),
        ({"temperature": torch.tensor([1])}, r"one-element floating-point tensor, got a tensor of shape \(1,\) and dtype torch.int64"),
        ({"temperature": np.float32(-0.2)}, r"temperature must be > 0 and finite, got -0.2"),
        ({"symmetric": True, "negative_keys": torch.randn(6, 3)}, r"symmetric=True .* negative_keys must be None"),
        ({"query": torch.randn(0, 3), "positive_key": torch.randn(0, 3)}, r"query must have at least one row, got 0"),
        ({"query": torch.randn(4, 0), "positive_key": torch.randn(4, 0)}, r"query must have an embedding dimension D >= 1"),
        ({"chunk_size": 0}, r"chunk_size must be None or a positive int, got 0"),
        ({"chunk_size": 2.5}, r"chunk_size must be None or a positive int, got 2.5"),
    ],
)  # fmt: skip
def test_info_nce_bad_input(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"query": Q, "positive_key": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        info_nce(**args)


@pytest.mark.parametrize(
    "z1,z2,kwargs,match",
    [
        (torch.randn(4), K, {}, r"z1 must have 2 dimensions"),
        (Q, torch.randn(5, 3), {}, r"z1 and z2 must have the same number of rows N, got 4 and 5"),
        (Q, torch.randn(4, 2), {}, r"z2 must have the same embedding dimension as z1"),
        (torch.randn(0, 3), torch.randn(0, 3), {}, r"z1 must have at least one row"),
        (Q, K, {"temperature": 0}, r"temperature must be > 0"),
        (Q, K, {"reduction": None}, r"reduction must be one of"),
    ],
)  # fmt: skip
def test_nt_xent_bad_input(z1: Any, z2: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nt_xent(z1, z2, **kwargs)


def test_module_arguments_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        InfoNCE(temperature=-1.0)
    with pytest.raises(ValueError, match="negative_mode must be one of"):
        InfoNCE(negative_mode="both")
    with pytest.raises(ValueError, match="reduction must be one of"):
        NTXent(reduction="average")
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        NTXent(chunk_size=-3)
    with pytest.raises(ValueError, match="symmetric=True"):
        InfoNCE(symmetric=True)(Q, K, torch.randn(2, 3))


def test_a_user_owned_temperature_tensor_is_rechecked_each_call() -> None:
    t = torch.tensor(0.1)
    loss = InfoNCE(temperature=t)
    loss(Q, K)
    t.fill_(0.0)
    with pytest.raises(ValueError, match=r"temperature must be > 0 and finite, got 0\.0"):
        loss(Q, K)
