"""Scaling of a data-parallel curvature matvec from 1 to 2 processes (gloo, CPU, 127.0.0.1).

Strong scaling: the same N samples are held by one process, or split evenly over two
processes (``process_group=True``), each process using ``--threads`` intra-op threads. Every
configuration runs in freshly spawned processes. Each timing starts after a barrier (all
ranks start together) and ends when the rank has its result; the slowest rank's time counts
(all-reduce MAX), the all-reduce of the product included; the ops are timed round-robin and
the median over repeats is reported. Columns:

* "1 proc": the plain operator (no process group) on all N samples;
* "1 proc, group": the same with ``process_group=True`` in a world of one (the cost of the
  distributed path itself: the exchange buffer and the fingerprints of v and θ);
* "2 procs": N/2 samples per process; speedup = "1 proc" / "2 procs" (ideal: 2 when the
  machine has two idle cores per thread);
* "all-reduce of P numbers" is timed alone as a row, for the communication share.

    python benchmarks/bench_distributed.py [--quick] [--threads 1] [--batch 2048] [--cnn-batch 128]
                                           [--json out.json]

At small N a matvec of the MLP (P = 269k) is dominated by O(P) work that does not shrink
with the shard (e.g. N = 128 and 256 cost the same), so strong scaling needs N in the
thousands there; the CNN (P = 26k) is compute-bound already at N = 128.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import cnn, mlp
from torch import nn

import curvfx

CONFIGS = {"1 proc": (1, False), "1 proc, group": (1, True), "2 procs": (2, True)}


def make_cases(batch: int, n_cnn: int) -> dict:
    """The same (model, loss, X, y) in every process; N = ``batch`` (MLP), ``n_cnn`` (CNN)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return {
        f"MLP 784-256-256-10 CE N={batch}": (
            mlp(),
            nn.CrossEntropyLoss(),
            torch.randn(batch, 784, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        ),
        f"CNN 2conv+linear CE N={n_cnn}": (
            cnn(),
            nn.CrossEntropyLoss(),
            torch.randn(n_cnn, 3, 32, 32, generator=g),
            torch.randint(0, 10, (n_cnn,), generator=g),
        ),
    }


def _worker(rank: int, world: int, use_group: bool, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    results = {}
    for name, (model, loss_fn, X, y) in make_cases(args.batch, args.cnn_batch).items():
        bounds = [len(X) * r // world for r in range(world + 1)]
        shard = (X[bounds[rank] : bounds[rank + 1]], y[bounds[rank] : bounds[rank + 1]])
        group = True if use_group else None
        G = curvfx.ggn(model, loss_fn, shard, process_group=group)
        H = curvfx.hessian(model, loss_fn, shard, process_group=group)
        V = torch.randn(G.shape[0], 16, generator=torch.Generator().manual_seed(1))
        buf = torch.zeros(G.shape[0])
        ops = {
            "GGN matvec": lambda G=G, V=V: G @ V[:, 0],
            "Hessian matvec": lambda H=H, V=V: H @ V[:, 0],
            "GGN matmat, 16 columns": lambda G=G, V=V: G @ V,
            "all-reduce of P numbers": lambda buf=buf: dist.all_reduce(buf),
        }
        results[name] = {"P": G.shape[0], "times": time_synchronized(ops, args.repeats)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def time_synchronized(ops: dict, repeats: int) -> dict:
    """Per op, the medians over ``repeats`` of the slowest rank's wall and CPU time, started after a barrier.

    The CPU time (``time.process_time``: this process's threads, gloo's included, without
    the time spent waiting) is what the op costs a rank when it has its cores to itself; on
    a loaded machine it predicts the scaling better than the wall time.
    """
    for op in ops.values():  # warm-up
        op()
    times = torch.zeros(2, len(ops), repeats, dtype=torch.float64)  # wall, cpu
    for r in range(repeats):
        for i, op in enumerate(ops.values()):
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            op()
            times[:, i, r] = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu])
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return {
        kind: {name: statistics.median(times[k, i].tolist()) for i, name in enumerate(ops)}
        for k, kind in enumerate(("wall", "cpu"))
    }


def run_config(world: int, use_group: bool, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(_worker, args=(world, use_group, port, args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--batch", type=int, default=2048, help="N, the total number of MLP samples")
    parser.add_argument("--cnn-batch", type=int, default=128, help="N, the total number of CNN samples")
    parser.add_argument("--json", default=None, help="write results to this file")
    args = parser.parse_args()
    args.repeats = 5 if args.quick else 20
    runs = {label: run_config(world, use_group, args) for label, (world, use_group) in CONFIGS.items()}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# curvfx data-parallel matvec scaling (torch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, {args.threads} thread(s) per process, load average {load:.1f})\n"
    )
    for case, first in runs["1 proc"].items():
        for kind, what in (("wall", "wall-clock"), ("cpu", "CPU time of the busiest rank")):
            print(f"## {case}, P = {first['P']}: {what}\n")
            print("| op | " + " | ".join(f"{label} ms" for label in CONFIGS) + " | speedup 1 → 2 |")
            print("|---|" + "---:|" * (len(CONFIGS) + 1))
            for op in first["times"][kind]:
                cells = [runs[label][case]["times"][kind][op] for label in CONFIGS]
                speedup = "—" if op == "all-reduce of P numbers" else f"{cells[0] / cells[-1]:.2f}×"
                row = " | ".join(f"{1e3 * t:.2f}" for t in cells)
                print(f"| {op} | {row} | {speedup} |")
            print()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
