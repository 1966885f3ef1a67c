"""cached_backward in one process: float64 equality with plain autograd over the same
micro-batch forwards (dropout replayed, BatchNorm buffers, towers, scalars, scaler)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from dist_infonce import InfoNCE, NTXent, cached_backward
from tests.conftest import record_error


class Encoder(nn.Module):
    """MLP with dropout and LayerNorm (the RNG must be replayed for exactness)."""

    def __init__(self, d_in: int, d_out: int = 6, p: float = 0.3, norm: str = "layer") -> None:
        super().__init__()
        norm_layer = nn.LayerNorm(16) if norm == "layer" else nn.BatchNorm1d(16)
        self.net = nn.Sequential(
            nn.Linear(d_in, 16), norm_layer, nn.ReLU(), nn.Dropout(p), nn.Linear(16, d_out)
        ).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Shared(nn.Module):
    """One encoder for both views (SimCLR)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__()
        self.enc = Encoder(5, **kw)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.enc(x0), self.enc(x1)


class TwoTower(nn.Module):
    def __init__(self, scalar: bool = False, **kw: Any) -> None:
        super().__init__()
        self.a, self.b = Encoder(5, **kw), Encoder(3, **kw)
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64)) if scalar else None

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.logit_scale is None:
            return self.a(x0), self.b(x1)
        # OpenCLIP's CLIP returns its logit scale next to the features.
        return self.a(x0), self.b(x1), self.logit_scale.exp()


def plain(
    model: Callable[..., Any], loss_fn: Callable[..., torch.Tensor], inputs: tuple, micro: int
) -> torch.Tensor:
    """The reference: the same micro-batch forwards, kept in one graph; one backward."""
    outs = [model(*chunk) for chunk in zip(*(x.split(micro) for x in inputs), strict=True)]
    joined = [
        torch.cat([o[k] for o in outs]) if outs[0][k].dim() else outs[0][k]
        for k in range(len(outs[0]))
    ]
    loss = loss_fn(*joined)
    loss.backward()
    return loss.detach()


def data(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 5, generator=g, dtype=torch.float64),
        torch.randn(b, 3, generator=g, dtype=torch.float64),
    )


def compare(
    family: str, got: nn.Module, ref: nn.Module, tol: float = 1e-12, floor: float = 1.0
) -> None:
    for (name, p), (_, r) in zip(got.named_parameters(), ref.named_parameters(), strict=True):
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is not None:
            assert record_error(family, p.grad, r.grad, floor) < tol, name


