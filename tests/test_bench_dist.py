"""The distributed benchmark measures what it says: same losses, real collectives, bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_infonce.bench_dist import collective_bytes


def test_collective_bytes_ring_costs() -> None:
    x = torch.zeros(10, 4)  # 160 bytes
    out = torch.zeros(40, 4)
    assert collective_bytes("all_gather_single", (out, x), {}, 4) == 3 * 160
    assert collective_bytes("all_gather", ([x] * 4, x), {}, 4) == 3 * 160
    assert collective_bytes("reduce_scatter_single", (x, out), {}, 4) == 3 * 640 // 4
    assert collective_bytes("all_reduce", (x,), {}, 4) == 2 * 3 * 160 // 4
    assert collective_bytes("scatter", (x, [x] * 4, 0), {}, 4) == 3 * 160
    assert collective_bytes("scatter", (x, None, 1), {}, 4) == 0
    with pytest.raises(ValueError, match="unknown collective"):
        collective_bytes("send", (x,), {}, 2)


def test_world_2_cli_rows(tmp_path: Path) -> None:
    # One size, tiny: 4 worlds of 2 spawned processes (the slow part of this file).
    b, d = 48, 8
    cmd = [
        sys.executable, "-m", "dist_infonce.bench", "--world", "2", "--sizes", str(b),
        "--dims", str(d), "--repeats", "1", "--chunk", "20", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "bench_dist.json").read_text())
    rows = {(r["method"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {
        ("ours", "one"), ("ours", "sym"), ("ours_two_calls", "sym"), ("open_clip", "sym")
    }  # fmt: skip
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["time_s"] > 0 and row["world"] == 2
    # Every symmetric method computes the same loss on the same inputs.
    ref = rows[("open_clip", "sym")]["loss"]
    for key in [("ours", "sym"), ("ours_two_calls", "sym")]:
        assert abs(rows[key]["loss"] - ref) <= 1e-5 * abs(ref), key
    tower = b * d * 4  # one rank's rows of one tower, float32
    names = [c.split(":")[0] for c in rows[("ours", "sym")]["collectives"]]
    assert names == [
        "all_gather_single", "all_gather_single", "all_reduce", "all_reduce",
        "reduce_scatter_single",
    ]  # fmt: skip
    # Ring costs at W = 2: one tower gathered and reduce-scattered; OpenCLIP and the
    # two one-direction calls move both towers.
    sym_bytes = rows[("ours", "sym")]["sent_mib"] * 2**20
    assert 2 * tower < sym_bytes < 2 * tower + 4 * 2 * b * 4 + 200
    assert rows[("ours_two_calls", "sym")]["sent_mib"] * 2**20 >= 4 * tower
    assert rows[("open_clip", "sym")]["sent_mib"] * 2**20 == 4 * tower
    table = (tmp_path / "table_dist.md").read_text()
    assert f"| 2 | {b} | {d} | ours | sym |" in table and table in proc.stdout
