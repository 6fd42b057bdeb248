"""A curvature report of a model on its data: loss, gradient, eigenvalues, traces, per-layer diagonals.

:func:`curvature_report` computes the numbers with curvfx's operators and estimators,
:func:`format_report` prints them, :func:`plot_report` draws them (matplotlib). The command
``python -m curvfx report`` (:mod:`curvfx.__main__`) runs the three on a built-in model or
on yours.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._pytree import ravel, unravel
from curvfx.estimators import density, diagonal, eigsh, spectral_density, trace
from curvfx.functional import make_functional
from curvfx.operators import empirical_fisher, ggn, hessian
from curvfx.operators._data import Batches

__all__ = ["SECTIONS", "curvature_report", "format_report", "plot_report"]

SECTIONS = (
    "loss and gradient",
    "Hessian eigenvalues",
    "GGN eigenvalues",
    "traces",
    "spectral density",
    "diagonal GGN per layer",
)


def curvature_report(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    top_k: int = 5,
    num_probes: int = 30,
    slq_probes: int = 3,
    slq_steps: int = 30,
    generator: torch.Generator | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The numbers of the report, for ``L(θ) = loss_fn(model(X), y)`` over ``data``.

    With H = ∇²_θ L, G the GGN Jᵀ(∇²_f L)J and F the empirical Fisher (all of the loss as
    written, over all batches of ``data``; see :func:`curvfx.hessian`):

    * ``loss`` L(θ), ``grad_norm`` ‖∇_θ L‖ (one pass over the data);
    * ``hessian_eigenvalues``, ``ggn_eigenvalues``: the ``top_k`` largest, by
      :func:`curvfx.eigsh` (Lanczos); ``*_converged`` says whether Lanczos met its tolerance;
    * ``ggn_trace``, ``fisher_trace``: exact, as sums of the exact diagonals
      (:func:`curvfx.diagonal`, layer-aware); ``hessian_trace`` ± ``hessian_trace_se``:
      Hutchinson with ``num_probes`` Rademacher probes and its standard error;
    * ``slq_nodes``, ``slq_weights``: :func:`curvfx.spectral_density` of H (``slq_probes``
      probes, ``slq_steps`` Lanczos steps), and ``negative_mass``, the share of the
      estimated spectrum below zero;
    * ``layers``: per parameter tensor, its size and the mean, max and share of tr(G) of
      its entries of diag(G).

    Cost: about 2·top_k·20 + num_probes + slq_probes·slq_steps Hessian/GGN products, and two
    exact diagonals (a few gradients each for Linear/Conv layers).

    Args:
        model: The ``nn.Module`` (trainable parameters are θ).
        loss_fn: A torch loss or ``loss_fn(outputs, targets) -> scalar``.
        data: One ``(X, y)`` batch or a re-iterable of batches.
        top_k: Number of eigenvalues of H and of G.
        num_probes: Hutchinson probes for tr(H).
        slq_probes: Probes of the spectral density.
        slq_steps: Lanczos steps per probe (at most P).
        generator: Source of all probes (default: seeded from torch's global RNG).
        progress: Called with each section's name before it is computed.

    Returns:
        A dict of plain floats, lists and tensors as listed above, plus ``P``, ``N``,
        ``num_batches``, ``seconds`` (per section) and ``model``, ``loss_fn`` names.
    """
    tell = progress or (lambda name: None)
    fn, params = make_functional(model)
    P = ravel(params).numel()
    batches = list(Batches(data))
    N = sum(int(y.shape[0]) for _, y in batches)
    top_k = min(top_k, P)
    H, G = hessian(model, loss_fn, data), ggn(model, loss_fn, data)
    out: dict[str, Any] = {"model": type(model).__name__, "loss_fn": _name(loss_fn), "P": P, "N": N}
    out["num_batches"], out["seconds"] = len(batches), {}

    def section(name):
        tell(name)
        out["seconds"][name] = time.perf_counter()

    def done(name):
        out["seconds"][name] = time.perf_counter() - out["seconds"][name]

    section("loss and gradient")
    loss, grad = _loss_and_gradient(fn, params, loss_fn, batches)
    out["loss"], out["grad_norm"] = float(loss), float(grad.norm())
    done("loss and gradient")

    for key, op, name in (("hessian", H, "Hessian eigenvalues"), ("ggn", G, "GGN eigenvalues")):
        section(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            values = eigsh(op, k=top_k, generator=generator, return_eigenvectors=False)
        out[f"{key}_eigenvalues"] = [float(v) for v in values]
        out[f"{key}_converged"] = not any(issubclass(w.category, RuntimeWarning) for w in caught)
        done(name)

    section("traces")
    d = diagonal(G, "exact")
    out["ggn_trace"] = float(d.sum())
    out["fisher_trace"] = float(trace(empirical_fisher(model, loss_fn, data), "exact"))
    estimate, se = trace(H, "hutchinson", num_samples=num_probes, generator=generator, return_std=True)
    out["hessian_trace"], out["hessian_trace_se"], out["num_probes"] = float(estimate), float(se), num_probes
    done("traces")

    section("spectral density")
    nodes, weights = spectral_density(
        H, num_probes=slq_probes, num_steps=min(slq_steps, P), generator=generator
    )
    out["slq_nodes"], out["slq_weights"] = nodes.detach().cpu(), weights.detach().cpu()
    out["negative_mass"] = float(weights[nodes < 0].sum() / weights.shape[0])
    done("spectral density")

    section("diagonal GGN per layer")
    total = float(d.sum())
    out["layers"] = [
        {
            "name": name,
            "numel": leaf.numel(),
            "mean": float(leaf.mean()),
            "max": float(leaf.max()),
            "share": float(leaf.sum()) / total if total else float("nan"),
        }
        for name, leaf in unravel(d, params).items()
    ]
    done("diagonal GGN per layer")
    return out


def format_report(r: dict) -> str:
    """The report as plain text, one block per entry of :data:`SECTIONS`."""
    lines = [
        f"curvature report — model {r['model']}, P = {r['P']:,} parameters, loss {r['loss_fn']}, "
        f"N = {r['N']:,} samples in {r['num_batches']} batch(es)",
        "",
        "== loss and gradient ==",
        f"loss L(θ)            {r['loss']:.6g}",
        f"gradient norm ‖∇L‖   {r['grad_norm']:.6g}",
    ]
    for key, title in (("hessian", "Hessian eigenvalues"), ("ggn", "GGN eigenvalues")):
        values = r[f"{key}_eigenvalues"]
        note = "" if r[f"{key}_converged"] else "   (Lanczos did not reach its tolerance)"
        lines += ["", f"== {title} (top {len(values)}, Lanczos) =={note}"]
        lines += [f"λ_{i + 1:<2d} {v: .6g}" for i, v in enumerate(values)]
    lines += [
        "",
        "== traces ==",
        f"tr(GGN)              {r['ggn_trace']:.6g}   (exact)",
        f"tr(empirical Fisher) {r['fisher_trace']:.6g}   (exact)",
        f"tr(Hessian)          {r['hessian_trace']:.6g} ± {r['hessian_trace_se']:.2g}   "
        f"(Hutchinson, {r['num_probes']} probes, ± one standard error)",
        "",
        "== spectral density of the Hessian (stochastic Lanczos quadrature) ==",
        f"eigenvalue range     [{float(r['slq_nodes'].min()):.4g}, {float(r['slq_nodes'].max()):.4g}]",
        f"negative mass        {100 * r['negative_mass']:.1f}% of the spectrum below zero",
        "",
        "== diagonal GGN per layer (exact) ==",
        f"{'parameter':<28s} {'size':>10s} {'mean':>11s} {'max':>11s} {'share of tr':>12s}",
    ]
    for layer in r["layers"]:
        lines.append(
            f"{layer['name']:<28s} {layer['numel']:>10,d} {layer['mean']:>11.4g} {layer['max']:>11.4g} "
            f"{100 * layer['share']:>11.1f}%"
        )
    return "\n".join(lines)


def plot_report(r: dict, path: str) -> None:
    """Save a figure: the smoothed Hessian spectral density and the per-layer mean diag(GGN).

    Raises:
        ImportError: If matplotlib is not installed (``pip install 'curvfx[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("--plot needs matplotlib: pip install 'curvfx[plot]'") from err
    nodes, weights = r["slq_nodes"].double(), r["slq_weights"].double()
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12)
    sigma = width / 100
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000, dtype=torch.float64)
    phi = density(nodes, weights, grid, sigma)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.semilogy(grid.numpy(), phi.clamp_min(1e-12).numpy())
    ax1.set_ylim(bottom=max(float(phi.max()) * 1e-8, 1e-12))
    ax1.set(xlabel="eigenvalue λ", ylabel="density φ_σ(λ)", title="Hessian spectral density (SLQ)")
    names = [layer["name"] for layer in r["layers"]]
    means = [max(layer["mean"], 1e-30) for layer in r["layers"]]
    ax2.barh(range(len(names)), means)
    ax2.set_yticks(range(len(names)), names, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.set(xlabel="mean of diag(GGN) entries", title="curvature per parameter tensor")
    fig.suptitle(f"{r['model']}, P = {r['P']:,}, loss {r['loss']:.4g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_and_gradient(fn, params, loss_fn, batches) -> tuple[float, Tensor]:
    """L and ∇L over the batches, combined as the operators combine them.

    For ``reduction="mean"``, L = Σ_b Z_b L_b / Σ_b Z_b (Z_b: the loss's normalizer of batch b);
    for ``"sum"``, L = Σ_b L_b.
    """
    from curvfx.losses import get_loss

    loss = get_loss(loss_fn)
    mean = loss.reduction != "sum"
    theta = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    total, grad, z_total = 0.0, None, 0.0
    for x, y in batches:
        z = float(loss.normalizer(y)) if mean else 1.0
        value = loss(fn(theta, x), y)
        g = ravel(dict(zip(theta, torch.autograd.grad(value, list(theta.values()))))) * z
        total, grad, z_total = total + z * value.item(), g if grad is None else grad + g, z_total + z
    if not mean:
        return total, grad
    return total / z_total, grad / z_total


def _name(loss_fn: Any) -> str:
    if isinstance(loss_fn, nn.Module):
        return f"{type(loss_fn).__name__}(reduction={getattr(loss_fn, 'reduction', '?')!r})"
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)
