"""MoCo in the trainer: ``loss.queue_size`` and ``model.momentum``.

- Config keys and what they refuse, naming the key.
- :class:`~dist_infonce.trainer.moco.MomentumEncoder`: the EMA of the parameters against
  float64 (buffers: its own), float32 under a bfloat16 model, no gradient.
- On real gloo worlds (2 and 3 ranks, uneven batches): MoCo training through DDP
  (queue + EMA + learnable temperature) equals a one-process float64 replay; with the
  trainer's BatchNorm model the key encoder and the queue stay identical across ranks
  although the online running statistics do not.
- The Trainer in this process: one push per optimizer step holding every micro-step's
  keys, also under gradient caching and accumulation, and one EMA update per step.
- torchrun, 2 ranks: a run SIGKILLed after a checkpoint resumes with the same losses,
  the same queue/size and queue/age, and the same queue and key encoder at the end.
"""

from __future__ import annotations

import copy
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_infonce.trainer import Trainer, build_data, build_learner, load_config
from dist_infonce.trainer.config import ConfigError
from dist_infonce.trainer.moco import MomentumEncoder
from dist_infonce.trainer.models import SiameseModel, mlp
from tests import moco_cases as cases
from tests._world import Worlds
from tests.conftest import record_error

# ------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss.queue_size=-1"], r"loss.queue_size: must be >= 0 \(0 = off\), got -1"),
        (["model.momentum=1.0"], r"model.momentum: must be in \[0, 1\) \(0 = off\), got 1.0"),
        (["loss.queue_size=8"], r"loss.queue_size: MoCo's query -> key loss needs loss.kind=info_nce \(got nt_xent\)"),
        (["model.momentum=0.9", "loss.kind=clip"], r"model.momentum: .* needs loss.kind=info_nce \(got clip\)"),
        (["loss.queue_size=8", "loss.kind=info_nce", "loss.num_negatives=4"], r"loss.queue_size: explicit negatives"),
        (["loss.queue_size=8", "loss.kind=info_nce", "loss.supervised=true"], r"loss.queue_size: labels define positives"),
        (["loss.queue_size=8", "loss.kind=info_nce", "loss.gather=false"], r"loss.queue_size: the queue holds the keys of every rank"),
        (["model.momentum=0.9", "loss.kind=info_nce", "dist.strategy=fsdp"], r"model.momentum: the momentum key encoder is an unsharded EMA copy"),
    ],
)  # fmt: skip
def test_config_refuses_what_moco_cannot_do(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_keys_and_models_that_cannot_have_a_key_encoder() -> None:
    cfg = load_config(None, ["loss.kind=info_nce", "loss.queue_size=4096", "model.momentum=0.99"])
    assert (cfg.loss.queue_size, cfg.model.momentum) == (4096, 0.99)
    assert load_config(None, []).loss.queue_size == 0 and load_config(None, []).model.momentum == 0
    two = load_config(
        None,
        ["data.name=synthetic_pairs", "model.name=two_tower", "loss.kind=info_nce", "model.momentum=0.9"],
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"model.momentum: .* TwoTowerModel has one tower per view"
    ):
        build_learner(two, build_data(two.data))
    wrong_dim = load_config(
        None, ["loss.kind=info_nce", "loss.queue_size=8", "model.embedding_dim=4", "model.name=mlp"]
    )
    learner = build_learner(wrong_dim, build_data(wrong_dim.data))
    with pytest.raises(
        ConfigError, match=r"loss.queue_size: the keys have shape \(3, 5\), the queue holds D=4"
    ):
        learner.loss_fn(torch.randn(3, 5), torch.randn(3, 5))


# --------------------------------------------------------------- the key encoder


def _siamese(dtype: torch.dtype = torch.float32) -> SiameseModel:
    torch.manual_seed(3)
    return SiameseModel(torch.nn.Sequential(torch.nn.Flatten(), mlp(6, 8, 5)), mlp(5, 8, 4)).to(
        dtype
    )


def test_ema_update_is_the_float64_ema_of_the_parameters() -> None:
    """Parameters: m * ema + (1 - m) * online (float64 reference); buffers: the key
    encoder's own (its forward in training updates them, the update does not)."""
    online = _siamese()
    enc = MomentumEncoder(online, 0.9)
    online.train()
    enc.train()
    for step in range(3):
        online(torch.randn(7, 6), torch.randn(7, 6))  # the online running statistics move
        enc(torch.randn(5, 6))  # and the key encoder's, from its own batch
        before = copy.deepcopy(enc.model)
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.1 * torch.randn_like(p))
        enc.update(online)
        after, src = dict(enc.model.named_parameters()), dict(online.named_parameters())
        for name, b in before.named_parameters():
            want = 0.9 * b.double() + 0.1 * src[name].double()
            assert record_error("EMA update vs float64", after[name], want) <= 1e-6, (step, name)
        for (name, b), (_, e) in zip(
            before.named_buffers(), enc.model.named_buffers(), strict=True
        ):
            assert torch.equal(b, e), name  # the update leaves the buffers alone
    bn = enc.model.encoder[1][1]
    assert int(bn.num_batches_tracked) == 3  # one per key forward, none from the update
    assert not any(p.requires_grad for p in enc.parameters())


