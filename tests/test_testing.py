"""dist_infonce.testing: the ring costs of collective_bytes, and the recorder's contract
(the real call still runs, the originals come back). Its use on real gloo worlds is in
tests/test_dist.py (which collectives a loss issues) and the distributed benchmark."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_infonce.testing import COUNTED, collective_bytes, record_collectives


def test_collective_bytes_ring_costs() -> None:
    x = torch.zeros(10, 4)  # 160 bytes
    out = torch.zeros(40, 4)
    assert collective_bytes("all_gather_single", (out, x), {}, 4) == 3 * 160
    assert collective_bytes("all_gather_into_tensor", (out,), {"input_tensor": x}, 4) == 3 * 160
    assert collective_bytes("all_gather", ([x] * 4, x), {}, 4) == 3 * 160
    assert collective_bytes("reduce_scatter_single", (x, out), {}, 4) == 3 * 640 // 4
    assert collective_bytes("all_to_all_single", (out, out), {}, 4) == 3 * 640 // 4
    assert collective_bytes("all_reduce", (x,), {}, 4) == 2 * 3 * 160 // 4
    assert collective_bytes("scatter", (x, [x] * 4, 0), {}, 4) == 3 * 160
    assert collective_bytes("scatter", (x, None, 1), {}, 4) == 0
    assert collective_bytes("broadcast", (), {"tensor": x}, 4) == 160
    # Point-to-point: the isends of the batch (P2POp's two fields; building a real one
    # needs a process group, which the distributed benchmark's tests have).
    ops = [SimpleNamespace(op=dist.isend, tensor=x), SimpleNamespace(op=dist.irecv, tensor=out)]
    assert collective_bytes("batch_isend_irecv", (ops,), {}, 4) == 160
    with pytest.raises(ValueError, match="unknown collective 'send'"):
        collective_bytes("send", (x,), {}, 2)


def test_recorder_measures_runs_the_real_call_and_restores() -> None:
    assert not dist.is_initialized()
    before = {n: getattr(dist, n) for n in COUNTED if hasattr(dist, n)}
    x = torch.zeros(3)  # 12 bytes
    sent = lambda name, args, kwargs: collective_bytes(name, args, kwargs, 4)
    with pytest.raises(RuntimeError, match="boom"), record_collectives(sent) as calls:
        assert all(getattr(dist, n) is not fn for n, fn in before.items())
        # The real all_reduce runs after the measurement: with no process group it
        # raises its own error, and the call is on record.
        with pytest.raises((RuntimeError, ValueError)):
            dist.all_reduce(x)
        raise RuntimeError("boom")
    assert calls == [("all_reduce", 2 * 3 * 12 // 4)]
    assert all(getattr(dist, n) is fn for n, fn in before.items())
