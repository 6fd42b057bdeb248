"""Cost of one HVP and one GGN-vector product as ratios to one gradient on the same batch.

Runs on CPU (and on CUDA when available) for an MLP and a CNN with cross-entropy (and the
MLP with MSE), timing in the same run: the batch gradient (``torch.autograd.grad``), every
curvfx HVP strategy, plain double backprop, and every curvfx GGN-vp strategy.

    python benchmarks/bench_core.py [--quick] [--device cpu|cuda] [--threads 2] [--json out.json]
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
    fn, params = curvfx.make_functional(model)
    plist = list(model.parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    vlist = list(v.values())

    def gradient():
        return torch.autograd.grad(loss_fn(model(x), y), plist)

    def double_backprop():
        g = torch.autograd.grad(loss_fn(model(x), y), plist, create_graph=True)
        return torch.autograd.grad(g, plist, grad_outputs=vlist)

    def batch_loss(p):
        return loss_fn(fn(p, x), y)

    ops = {"gradient": gradient, "HVP plain double backprop": double_backprop}
    for s in ("autograd", "rev-rev", "fwd-rev"):
        ops[f"HVP curvfx strategy={s}"] = lambda s=s: curvfx.hvp(batch_loss, params, v, strategy=s)
    for s in ("autograd", "forward-ad", "func"):
        ops[f"GGN-vp curvfx strategy={s}"] = lambda s=s: curvfx.ggn_vp(
            fn, loss_fn, params, x, y, v, strategy=s
        )
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
    repeats = 5 if args.quick else 20
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, {device}",
        "cases": {},
    }
    print(f"# curvfx core benchmark — {results['machine']}\n")
    for case, (model, loss_fn, x, y) in cases(device).items():
        rows = run_case(model, loss_fn, x, y, repeats, device)
        results["cases"][case] = rows
        print_table(case, rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