def test_ema_of_a_bfloat16_model_is_float32_without_gradient() -> None:
    online = _siamese(torch.bfloat16)
    enc = MomentumEncoder(online, 0.999)
    assert {t.dtype for t in enc.model.state_dict().values() if t.is_floating_point()} == {
        torch.float32
    }
    before = copy.deepcopy(enc.model)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    enc.update(online)
    # A bfloat16 EMA would not move at all: 0.001 is below bfloat16's resolution near 1.
    moved = [
        (e - b).abs().max().item()
        for e, b in zip(enc.model.parameters(), before.parameters(), strict=True)
    ]
    assert min(moved) > 5e-4, moved
    x = torch.randn(9, 6, requires_grad=True)
    assert not enc(x).requires_grad


# --------------------------------------------------------------- real gloo worlds


@pytest.mark.parametrize("world_size,sizes", [(2, [3, 5]), (3, [2, 4, 1])])
def test_ddp_moco_training_equals_float64_replay(
    worlds: Worlds, world_size: int, sizes: list[int]
) -> None:
    """Queue of 7 (wraps every step), momentum 0.8, learnable temperature, 4 SGD steps."""
    args = (sizes, 4, 13 + world_size, 0.8, 7)
    res = worlds.run(world_size, cases.training_case, *args)
    ref = cases.replay(*args)
    for step, want in enumerate(ref["losses"]):
        mean = torch.tensor(sum(r["losses"][step] for r in res) / world_size, dtype=torch.float64)
        assert (
            record_error("MoCo DDP loss vs float64", mean, torch.tensor(want, dtype=torch.float64))
            <= 1e-12
        )
    for r in res:
        assert not r["ema_requires_grad"]
        assert record_error("MoCo DDP queue vs float64", r["queue"], ref["queue"]) <= 1e-12
        for part in ("online", "ema"):
            for name, want in ref[part].items():
                assert record_error(f"MoCo DDP {part} vs float64", r[part][name], want) <= 1e-12
        assert record_error("MoCo DDP temperature", r["logit_scale"], ref["logit_scale"]) <= 1e-12


def test_key_encoder_and_queue_identical_across_ranks_with_batchnorm(worlds: Worlds) -> None:
    res = worlds.run(2, cases.bn_sync_case, 3)
    # The online running statistics differ (each rank normalised its own batch): without
    # the broadcast of rank 0's EMA buffers the key encoders would drift apart.
    assert not torch.equal(res[0]["online_buffers"], res[1]["online_buffers"])
    assert torch.equal(res[0]["ema"], res[1]["ema"])
    assert res[0]["queue"] == res[1]["queue"] and res[0]["filled"] == 20


# ------------------------------------------------------------ the Trainer, in process


