"""The trainer's FSDP pieces on real gloo worlds: the sharding policy, clipping over
sharded and replicated gradients, and sharded checkpoints resharded onto another
world size (dist_infonce.trainer.fsdp, dist_infonce.trainer.sharded_checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dist_infonce.trainer.config import ConfigError, load_config
from dist_infonce.trainer.fsdp import shard_model, tower_blocks
from tests import fsdp_cases
from tests._world import Worlds
from tests.conftest import record_error


def test_sharded_checkpoint_reshards_from_two_ranks_onto_three(
    worlds: Worlds, tmp_path: Path
) -> None:
    saved = worlds.run(2, fsdp_cases.save_sharded_case, str(tmp_path), 0)[0]
    loaded = worlds.run(3, fsdp_cases.load_sharded_case, str(tmp_path), 1)[0]
    assert loaded.pop("trainer") == {"step": 2, "note": "rank 0's"}
    assert set(loaded) == set(saved)
    assert any(k.endswith("exp_avg_sq") for k in saved)  # the optimizer moments travel too
    assert any(k.startswith("model.loss_fn.") for k in saved)  # the replicated temperature
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002.dcp"]  # no .tmp left


def test_clip_grad_norm_over_sharded_and_replicated_gradients(worlds: Worlds) -> None:
    res = worlds.run(2, fsdp_cases.clip_case, 0.05)
    for r in res:
        want = [g.clone() for g in r["before"]]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in want]))
        assert record_error("trainer FSDP: clipped grad norm", r["norm"], norm) < 1e-6
        scale = min(1.0, 0.05 / (float(norm) + 1e-6))
        for got, g in zip(r["after"], want, strict=True):
            assert record_error("trainer FSDP: clipped grads", got, g * scale, floor=1e-3) < 1e-6
        # Each rank holds about half of the sharded gradients (plus the temperature).
        assert r["local_numel"] < 0.6 * r["full_numel"]
    assert torch.equal(res[0]["norm"], res[1]["norm"])


def test_tower_blocks_policy() -> None:
    from dist_infonce.trainer.models import build_model

    cfg = load_config(None, ["model.name=two_tower", "model.depth=3"]).model
    model = build_model(cfg, ((7,), (5,)))
    blocks = tower_blocks(model.encoder0)
    # Flatten, then the MLP: Linear, BN, (ReLU), Linear, BN, (ReLU), Linear.
    assert [type(b).__name__ for b in blocks] == ["Linear", "BatchNorm1d"] * 2 + ["Linear"]
    transformer = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    assert tower_blocks(transformer) == [transformer[0], transformer[1]]
    lone = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    assert tower_blocks(lone) == []


def test_zero_dim_parameter_and_fp16_are_refused() -> None:
    class WithScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(3, 3)
            self.logit_scale = nn.Parameter(torch.tensor(1.0))

    with pytest.raises(ConfigError, match=r"0-dim parameters \['logit_scale'\]"):
        shard_model(
            WithScale(), device=torch.device("cpu"), reshard_after_forward=True, precision="fp32"
        )
    with pytest.raises(
        ConfigError, match=r"train.precision: fp16 is not supported with dist.strategy=fsdp"
    ):
        load_config(None, ["dist.strategy=fsdp", "precision=fp16"])
    cfg = load_config(None, ["dist.strategy=fsdp", "dist.fsdp_reshard_after_forward=false"])
    assert (cfg.dist.strategy, cfg.dist.fsdp_reshard_after_forward) == ("fsdp", False)
    with pytest.raises(ConfigError, match=r"dist.strategy: 'fsdp2' is not one of ddp, fsdp"):
        load_config(None, ["dist.strategy=fsdp2"])


def test_newest_sharded_skips_incomplete_and_prune_keeps_the_newest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dist_infonce.trainer.checkpoint import save_atomic
    from dist_infonce.trainer.sharded_checkpoint import (
        list_sharded,
        newest_sharded,
        prune_sharded,
        sharded_path,
    )

    for step in (3, 4, 8):
        path = sharded_path(tmp_path, step)
        path.mkdir()
        save_atomic({"step": step}, path / "trainer.pt")
        if step != 8:  # step 8: DCP never finished (no .metadata)
            (path / ".metadata").write_bytes(b"")
    (tmp_path / ".step_00000009.dcp.tmp").mkdir()  # an interrupted write: never listed
    assert newest_sharded(tmp_path) == sharded_path(tmp_path, 4)
    assert "step_00000008.dcp is unreadable" in capsys.readouterr().err
    assert prune_sharded(tmp_path, keep=2) == [sharded_path(tmp_path, 3)]
    assert [s for s, _ in list_sharded(tmp_path)] == [4, 8]
