"""Cases for the fused Triton kernel, run in a process of their own.

Under ``TRITON_INTERPRET=1`` (CPU, in a spawned worker: the variable must be set
before the kernels are decorated, and must not leak into the rest of the test
session) or on CUDA. Each case returns ``[(name, got, expected), ...]``: the
loss value and the gradients of the inputs and of the temperature from the
public API with ``kernel="triton"``, and the same from the float64 reference in
:mod:`tests.reference` (which shares no code with the package).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dist_infonce import info_nce, nt_xent
from tests.reference import ref_info_nce, ref_nt_xent

#: one: in-batch, one direction (row statistics only); sym: CLIP (row and column
#: statistics from one pass); ntxent: the self-similarity mask; unpaired:
#: explicit negatives, the positive as the extra logit.
MODES = ("one", "sym", "ntxent", "unpaired")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Result = list[tuple[str, torch.Tensor, torch.Tensor]]


def _loss(
    mode: str, xs: list[torch.Tensor], t: torch.Tensor, reference: bool, **kw: object
) -> torch.Tensor:
    if mode == "ntxent":
        fn = ref_nt_xent if reference else nt_xent
        return fn(xs[0], xs[1], t, **kw)  # type: ignore[operator]
    fn = ref_info_nce if reference else info_nce
    neg = xs[2] if mode == "unpaired" else None
    return fn(xs[0], xs[1], neg, t, symmetric=mode == "sym", **kw)  # type: ignore[operator]


def _value_and_grads(
    mode: str, xs: list[torch.Tensor], t: torch.Tensor, reference: bool, **kw: object
) -> list[torch.Tensor]:
    out = _loss(mode, xs, t, reference, **kw)
    # A fixed non-uniform cotangent, so that reduction="none" checks per-row weights.
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64, device=out.device)
    grads = torch.autograd.grad((out.double() * w.reshape(out.shape)).sum(), [*xs, t])
    return [out.detach(), *grads]


def compare(
    mode: str,
    dtype: str,
    n: int,
    m: int,
    d: int,
    temperature: float,
    chunk_size: int | None,
    seed: int,
    device: str = "cpu",
    normalize: bool = False,
    scale: float = 1.0,
    reduction: str = "mean",
) -> Result:
    """Triton kernel vs float64 reference, on one configuration.

    With ``normalize=False`` (the default here) the inputs are L2-normalised and
    rounded to ``dtype`` first: the reference sees exactly the numbers the kernel
    sees, so the comparison measures the kernel's accumulation, not the input
    rounding. ``scale`` != 1 leaves the logits unbounded (the online-maximum path).
    """
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("CPU cases need TRITON_INTERPRET=1 in this process")
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, d), (n, d)] + ([(m, d)] if mode == "unpaired" else [])
    xs64 = [
        scale * F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
        for s in shapes
    ]
    xs = [x.to(DTYPES[dtype]).to(device).requires_grad_() for x in xs64]
    t = torch.tensor(temperature, device=device, requires_grad=True)
    got = _value_and_grads(
        mode, xs, t, False, normalize=normalize, reduction=reduction, kernel="triton",
        chunk_size=chunk_size,
    )  # fmt: skip
    ref_xs = [x.detach().cpu().double().requires_grad_() for x in xs]
    t64 = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    ref = _value_and_grads(mode, ref_xs, t64, True, normalize=normalize, reduction=reduction)
    names = ["loss"] + [f"grad x{i}" for i in range(len(xs))] + ["grad temperature"]
    # As the API returns them: the loss in float32, input gradients in the input
    # dtype (the caller checks both).
    return [(nm, a.detach().cpu(), b) for nm, a, b in zip(names, got, ref, strict=True)]


def init_worker() -> None:
    """Pool initializer: one thread, and no numpy warnings from the interpreter.

    The interpreter evaluates masked-out lanes too (log(0), exp of -inf
    differences on padding rows); the kernels discard them, the warnings are noise.
    """
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)


def empty_side(n: int, m: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Triton vs chunked kernel when one side is empty (a rank with 0 rows under gather).

    Row and column statistics (with an extra logit per row) and the gradients of
    every input; the chunked kernel is the reference for these edge cases.
    """
    from dist_infonce.kernels import chunked_lse
    from dist_infonce.kernels.triton_lse import triton_lse

    g = torch.Generator().manual_seed(7)
    base = [
        torch.randn(n, 16, generator=g),
        torch.randn(m, 16, generator=g),
        torch.randn(n, generator=g),
    ]
    out = []
    for fn in (triton_lse, chunked_lse):
        a, b, extra = (x.clone().requires_grad_() for x in base)
        t = torch.tensor(10.0, requires_grad=True)
        lse, clse = fn(a, b, t, extra=extra, cols=True, chunk_size=16)
        # Weights that keep -inf entries (empty sums) out of the backward seed.
        loss = (
            torch.where(lse.isfinite(), lse, 0).sum() + torch.where(clse.isfinite(), clse, 0).sum()
        )
        out.append(
            [
                lse.detach(),
                clse.detach(),
                *torch.autograd.grad(loss, [a, b, t, extra], allow_unused=True),
            ]
        )
    names = ["row lse", "col lse", "grad a", "grad b", "grad t", "grad extra"]
    return [(nm, x, y) for nm, x, y in zip(names, *out, strict=True)]


