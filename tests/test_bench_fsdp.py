"""python -m dist_infonce.bench fsdp measures real trainer steps, DDP vs FSDP2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.bench_cli import REPO, read_json, run_bench


@pytest.mark.slow
def test_fsdp_bench_small_run(tmp_path: Path) -> None:
    """Both strategies, cached, on two gloo processes per row, tiny sizes."""
    out = tmp_path / "out"
    proc = run_bench(
        "fsdp", "--batch", "32", "--micro", "8", "--hidden", "64", "--depth", "2",
        "--modes", "cached", "--out", str(out), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = read_json(out / "fsdp.json")
    rows = {r["strategy"]: r for r in data["rows"]}
    assert sorted(rows) == ["ddp", "fsdp"] and all(r["micro"] == 8 for r in rows.values())
    for r in rows.values():
        assert r["peak_mib"] >= r["base_mib"] > 50 and r["seconds"] > 0, r
        assert r["sent_mib"] > 0 and r["config"]["model"]["hidden_dim"] == 64
    assert rows["fsdp"]["config"]["dist"]["strategy"] == "fsdp"
    # The task is configs/clip_synthetic.yaml's step with wider towers.
    task = yaml.safe_load((REPO / "configs" / "clip_synthetic.yaml").read_text())
    widened = {("model", "hidden_dim"), ("model", "depth")}
    for section in ("model", "loss", "data"):
        for key, value in task[section].items():
            if (section, key) not in widened:
                assert rows["ddp"]["config"][section][key] == value, (section, key)
    # Sharding over 2 ranks halves parameters, gradients and AdamW moments (the loss's
    # temperature and FSDP's padding aside).
    ratio = rows["fsdp"]["state_mib"] / rows["ddp"]["state_mib"]
    assert 0.45 < ratio < 0.6, ratio
    assert "| fsdp | cached (8) |" in proc.stdout and "load_avg_1min_at_end" in data["meta"]


def test_fsdp_bench_rejects_bad_batch(tmp_path: Path) -> None:
    proc = run_bench("fsdp", "--batch", "33", "--world", "2", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "multiple of --world 2" in proc.stderr
