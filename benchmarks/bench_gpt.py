"""A GPT-style decoder: curvature ops as ratios to one gradient, peak memory, curvlinops beside.

The model (``GPT`` of ``tests/zoo.py``): token and position embeddings, pre-LayerNorm
blocks of causal self-attention (``F.scaled_dot_product_attention(is_causal=True)``) and a
GELU MLP of width 4·128, a final LayerNorm and an output layer tied to the token embedding,
GPT-2's initialization (N(0, 0.02²) weights: with unit-variance embeddings the tied logits
saturate the softmax);
vocabulary 512, width 128, 4 blocks of 4 heads, context 64 (P = 867,072).
Batch: 8 sequences of 64 tokens, targets with about 10 % set to -100
(``nn.CrossEntropyLoss(ignore_index=-100)`` on logits [N, V, T]). CPU, float32.

Ops, each timed round-robin with a gradient of the same batch (``_common.time_ops``):
gradient (default SDPA kernel, the unit; and with the math kernel, which curvfx uses
inside its products), HVP (``curvfx.hvp``; in the full run also each ``strategy=``), GGN-vp
(``curvfx.ggn_vp``), the MC diagonal of the GGN (one sampled target per position), the top
GGN eigenvalue of each transformer block (``curvfx.eigsh(k=1, tol=1e-3)`` on the block's
parameters, all blocks in one timing), and curvlinops' ``HessianLinearOperator`` /
``GGNLinearOperator`` matvecs as they are and inside ``sdpa_kernel(SDPBackend.MATH)``
(curvlinops 3.0 has no exact diagonal of the GGN; its diagonals are Hutchinson / XDiag).

The exact diagonal of the GGN needs the output factor S of the loss Hessian, [K, N, V, T]
with K = V·T columns (one per class and position): 32,768 × 8 × 512 × 64 floats = 34 GB at
T = 64, more than this machine has, so it is timed on the same model with sequences
shortened to ``--diag-seq`` tokens (default 2: K = 1,024), both routes (``backend=
"structured"``, the default, and ``"generic"``), beside a gradient of that short batch.

* --quick (< 2 min): 3 rounds, an op whose first call takes over 1 s is timed by that call
  alone, no explicit strategies, no generic exact diagonal.
* rel. diff: ‖peer - curvfx‖ / ‖curvfx‖ (the MC diagonal's row: the spread to another seed).

    python benchmarks/bench_gpt.py [--quick] [--threads 2] [--json out.json] [--diag-seq 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import machine, time_ops
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvfx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import GPT

VOCAB, CONTEXT, WIDTH, BLOCKS, HEADS = 512, 64, 128, 4, 4
BATCH, IGNORED = 8, 0.1
QUICK = {"repeats": 3, "slow_seconds": 1.0, "max_seconds": 2.0, "timeout": 120.0}
FULL = {"repeats": 10, "slow_seconds": 20.0, "max_seconds": 10.0, "timeout": 600.0}
MAX_FACTOR_BYTES = 4 * 2**30  # the exact diagonal's factor S above this: not run at that size


def gpt2_init_(model: nn.Module) -> nn.Module:
    """GPT-2's initialization, in place: N(0, 0.02²) weights of Linear and Embedding, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def batch(seq: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids [BATCH, seq] and targets [BATCH, seq], about ``IGNORED`` of them -100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (BATCH, seq), generator=g)
    y = torch.randint(0, VOCAB, (BATCH, seq), generator=g)
    y[torch.rand(BATCH, seq, generator=g) < IGNORED] = -100
    y[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)  # every sample keeps a target
    return x, y


