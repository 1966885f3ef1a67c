"""CLIP-style training in your own DDP code: our loss and gradient cache, no trainer.

Two MLP towers learn a joint space for paired synthetic "modalities" (the trainer's
``synthetic_pairs`` task). The loss is the symmetric InfoNCE over the *global* batch
(``gather=True``) with a learnable temperature; the encoders run ``--micro`` rows at
a time through :func:`dist_infonce.cache.cached_backward`, so the global batch is
bounded by neither the loss's memory nor the encoders'.

    torchrun --nproc_per_node=2 examples/ddp_clip_cached.py --steps 60 --batch 512 --micro 64

Prints the mean loss over ranks every ``--log-every`` steps and recall@1 on held-out
pairs at the end (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_infonce import InfoNCE, cached_backward
from dist_infonce.trainer.config import DataConfig
from dist_infonce.trainer.data import SyntheticPairs, batch_generator, recall_at_1


class TwoTower(nn.Module):
    """One MLP per modality, into a shared 64-dim space. Shape: (B, 64), (B, 48) -> 2 x (B, 32)."""

    def __init__(self, dim_a: int = 64, dim_b: int = 48, hidden: int = 256, out: int = 32) -> None:
        super().__init__()

        def tower(d: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out)
            )

        self.a, self.b = tower(dim_a), tower(dim_b)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(xa), self.b(xb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=512, help="rows per rank per step")
    parser.add_argument("--micro", type=int, default=64, help="rows per encoder pass")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()

    # torchrun sets RANK/WORLD_SIZE/MASTER_*; a plain `python` run is a world of one.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")

    torch.manual_seed(0)  # the same initial weights on every rank
    data = SyntheticPairs(DataConfig(name="synthetic_pairs"))
    model = DistributedDataParallel(TwoTower().to(device))
    # The loss module stays outside DDP: it averages its learnable temperature's
    # gradient over the ranks itself, as DDP does for the model's.
    loss_fn = InfoNCE(0.07, symmetric=True, gather=True, learn_temperature=True).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=args.lr)

    for step in range(1, args.steps + 1):
        xa, xb = data.sample(batch_generator(seed=0, step=step, rank=rank), args.batch)[:2]
        loss = cached_backward(model, loss_fn, (xa.to(device), xb.to(device)), args.micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == 1:
            # Each rank returns its share of the global mean: their mean is the loss.
            dist.all_reduce(loss)
            if rank == 0:
                print(
                    f"step {step} loss {float(loss) / world:.4f} "
                    f"temperature {float(loss_fn.temperature.detach()):.4f}",
                    flush=True,
                )

    if rank == 0:
        with torch.no_grad():
            za, zb = model.module(data.eval_a.to(device), data.eval_b.to(device))
        za, zb = nn.functional.normalize(za, dim=-1), nn.functional.normalize(zb, dim=-1)
        print(f"recall@1 {recall_at_1(za.cpu(), zb.cpu()):.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