def _moco_cfg(out: Path, *extra: str) -> Any:
    return load_config(
        None,
        [
            "model.name=mlp",
            "model.hidden_dim=16",
            "model.feature_dim=8",
            "model.embedding_dim=4",
            "loss.kind=info_nce",
            "loss.queue_size=20",
            "model.momentum=0.9",
            "train.batch_size=8",
            "train.steps=4",
            "train.warmup_steps=1",
            "log.progress=false",
            "eval.enabled=false",
            "checkpoint.every=0",
            "wandb.mode=disabled",
            f"output_dir={out}",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.grad_accum_steps=2"],
        ["train.micro_batch_size=4"],
        ["model.momentum=0"],
    ],
    ids=["plain", "accum2", "cached", "queue-only"],
)
def test_trainer_pushes_every_micro_step_once_per_optimizer_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str]
) -> None:
    """After each train_step the queue's newest rows are the keys of every micro-step's
    batch (keys of the encoder as it was before the step), one push per step; the key
    encoder moved by exactly one EMA update."""
    monkeypatch.delenv("DIST_INFONCE_TEST_FAULT", raising=False)
    cfg = _moco_cfg(tmp_path / "run", *extra)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        learner, acc = trainer.unwrapped, trainer.accelerator
        queue, momentum = learner.queue, cfg.model.momentum
        drawn: list[Any] = []  # the batches each train_step takes from the loader
        take = trainer.batches.next
        trainer.batches.next = lambda: drawn.append(take()) or drawn[-1]  # type: ignore[method-assign]
        for step in range(cfg.train.steps):
            keys_before = copy.deepcopy(learner.key_encoder)
            if keys_before is not None:
                keys_before.train()
            online_before = copy.deepcopy(learner.model).train()
            drawn.clear()
            trainer.train_step()
            assert len(drawn) == cfg.train.grad_accum_steps
            expected = []
            for batch in drawn:
                x0, x1 = batch.x0, batch.x1
                with torch.no_grad(), acc.autocast():
                    if keys_before is not None:  # in micro-batches under caching
                        rows = cfg.train.micro_batch_size or len(x1)
                        expected += [keys_before(c).float() for c in x1.split(rows)]
                    else:  # keys of the online model as its forward (both views) saw them
                        expected.append(online_before(x0, x1)[1].float())
            expected = torch.cat(expected)
            assert queue.pushes == step + 1, "one push per optimizer step"
            assert queue.filled == min((step + 1) * len(expected), cfg.loss.queue_size)
            newest = queue.negatives()[-len(expected) :]
            err = record_error("trainer: pushed keys vs the step's keys", newest, expected)
            assert err <= 1e-6, (step, err)
            if keys_before is None:
                assert learner.key_encoder is None
                continue
            after = dict(learner.key_encoder.model.named_parameters())
            online = dict(learner.model.named_parameters())
            for name, b in keys_before.model.named_parameters():
                assert after[name].dtype == torch.float32 and not after[name].requires_grad
                want = momentum * b.double() + (1 - momentum) * online[name].double()
                err = record_error("trainer: one EMA update per step", after[name], want)
                assert err <= 1e-6, (step, name, err)
    finally:
        trainer.close()


# ------------------------------------------------------------------ torchrun, e2e

#: A short MoCo run on the digits: the queue (100) wraps every 2 steps (2 ranks x 16 rows
#: x 2 accumulation steps = 64 keys per push), not a multiple of the global batch.
STEPS = 16
E2E = (
    "model.name=mlp",
    "loss.kind=info_nce",
    "loss.queue_size=100",
    "model.momentum=0.9",
    f"train.steps={STEPS}",
    "train.batch_size=16",
    "train.warmup_steps=3",
    "log.every=1",
    "log.progress=false",
    "checkpoint.every=8",
    "checkpoint.keep=3",
    "eval.enabled=false",
    "wandb.mode=disabled",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,per_push",
    [
        (("train.grad_accum_steps=2",), 64),
        (("train.micro_batch_size=8", "train.precision=bf16"), 32),
    ],
    ids=["accum2", "cached-bf16"],
)
def test_moco_resume_after_sigkill_matches_uninterrupted(
    tmp_path: Path, variant: tuple[str, ...], per_push: int
) -> None:
    from tests.test_train import Started, clean_env, last_step, read_rows, run, torchrun, train_rows

    env = clean_env(tmp_path)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    run([*torchrun(2), *E2E, *variant, f"output_dir={ref_out}"], env)
    cmd = [*torchrun(2), *E2E, *variant, f"output_dir={out}"]
    first = Started(cmd, env, tmp_path / "first.log")
    ckpt = out / "checkpoints" / "step_00000008.pt"
    deadline = time.monotonic() + 180
    while not (ckpt.is_file() and last_step(out) >= 11):
        assert first.proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no step-8 checkpoint in time"
        time.sleep(0.02)
    assert first.kill() == -signal.SIGKILL
    killed_at = last_step(out)
    assert 11 <= killed_at < STEPS, killed_at
    proc = run(cmd, env)
    assert "(step 8)" in proc.stderr, proc.stderr[-2000:]

    got, want = train_rows(out), train_rows(ref_out)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == want[step]["loss"], step  # bitwise
        # Deterministic from the config: one push of per_push keys per step.
        size = min(step * per_push, 100)
        age = step - 1 - max(0, step * per_push - 100) // per_push
        assert (got[step]["queue/size"], got[step]["queue/age"]) == (size, age), got[step]
        assert (want[step]["queue/size"], want[step]["queue/age"]) == (size, age)
    print(f"MoCo {variant}: SIGKILL after step {killed_at}, resumed from 8: losses bitwise equal")
    a = torch.load(out / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)["model"]
    b = torch.load(ref_out / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)["model"]
    moco_keys = [k for k in b if k.startswith(("loss_fn.queue.", "key_encoder."))]
    assert "loss_fn.queue.rows" in moco_keys and any(
        k.startswith("key_encoder.") for k in moco_keys
    )
    for k in moco_keys:
        assert torch.equal(a[k], b[k]), k
    assert all("eval/" not in r for r in read_rows(out))