def main_ops(model, loss_fn, x, y, quick: bool) -> tuple[dict, dict, dict]:
    """``{label: callable}`` of the ops on the full batch, their op group, and reference labels."""
    fn, params = curvfx.make_functional(model)
    plist = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    P = sum(p.numel() for p in params.values())
    v = torch.randn(P, generator=g)
    v_dict = curvfx.unravel(v, params)

    def loss_at(p):
        return loss_fn(fn(p, x), y)

    def math_gradient():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.grad(loss_fn(model(x), y), plist)

    def mc_diag(seed):
        gen = torch.Generator().manual_seed(seed)
        return curvfx.diagonal(curvfx.fisher(model, loss_fn, (x, y), kind="mc", generator=gen), "exact")

    ops = {
        "gradient": ("gradient", lambda: torch.autograd.grad(loss_fn(model(x), y), plist)),
        "gradient, math SDPA kernel": ("gradient", math_gradient),
        "curvfx hvp": ("HVP", lambda: curvfx.hvp(loss_at, params, v_dict)),
    }
    if not quick:
        for s in ("autograd", "rev-rev", "fwd-rev"):
            ops[f"curvfx hvp strategy={s}"] = (
                "HVP",
                lambda s=s: curvfx.hvp(loss_at, params, v_dict, strategy=s),
            )
    ops["curvfx ggn_vp"] = ("GGN-vp", lambda: curvfx.ggn_vp(fn, loss_fn, params, x, y, v_dict))
    if not quick:
        for s in ("autograd", "forward-ad", "func"):
            ops[f"curvfx ggn_vp strategy={s}"] = (
                "GGN-vp",
                lambda s=s: curvfx.ggn_vp(fn, loss_fn, params, x, y, v_dict, strategy=s),
            )
    ops["curvfx MC diag GGN (1 sample)"] = ("MC diag GGN", lambda: mc_diag(1))
    eig = block_eigenvalues(model, loss_fn, x, y)
    ops[f"curvfx eigsh per block, {eig.how}"] = ("top GGN eigenvalue, each block", eig)
    ops |= curvlinops_ops(model, loss_fn, x, y, v)
    refs = {"HVP": "curvfx hvp", "GGN-vp": "curvfx ggn_vp", "MC diag GGN": "curvfx MC diag GGN (1 sample)"}
    reseeded = {"curvfx MC diag GGN (1 sample)": lambda: mc_diag(11)}
    return ops, refs, reseeded


def block_eigenvalues(model, loss_fn, x, y):
    """Top GGN eigenvalue of each block's parameters: ``op.restrict`` when curvfx has it, else ``params=``."""
    _, params = curvfx.make_functional(model)
    groups = [[k for k in params if k.startswith(f"blocks.{i}.")] for i in range(len(model.blocks))]
    G = curvfx.ggn(model, loss_fn, (x, y))
    restrict = getattr(G, "restrict", None)

    def run():
        values = []
        for i, names in enumerate(groups):
            op = (
                restrict(names)
                if restrict is not None
                else curvfx.ggn(model, loss_fn, (x, y), params={k: params[k] for k in names})
            )
            gen = torch.Generator().manual_seed(3 + i)
            values.append(curvfx.eigsh(op, k=1, tol=1e-3, generator=gen, return_eigenvectors=False))
        return torch.cat([torch.as_tensor(val).reshape(-1) for val in values])

    run.how = "op.restrict(names)" if restrict is not None else "ggn(params=block)"
    return run


def curvlinops_ops(model, loss_fn, x, y, v) -> dict:
    """curvlinops' Hessian and GGN matvecs, as they are and with the math SDPA kernel forced."""
    try:
        import curvlinops
    except ImportError as err:
        return {"curvlinops": ("absent", _raiser(err))}
    twin = copy.deepcopy(model)
    plist = list(twin.parameters())
    kw = {"check_deterministic": False}
    ops = {}
    for name, cls, group in (
        ("HessianLinearOperator", curvlinops.HessianLinearOperator, "HVP"),
        ("GGNLinearOperator", curvlinops.GGNLinearOperator, "GGN-vp"),
    ):
        try:
            op = cls(twin, loss_fn, plist, [(x, y)], **kw)
        except Exception as err:  # reported in the row, not fatal
            ops[f"curvlinops {name} @ v"] = (group, _raiser(err))
            continue

        def math(op=op):
            with sdpa_kernel(SDPBackend.MATH):
                return op @ v

        ops[f"curvlinops {name} @ v"] = (group, lambda op=op: op @ v)
        ops[f"curvlinops {name} @ v, math SDPA kernel"] = (group, math)
    return ops


def diag_ops(model, loss_fn, seq: int, quick: bool) -> tuple[dict, dict]:
    """Exact diag GGN on sequences of ``seq`` tokens, both backends, and that batch's gradient."""
    x, y = batch(seq, seed=1)
    plist = list(model.parameters())
    G = curvfx.ggn(model, loss_fn, (x, y))
    tag = f"T={seq}"
    ops = {
        f"gradient {tag}": ("gradient", lambda: torch.autograd.grad(loss_fn(model(x), y), plist)),
        f"curvfx exact diag GGN {tag} (structured)": (
            "exact diag GGN",
            lambda: G._exact_diagonal(backend="structured"),
        ),
    }
    if not quick:
        ops[f"curvfx exact diag GGN {tag} (generic)"] = (
            "exact diag GGN",
            lambda: G._exact_diagonal(backend="generic"),
        )
    return ops, {"exact diag GGN": f"curvfx exact diag GGN {tag} (structured)"}


