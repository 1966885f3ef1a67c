"""The trainer's MoCo pieces on every rank of a real gloo world (see tests/_world.py).

The :class:`~dist_infonce.trainer.learner.Learner` is driven exactly as the trainer
drives it (DDP forward, backward, optimizer step, ``end_step``), on a global batch that
the test process rebuilds from a seed for its one-process float64 replay.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce.trainer.config import LossConfig, load_config
from dist_infonce.trainer.data import build_data, sample_batch
from dist_infonce.trainer.learner import Learner, build_learner
from dist_infonce.trainer.moco import MomentumEncoder, build_queue_loss
from dist_infonce.trainer.models import SiameseModel

D_IN, D_EMB, LR = 6, 4, 0.5


def tiny_model(seed: int) -> SiameseModel:
    """A shared encoder + head without BatchNorm: one process on the concatenated batch
    computes exactly what the ranks compute on their slices."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, 5))
    return SiameseModel(encoder, nn.Linear(5, D_EMB)).double()


def global_steps(seed: int, total: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch ``(x0, x1)`` of every step: x1 a noisy copy of x0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x0 = torch.randn(total, D_IN, generator=g, dtype=torch.float64)
        out.append((x0, x0 + 0.3 * torch.randn(total, D_IN, generator=g, dtype=torch.float64)))
    return out


def moco_learner(seed: int, momentum: float, queue_size: int) -> Learner:
    model = tiny_model(seed)
    cfg = LossConfig(
        kind="info_nce", temperature=0.3, learn_temperature=True, queue_size=queue_size
    )
    loss = build_queue_loss(cfg, D_EMB)
    return Learner(model, loss, "info_nce", key_encoder=MomentumEncoder(model, momentum)).double()


def training_case(
    sizes: list[int], steps: int, seed: int, momentum: float, queue_size: int
) -> dict[str, Any]:
    """``steps`` MoCo steps under DDP on this rank's rows (sizes may differ per rank)."""
    rank = dist.get_rank()
    learner = moco_learner(seed, momentum, queue_size)
    ddp = DistributedDataParallel(learner)
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=LR)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    losses = []
    for x0, x1 in global_steps(seed, sum(sizes), steps):
        loss = ddp(x0[rows], x1[rows])
        loss.backward()
        opt.step()
        learner.end_step(taken=True)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert learner.queue is not None and learner.key_encoder is not None
    return {
        "losses": losses,
        "online": {n: p.detach().clone() for n, p in learner.model.named_parameters()},
        "ema": {n: p.detach().clone() for n, p in learner.key_encoder.model.named_parameters()},
        "logit_scale": learner.loss_fn.loss.logit_scale.detach().clone(),
        "queue": learner.queue.negatives(),
        "ema_requires_grad": any(p.requires_grad for p in learner.key_encoder.parameters()),
    }


def bn_sync_case(steps: int) -> dict[str, Any]:
    """The trainer's own Learner (``mlp`` with BatchNorm) on the digits under DDP: each
    rank's batch differs, so do the online running statistics; the key encoder and the
    queue must not."""
    rank = dist.get_rank()
    cfg = load_config(
        None,
        [
            "model.name=mlp",
            "model.hidden_dim=16",
            "model.feature_dim=8",
            "model.embedding_dim=4",
            "loss.kind=info_nce",
            "loss.queue_size=20",
            "model.momentum=0.9",
            "train.batch_size=6",
        ],
    )
    data = build_data(cfg.data)
    torch.manual_seed(0)
    learner = build_learner(cfg, data)
    ddp = DistributedDataParallel(learner)
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        x0, x1, _ = sample_batch(data, cfg, step=step, rank=rank, micro=0)
        ddp(x0, x1).backward()
        opt.step()
        learner.end_step(taken=True)
        opt.zero_grad(set_to_none=True)
    assert learner.key_encoder is not None and learner.queue is not None
    flat = lambda m: torch.cat([t.detach().double().reshape(-1) for t in m.state_dict().values()])
    return {
        "ema": flat(learner.key_encoder.model),
        "online_buffers": torch.cat([b.double().reshape(-1) for b in learner.model.buffers()]),
        "queue": learner.queue.negatives().numpy().tobytes(),
        "filled": learner.queue.filled,
    }


# ------------------------------------------------------------------ the reference


def replay(
    sizes: list[int], steps: int, seed: int, momentum: float, queue_size: int
) -> dict[str, Any]:
    """One process, float64: the global-mean MoCo loss over the concatenated batch, SGD,
    the EMA, the queue (rank order within a step). The first step (empty queue) uses each
    rank's own keys as in-batch negatives, as the trainer does."""
    from tests.reference import ref_info_nce

    model = tiny_model(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    # As InfoNCE initialises it (float32), then .double() as the learner.
    logit_scale = torch.tensor(math.log(1 / 0.3)).double().requires_grad_()
    opt = torch.optim.SGD([*model.parameters(), logit_scale], lr=LR)
    queue = torch.zeros(0, D_EMB, dtype=torch.float64)
    losses = []
    for x0, x1 in global_steps(seed, sum(sizes), steps):
        q = model.encode(x0, 0)
        with torch.no_grad():
            k = ema.encode(x1, 1)
        t = 1 / logit_scale.exp()
        if len(queue) == 0:
            bounds = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
            rows = torch.cat(
                [
                    ref_info_nce(q[a:b], k[a:b], None, t, reduction="none")
                    for a, b in itertools.pairwise(bounds)
                ]
            )
        else:
            rows = ref_info_nce(q, k, queue, t, reduction="none")
        loss = rows.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.copy_(momentum * e + (1 - momentum) * p)
        queue = torch.cat([queue, k])[-queue_size:]
        losses.append(loss.item())
    return {
        "losses": losses,
        "online": {n: p.detach() for n, p in model.named_parameters()},
        "ema": {n: p.detach() for n, p in ema.named_parameters()},
        "logit_scale": logit_scale.detach(),
        "queue": queue,
    }
