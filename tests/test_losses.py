"""Single-process exactness: chunked vs dense vs an independent float64 reference,
parity with info-nce-pytorch, dtypes, temperatures, memory of the saved graph."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_infonce import InfoNCE, NTXent, info_nce, nt_xent
from tests.conftest import record_error
from tests.reference import ref_info_nce, ref_nt_xent

MODES = ["one", "sym", "unpaired", "paired", "ntxent"]


def make_inputs(
    mode: str, n: int, m: int, d: int, dtype: torch.dtype, seed: int, scale: float = 1.0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return (
            (scale * torch.randn(*shape, generator=g, dtype=torch.float64))
            .to(dtype)
            .requires_grad_()
        )

    q, k = leaf(n, d), leaf(n, d)
    if mode == "unpaired":
        return [q, k, leaf(m, d)]
    if mode == "paired":
        return [q, k, leaf(n, m, d)]
    return [q, k]


def ours(mode: str, xs: list[torch.Tensor], t: torch.Tensor | float, **kw: object) -> torch.Tensor:
    if mode == "ntxent":
        return nt_xent(xs[0], xs[1], t, **kw)  # type: ignore[arg-type]
    neg = xs[2] if len(xs) == 3 else None
    return info_nce(
        xs[0], xs[1], neg, t, negative_mode="paired" if mode == "paired" else "unpaired",
        symmetric=mode == "sym", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def reference(
    mode: str, xs: list[torch.Tensor], t: torch.Tensor | float, **kw: object
) -> torch.Tensor:
    if mode == "ntxent":
        return ref_nt_xent(xs[0], xs[1], t, **kw)  # type: ignore[arg-type]
    neg = xs[2] if len(xs) == 3 else None
    return ref_info_nce(
        xs[0], xs[1], neg, t, negative_mode="paired" if mode == "paired" else "unpaired",
        symmetric=mode == "sym", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def value_and_grads(
    fn, mode: str, xs: list[torch.Tensor], t: torch.Tensor, reduction: str, **kw: object
) -> list[torch.Tensor]:
    out = fn(mode, xs, t, reduction=reduction, **kw)
    # A fixed random cotangent makes reduction="none" exercise per-row gradients.
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    grads = torch.autograd.grad((out.double() * w).sum(), [*xs, t])
    return [out.detach(), *grads]


# ------------------------------------------------------- chunked vs dense vs float64


def xs_rows(mode: str, n: int) -> int:
    return 2 * n if mode == "ntxent" else n


def max_abs_logit(xs: list[torch.Tensor], temperature: float, normalize: bool) -> float:
    """Bound on |logit| by Cauchy-Schwarz: max norm of queries x max norm of keys / t."""

    def norm(x: torch.Tensor) -> float:
        return 1.0 if normalize else float(x.detach().norm(dim=-1).max())

    return max(norm(xs[0]), norm(xs[1])) * max(norm(x) for x in xs) / temperature


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    n=st.integers(1, 23),
    m=st.integers(1, 19),
    d=st.integers(1, 9),
    chunk=st.integers(1, 30),
    temperature=st.sampled_from([0.01, 0.05, 0.1, 0.5, 2.0]),
    normalize=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scale=st.sampled_from([0.3, 1.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_chunked_and_dense_match_float64_reference(
    mode: str, n: int, m: int, d: int, chunk: int, temperature: float,
    normalize: bool, reduction: str, scale: float, seed: int,
) -> None:  # fmt: skip
    # Temperatures from 0.01 to 2 and unnormalised inputs of scale up to 4 cover
    # both kernel paths (fixed shift for bounded logits, online max otherwise).
    x64 = make_inputs(mode, n, m, d, torch.float64, seed, scale)
    t64 = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    ref = value_and_grads(reference, mode, x64, t64, reduction, normalize=normalize)
    for chunk_size in (None, chunk):
        got = value_and_grads(
            ours, mode, x64, t64, reduction, normalize=normalize, chunk_size=chunk_size
        )
        for g, r in zip(got, ref, strict=True):
            assert record_error(f"float64 vs reference ({mode})", g, r) <= 1e-9

    x32 = [x.detach().float().requires_grad_() for x in x64]
    t32 = torch.tensor(temperature, requires_grad=True)
    got = value_and_grads(ours, mode, x32, t32, reduction, normalize=normalize, chunk_size=chunk)
    # The float64 comparison above is the exactness proof. This one is about
    # stability: float32 rounds a logit s to ~6e-8 |s| and logits reach
    # |s| = 16 / 0.01, an absolute error every float32 implementation carries.
    # Gradients are sums of terms of size ~|s| (per row; the temperature's ~|s|/t)
    # that may cancel exactly (d = 1), so each is measured against that scale.
    s_max = max_abs_logit(x64, temperature, normalize)
    rows = 1.0 if reduction == "mean" else float(xs_rows(mode, n))
    tol = 2e-6 * max(s_max, 50.0)
    floors = [rows] + [rows * s_max] * (len(got) - 2) + [rows * s_max / temperature]
    for g, r, floor in zip(got, ref, floors, strict=True):
        assert record_error(f"float32 chunked vs float64 ref ({mode})", g, r, floor) <= tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.07, 0.01])
def test_chunked_float32_large_batch_matches_float64(mode: str, temperature: float) -> None:
    # Many tiles (and the online path at 0.01): accumulation error stays small.
    x64 = make_inputs(mode, 700, 300, 32, torch.float64, 0)
    t64 = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    ref = value_and_grads(reference, mode, x64, t64, "mean")
    x32 = [x.detach().float().requires_grad_() for x in x64]
    t32 = torch.tensor(temperature, requires_grad=True)
    got = value_and_grads(ours, mode, x32, t32, "mean", chunk_size=128)
    for g, r in zip(got, ref, strict=True):
        assert record_error(f"float32 chunked N=700 vs float64 ({mode})", g, r) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_half_inputs_accumulate_in_float32(dtype: torch.dtype, mode: str) -> None:
    # Inputs already L2-normalised and rounded to the half dtype, normalize=False:
    # the float64 reference sees exactly the same numbers, so only the
    # accumulation differs and float32 accuracy is expected, not half's.
    # (With normalize=True the normalised vectors are themselves rounded to the
    # input dtype, as F.normalize does.)
    xs = [
        F.normalize(x.detach().double(), dim=-1).to(dtype).requires_grad_()
        for x in make_inputs(mode, 40, 30, 16, dtype, 1)
    ]
    t = torch.tensor(0.1, requires_grad=True)
    got = value_and_grads(ours, mode, xs, t, "mean", chunk_size=16, normalize=False)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    t64 = t.detach().double().requires_grad_()
    ref = value_and_grads(reference, mode, x64, t64, "mean", normalize=False)
    assert got[0].dtype == torch.float32
    assert all(g.dtype == dtype for g in got[1:-1])
    assert record_error(f"{dtype} loss vs float64", got[0], ref[0]) <= 1e-6
    assert record_error(f"{dtype} temperature grad vs float64", got[-1], ref[-1]) <= 1e-5
    for g, r in zip(got[1:-1], ref[1:-1], strict=True):
        # The returned input gradients are rounded to the input dtype.
        assert record_error(f"{dtype} grads vs float64", g, r) <= (
            1e-2 if dtype == torch.bfloat16 else 2e-3
        )


def test_auto_chunk_size_picks_the_chunked_kernel_for_large_matrices() -> None:
    def kernels(n: int) -> set[str]:
        q, k = torch.randn(n, 4, requires_grad=True), torch.randn(n, 4)
        names, stack = set(), [info_nce(q, k).grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None:
                names.add(type(fn).__name__)
                stack.extend(f for f, _ in fn.next_functions)
        return names

    assert any("Chunked" in n for n in kernels(2100))
    assert not any("Chunked" in n for n in kernels(100))


@pytest.mark.parametrize("mode", ["one", "sym", "ntxent"])
def test_chunked_graph_saves_only_linear_memory(mode: str) -> None:
    # Everything autograd keeps for backward, counted as it is saved: the chunked
    # kernel must keep O((N + M) D) bytes, not the N x M logits.
    n, d = 3000, 8
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    xs = make_inputs(mode, n, n, d, torch.float32, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ours(mode, xs, 0.1, chunk_size=256)
    loss.backward()
    assert sum(saved) < 64 * n * d * 4, f"saved {sum(saved)} bytes"
    dense = n * n * 4
    assert sum(saved) < dense / 20


# ----------------------------------------------------------- info-nce-pytorch parity

info_nce_pkg = pytest.importorskip("info_nce")


@pytest.mark.parametrize("negative_mode", ["unpaired", "paired", "in-batch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_info_nce_pytorch(
    negative_mode: str, reduction: str, dtype: torch.dtype
) -> None:
    mode = {"unpaired": "unpaired", "paired": "paired", "in-batch": "one"}[negative_mode]
    xs = make_inputs(mode, 17, 9, 12, dtype, 5)
    neg = xs[2] if len(xs) == 3 else None
    nm = "paired" if mode == "paired" else "unpaired"
    # Positional arguments in info-nce-pytorch's order.
    ours_out = info_nce(xs[0], xs[1], neg, 0.1, reduction, nm)
    theirs = info_nce_pkg.info_nce(xs[0], xs[1], neg, 0.1, reduction, nm)
    w = torch.linspace(0.5, 1.5, theirs.numel(), dtype=dtype).reshape(theirs.shape)
    g_ours = torch.autograd.grad((ours_out * w).sum(), xs)
    g_theirs = torch.autograd.grad((theirs * w).sum(), xs)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert ours_out.shape == theirs.shape and ours_out.dtype == theirs.dtype
    assert record_error(f"info-nce-pytorch parity ({dtype})", ours_out, theirs) <= tol
    for a, b in zip(g_ours, g_theirs, strict=True):
        assert record_error(f"info-nce-pytorch parity ({dtype})", a, b) <= tol * 5


def test_module_is_a_drop_in_for_info_nce_pytorch_module() -> None:
    xs = make_inputs("unpaired", 8, 6, 4, torch.float32, 2)
    a = InfoNCE(0.2, "sum", "unpaired")(*xs)
    b = info_nce_pkg.InfoNCE(0.2, "sum", "unpaired")(*xs)
    assert record_error("info-nce-pytorch parity (module)", a, b) <= 1e-6


# --------------------------------------------------------------------- temperature


def test_learnable_temperature_is_log_parametrised_and_clamped() -> None:
    xs = make_inputs("sym", 10, 10, 6, torch.float64, 3)
    mod = InfoNCE(0.07, symmetric=True, learn_temperature=True).double()
    assert math.isclose(float(mod.temperature.detach()), 0.07, rel_tol=1e-6)
    loss = mod(*xs)
    (g,) = torch.autograd.grad(loss, [mod.logit_scale])
    scale = mod.logit_scale.detach().clone().requires_grad_()
    ref = ref_info_nce(xs[0], xs[1], None, 1 / scale.exp(), symmetric=True)
    (g_ref,) = torch.autograd.grad(ref, [scale])
    assert record_error("learnable temperature grad", g, g_ref) <= 1e-10
    with torch.no_grad():
        mod.logit_scale.fill_(math.log(1000.0))
    assert math.isclose(float(mod.temperature.detach()), 0.01, rel_tol=1e-6)
    (g,) = torch.autograd.grad(mod(*xs), [mod.logit_scale])
    assert g.item() == 0.0  # clamped: no push beyond 1/temperature = 100


def test_ntxent_module_with_learnable_temperature() -> None:
    z1, z2 = make_inputs("ntxent", 9, 0, 5, torch.float64, 4)
    mod = NTXent(0.5, learn_temperature=True).double()
    assert math.isclose(float(mod.temperature.detach()), 0.5, rel_tol=1e-6)
    ref = ref_nt_xent(z1, z2, mod.temperature.detach())
    assert record_error("NTXent module vs reference", mod(z1, z2), ref) <= 1e-12


def test_tensor_temperature_gets_a_gradient() -> None:
    q, k = make_inputs("one", 6, 6, 3, torch.float64, 5)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    info_nce(q, k, temperature=t).backward()
    t2 = t.detach().clone().requires_grad_()
    ref_info_nce(q.detach(), k.detach(), None, t2).backward()
    assert record_error("tensor temperature grad", t.grad, t2.grad) <= 1e-12


def test_gather_at_world_size_one_is_the_local_loss() -> None:
    xs = make_inputs("sym", 7, 7, 3, torch.float64, 6)
    a = info_nce(*xs, symmetric=True, gather=True)
    b = info_nce(*xs, symmetric=True)
    assert torch.equal(a, b)


def test_reduction_none_shapes() -> None:
    q, k = make_inputs("one", 5, 5, 3, torch.float32, 0)
    assert info_nce(q, k, reduction="none").shape == (5,)
    assert info_nce(q, k, reduction="none", symmetric=True).shape == (5,)
    assert nt_xent(q, k, reduction="none").shape == (10,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(mode: str, dtype: torch.dtype) -> None:
    xs = [x.detach().cuda().requires_grad_() for x in make_inputs(mode, 300, 200, 64, dtype, 0)]
    t = torch.tensor(0.07, device="cuda", requires_grad=True)
    got = value_and_grads(ours, mode, xs, t, "mean", chunk_size=64)
    x64 = [x.detach().cpu().double().requires_grad_() for x in xs]
    ref = value_and_grads(
        reference, mode, x64, torch.tensor(0.07, dtype=torch.float64, requires_grad=True), "mean"
    )
    for g, r in zip(got, ref, strict=True):
        assert record_error(f"CUDA {dtype} vs float64 ({mode})", g, r) <= (
            1e-2 if dtype == torch.bfloat16 else 1e-4
        )


def test_zero_rows_locally_is_an_error_without_gather() -> None:
    q = torch.zeros(0, 4)
    with pytest.raises(ValueError, match="query must have at least one row"):
        info_nce(q, q)
    with pytest.raises(ValueError, match="global batch is empty"):
        info_nce(q, q, gather=True)  # world size 1: the global batch is this one


def test_normalize_false_uses_raw_dot_products() -> None:
    q, k = make_inputs("one", 6, 6, 3, torch.float64, 8, scale=2.0)
    logits = q @ k.T / 0.5
    ref = F.cross_entropy(logits, torch.arange(6))
    assert (
        record_error("normalize=False", info_nce(q, k, temperature=0.5, normalize=False), ref)
        <= 1e-12
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, 8])
def test_autocast_does_not_lower_the_loss_precision(mode: str, chunk: int | None) -> None:
    # Under bf16 autocast (accelerate's mixed precision) a plain matmul would run in
    # bf16 and round the logits to 3 significant digits. The loss opts out: its
    # logits and log-sum-exps stay float32.
    xs = make_inputs(mode, 40, 30, 16, torch.float32, 3)
    t = torch.tensor(0.05, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(mode, xs, t, chunk_size=chunk)
    # Backward outside autocast, as PyTorch recommends and accelerate does.
    got = [out.detach(), *torch.autograd.grad(out, [*xs, t])]
    x64 = [x.detach().double().requires_grad_() for x in xs]
    t64 = t.detach().double().requires_grad_()
    ref_out = reference(mode, x64, t64)
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, [*x64, t64])]
    for g, r in zip(got, ref, strict=True):
        assert record_error("float32 under bf16 autocast vs float64", g, r) <= 1e-5