def masked_columns(temperature: float, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Triton vs the float64 chunked kernel with ``cols=True`` and an NT-Xent-like mask.

    Masked pairs are self-similar (``b[mask[i]] = a[i]``): the largest logit of their
    column, as NT-Xent's self-similarity is, so a column statistic that keeps them
    is far off. Some rows mask nothing (an index past M, or negative). Row and column
    statistics and the gradients of a, b and t, under a weighted sum of both.
    """
    g = torch.Generator().manual_seed(seed)
    n, m, d = 40, 27, 20
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    rows, cols = torch.randperm(n, generator=g)[:20], torch.randperm(m, generator=g)[:20]
    mask = torch.full((n,), m, dtype=torch.int64)  # past M: masks nothing
    mask[rows] = cols
    mask[rows[:3]] = -1  # negative: masks nothing either
    inside = (mask >= 0) & (mask < m)
    b[mask[inside]] = a[inside]
    base = [a.float(), b.float()]
    w_row = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    w_col = torch.linspace(1.5, 0.5, m, dtype=torch.float64)
    from dist_infonce.kernels import chunked_lse
    from dist_infonce.kernels.triton_lse import triton_lse

    out = []
    for fn, dtype in ((triton_lse, torch.float32), (chunked_lse, torch.float64)):
        x, y = (v.to(dtype).requires_grad_() for v in base)
        t = torch.tensor(1.0 / temperature, dtype=dtype, requires_grad=True)
        lse, clse = fn(x, y, t, mask_idx=mask, cols=True, chunk_size=16)
        total = (lse.double() * w_row).sum() + (clse.double() * w_col).sum()
        out.append([lse.detach(), clse.detach(), *torch.autograd.grad(total, [x, y, t])])
    names = ["row lse", "col lse", "grad a", "grad b", "grad t"]
    return [(nm, x, y) for nm, x, y in zip(names, *out, strict=True)]


def shared_mask_column(cols: bool) -> str:
    """Two rows mask one column: refused with ``cols=True``, accepted without."""
    from dist_infonce.kernels.triton_lse import triton_lse

    a, b = torch.randn(4, 16), torch.randn(5, 16)
    mask = torch.tensor([2, 2, 7, -1])
    try:
        triton_lse(a, b, torch.tensor(1.0), mask_idx=mask, cols=cols, chunk_size=16)
    except ValueError as e:
        return f"ValueError: {e}"
    return "accepted"
