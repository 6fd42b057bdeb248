"""Data-parallel GGN with curvfx on torch.distributed.

Run on one machine with two CPU processes (gloo):

    torchrun --nproc_per_node=2 examples/distributed_ggn.py

or on GPUs, one process per GPU (nccl; the same code path):

    torchrun --nproc_per_node=4 examples/distributed_ggn.py --backend nccl

Every rank builds the same model (same seed) and keeps its own, unevenly sized shard of one
synthetic classification data set. The GGN operator built with ``process_group=True``
all-reduces each product, so every rank gets the curvature of the loss on *all* the data;
the estimators on top (trace, eigenvalues, CG) run in lockstep because every rank draws
the same probes (the generators below are seeded identically on every rank). Rank 0 then
checks the results against a single-process GGN on the full data set.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import curvfx

N, D, C = 600, 20, 5


def main() -> None:
    """Build the data-parallel GGN, use it, and compare with one process on all the data."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()

    # A timeout bounds every collective: a rank that fails outside curvfx, or dies, makes the
    # others raise after it instead of hanging (curvfx's own errors reach every rank at once).
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)

    # The same model and data set on every rank; rank r keeps a shard of size ∝ r + 1.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, C)).double().to(device)
    X = torch.randn(N, D, dtype=torch.float64, device=device)
    y = torch.randint(0, C, (N,), device=device)
    bounds = [N * r * (r + 1) // (world * (world + 1)) for r in range(world + 1)]
    shard = (X[bounds[rank] : bounds[rank + 1]], y[bounds[rank] : bounds[rank + 1]])

    # A DDP model works as is: curvfx uses its .module, no gradient all-reduce is triggered.
    ddp = nn.parallel.DistributedDataParallel(model)
    G = curvfx.ggn(ddp, nn.CrossEntropyLoss(), shard, process_group=True)
    P = G.shape[0]

    def seeded(seed: int) -> torch.Generator:  # identical on every rank: identical probes
        return torch.Generator(device or "cpu").manual_seed(seed)

    v = torch.randn(P, generator=seeded(1), dtype=torch.float64, device=device)
    Gv = G @ v
    trace = curvfx.trace(G, "hutchinson", num_samples=20, generator=seeded(2))
    top = curvfx.eigsh(G, k=2, generator=seeded(3), return_eigenvectors=False)
    x, info = curvfx.cg(G, v, damping=1e-2, tol=1e-10)

    if rank == 0:
        G_full = curvfx.ggn(model, nn.CrossEntropyLoss(), (X, y))  # one process, all the data
        checks = {
            "G v": (Gv, G_full @ v),
            "Hutchinson trace": (
                trace,
                curvfx.trace(G_full, "hutchinson", num_samples=20, generator=seeded(2)),
            ),
            "top-2 eigenvalues": (
                top,
                curvfx.eigsh(G_full, k=2, generator=seeded(3), return_eigenvectors=False),
            ),
            "CG solution": (x, curvfx.cg(G_full, v, damping=1e-2, tol=1e-10)[0]),
        }
        print(f"{world} ranks, shard sizes {[b - a for a, b in zip(bounds, bounds[1:])]}, P = {P}")
        print(f"trace ≈ {float(trace):.4f}, top eigenvalues {top.tolist()}, CG: {info.num_iters} iterations")
        for name, (distributed, single) in checks.items():
            err = float(torch.linalg.vector_norm(distributed - single) / torch.linalg.vector_norm(single))
            print(f"{name:18s} relative error to one process on all the data: {err:.1e}")
            assert err < 1e-10, name
    dist.barrier()  # every rank tears gloo down together (a rank leaving early aborted another's)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
