"""Local NT-Xent fwd+bwd: symmetric tiles (each tile once) vs the general chunked kernel.

Side by side in one process, alternating, on the same L2-normalised views::

    python scripts/ntxent_tiles_timing.py --sizes 1024,4096,8192 --dim 128 --repeats 3

``N`` is the number of pairs (the similarity matrix is 2N x 2N). Prints the
median time of each kernel and their ratio; the load average goes with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dist_infonce.kernels import chunked_lse
from dist_infonce.kernels.symmetric import self_lse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,4096,8192", help="pairs N, comma-separated")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    t = torch.tensor(1.0 / args.temperature)
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()}")
    print("| N pairs | D | general s | symmetric s | ratio |\n|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        z = torch.nn.functional.normalize(torch.randn(2 * n, args.dim), dim=1).requires_grad_()
        own = torch.arange(2 * n)
        kernels = {
            "general": lambda z=z, own=own: chunked_lse(
                z, z, t, mask_idx=own, chunk_size=args.chunk
            )[0],
            "symmetric": lambda z=z: self_lse(z, t, args.chunk),
        }
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fn in kernels.items():
                z.grad = None
                t0 = time.perf_counter()
                fn().sum().backward()
                times[name].append(time.perf_counter() - t0)
        g, s = (statistics.median(times[k][1:]) for k in kernels)
        print(f"| {n} | {args.dim} | {g:.3f} | {s:.3f} | {g / s:.2f} |", flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
