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