def _raiser(err):
    def fail():
        raise err

    return fail


def run(args) -> dict:
    torch.manual_seed(0)
    model = gpt2_init_(GPT(VOCAB, CONTEXT, WIDTH, HEADS, hidden=4 * WIDTH, blocks=BLOCKS))
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    x, y = batch(CONTEXT)
    P = sum(p.numel() for p in model.parameters())
    timing = QUICK if args.quick else FULL
    results = {
        "machine": machine("cpu", args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "P": P,
        "N": BATCH,
        "T": CONTEXT,
        "ignored_targets": int((y == -100).sum()),
        "tables": {},
    }
    factor_bytes = VOCAB * CONTEXT * BATCH * VOCAB * CONTEXT * 4
    results["exact_diag_full_T"] = (
        f"not run: the GGN factor S would be [{VOCAB * CONTEXT}, {BATCH}, {VOCAB}, {CONTEXT}] "
        f"= {factor_bytes / 2**30:.0f} GiB (float32)"
        if factor_bytes > MAX_FACTOR_BYTES
        else None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for title, (ops, refs, reseeded) in {
            f"full batch (N={BATCH}, T={CONTEXT})": main_ops(model, loss_fn, x, y, args.quick),
            f"exact diag GGN (N={BATCH}, T={args.diag_seq})": (
                *diag_ops(model, loss_fn, args.diag_seq, args.quick),
                {},
            ),
        }.items():
            start = time.perf_counter()
            results["tables"][title] = table(ops, refs, reseeded, timing)
            print(f"  {title}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return results


def table(ops, refs, reseeded, timing) -> dict:
    """Time every op (round-robin), with memory and agreement to its group's curvfx reference."""
    values, memory = {}, {}
    times = time_ops(
        {k: f for k, (_, f) in ops.items()}, device="cpu", results=values, memory=memory, **timing
    )
    base = next(times[k] for k, (group, _) in ops.items() if group == "gradient")
    rows = {}
    for label, (group, _) in ops.items():
        t = times[label]
        row = {"op": group}
        if isinstance(t, float):
            row |= {"median_ms": 1e3 * t, "ratio": t / base, "peak_mib": memory.get(label)}
            ref = refs.get(group)
            if label in reseeded and label in values:
                row["rel_diff"], row["seed_spread"] = _rel_diff(reseeded[label](), values[label]), True
            elif ref is not None and ref != label and ref in values:
                row["rel_diff"] = _rel_diff(values[label], values[ref])
        else:
            row["error"] = t
        rows[label] = row
    return rows


def _flat(value) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().reshape(-1)
    if isinstance(value, dict):
        value = list(value.values())
    return torch.cat([_flat(v) for v in value])


def _rel_diff(value, ref) -> float:
    a, b = _flat(value).double(), _flat(ref).double()
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}.", ""]
    mode = "`--quick`" if results["quick"] else "full"
    lines += [
        f"Run: {mode}, {results['date']}, {results.get('seconds', 0):.0f} s in all. "
        f"P = {results['P']:,}; batch N = {results['N']}, T = {results['T']} "
        f"({results['ignored_targets']} targets = -100).",
        "",
    ]
    for title, rows in results["tables"].items():
        lines += [f"#### {title}", ""]
        lines += ["| op | implementation | median ms | × gradient | peak MiB | rel. diff to curvfx |"]
        lines += ["|---|---|---:|---:|---:|---:|"]
        for label, row in rows.items():
            if "error" in row:
                lines.append(f"| {row['op']} | {label} | fails: {row['error']} | — | — | — |")
                continue
            diff = row.get("rel_diff")
            diff = (
                "—" if diff is None else f"{diff:.1e}" + (" (seed spread)" if row.get("seed_spread") else "")
            )
            peak = "—" if row.get("peak_mib") is None else f"{row['peak_mib']:.1f}"
            lines.append(
                f"| {row['op']} | {label} | {row['median_ms']:.1f} | {row['ratio']:.2f}× | {peak} | {diff} |"
            )
        lines.append("")
    if results.get("exact_diag_full_T"):
        lines += [f"Exact diag GGN at T = {results['T']}: {results['exact_diag_full_T']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, slow calls timed once (< 2 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--diag-seq", type=int, default=1, help="sequence length for the exact diag GGN")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - start
    print(f"# curvfx GPT-style decoder benchmark{' (--quick)' if args.quick else ''}\n\n{markdown(results)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
