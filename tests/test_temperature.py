"""The temperature as info-nce-pytorch users pass and change it: NumPy scalars, one-element
tensors, and ``module.temperature = value`` (schedules), against the peer and the float64
reference; a learnable temperature set by assignment."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dist_infonce import InfoNCE, NTXent, info_nce, nt_xent
from tests.conftest import record_error
from tests.reference import ref_nt_xent

info_nce_pkg = pytest.importorskip("info_nce")

# (name, a factory: every call a fresh temperature, so gradients never mix)
TEMPERATURES = {
    "np.float32": lambda: np.float32(0.2),
    "np.float64": lambda: np.float64(0.2),
    "np.int64": lambda: np.int64(2),
    "tensor (1,)": lambda: torch.tensor([0.2], dtype=torch.float64, requires_grad=True),
    "tensor (1, 1)": lambda: torch.tensor([[0.2]], dtype=torch.float64, requires_grad=True),
    "tensor ()": lambda: torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
}
MODES = {"in-batch": (None, "unpaired"), "unpaired": ((6, 5), "unpaired"), "paired": ((9, 4, 5), "paired")}  # fmt: skip


def inputs(mode: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape, _ = MODES[mode]
    xs = [torch.randn(9, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    if shape is not None:
        xs.append(torch.randn(*shape, generator=g, dtype=torch.float64))
    return [x.requires_grad_() for x in xs]


def value_and_grads(out: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad((out * w).sum(), wrt)]


def assert_same(family: str, ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape, (a.shape, b.shape)  # a tensor's gradient in its own shape
        assert record_error(family, a, b) <= 1e-12


@pytest.mark.parametrize("kind", list(TEMPERATURES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["function", "module"])
def test_temperature_types_match_info_nce_pytorch(
    kind: str, mode: str, reduction: str, form: str
) -> None:
    _, negative_mode = MODES[mode]
    results = []
    for impl in ("ours", "theirs"):
        xs, t = inputs(mode), TEMPERATURES[kind]()
        neg = xs[2] if len(xs) == 3 else None
        if form == "function":
            fn = info_nce if impl == "ours" else info_nce_pkg.info_nce
            out = fn(xs[0], xs[1], neg, t, reduction, negative_mode)
        else:
            cls = InfoNCE if impl == "ours" else info_nce_pkg.InfoNCE
            out = cls(t, reduction, negative_mode)(xs[0], xs[1], neg)
        tensors = [t] if isinstance(t, torch.Tensor) else []
        results.append(value_and_grads(out, xs + tensors))
    assert_same(f"temperature {kind} vs info-nce-pytorch", *results)


@pytest.mark.parametrize("kind", list(TEMPERATURES))
@pytest.mark.parametrize("form", ["function", "module"])
def test_nt_xent_takes_the_same_temperatures(kind: str, form: str) -> None:
    results = []
    for impl in ("ours", "reference"):
        xs, t = inputs("in-batch", 1), TEMPERATURES[kind]()
        if impl == "reference":
            # The reference divides by a 0-dim temperature; keep the user's tensor as
            # the leaf so that its gradient comes back in its own shape.
            ref_t = t.reshape(()) if isinstance(t, torch.Tensor) else float(t)
            out = ref_nt_xent(xs[0], xs[1], ref_t, reduction="none")
        elif form == "function":
            out = nt_xent(xs[0], xs[1], t, reduction="none")
        else:
            out = NTXent(t, reduction="none")(xs[0], xs[1])
        tensors = [t] if isinstance(t, torch.Tensor) else []
        results.append(value_and_grads(out, xs + tensors))
    assert_same(f"nt_xent temperature {kind} vs float64 reference", *results)


def test_float32_module_with_a_numpy_temperature_matches_the_peer() -> None:
    xs = [x.detach().float().requires_grad_() for x in inputs("unpaired", 2)]
    ours = value_and_grads(InfoNCE(np.float32(0.07))(*xs), xs)
    theirs = value_and_grads(info_nce_pkg.InfoNCE(np.float32(0.07))(*xs), xs)
    for a, b in zip(ours, theirs, strict=True):
        assert record_error("temperature np.float32, float32 inputs vs peer", a, b) <= 2e-6


@pytest.mark.parametrize("value", [0.3, np.float32(0.3), torch.tensor([0.3], dtype=torch.float64)])
def test_assigned_temperature_is_used_like_info_nce_pytorch(value: Any) -> None:
    # A schedule assigns the temperature between steps; every step must match the peer.
    ours, theirs = InfoNCE(0.1), info_nce_pkg.InfoNCE(0.1)
    for step, t in enumerate([0.1, value, 0.05]):
        ours.temperature, theirs.temperature = t, t
        xs = inputs("in-batch", 10 + step)
        a = value_and_grads(ours(*xs), xs)
        b = value_and_grads(theirs(*xs), xs)
        assert_same("assigned temperature vs info-nce-pytorch", a, b)
    assert math.isclose(float(ours.temperature), 0.05, rel_tol=1e-7)  # read back (float32)


def test_assigned_options_are_checked_and_used_like_info_nce_pytorch() -> None:
    ours, theirs = InfoNCE(0.2), info_nce_pkg.InfoNCE(0.2)
    ours.reduction = theirs.reduction = "none"
    ours.negative_mode = theirs.negative_mode = "paired"
    xs = inputs("paired", 3)
    assert_same(
        "assigned options vs info-nce-pytorch",
        value_and_grads(ours(*xs), xs),
        value_and_grads(theirs(*xs), xs),
    )
    with pytest.raises(ValueError, match="reduction must be one of"):
        ours.reduction = "avg"
    with pytest.raises(ValueError, match="power of two >= 16 with kernel='triton'"):
        NTXent(chunk_size=48).kernel = "triton"
    assert ours.reduction == "none"  # a refused value leaves the module as it was


@pytest.mark.parametrize("cls", [InfoNCE, NTXent])
def test_ntxent_and_infonce_temperature_assignment(cls: type[nn.Module]) -> None:
    mod = cls(0.5)
    xs = inputs("in-batch", 4)
    mod.temperature = np.float64(0.25)
    assert float(mod.temperature) == 0.25
    got = mod(*xs)
    ref = cls(0.25)(*xs)
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match=r"temperature must be > 0 and finite, got -1\.0"):
        mod.temperature = -1.0
    with pytest.raises(ValueError, match="one-element floating-point tensor"):
        mod.temperature = torch.tensor([0.1, 0.2])
    assert float(mod.temperature) == 0.25  # refused: unchanged


@pytest.mark.parametrize("cls", [InfoNCE, NTXent])
def test_assignment_sets_a_learnable_temperature_in_place(cls: type[nn.Module]) -> None:
    mod = cls(0.5, learn_temperature=True).double()
    param = mod.logit_scale
    opt = torch.optim.Adam(mod.parameters(), lr=0.1)
    xs = inputs("in-batch", 5)
    mod(*xs).backward()
    opt.step()
    state = {k: v.clone() for k, v in opt.state[param].items()}
    mod.temperature = torch.tensor([0.2], dtype=torch.float64)  # read once, not tracked
    assert mod.logit_scale is param and opt.state[param].keys() == state.keys()
    assert all(torch.equal(opt.state[param][k], v) for k, v in state.items())  # moments kept
    assert math.isclose(param.item(), math.log(5.0), rel_tol=1e-15)
    assert math.isclose(float(mod.temperature.detach()), 0.2, rel_tol=1e-15)
    # The forward and its gradient are those of a fixed temperature 0.2 (chain rule
    # through log(1 / t)).
    fixed = cls(0.2).double()
    assert record_error("learnable after assignment vs fixed", mod(*xs), fixed(*xs)) <= 1e-15
    # Past CLIP's clamp the value is stored but the forward uses 1/temperature = 100.
    mod.temperature = 0.001
    assert math.isclose(param.item(), math.log(1000.0), rel_tol=1e-15)
    clamped = cls(0.01).double()
    assert record_error("learnable after assignment vs fixed", mod(*xs), clamped(*xs)) <= 1e-15


def test_a_parameter_assigned_as_temperature_gets_its_gradient() -> None:
    # nn.Module would register an nn.Parameter under the name (and refuse: the
    # attribute exists); the temperature setter takes it like any tensor.
    mod = InfoNCE(0.1)
    t = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    mod.temperature = t
    xs = inputs("in-batch", 6)
    mod(*xs).backward()
    t_ref = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    info_nce_pkg.info_nce(*(x.detach() for x in xs), temperature=t_ref).backward()
    assert record_error("assigned Parameter temperature grad", t.grad, t_ref.grad) <= 1e-12


def test_fixed_temperature_reads_back_as_given_and_a_plain_tensor_stays_the_users() -> None:
    assert InfoNCE(0.1).temperature == 0.1 and isinstance(InfoNCE(0.1).temperature, float)
    t = torch.tensor(0.2)
    mod = InfoNCE(t).double()
    assert mod.temperature is t and t.dtype == torch.float32  # not registered: left alone
    assert list(mod.parameters()) == []


def test_parameter_temperature_is_registered_and_reassignable() -> None:
    t = nn.Parameter(torch.tensor(0.2))
    mod = InfoNCE(t)
    assert list(mod.parameters()) == [t]  # as info-nce-pytorch's module registers it
    assert mod.self_averaged_parameters() == [t]
    q, k = torch.randn(5, 4), torch.randn(5, 4)
    mod(q, k).backward()
    assert t.grad is not None and t.grad.shape == ()
    mod.temperature = 0.3  # a schedule replaces the parameter by a number
    assert mod.temperature == 0.3 and list(mod.parameters()) == []
    assert mod.self_averaged_parameters() == []