def run_both(
    make_model: Callable[[], nn.Module],
    loss_fn: nn.Module,
    inputs: tuple,
    micro: int,
    seed: int = 3,
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = make_model()
    ref_model, ref_loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    torch.manual_seed(seed)
    loss = cached_backward(model, loss_fn, inputs, micro)
    rng_after = torch.get_rng_state()
    torch.manual_seed(seed)
    ref = plain(ref_model, ref_loss_fn, inputs, micro)
    # The generators end where the plain forwards leave them.
    assert torch.equal(rng_after, torch.get_rng_state())
    assert record_error("cache: loss vs plain (float64)", loss, ref) < 1e-12
    if not isinstance(loss_fn, nn.Module):
        return [model, loss_fn], [ref_model, ref_loss_fn], loss, ref  # type: ignore[return-value]
    return (
        nn.ModuleList([model, loss_fn]),
        nn.ModuleList([ref_model, ref_loss_fn]),
        loss,
        ref,
    )


@pytest.mark.parametrize("micro", [1, 3, 4, 10, 64])
def test_shared_encoder_nt_xent_with_dropout(micro: int) -> None:
    x0, _ = data(10)
    x1 = x0 + 0.1 * torch.randn_like(x0)
    got, ref, *_ = run_both(Shared, NTXent(0.3, learn_temperature=True), (x0, x1), micro)
    compare("cache: grads vs plain, dropout (float64)", got, ref)


@pytest.mark.parametrize("micro", [2, 3, 7])
@pytest.mark.parametrize("chunk", [None, 4])
def test_two_tower_clip_learnable_temperature(micro: int, chunk: int | None) -> None:
    loss_fn = InfoNCE(0.2, symmetric=True, learn_temperature=True, chunk_size=chunk)
    got, ref, *_ = run_both(TwoTower, loss_fn, data(11), micro)
    compare("cache: grads vs plain, dropout (float64)", got, ref)
    assert got[1].logit_scale.grad is not None


def test_batchnorm_buffers_updated_once_per_micro_batch() -> None:
    make = lambda: TwoTower(norm="batch", p=0.0)
    got, ref, *_ = run_both(make, InfoNCE(0.2, symmetric=True), data(11), 3)
    compare("cache: grads vs plain, BatchNorm (float64)", got, ref)
    for (name, b), (_, r) in zip(got.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(b, r), name
    bn = got[0].a.net[1]
    assert int(bn.num_batches_tracked) == 4  # ceil(11 / 3) micro-batches, once each


def test_scalar_output_gradient_counted_once() -> None:
    def loss_fn(za: torch.Tensor, zb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        za, zb = nn.functional.normalize(za, dim=-1), nn.functional.normalize(zb, dim=-1)
        logits = scale * za @ zb.T
        labels = torch.arange(len(za))
        return nn.functional.cross_entropy(logits, labels)

    make = lambda: TwoTower(scalar=True)
    torch.manual_seed(0)
    model = make()
    ref_model = copy.deepcopy(model)
    torch.manual_seed(1)
    cached_backward(model, loss_fn, data(9), 2)
    torch.manual_seed(1)
    plain(ref_model, loss_fn, data(9), 2)
    compare("cache: grads vs plain, scalar output (float64)", model, ref_model)
    assert model.logit_scale.grad.abs() > 0


def test_frozen_tower_is_not_rerun() -> None:
    torch.manual_seed(0)
    tower_a, tower_b = Encoder(5), Encoder(3)
    tower_b.requires_grad_(False)
    ref_a, ref_b = copy.deepcopy(tower_a), copy.deepcopy(tower_b)
    calls = {"a": 0, "b": 0}
    tower_a.register_forward_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    tower_b.register_forward_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    loss_fn = InfoNCE(0.2, symmetric=True)
    x0, x1 = data(10)
    torch.manual_seed(5)
    cached_backward((tower_a, tower_b), loss_fn, (x0, x1), 4)
    assert calls == {"a": 6, "b": 3}  # 3 micro-batches: a twice, b (frozen) once
    torch.manual_seed(5)
    outs_a = torch.cat([ref_a(c) for c in x0.split(4)])
    outs_b = torch.cat([ref_b(c) for c in x1.split(4)])
    loss_fn(outs_a, outs_b).backward()
    compare("cache: grads vs plain, towers (float64)", tower_a, ref_a)


def test_frozen_tower_batchnorm_updated_once_per_micro_batch() -> None:
    """LiT: a frozen BatchNorm tower in train mode still tracks its running statistics
    (pass 2 skips it, so its pass-1 forward is the one that counts)."""
    torch.manual_seed(0)
    tower_a, tower_b = Encoder(5, norm="batch"), Encoder(3, norm="batch", p=0.0)
    tower_b.requires_grad_(False)
    ref_a, ref_b = copy.deepcopy(tower_a), copy.deepcopy(tower_b)
    loss_fn = InfoNCE(0.2, symmetric=True)
    x0, x1 = data(10)
    torch.manual_seed(5)
    cached_backward((tower_a, tower_b), loss_fn, (x0, x1), 4)
    torch.manual_seed(5)
    outs_a = torch.cat([ref_a(c) for c in x0.split(4)])
    outs_b = torch.cat([ref_b(c) for c in x1.split(4)])
    loss_fn(outs_a, outs_b).backward()
    compare("cache: grads vs plain, towers (float64)", tower_a, ref_a)
    for got, ref in ((tower_a, ref_a), (tower_b, ref_b)):
        for (name, b), (_, r) in zip(got.named_buffers(), ref.named_buffers(), strict=True):
            assert torch.equal(b, r), name
    assert int(tower_b.net[1].num_batches_tracked) == 3  # ceil(10 / 4), as plain autograd


def test_frozen_tower_updating_shared_buffers_is_refused() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, affine=False).double()  # buffers only: shared, no parameters
    trained = nn.Sequential(nn.Linear(5, 4), bn).double()
    frozen = nn.Sequential(nn.Linear(5, 4), bn).double().requires_grad_(False)
    before = bn.running_mean.clone()
    x = data(6)[0]
    with pytest.raises(ValueError, match=r"inputs\[1\]\) is frozen .* updates buffers"):
        cached_backward((trained, frozen), lambda a, b: a.sum() + b.sum(), (x, x), 4)
    assert torch.equal(bn.running_mean, before)  # pass 1 undone before raising
    # Frozen before the re-run tower: the same refusal (the restore would drop its update).
    with pytest.raises(ValueError, match=r"inputs\[0\]\) is frozen .* updates buffers"):
        cached_backward((frozen, trained), lambda a, b: a.sum() + b.sum(), (x, x), 4)
    # A shared buffer the frozen tower leaves alone (eval mode) is fine.
    frozen_eval = nn.Sequential(frozen[0], _Eval(bn)).requires_grad_(False)
    cached_backward((trained, frozen_eval), lambda a, b: a.sum() + b.sum(), (x, x), 4)
    assert int(bn.num_batches_tracked) == 2  # the re-run tower's two micro-batches only


class _Eval(nn.Module):
    """Runs a shared BatchNorm in eval mode: it reads the buffers, never updates them."""

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.bn.running_mean, self.bn.running_var)


def test_towers_with_different_row_counts() -> None:
    """Explicit negatives: a second tower over M rows, its loss argument after the pairs."""
    torch.manual_seed(0)
    enc = Encoder(5)
    ref = copy.deepcopy(enc)
    loss_fn = InfoNCE(0.2)
    g = torch.Generator().manual_seed(1)
    q, k, neg = (torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (7, 7, 5))
    both = lambda a, b: (enc(a), enc(b))
    torch.manual_seed(2)
    cached_backward((both, enc), loss_fn, ((q, k), neg), 3)
    torch.manual_seed(2)
    outs = [(ref(a), ref(b)) for a, b in zip(q.split(3), k.split(3), strict=True)]
    zn = torch.cat([ref(c) for c in neg.split(3)])
    loss_fn(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), zn).backward()
    compare("cache: grads vs plain, towers (float64)", enc, ref)


