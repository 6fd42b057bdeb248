"""Curvature per layer: trace and top eigenvalues of each layer's diagonal block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvfx._arguments import check_count
from curvfx.estimators.eigen import eigsh
from curvfx.estimators.trace import METHODS, trace
from curvfx.operators._base import LinearOperator
from curvfx.operators._restrict import layer_names

__all__ = ["LayerCurvature", "layer_curvature"]


@dataclass(frozen=True)
class LayerCurvature:
    """Curvature of one layer's block ``A_l = A[S_l, S_l]`` (S_l: the layer's parameters).

    Attributes:
        num_params: P_l, the number of the layer's parameters.
        trace: tr(A_l), a 0-d tensor.
        eigenvalues: The min(k, P_l) largest eigenvalues of A_l, descending.
    """

    num_params: int
    trace: Tensor
    eigenvalues: Tensor


def layer_curvature(
    A: LinearOperator,
    layers: list[str] | None = None,
    *,
    k: int = 1,
    trace_method: str = "exact",
    num_samples: int = 100,
    num_iters: int | None = None,
    generator: torch.Generator | None = None,
    max_size: int = 4096,
) -> dict[str, LayerCurvature]:
    """Trace and top-k eigenvalues of each layer's block of a curvature operator.

    For each layer l (a module prefix or parameter name, as ``A.restrict`` takes), the
    block ``A_l = A[S_l, S_l]`` is ``A.restrict(l)`` — the curvature with respect to the
    layer's parameters, the others held fixed — and

        trace_l = tr(A_l)  (:func:`curvfx.trace` with ``trace_method``),
        eigenvalues_l = the min(k, P_l) largest eigenvalues of A_l  (:func:`curvfx.eigsh`).

    Cost per layer: the trace's cost (free from the factored exact diagonal for GGN and
    Fisher; P_l products for an exact Hessian trace, refused above ``max_size``; m
    products for the stochastic methods) plus at most ``num_iters`` Lanczos products.

    Args:
        A: A curvature operator over an ``nn.Module``'s parameters (:func:`curvfx.hessian`,
            :func:`curvfx.ggn`, :func:`curvfx.fisher`, :func:`curvfx.empirical_fisher`).
        layers: Layer names; default: the modules that own parameters directly, in
            parameter order (``"0.weight"``, ``"0.bias"`` -> ``"0"``).
        k: Number of eigenvalues per layer (fewer for a layer with P_l < k).
        trace_method: ``method`` of :func:`curvfx.trace`.
        num_samples: Products per trace for the stochastic ``trace_method``.
        num_iters: Lanczos steps per layer (default as :func:`curvfx.eigsh`).
        generator: Source of probes and Lanczos start vectors (None: as the estimators).
        max_size: As :func:`curvfx.trace`.

    Returns:
        ``{layer: LayerCurvature(num_params, trace, eigenvalues)}`` in the order of ``layers``.

    Raises:
        TypeError: If ``A`` is not a curvature operator (it has no ``restrict``).
        ValueError: If ``layers``, ``k``, ``trace_method`` or ``num_samples`` (checked
            for every ``trace_method``) is invalid, a layer selects no parameter, or as
            the estimators.
    """
    if not callable(getattr(A, "restrict", None)):
        raise TypeError(f"A: expected a curvature operator with .restrict, got {type(A).__name__}")
    k = check_count(k, "k")
    if trace_method not in METHODS:
        raise ValueError(
            f"trace_method: expected one of {', '.join(map(repr, METHODS))}, got {trace_method!r}"
        )
    check_count(num_samples, "num_samples")
    if layers is None:
        if not isinstance(A.params, dict):
            raise ValueError("layers: required when the operator's params are not a dict of named parameters")
        layers = layer_names(A.params)
    if isinstance(layers, str) or not isinstance(layers, list | tuple) or not layers:
        raise ValueError(f"layers: expected a non-empty list of layer names, got {layers!r}")
    out = {}
    for layer in layers:
        block = A.restrict(layer)
        P = block.shape[0]
        t = trace(block, trace_method, num_samples=num_samples, generator=generator, max_size=max_size)
        iters = None if num_iters is None else min(num_iters, P)
        values = eigsh(block, min(k, P), num_iters=iters, generator=generator, return_eigenvectors=False)
        out[layer] = LayerCurvature(P, t, values)
    return out
