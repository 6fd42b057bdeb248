"""Compiled versus eager curvature products, as ratios to one eager gradient on the same batch.

For each problem (MLP-CE, MLP-MSE, CNN-CE from ``_common.cases``): the compile time of a
compiled Hessian and GGN operator (``compile=True``: inductor, ``dynamic=False``; the time
includes the one self-check against eager), their steady-state matvec beside the eager
operators and the peers' HVP and GGN-vp (plain torch double backprop at least), all timed
in the same run, round-robin, as medians over rounds; and the break-even number of products
``compile time / (eager - compiled seconds per product)`` ("never" if compiled is not faster).

Each run compiles cold: inductor's on-disk caches go to a fresh temporary directory unless
``--warm-cache``.

    python benchmarks/bench_compile.py [--quick] [--threads 2] [--json out.json]
        [--case CNN] [--hvp-strategy rev-rev] [--ggn-strategy func-vjp] [--options '{"mode": ...}']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--case", action="append", help="run the cases whose name contains this")
    parser.add_argument("--hvp-strategy", default=None, help="engine the compiled Hessian traces")
    parser.add_argument("--ggn-strategy", default=None, help="engine the compiled GGN traces")
    parser.add_argument("--options", default="{}", help="torch.compile options as JSON")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches")
    args = parser.parse_args(argv)
    if not args.warm_cache:  # before torch is imported: compile cold, as a first run would
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="curvfx-bench-compile-")

    import torch
    from _common import cases, machine

    torch.set_num_threads(args.threads)
    results = {
        "machine": machine("cpu", args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "options": json.loads(args.options),
        "strategies": {"HVP": args.hvp_strategy, "GGN-vp": args.ggn_strategy},
        "cases": {},
    }
    for case, (model, loss_fn, x, y) in cases("cpu").items():
        if args.case and not any(s.lower() in case.lower() for s in args.case):
            continue
        print(f"{case} ...", file=sys.stderr, flush=True)
        results["cases"][case] = run_case(model, loss_fn, x, y, args)
    print(f"# Compiled curvature products\n\n{results['machine']}\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def run_case(model, loss_fn, x, y, args) -> dict:
    """Compile times, median seconds of every op, and the break-even counts of one problem."""
    import torch
    from _common import time_ops
    from _peers import flat, peer_ops, peer_status
    from run import context

    import curvfx

    c = context(model, loss_fn, x, y, "cpu")
    plist = list(c.model.parameters())
    batch = (c.x, c.y)
    ops = {"gradient": lambda: torch.autograd.grad(c.loss_fn(c.model(c.x), c.y), plist)}
    options = {**json.loads(args.options)}
    compile_seconds, errors = {}, {}
    for label, ctor, strategy in (
        ("HVP", curvfx.hessian, args.hvp_strategy),
        ("GGN-vp", curvfx.ggn, args.ggn_strategy),
    ):
        eager = ctor(c.model, c.loss_fn, batch)
        compiled = ctor(c.model, c.loss_fn, batch, compile=options or True)
        if strategy:
            compiled.compiled_strategy = strategy  # an experiment knob: the engine that is traced
        start = time.perf_counter()
        out = compiled @ c.v  # compiles, then checks against eager once
        compile_seconds[label] = time.perf_counter() - start
        truth = eager @ c.v
        errors[label] = float((out - truth).norm() / truth.norm())
        if compiled._compiled.fallback:
            errors[label] = f"self-check failed ({errors[label]:.1e}): eager fallback"
        ops[f"{label} curvfx eager"] = lambda op=eager: op @ c.v
        ops[f"{label} curvfx compiled"] = lambda op=compiled: op @ c.v
    if not args.no_peers:
        peers, _ = peer_ops(c, peer_status())
        for label in ("HVP", "GGN-vp"):
            for library, variants in peers.get(label, {}).items():
                for variant, fn in variants.items():
                    name = f"{label} {library}" + (f" {variant}" if variant else "")
                    ops[name] = lambda fn=fn: flat(fn())
    # a slow peer (over 1 s a call) is timed by its first call and leaves the rounds
    rows = time_ops(ops, 5 if args.quick else 20, "cpu", slow_seconds=1.0, max_seconds=10.0, timeout=120.0)
    break_even = {}
    for label, seconds in compile_seconds.items():
        saved = rows[f"{label} curvfx eager"] - rows[f"{label} curvfx compiled"]
        break_even[label] = round(seconds / saved) if saved > 0 else None
    return {
        "seconds": rows,
        "compile_seconds": compile_seconds,
        "break_even_products": break_even,
        "compiled_vs_eager_relerr": errors,
    }


def markdown(results: dict) -> str:
    """One summary table (ratios to one eager gradient), then each case's full table."""
    lines = [
        "| problem | gradient ms | HVP eager | HVP compiled | GGN-vp eager | GGN-vp compiled "
        "| compile s (HVP / GGN) | break-even products (HVP / GGN) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, r in results["cases"].items():
        t, base = r["seconds"], r["seconds"]["gradient"]

        def ratio(name, t=t, base=base):
            return f"{t[name] / base:.2f}×" if isinstance(t.get(name), float) else str(t.get(name))

        cs, be = r["compile_seconds"], r["break_even_products"]
        lines.append(
            f"| {case} | {1e3 * base:.2f} | {ratio('HVP curvfx eager')} | {ratio('HVP curvfx compiled')} "
            f"| {ratio('GGN-vp curvfx eager')} | {ratio('GGN-vp curvfx compiled')} "
            f"| {cs['HVP']:.0f} / {cs['GGN-vp']:.0f} "
            f"| {be['HVP'] if be['HVP'] is not None else 'never'} / "
            f"{be['GGN-vp'] if be['GGN-vp'] is not None else 'never'} |"
        )
    for case, r in results["cases"].items():
        base = r["seconds"]["gradient"]
        lines += ["", f"## {case}", "", "| op | median ms | ratio to gradient |", "|---|---:|---:|"]
        for name, t in r["seconds"].items():
            if isinstance(t, float):
                lines.append(f"| {name} | {1e3 * t:.2f} | {t / base:.2f}× |")
            else:
                lines.append(f"| {name} | {t} | — |")
        lines.append(f"\ncompiled vs eager relative error: {r['compiled_vs_eager_relerr']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