def test_grad_scaler_scales_once() -> None:
    loss_fn = InfoNCE(0.2, symmetric=True, learn_temperature=True)
    torch.manual_seed(0)
    model = TwoTower(p=0.0)
    ref_model, ref_loss = copy.deepcopy(model), copy.deepcopy(loss_fn)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = cached_backward(model, loss_fn, data(8), 3, scaler=scaler)
    ref = cached_backward(ref_model, ref_loss, data(8), 3)
    assert torch.equal(loss, ref)  # returned unscaled
    for p, r in zip(
        [*model.parameters(), *loss_fn.parameters()],
        [*ref_model.parameters(), *ref_loss.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(p.grad, 1024.0 * r.grad, rtol=1e-12, atol=0)


def test_bf16_autocast_close_to_plain() -> None:
    """Pass 2 runs under the caller's autocast like pass 1. The loss gets the bf16
    outputs upcast to float32 (the reference does the same); the cached float32
    gradients are rounded to bf16 where they enter the model, as plain autograd's."""
    loss_fn = InfoNCE(0.2, symmetric=True)
    torch.manual_seed(0)
    model = TwoTower(p=0.0).float()
    ref_model = copy.deepcopy(model)
    x0, x1 = (x.float() for x in data(12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cached_backward(model, loss_fn, (x0, x1), 5)
        ref = plain(ref_model, lambda *z: loss_fn(*(t.float() for t in z)), (x0, x1), 5)
    assert abs(float(loss) - float(ref)) < 1e-6
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        err = record_error("cache: grads vs plain, bf16 autocast", p.grad, r.grad)
        assert err < 2e-2, name


def test_accumulates_into_existing_grads() -> None:
    torch.manual_seed(0)
    model = TwoTower(p=0.0)
    loss_fn = InfoNCE(0.2, symmetric=True)
    cached_backward(model, loss_fn, data(6), 4)
    once = [p.grad.clone() for p in model.parameters()]
    cached_backward(model, loss_fn, data(6), 4)
    for p, g in zip(model.parameters(), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("micro", [0, -1, 1.5, True, None])
def test_bad_micro_batch_size(micro: object) -> None:
    with pytest.raises(ValueError, match="micro_batch_size"):
        cached_backward(TwoTower(), InfoNCE(), data(4), micro)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    model, loss_fn = TwoTower(), InfoNCE()
    x0, x1 = data(4)
    with pytest.raises(ValueError, match=r"inputs: all tensors must have the same first"):
        cached_backward(model, loss_fn, (x0, x1[:3]), 2)
    with pytest.raises(ValueError, match=r"inputs is an empty batch"):
        cached_backward(model, loss_fn, (x0[:0], x1[:0]), 2)
    with pytest.raises(ValueError, match=r"inputs must be a Tensor or a non-empty tuple"):
        cached_backward(model, loss_fn, [x0, "x1"], 2)
    with pytest.raises(ValueError, match=r"inputs must hold one entry per tower"):
        cached_backward((model.a, model.b), loss_fn, x0, 2)


def test_bad_outputs() -> None:
    x0, x1 = data(5)
    wrong_rows = lambda a, b: (a[:1].repeat(3, 1), b)
    with pytest.raises(ValueError, match=r"model output 0 .* has 3 rows for a micro-batch of 2"):
        cached_backward(wrong_rows, InfoNCE(), (x0, x1[:, :5].contiguous()), 2)
    varying = lambda a, b: (a, b, a.sum())
    with pytest.raises(ValueError, match=r"0-dim but differs between micro-batches"):
        cached_backward(varying, lambda a, b, s: (a * b).sum() * s, (x0, x0), 2)
    with pytest.raises(ValueError, match=r"loss_fn must return a 0-dim tensor"):
        cached_backward(lambda a: a, lambda z: z, x0, 2)
    with pytest.raises(ValueError, match=r"model .* must return a Tensor or a tuple"):
        cached_backward(lambda a: [1, 2], lambda z: z, x0, 2)


def test_loss_module_behind_partial_with_labels() -> None:
    """SupCon labels bound with functools.partial: the module (and its temperature)
    is still found; gradients equal plain autograd."""
    labels = torch.tensor([3, 1, 3, 2, 1, 3, 7, 2, 2])
    loss_fn = functools.partial(InfoNCE(0.2, learn_temperature=True).double(), labels=labels)
    got, ref, *_ = run_both(TwoTower, loss_fn, data(9), 4)
    compare("cache: grads vs plain, labels (float64)", got[0], ref[0])
    t_got, t_ref = got[1].func.logit_scale.grad, ref[1].func.logit_scale.grad
    assert record_error("cache: grads vs plain, labels (float64)", t_got, t_ref) < 1e-12


class Recentre(nn.Module):
    """Reassigns its buffer in forward (DINO's centre), instead of updating in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(6, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x - self.center
        self.center = 0.5 * self.center + 0.5 * x.detach().mean(0)
        return y


def test_reassigned_buffer_restored_after_pass_1() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Encoder(5), Recentre())
    ref = copy.deepcopy(model)
    x = data(10)[0]
    loss_fn = lambda z: (z**2).sum() + z[:, 0].exp().sum()
    torch.manual_seed(3)
    cached_backward(model, loss_fn, x, 4)
    torch.manual_seed(3)
    plain(lambda c: (ref(c),), loss_fn, (x,), 4)
    compare("cache: grads vs plain, reassigned buffer (float64)", model, ref)
    torch.testing.assert_close(model[1].center, ref[1].center, rtol=0, atol=0)


def test_micro_batch_size_accepts_numpy_and_tensor_ints() -> None:
    import numpy as np

    torch.manual_seed(0)
    model = TwoTower(p=0.0)
    for micro in (np.int64(3), torch.tensor(3)):
        cached_backward(model, InfoNCE(0.2, symmetric=True), data(7), micro)  # type: ignore[arg-type]
