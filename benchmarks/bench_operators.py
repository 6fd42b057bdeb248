"""Cost of operator products and estimators as ratios to one gradient on the same batch.

For an MLP and a CNN with cross-entropy (CPU, or CUDA with ``--device cuda``), times in
one round-robin run: the batch gradient, a GGN and a Hessian matvec, a 16-column GGN
matmat and 16 separate matvecs, the exact GGN diagonal, a 20-probe Hutchinson trace of the
GGN, and the top GGN and Hessian eigenvalue (Lanczos).

    python benchmarks/bench_operators.py [--quick] [--device cpu|cuda] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from _common import cases, print_table, time_ops

import curvfx


def run_case(model, loss_fn, x, y, repeats, device):
    model, x, y = model.to(device), x.to(device), y.to(device)
    plist = list(model.parameters())
    G = curvfx.ggn(model, loss_fn, (x, y))
    H = curvfx.hessian(model, loss_fn, (x, y))
    gen = torch.Generator(device).manual_seed(0)
    V = torch.randn(G.shape[0], 16, generator=gen, device=device)

    def sixteen_matvecs():
        return [G @ V[:, k] for k in range(16)]

    ops = {
        "gradient": lambda: torch.autograd.grad(loss_fn(model(x), y), plist),
        "GGN matvec": lambda: G @ V[:, 0],
        "Hessian matvec": lambda: H @ V[:, 0],
        "GGN matmat, 16 columns": lambda: G @ V,
        "GGN 16 separate matvecs": sixteen_matvecs,
        "exact diag GGN": lambda: curvfx.diagonal(G, "exact"),
        "Hutchinson trace GGN, 20 probes": lambda: curvfx.trace(
            G, "hutchinson", num_samples=20, generator=torch.Generator(device).manual_seed(1)
        ),
        "top GGN eigenvalue": lambda: curvfx.eigsh(
            G, k=1, generator=torch.Generator(device).manual_seed(2), return_eigenvectors=False
        ),
        "top Hessian eigenvalue": lambda: curvfx.eigsh(
            H, k=1, generator=torch.Generator(device).manual_seed(2), return_eigenvectors=False
        ),
    }
    return time_ops(ops, repeats, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    repeats = 2 if args.quick else 5
    machine = (
        f"{platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, {device}"
    )
    results = {"machine": machine, "cases": {}}
    print(f"# curvfx operator benchmark — {machine}\n")
    for case, (model, loss_fn, x, y) in cases(device).items():
        if "MSE" in case:
            continue
        rows = run_case(model, loss_fn, x, y, repeats, device)
        results["cases"][case] = rows
        print_table(case, rows)
        matmat, separate = rows["GGN matmat, 16 columns"], rows["GGN 16 separate matvecs"]
        print(f"16-column matmat / 16 matvecs: {matmat / separate:.2f} (target ≤ 0.5)\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
