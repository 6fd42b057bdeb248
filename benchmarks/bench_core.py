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
import statistics
import time

import torch
from torch import nn

import curvfx


def mlp(widths=(784, 256, 256, 10)) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def cases(device):
    g = torch.Generator().manual_seed(0)
    x_mlp = torch.randn(128, 784, generator=g)
    y_cls = torch.randint(0, 10, (128,), generator=g)
    x_cnn = torch.randn(64, 3, 32, 32, generator=g)
    y_cnn = torch.randint(0, 10, (64,), generator=g)
    y_reg = torch.randn(128, 10, generator=g)
    return {
        "MLP 784-256-256-10 N=128 CE": (mlp(), nn.CrossEntropyLoss(), x_mlp, y_cls),
        "MLP 784-256-256-10 N=128 MSE": (mlp(), nn.MSELoss(), x_mlp, y_reg),
        "CNN 2conv+linear N=64 CE": (cnn(), nn.CrossEntropyLoss(), x_cnn, y_cnn),
    }


def median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    for s in ("autograd", "func"):
        ops[f"GGN-vp curvfx strategy={s}"] = lambda s=s: curvfx.ggn_vp(
            fn, loss_fn, params, x, y, v, strategy=s
        )
    rows = {}
    for name, op in ops.items():
        try:
            rows[name] = median_time(op, repeats, device)
        except ValueError as err:  # e.g. fwd-rev on mse_loss in torch 2.13
            rows[name] = f"n/a ({str(err).split(';')[0]})"
    return rows


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
        base = rows["gradient"]
        results["cases"][case] = rows
        print(f"## {case}\n\n| op | median ms | ratio to gradient |\n|---|---:|---:|")
        for name, t in rows.items():
            if isinstance(t, float):
                print(f"| {name} | {1e3 * t:.2f} | {t / base:.2f}× |")
            else:
                print(f"| {name} | {t} | — |")
        print()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
