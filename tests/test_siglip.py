"""SigLIP's sigmoid loss in one process: dense and chunked vs an independent float64
reference and vs OpenCLIP's ``SigLipLoss``, gradients of x, y, t and b, labels, half
inputs, the module's learnable parameters, gradient caching, memory and errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_infonce import SigLIP, cached_backward, siglip_loss
from tests.conftest import record_error
from tests.reference import ref_siglip

# (kernel, chunk_size): the dense path, tiles that divide nothing, one tile for all.
KERNELS = [("dense", None), ("chunked", 3), ("chunked", 7), ("chunked", 64)]


def leaves(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    # y a noisy copy of x: positives score above negatives (a loss that is not flat).
    y = x + 0.7 * scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()


def scalars(t: float, b: float, dtype: torch.dtype = torch.float64):
    return (
        torch.tensor(t, dtype=dtype, requires_grad=True),
        torch.tensor(b, dtype=dtype, requires_grad=True),
    )


def value_and_grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    # A non-uniform cotangent for reduction="none": per-row weights reach every gradient.
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad((out.double() * w).sum(), inputs)]


def labels_of(n: int, seed: int) -> torch.Tensor:
    # Few classes, int64 values only an exact comparison tells apart.
    classes = torch.tensor([2**62, 2**62 + 1, -(2**63), 7], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed + 3)
    return classes[torch.randint(0, 4, (n,), generator=g)]


NAMES = ["loss", "grad x", "grad y", "grad t", "grad b"]


@pytest.mark.parametrize("kernel,chunk", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labeled", [False, True])
def test_matches_float64_reference(
    kernel: str, chunk: int | None, reduction: str, labeled: bool
) -> None:
    n, d = 13, 6
    x, y = leaves(n, d, seed=1)
    t, b = scalars(7.0, -3.0)
    labels = labels_of(n, 1) if labeled else None
    if labeled:
        assert labels.unique().numel() < n
    out = siglip_loss(
        x, y, t, b, labels=labels, reduction=reduction, kernel=kernel, chunk_size=chunk
    )
    got = value_and_grads(out, [x, y, t, b])
    ref = value_and_grads(ref_siglip(x, y, t, b, labels, reduction), [x, y, t, b])
    for name, a, e in zip(NAMES, got, ref, strict=True):
        assert a.dtype == torch.float64
        err = record_error(f"siglip {kernel} vs float64 reference", a, e)
        assert err <= 1e-12, f"{name}: {err:.2e}"


@pytest.mark.parametrize("kernel,chunk", KERNELS)
def test_unnormalised_inputs_large_logits(kernel: str, chunk: int | None) -> None:
    # normalize=False with norms ~3 and t = 20: |z| up to several hundred, where a
    # naive log(1 + exp(z)) overflows and log(1 + e) loses the small terms.
    x, y = leaves(11, 5, seed=2, scale=3.0)
    t, b = scalars(20.0, 4.0)
    out = siglip_loss(x, y, t, b, normalize=False, kernel=kernel, chunk_size=chunk)
    got = value_and_grads(out, [x, y, t, b])
    ref = value_and_grads(ref_siglip(x, y, t, b, normalize=False), [x, y, t, b])
    for name, a, e in zip(NAMES, got, ref, strict=True):
        err = record_error("siglip large logits vs float64 reference", a, e)
        assert err <= 1e-12, f"{name}: {err:.2e}"


@pytest.mark.parametrize("kernel,chunk", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_open_clip_siglip_loss(kernel: str, chunk: int | None, dtype: torch.dtype) -> None:
    loss_mod = pytest.importorskip("open_clip.loss")
    x, y = leaves(17, 8, seed=3, dtype=dtype)
    t, b = scalars(10.0, -10.0, dtype)
    # OpenCLIP's models normalise before the loss; its loss takes the features as given.
    peer = loss_mod.SigLipLoss()(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t, b)
    ref = value_and_grads(peer, [x, y, t, b])
    got = value_and_grads(siglip_loss(x, y, t, b, kernel=kernel, chunk_size=chunk), [x, y, t, b])
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    for name, a, e in zip(NAMES, got, ref, strict=True):
        assert a.dtype == dtype
        err = record_error(f"siglip vs OpenCLIP SigLipLoss ({dtype})", a, e)
        assert err <= tol, f"{name}: {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel,chunk", [("dense", None), ("chunked", 5)])
def test_half_inputs_accumulate_in_float32(
    dtype: torch.dtype, kernel: str, chunk: int | None
) -> None:
    # Pre-normalised inputs rounded to dtype, normalize=False: the reference sees the
    # same numbers, so this measures the accumulation, not the input rounding.
    g = torch.Generator().manual_seed(4)
    base = [F.normalize(torch.randn(21, 16, generator=g, dtype=torch.float64), dim=-1)] * 2
    base[1] = F.normalize(
        base[0] + 0.5 * torch.randn(21, 16, generator=g, dtype=torch.float64), dim=-1
    )
    x, y = (v.to(dtype).requires_grad_() for v in base)
    t, b = scalars(10.0, -10.0, torch.float32)
    out = siglip_loss(x, y, t, b, normalize=False, kernel=kernel, chunk_size=chunk)
    assert out.dtype == torch.float32
    got = value_and_grads(out, [x, y, t, b])
    x64, y64 = (v.detach().double().requires_grad_() for v in (x, y))
    t64, b64 = scalars(10.0, -10.0)
    ref = value_and_grads(ref_siglip(x64, y64, t64, b64, normalize=False), [x64, y64, t64, b64])
    for name, a, e in zip(NAMES, got, ref, strict=True):
        if name in ("grad x", "grad y"):
            assert a.dtype == dtype
            # Returned in the input dtype: its rounding (2^-8 bf16, 2^-11 fp16) plus float32.
            tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        else:
            tol = 1e-6
        err = record_error(f"siglip {kernel} half inputs vs float64 ({dtype})", a, e, floor=1e-6)
        assert err <= tol, f"{name}: {err:.2e}"


def test_partial_gradients_and_no_grad() -> None:
    # Only some inputs want a gradient (a frozen tower, a fixed float scale), and the
    # forward under no_grad: each path of the tiled kernel against the dense one.
    x, y = leaves(10, 4, seed=5)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    for kw in ({"kernel": "dense"}, {"kernel": "chunked", "chunk_size": 3}):
        out = siglip_loss(x, y.detach(), 5.0, b, reduction="sum", **kw)
        grads = torch.autograd.grad(out, [x, b])
        if kw["kernel"] == "dense":
            ref = [out.detach(), *grads]
            continue
        for a, e in zip([out.detach(), *grads], ref, strict=True):
            assert record_error("siglip partial gradients", a, e) <= 1e-12
    with torch.no_grad():
        value = siglip_loss(x, y, 5.0, -2.0, kernel="chunked", chunk_size=3)
    assert record_error("siglip no_grad", value, ref_siglip(x, y, 5.0, -2.0)) <= 1e-12


def test_one_element_tensor_scale_and_bias_get_gradients_in_their_shape() -> None:
    x, y = leaves(6, 3, seed=6)
    t = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    siglip_loss(x, y, t, b, kernel="chunked", chunk_size=4).backward()
    assert t.grad.shape == (1,) and b.grad.shape == (1,)
    t2, b2 = scalars(4.0, -1.0)
    ref_siglip(x, y, t2, b2).backward()
    assert record_error("siglip (1,) scalars", t.grad[0], t2.grad) <= 1e-12
    assert record_error("siglip (1,) scalars", b.grad[0], b2.grad) <= 1e-12


def test_module_owns_log_scale_and_bias() -> None:
    m = SigLIP().double()
    assert float(m.logit_scale.detach()) == pytest.approx(math.log(10.0))
    assert float(m.logit_bias.detach()) == -10.0
    assert float(m.scale) == pytest.approx(10.0) and float(m.temperature) == pytest.approx(0.1)
    x, y = leaves(9, 4, seed=7)
    m(x, y, labels=labels_of(9, 7)).backward()
    # d/d(log t) = t * d/dt, through the module's parametrisation (t: the float32
    # log 10 the parameter holds, exponentiated).
    scale = float(m.scale.detach())
    t, b = scalars(scale, -10.0)
    ref_siglip(x.detach(), y.detach(), t, b, labels_of(9, 7)).backward()
    assert record_error("SigLIP module grads", m.logit_scale.grad, scale * t.grad) <= 1e-12
    assert record_error("SigLIP module grads", m.logit_bias.grad, b.grad) <= 1e-12
    # The scale is clamped at 100 in the forward: beyond it the gradient stops.
    with torch.no_grad():
        m.logit_scale.fill_(math.log(1000.0))
    m.logit_scale.grad = None
    m(x, y).backward()
    assert float(m.scale) == pytest.approx(100.0)
    assert float(m.logit_scale.grad) == 0.0
    assert "learn=True" in repr(m) and "scale=100" in repr(m)


def test_module_fixed_scale_and_bias_and_options() -> None:
    m = SigLIP(5.0, -2.0, learn=False, kernel="chunked", chunk_size=3)
    assert list(m.parameters()) == []
    x, y = leaves(8, 4, seed=8)
    assert record_error("SigLIP fixed", m(x, y), ref_siglip(x, y, 5.0, -2.0)) <= 1e-12
    m.reduction = "none"
    assert m(x, y).shape == (8,)
    with pytest.raises(ValueError, match="reduction"):
        m.reduction = "avg"
    assert m.reduction == "none"
    with pytest.raises(ValueError, match="init_scale"):
        SigLIP(0.0)
    with pytest.raises(ValueError, match="init_bias"):
        SigLIP(init_bias=float("nan"))


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 4))
        self.b = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
        self.double()

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x0), self.b(x1)


@pytest.mark.parametrize("micro", [1, 4, 7])
@pytest.mark.parametrize("labeled", [False, True])
def test_cached_backward_equals_plain_backward(micro: int, labeled: bool) -> None:
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(14, 5, generator=g, dtype=torch.float64)
    x1 = torch.randn(14, 3, generator=g, dtype=torch.float64)
    labels = labels_of(14, 9) if labeled else None
    grads = []
    for cached in (False, True):
        torch.manual_seed(0)
        model, loss_fn = TwoTower(), SigLIP(kernel="chunked", chunk_size=5).double()
        torch.manual_seed(1)  # dropout masks: the same in both runs (replayed when cached)
        fn = functools.partial(loss_fn, labels=labels)
        if cached:
            loss = cached_backward(model, fn, (x0, x1), micro)
        else:
            out = model(x0, x1)
            loss = fn(*out)
            loss.backward()
        named = [*model.named_parameters(), *loss_fn.named_parameters()]
        grads.append((float(loss), {k: p.grad.clone() for k, p in named}))
    (ref_loss, ref), (loss, got) = grads
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    assert set(got) == set(ref) and "logit_bias" in got
    for k, e in ref.items():
        assert record_error("siglip cached_backward vs plain", got[k], e) <= 1e-12, k


def test_chunked_graph_saves_only_linear_memory() -> None:
    # Everything autograd keeps for backward, counted as it is saved: the inputs and
    # the forward's gradients U, V (2 x (N + M) x D), never an N x M matrix.
    n, d = 512, 8
    x, y = leaves(n, d, seed=10, dtype=torch.float32)
    t, b = scalars(10.0, -10.0, torch.float32)
    saved: list[int] = []

    def pack(v: torch.Tensor) -> torch.Tensor:
        saved.append(v.numel() * v.element_size())
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        loss = siglip_loss(x, y, t, b, kernel="chunked", chunk_size=64)
    assert sum(saved) < 16 * n * d * 4, f"saved {sum(saved)} bytes"
    assert sum(saved) < n * n * 4 / 4
    loss.backward()


def test_errors_name_the_argument() -> None:
    x, y = leaves(4, 3, seed=11)
    with pytest.raises(ValueError, match="same number of rows"):
        siglip_loss(x, y[:3], 10.0, -10.0)
    with pytest.raises(ValueError, match="y must have the same embedding dimension"):
        siglip_loss(x, torch.randn(4, 5, dtype=torch.float64), 10.0, -10.0)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        siglip_loss(x[0], y, 10.0, -10.0)
    with pytest.raises(ValueError, match="at least one row"):
        siglip_loss(x[:0], y[:0], 10.0, -10.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        siglip_loss(x, y, -1.0, -10.0)
    with pytest.raises(ValueError, match="scale must be"):
        siglip_loss(x, y, torch.ones(2), -10.0)
    with pytest.raises(ValueError, match="bias must be finite"):
        siglip_loss(x, y, 10.0, float("inf"))
    with pytest.raises(ValueError, match="bias must be"):
        siglip_loss(x, y, 10.0, "b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must have dtype torch\.int64"):
        siglip_loss(x, y, 10.0, -10.0, labels=torch.zeros(4))
    with pytest.raises(ValueError, match="labels must have shape"):
        siglip_loss(x, y, 10.0, -10.0, labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction"):
        siglip_loss(x, y, 10.0, -10.0, reduction="avg")
    with pytest.raises(ValueError, match="kernel"):
        siglip_loss(x, y, 10.0, -10.0, kernel="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        siglip_loss(x, y, 10.0, -10.0, kernel="dense", chunk_size=4)
    with pytest.raises(ValueError, match="kernel='triton' takes float32"):
        siglip_loss(x, y, 10.0, -10.0, kernel="triton")
