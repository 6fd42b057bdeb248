"""Time per step of curvfx's second-order optimizers as ratios to one SGD step on the same batch.

For the MLP (MSE and cross-entropy) and the CNN of ``_common.cases`` (CPU, or CUDA with
``--device cuda``), times in one round-robin run: an SGD step (zero_grad, forward,
backward, update), HessianFree with at most 10 and 50 (the default) CG iterations,
AdaHessian with Hutchinson's Hessian diagonal and with the exact GGN diagonal, and the
diagonal natural gradient with the empirical, MC and exact Fisher. Each optimizer has its
own copy of the model and runs on the same batch. LevenbergMarquardt / GaussNewton are not
timed here: they form the residual Jacobian [m, P] (for the MLP, 1280 × 269k numbers).

    python benchmarks/bench_optim.py [--quick] [--device cpu|cuda] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform

import torch
from _common import cases, print_table, time_ops

from curvfx.optim import AdaHessian, DiagonalNaturalGradient, HessianFree


def optimizers(model, loss_fn):
    """name -> (model copy, optimizer), each over its own copy of ``model``."""

    def build(factory):
        m = copy.deepcopy(model)
        return m, factory(m)

    gen = torch.Generator().manual_seed(0)
    return {
        "SGD step": build(lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)),
        "HessianFree, ≤ 10 CG iterations": build(
            lambda m: HessianFree(m.parameters(), model=m, loss_fn=loss_fn, cg_maxiter=10)
        ),
        "HessianFree, ≤ 50 CG iterations (default)": build(
            lambda m: HessianFree(m.parameters(), model=m, loss_fn=loss_fn)
        ),
        "AdaHessian, Hutchinson Hessian diagonal": build(
            lambda m: AdaHessian(m.parameters(), model=m, loss_fn=loss_fn, lr=1e-3, generator=gen)
        ),
        "AdaHessian, exact GGN diagonal": build(
            lambda m: AdaHessian(
                m.parameters(), model=m, loss_fn=loss_fn, lr=1e-3, curvature="ggn", method="exact"
            )
        ),
        "DiagonalNaturalGradient, empirical Fisher": build(
            lambda m: DiagonalNaturalGradient(m.parameters(), model=m, loss_fn=loss_fn, lr=1e-3)
        ),
        "DiagonalNaturalGradient, MC Fisher": build(
            lambda m: DiagonalNaturalGradient(
                m.parameters(), model=m, loss_fn=loss_fn, lr=1e-3, fisher_type="mc", generator=gen
            )
        ),
        "DiagonalNaturalGradient, exact Fisher": build(
            lambda m: DiagonalNaturalGradient(
                m.parameters(), model=m, loss_fn=loss_fn, lr=1e-3, fisher_type="exact"
            )
        ),
    }


def run_case(model, loss_fn, x, y, repeats, device):
    model, x, y = model.to(device), x.to(device), y.to(device)
    built = optimizers(model, loss_fn)

    def sgd_step(m, opt):
        opt.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    ops = {}
    for name, (m, opt) in built.items():
        if name == "SGD step":
            ops[name] = lambda m=m, opt=opt: sgd_step(m, opt)
        else:
            ops[name] = lambda opt=opt: opt.step((x, y))
    rows = time_ops(ops, repeats, device, max_seconds=20.0)
    cg_iters = {
        name: opt.global_state()["cg_iters"] for name, (_, opt) in built.items() if name.startswith("Hessian")
    }
    return rows, cg_iters


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
    repeats = 3 if args.quick else 7
    machine = (
        f"{platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, {device}"
    )
    results = {"machine": machine, "cases": {}}
    print(f"# curvfx optimizer benchmark — {machine}\n")
    print("Ratios are to one SGD step (zero_grad, forward, backward, update) on the same batch.\n")
    for case, (model, loss_fn, x, y) in cases(device).items():
        rows, cg_iters = run_case(model, loss_fn, x, y, repeats, device)
        results["cases"][case] = {"seconds": rows, "cg_iters_last_step": cg_iters}
        print_table(case, rows, baseline="SGD step")
        print(
            "CG iterations in the last HessianFree step: "
            + ", ".join(f"{k}: {v}" for k, v in cg_iters.items())
        )
        print()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
