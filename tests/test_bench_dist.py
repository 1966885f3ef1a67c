"""The distributed benchmark (``python -m dist_infonce.bench --world 2``) measures what it
says, checked through its command line: the same losses, the real collectives, the bytes.

OpenCLIP is a peer, not a dependency of the library: the ``dev`` extra installs it, a
user's plain install may not (or, on torch 2.13 here, may not import it). Our rows are
checked either way; OpenCLIP's rows where it imports (a separate test, skipped with the
reason otherwise); and a missing peer is a skipped row, never a failed run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.bench_cli import REPO, read_json, run_bench
from tests.conftest import record_error

B, D = 48, 8
TOWER = B * D * 4  # one rank's rows of one tower, float32
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
OURS = {("ours", "one"), ("ours", "sym"), ("ours_two_calls", "sym")}


@pytest.fixture(scope="module")
def world_2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI run (a world of 2 spawned processes per row), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("bench-dist")
    proc = run_bench(
        "--world", "2", "--sizes", str(B), "--dims", str(D), "--repeats", "1", "--chunk", "20",
        "--modes", "one,sym", "--out", str(tmp), cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = read_json(tmp / "bench_dist.json")
    rows = {(r["method"], r["mode"]): r for r in data["rows"]}
    return {"rows": rows, "stdout": proc.stdout, "table": (tmp / "table_dist.md").read_text()}


def _same_loss(family: str, row: dict[str, Any], ref: dict[str, Any]) -> float:
    return record_error(family, torch.tensor(row["loss"]), torch.tensor(ref["loss"]))


def test_world_2_cli_rows(world_2: dict[str, Any]) -> None:
    rows = world_2["rows"]
    assert set(rows) == OURS | {("open_clip", "sym")}
    for key in OURS:
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["time_s"] > 0 and rows[key]["world"] == 2
    if not HAS_OPEN_CLIP:
        peer = rows[("open_clip", "sym")]
        assert (peer["status"], peer["reason"]) == ("skipped", "open-clip-torch is not installed")
    # Both symmetric methods of ours compute the same global loss on the same inputs.
    ref = rows[("ours_two_calls", "sym")]
    assert _same_loss("bench dist: ours sym vs two calls", rows[("ours", "sym")], ref) <= 1e-5
    names = [c.split(":")[0] for c in rows[("ours", "sym")]["collectives"]]
    assert names == [
        "all_gather_single", "all_gather_single", "all_reduce", "all_reduce",
        "reduce_scatter_single",
    ]  # fmt: skip
    # Ring costs at W = 2: one tower gathered and reduce-scattered (plus the labels and
    # the column statistics); the two one-direction calls move both towers.
    sym_bytes = rows[("ours", "sym")]["sent_mib"] * 2**20
    assert 2 * TOWER < sym_bytes < 2 * TOWER + 4 * 2 * B * 4 + 200
    assert rows[("ours_two_calls", "sym")]["sent_mib"] * 2**20 >= 4 * TOWER
    assert f"| 2 | {B} | {D} | ours | sym |" in world_2["table"]
    assert world_2["table"] in world_2["stdout"]


@pytest.mark.skipif(
    not HAS_OPEN_CLIP,
    reason="open-clip-torch is not installed (an optional peer; the dev extra installs it)",
)
def test_world_2_open_clip_rows(world_2: dict[str, Any]) -> None:
    rows = world_2["rows"]
    peer = rows[("open_clip", "sym")]
    assert peer["status"] == "ok", peer
    assert _same_loss("bench dist: ours sym vs OpenCLIP", rows[("ours", "sym")], peer) <= 1e-5
    # OpenCLIP gathers both towers: twice our symmetric loss's tower bytes.
    assert peer["sent_mib"] * 2**20 == 4 * TOWER


SIGLIP_PEERS = ("open_clip_bidir", "open_clip_shift", "open_clip_reduce", "open_clip_gather")


def test_world_2_siglip_rows_count_point_to_point_bytes(tmp_path: Path) -> None:
    proc = run_bench(
        "--world", "2", "--sizes", str(B), "--dims", str(D), "--repeats", "1", "--chunk", "20",
        "--modes", "siglip", "--out", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["method"]: r for r in read_json(tmp_path / "bench_dist.json")["rows"]}
    assert set(rows) == {"ours", *SIGLIP_PEERS}
    ours = rows["ours"]
    assert ours["status"] == "ok" and ours["mode"] == "siglip"
    # One gather of the y tower (after the size exchange), one reduce-scatter back.
    names = [c.split(":")[0] for c in ours["collectives"]]
    assert names == ["all_gather_single", "all_gather_single", "reduce_scatter_single"]
    assert 2 * TOWER < ours["sent_mib"] * 2**20 < 2 * TOWER + 200
    if not HAS_OPEN_CLIP:
        assert all(rows[m]["status"] == "skipped" for m in SIGLIP_PEERS)
        return
    # The ring exchanges (both ways at W = 2: one hop) and the gather move the y tower
    # once each way too; the all-reduce variant twice as much. Same loss everywhere.
    expected = {"open_clip_bidir": 2, "open_clip_shift": 2, "open_clip_reduce": 4,
                "open_clip_gather": 2}  # fmt: skip
    for m in SIGLIP_PEERS:
        assert rows[m]["status"] == "ok", rows[m]
        assert _same_loss(f"bench dist: ours siglip vs {m}", ours, rows[m]) <= 1e-5
        assert rows[m]["sent_mib"] * 2**20 == expected[m] * TOWER, m
    assert "batch_isend_irecv" in rows["open_clip_shift"]["collectives"][0]


def test_missing_peer_is_a_skipped_row(tmp_path: Path) -> None:
    # As on a plain `pip install -e ".[dev]"`: open_clip cannot be found (a None entry
    # in sys.modules makes find_spec and import see no package); the CLI runs as
    # `python -m dist_infonce.bench` does, via runpy.
    code = (
        "import runpy, sys; sys.modules['open_clip'] = None; "
        "runpy.run_module('dist_infonce.bench', run_name='__main__')"
    )
    args = ["--world", "2", "--methods", "open_clip", "--sizes", str(B), "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = read_json(tmp_path / "bench_dist.json")["rows"]
    assert (row["status"], row["reason"]) == ("skipped", "open-clip-torch is not installed")
    assert "skipped: open-clip-torch is not installed" in (tmp_path / "table_dist.md").read_text()
