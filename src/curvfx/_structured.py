"""Layer-aware exact diagonals: per-sample gradients of known layers in factored form.

For a layer ``z = W a (+ b)`` (``nn.Linear``; ``nn.Conv1d/2d`` after unfolding the input
into patches) the gradient of sample n for a cotangent ``s`` at the model outputs is
``G_n = Σ_t g_nt a_ntᵀ`` with ``g = ∂⟨f, s⟩/∂z`` and t the positions (sequence steps,
spatial locations). The diagonal of ``Σ_n Σ_k J_nᵀ s_kn s_knᵀ J_n`` is ``Σ_n Σ_k G_kn ⊙ G_kn``:

* one position, one call of the layer: ``Σ_k Σ_n g_kn² a_nᵀ²`` — no per-sample gradient is
  formed (``einsum("kno,ni->oi", g², a²)``), the cost of K backward passes to the layer
  outputs (done as one batched backward) plus one contraction;
* several positions or calls (sequences, convolutions, a layer used twice): the per-sample
  layer gradients ``G_kn`` are formed for that layer only (K·N·|W| numbers) and squared.

Layer inputs and outputs are captured by :mod:`curvfx._capture` (forward hooks removed
before returning, also on error). Parameters of other modules (and of modules
called with options this path does not cover) take the generic per-sample route
(:func:`curvfx._factors.factor_diagonal`) restricted to those parameters, so every model
the generic route accepts works, with the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvfx._capture import captured, output_grads, positions, supported_layers
from curvfx._factors import factor_diagonal
from curvfx._pytree import unsqueeze_leaves
from curvfx.functional import FunctionalModel

__all__ = ["check_backend", "sample_squares", "structured_diagonal"]

BACKENDS = ("auto", "structured", "generic")


def sample_squares(
    fn: Any,
    params: Any,
    x: Any,
    S: Tensor,
    chunk_size: int | None = None,
    per_sample: bool = False,
    backend: str = "auto",
) -> Any:
    """``Σ_n Σ_k (J_nᵀ s_kn)²`` (or per sample) by the route ``backend`` picks.

    ``backend``: "structured" (layer-aware, needs a module made functional by curvfx, params
    a dict), "generic" (per-sample vmap over all parameters, :func:`factor_diagonal`), or
    "auto" (structured when possible).

    Raises:
        ValueError: For an unknown ``backend``, or "structured" with a pure function.
    """
    check_backend(backend)
    possible = isinstance(fn, FunctionalModel) and isinstance(params, dict)
    if backend == "structured" and not possible:
        raise ValueError("backend: 'structured' needs an nn.Module model (made functional by curvfx)")
    if possible and backend != "generic":
        return structured_diagonal(fn, params, x, S, chunk_size, per_sample)
    return factor_diagonal(lambda p, xn: fn(p, unsqueeze_leaves(xn))[0], params, x, S, chunk_size, per_sample)


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming ``backend`` unless it is one of "auto", "structured", "generic"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto', 'structured' or 'generic', got {backend!r}")


def structured_diagonal(
    fn: FunctionalModel,
    params: dict[str, Tensor],
    x: Any,
    S: Tensor,
    chunk_size: int | None = None,
    per_sample: bool = False,
) -> dict[str, Tensor]:
    """``Σ_n Σ_k (J_nᵀ s_kn)²`` per parameter for ``S`` [K, N, *output_shape] (a dict like ``params``).

    With ``per_sample=True``: ``[Σ_k ‖J_nᵀ s_kn‖²]_n`` [N] per parameter instead. Known
    layers (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` with zero padding and one group)
    are handled in factored form; every other parameter by the generic route.
    """
    if S.shape[0] == 0:  # an empty factor (e.g. a loss linear in the outputs)
        return {k: S.new_zeros(S.shape[1]) if per_sample else torch.zeros_like(v) for k, v in params.items()}
    layers = supported_layers(fn.module, params)
    diag: dict[str, Tensor] = {}
    if layers:
        candidates = {name for names in layers.values() for name in names.values()}
        records: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
        with torch.enable_grad(), captured(records):
            p = {k: v.detach().requires_grad_(k in candidates) for k, v in params.items()}
            outputs = fn(p, x)
        n = S.shape[1]
        records = {m: calls for m, calls in records.items() if _samples_on_dim0(calls, n)}
        zs = [z for calls in records.values() for _, z in calls]
        grads = iter(output_grads(outputs, zs, S) if zs else ())  # ∂⟨f, s_k⟩/∂z per call, [K, *z.shape]
        for module, calls in records.items():
            per_call = [(a, next(grads)) for a, _ in calls]
            diag.update(_layer_squares(module, layers[module], per_call, per_sample))
    structured = set(diag)
    generic = {k: v for k, v in params.items() if k not in structured}
    if generic:
        fixed = {k: v for k, v in params.items() if k in structured}

        def sample_outputs(sub, xn):
            return fn({**fixed, **sub}, unsqueeze_leaves(xn))[0]

        diag.update(factor_diagonal(sample_outputs, generic, x, S, chunk_size, per_sample))
    return {k: diag[k] for k in params}


def _samples_on_dim0(calls: list[tuple[Tensor, Tensor]], n: int) -> bool:
    """Whether a layer's calls can be read per sample: called, differentiable, batch-first.

    A layer that was not called, was called without gradient, or whose input does not
    lead with the N samples (rows of a flattened batch, a sequence-first layout, a
    parameter broadcast over samples) takes the generic route instead.
    """
    return bool(calls) and all(z.requires_grad and a.dim() > 1 and a.shape[0] == n for a, z in calls)


def _layer_squares(
    module: nn.Module, names: dict[str, str], calls: list[tuple[Tensor, Tensor]], per_sample: bool
) -> dict[str, Tensor]:
    """Squared per-sample gradients of ``module``'s parameters, from its calls ``[(a, ∂/∂z [K, ...])]``.

    Summed over samples and columns k (the diagonal, shaped like the parameter), or, with
    ``per_sample``, over columns and entries ([N]).
    """
    flat = [positions(module, a, g) for a, g in calls]
    # flat: [(a [N, T, in], g [K, N, T, out])]; per-sample gradient G_kn = Σ_calls Σ_t g_knt a_ntᵀ
    out = {}
    if len(flat) == 1 and flat[0][0].shape[1] == 1:  # one call, one position: factored
        a2, g2 = flat[0][0][:, 0] ** 2, flat[0][1][:, :, 0] ** 2  # [N, in], [K, N, out]
        if "weight" in names:
            w = "kno,ni->n" if per_sample else "kno,ni->oi"
            out[names["weight"]] = torch.einsum(w, g2, a2)
        if "bias" in names:
            out[names["bias"]] = g2.sum((0, 2)) if per_sample else g2.sum((0, 1))
    else:  # per-sample layer gradients, then squared
        if "weight" in names:
            grads = sum(torch.einsum("knto,nti->knoi", g, a) for a, g in flat)
            out[names["weight"]] = (grads**2).sum((0, 2, 3) if per_sample else (0, 1))
        if "bias" in names:
            bias = sum(g.sum(2) for _, g in flat) ** 2  # [K, N, out]
            out[names["bias"]] = bias.sum((0, 2)) if per_sample else bias.sum((0, 1))
    if not per_sample and "weight" in names:
        out[names["weight"]] = out[names["weight"]].reshape(module.weight.shape)
    return out
