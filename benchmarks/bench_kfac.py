"""Cost of KFAC as ratios to one gradient on the same batch, beside curvlinops and BackPACK.

For the 784-256-256-10 MLP (cross-entropy and MSE) and the CNN with cross-entropy (CPU, or
CUDA with ``--device cuda``), times in one round-robin run: the batch gradient, computing
the Kronecker factors (type-2, MC with one sample, empirical; EKFAC's factors and
eigenvalue corrections), the damped inverse (eigendecompositions), applying it to one
gradient, one ``curvfx.optim.KFAC`` step with factors and inverse refreshed, one with
neither (the steps in between), one SGD step (forward, backward, update), and the peers'
KFAC factors where installed (curvlinops ``KFACLinearOperator`` with
``separate_weight_and_bias=False``; BackPACK's ``KFAC`` (MC, 1 sample) and ``KFLR``
(type-2) extensions).

    python benchmarks/bench_kfac.py [--quick] [--device cpu|cuda] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch
from _common import cases, machine, print_table, time_ops

import curvfx
from curvfx.operators.kfac import kfac


def run_case(model, loss_fn, x, y, repeats, device):
    model, x, y = model.to(device), x.to(device), y.to(device)
    plist = list(model.parameters())
    data = (x, y)
    mse = isinstance(loss_fn, torch.nn.MSELoss)

    def factors(fisher_type):
        gen = torch.Generator(device).manual_seed(0)
        return lambda: kfac(model, loss_fn, data, fisher_type=fisher_type, generator=gen).factors

    K = kfac(model, loss_fn, data)
    inverse, heuristic = K.inverse(1e-3), K.inverse(1e-3, method="heuristic")
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(x), y), plist)])

    def ekfac_factors():
        return curvfx.operators.ekfac(model, loss_fn, data).spectrum

    def fresh_inverse():
        return kfac(model, loss_fn, data).inverse(1e-3)

    refresh = _kfac_step(model, loss_fn, data, factor_update_steps=1, inverse_update_steps=1)
    reuse = _kfac_step(model, loss_fn, data, factor_update_steps=10**9, inverse_update_steps=10**9)
    sgd_model = copy.deepcopy(model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-4)

    def sgd_step():
        sgd.zero_grad()
        loss_fn(sgd_model(x), y).backward()
        sgd.step()

    ops = {
        "gradient": lambda: torch.autograd.grad(loss_fn(model(x), y), plist),
        "curvfx KFAC factors type-2": factors("type-2"),
        "curvfx KFAC factors mc (1 sample)": factors("mc"),
        "curvfx KFAC factors empirical": factors("empirical"),
        "curvfx EKFAC factors + corrections type-2": ekfac_factors,
        "curvfx KFAC factors + exact inverse (eigh) type-2": fresh_inverse,
        "curvfx apply exact inverse to a gradient": lambda: inverse @ g,
        "curvfx apply π-damped inverse to a gradient": lambda: heuristic @ g,
        "SGD step": sgd_step,
        "curvfx KFAC step, factors + inverse (mc, π-damping)": refresh,
        "curvfx KFAC step, no refresh": reuse,
    }
    ops.update(_peers(model, loss_fn, x, y, mse))
    return time_ops(ops, repeats, device)


def _kfac_step(model, loss_fn, batch, **options):
    """One ``curvfx.optim.KFAC`` step on a copy of ``model`` (after a first step that sets it up)."""
    twin = copy.deepcopy(model)
    opt = curvfx.optim.KFAC(twin.parameters(), model=twin, loss_fn=loss_fn, lr=1e-4, **options)
    opt.step(batch)
    return lambda: opt.step(batch)


def _peers(model, loss_fn, x, y, mse):
    ops = {}
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        KFACLinearOperator = None
    if KFACLinearOperator is not None:
        for fisher_type in ("type-2", "mc"):

            def curvlinops_factors(fisher_type=fisher_type):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    op = KFACLinearOperator(
                        model,
                        loss_fn,
                        params,
                        [(x, y)],
                        fisher_type=fisher_type,
                        separate_weight_and_bias=False,
                        check_deterministic=False,
                        num_data=len(y),
                        num_per_example_loss_terms=1,
                    )
                    op.compute_kronecker_factors()

            ops[f"curvlinops KFAC factors {fisher_type}"] = curvlinops_factors
    try:
        from backpack import backpack, extend
        from backpack.extensions import KFAC, KFLR
    except ImportError:
        return ops
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) and mse:
        return ops
    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    for name, ext in (("mc", KFAC), ("type-2", KFLR)):

        def backpack_factors(ext=ext):
            loss = bp_loss(bp_model(x), y)
            with backpack(ext()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss.backward()
            bp_model.zero_grad(set_to_none=True)

        ops[f"BackPACK KFAC factors {name}"] = backpack_factors
    return ops


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
    repeats = 3 if args.quick else 10
    where = machine(device, args.threads)
    results = {"machine": where, "cases": {}}
    print(f"# curvfx KFAC benchmark — {where}\n")
    for case, (model, loss_fn, x, y) in cases(device).items():
        rows = run_case(model, loss_fn, x, y, repeats, device)
        results["cases"][case] = rows
        print_table(case, rows)
        step, sgd = rows["curvfx KFAC step, no refresh"], rows["SGD step"]
        refresh = rows["curvfx KFAC step, factors + inverse (mc, π-damping)"]
        print(f"KFAC step / SGD step: {step / sgd:.2f} (no refresh), {refresh / sgd:.2f} (refresh)\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
