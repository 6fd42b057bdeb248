"""Compiled versus eager curvature products, as ratios to one eager gradient on the same batch.

For each problem (MLP-CE, MLP-MSE, CNN-CE from ``_common.cases``): the compile time of a
compiled Hessian and GGN operator (``compile=True``, inductor), their steady-state matvec
beside the eager operators, and the number of products after which compiling pays off
(compile time / time saved per product).

    python benchmarks/bench_compile.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import cases, print_table, time_ops

import curvfx


def run_case(model, loss_fn, x, y, repeats):
    plist = list(model.parameters())
    ops, compile_seconds = {"gradient": lambda: torch.autograd.grad(loss_fn(model(x), y), plist)}, {}
    v = torch.randn(sum(p.numel() for p in plist))
    for name, ctor in (("Hessian", curvfx.hessian), ("GGN", curvfx.ggn)):
        eager = ctor(model, loss_fn, (x, y))
        compiled = ctor(model, loss_fn, (x, y), compile=True)
        start = time.perf_counter()
        compiled @ v  # compiles, then checks against eager once
        compile_seconds[name] = time.perf_counter() - start
        ops[f"{name} matvec eager"] = lambda eager=eager: eager @ v
        ops[f"{name} matvec compiled"] = lambda compiled=compiled: compiled @ v
    rows = time_ops(ops, repeats, "cpu")
    for name, seconds in compile_seconds.items():
        saved = rows[f"{name} matvec eager"] - rows[f"{name} matvec compiled"]
        pays = f"{seconds / saved:.0f} products" if saved > 0 else "never"
        print(f"{name}: compile + check {seconds:.1f} s; pays off after {pays}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for case, (model, loss_fn, x, y) in cases("cpu").items():
        print(f"## {case}")
        print_table(case, run_case(model, loss_fn, x, y, 5 if args.quick else 20))


if __name__ == "__main__":
    main()
