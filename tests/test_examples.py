"""examples/ run as a user runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import REPO, TIMEOUT_S, clean_env

pytestmark = pytest.mark.slow


def test_ddp_clip_cached_example_learns(tmp_path: Path) -> None:
    """Plain DDP + InfoNCE(symmetric, gather, learnable temperature) + cached_backward
    under ``torchrun --nproc_per_node=2``: the global loss falls."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "examples/ddp_clip_cached.py", "--steps", "30", "--batch", "128", "--micro", "48",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    losses = [float(x) for x in re.findall(r"^step \d+ loss ([\d.]+)", proc.stdout, re.M)]
    assert len(losses) == 4, proc.stdout  # steps 1, 10, 20, 30
    assert losses[-1] < 0.5 * losses[0], losses
    recall = float(re.search(r"^recall@1 ([\d.]+)", proc.stdout, re.M).group(1))
    assert recall > 0.2, proc.stdout


def test_make_digits_pairs_cli_writes_both_formats(tmp_path: Path) -> None:
    """The example data builder: PNGs, a parquet table and shards that the sources read."""
    out = tmp_path / "pairs"
    cmd = [
        sys.executable,
        "examples/make_digits_pairs.py",
        "--out",
        str(out),
        "--limit",
        "24",
        "--shards",
        "3",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pyarrow.parquet as pq

    table = pq.read_table(out / "pairs.parquet").to_pydict()
    assert table["id"] == list(range(24)) and len(list((out / "images").glob("*.png"))) == 24
    assert table["caption"][0] == "a photo of the digit zero" and table["label"][:3] == [0, 1, 2]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        f"pairs-{i:04d}.tar" for i in range(3)
    ]
    assert f"data.path={out}/shards/pairs-{{0000..0002}}.tar" in proc.stdout
    assert f"data.path={out / 'pairs.parquet'} data.image_root={out / 'images'}" in proc.stdout
