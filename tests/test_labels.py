"""``labels=`` (multiple positives, SupCon's L_out), single process: float64 against
an independent dense reference, pytorch-metric-learning's SupConLoss, the reduction
to the unlabelled loss, bad input, and the memory of the saved graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_infonce import InfoNCE, NTXent, info_nce, nt_xent
from tests.conftest import record_error

MODES = ["one", "sym", "ntxent"]
# Label values that only exact int64 comparison separates: 2**62 and 2**62 + 1 are
# the same float64, and the extremes of int64.
CLASSES = torch.tensor([2**62, 2**62 + 1, -(2**63), 2**63 - 1, 7], dtype=torch.int64)


def make_labels(n: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 99)
    return CLASSES[torch.randint(0, classes, (n,), generator=g)]


def leaves(n: int, d: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
        for _ in range(2)
    ]


def ref_supcon(
    mode: str,
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor | float,
    reduction: str,
    normalize: bool,
) -> torch.Tensor:
    """Dense, from the definition: log-softmax over the (masked) row, mean over positives."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)

    def rows(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        logp = logits.log_softmax(1)
        return -torch.where(positive, logp, 0.0).sum(1) / positive.sum(1)

    same = labels[:, None] == labels[None, :]
    if mode == "ntxent":
        z = torch.cat([a, b])
        lab = torch.cat([labels, labels])
        eye = torch.eye(len(z), dtype=torch.bool)
        logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
        per_row = rows(logits, (lab[:, None] == lab[None, :]) & ~eye)
    else:
        logits = a @ b.T / temperature
        per_row = rows(logits, same)
        if mode == "sym":
            per_row = 0.5 * (per_row + rows(logits.T, same))
    if reduction == "mean":
        return per_row.mean()
    return per_row.sum() if reduction == "sum" else per_row


def ours(mode: str, a: torch.Tensor, b: torch.Tensor, t: object, **kw: object) -> torch.Tensor:
    if mode == "ntxent":
        return nt_xent(a, b, t, **kw)  # type: ignore[arg-type]
    return info_nce(a, b, None, t, symmetric=mode == "sym", **kw)  # type: ignore[arg-type]


def value_and_grads(out: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad((out.double() * w).sum(), wrt)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "chunk,temperature,normalize,scale",
    # dense; chunked tiles that divide nothing on the fixed-shift path; the online
    # path (unbounded logits); unnormalised inputs.
    [(None, 0.2, True, 1.0), (3, 0.2, True, 1.0), (4, 0.01, True, 1.0), (5, 0.5, False, 3.0)],
    ids=["dense", "chunk3", "chunk4-online", "chunk5-raw"],
)
def test_labels_match_dense_reference_float64(
    mode: str, reduction: str, chunk: int | None, temperature: float, normalize: bool, scale: float
) -> None:
    for n, classes, seed in [(11, 3, 0), (7, 5, 1), (1, 1, 2)]:
        a, b = leaves(n, 4, seed, scale)
        labels = make_labels(n, classes, seed)
        t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
        got = value_and_grads(
            ours(mode, a, b, t, reduction=reduction, normalize=normalize, chunk_size=chunk,
                 labels=labels),
            [a, b, t],
        )  # fmt: skip
        ref = value_and_grads(ref_supcon(mode, a, b, labels, t, reduction, normalize), [a, b, t])
        for g, r in zip(got, ref, strict=True):
            assert record_error(f"labels float64 vs dense reference ({mode})", g, r) <= 1e-10


def test_nt_xent_labels_match_pytorch_metric_learning_supcon() -> None:
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    for n, classes, seed in [(16, 4, 0), (9, 2, 1)]:
        a, b = leaves(n, 6, seed)
        labels = make_labels(n, classes, seed)
        for chunk in (None, 5):
            got = value_and_grads(nt_xent(a, b, 0.1, labels=labels, chunk_size=chunk), [a, b])
            theirs = pml_losses.SupConLoss(temperature=0.1)(
                torch.cat([a, b]), torch.cat([labels, labels])
            )
            ref = value_and_grads(theirs, [a, b])
            for g, r in zip(got, ref, strict=True):
                assert record_error("nt_xent labels vs pml SupConLoss", g, r) <= 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distinct_labels_are_the_unlabelled_loss(
    mode: str, chunk: int | None, reduction: str
) -> None:
    n = 9
    a, b = leaves(n, 5, 3)
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    # Random 64-bit hashes: every row its own class.
    labels = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    assert labels.unique().numel() == n
    got = value_and_grads(
        ours(mode, a, b, t, chunk_size=chunk, labels=labels, reduction=reduction), [a, b, t]
    )
    ref = value_and_grads(ours(mode, a, b, t, chunk_size=chunk, reduction=reduction), [a, b, t])
    for x, y in zip(got, ref, strict=True):
        assert record_error("distinct labels vs unlabelled loss", x, y) <= 1e-13


def test_module_forward_takes_labels() -> None:
    a, b = leaves(8, 4, 5)
    labels = make_labels(8, 2, 5)
    mod = InfoNCE(0.2, symmetric=True, learn_temperature=True).double()
    ref = ref_supcon("sym", a, b, labels, mod.temperature.detach(), "mean", True)
    assert record_error("labels module vs reference", mod(a, b, labels=labels), ref) <= 1e-12
    mod2 = NTXent(0.3, chunk_size=3)
    ref2 = ref_supcon("ntxent", a, b, labels, 0.3, "mean", True)
    assert record_error("labels module vs reference", mod2(a, b, labels=labels), ref2) <= 1e-12


def test_bad_labels_are_value_errors_naming_labels() -> None:
    a, b = leaves(6, 4, 6)
    good = torch.zeros(6, dtype=torch.int64)
    bad = {
        "shape": good[:, None],
        "length": good[:5],
        "float dtype": good.double(),
        "int32 dtype": good.int(),
        "not a tensor": [0] * 6,
    }
    for what, labels in bad.items():
        for fn in (
            lambda lab: info_nce(a, b, labels=lab),
            lambda lab: info_nce(a, b, symmetric=True, labels=lab),
            lambda lab: nt_xent(a, b, labels=lab),
            lambda lab: InfoNCE()(a, b, labels=lab),
            lambda lab: NTXent()(a, b, labels=lab),
        ):
            with pytest.raises(ValueError, match="labels") as e:
                fn(labels)
            assert "labels" in str(e.value), what
    for mode, neg in [("unpaired", torch.randn(3, 4)), ("paired", torch.randn(6, 3, 4))]:
        with pytest.raises(ValueError, match=r"labels .*negative_keys"):
            info_nce(a, b, neg.double(), negative_mode=mode, labels=good)
        with pytest.raises(ValueError, match=r"labels .*negative_keys"):
            InfoNCE(negative_mode=mode)(a, b, neg.double(), labels=good)


@pytest.mark.parametrize("mode", MODES)
def test_labels_keep_the_saved_graph_linear(mode: str) -> None:
    n, d = 3000, 8
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g).requires_grad_()
    b = torch.randn(n, d, generator=g).requires_grad_()
    labels = torch.randint(0, 10, (n,), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ours(mode, a, b, 0.1, chunk_size=256, labels=labels)
    loss.backward()
    assert sum(saved) < 80 * n * d * 4, f"saved {sum(saved)} bytes"
    assert sum(saved) < n * n * 4 / 20


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, 8])
def test_labels_with_bfloat16_inputs_and_autocast_accumulate_in_float32(
    mode: str, chunk: int | None
) -> None:
    # Unit rows already rounded to bfloat16, normalize=False: the float64 reference
    # sees the same numbers, so float32 accuracy is expected, not bfloat16's.
    a, b = (
        F.normalize(x.detach(), dim=-1).to(torch.bfloat16).requires_grad_()
        for x in leaves(30, 16, 7)
    )
    labels = make_labels(30, 4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(mode, a, b, 0.1, normalize=False, chunk_size=chunk, labels=labels)
    assert out.dtype == torch.float32
    ref = ref_supcon(mode, a.double(), b.double(), labels, 0.1, "mean", False)
    assert record_error("labels bfloat16 inputs vs float64", out, ref) <= 1e-6
    out.backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16
