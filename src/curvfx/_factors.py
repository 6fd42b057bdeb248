"""Output-space factors of the curvature matrices, and the exact diagonal they give.

Each Gauss-Newton-type matrix is ``Σ_n J_nᵀ (Σ_k s_kn s_knᵀ) J_n`` with per-sample output
factors ``S`` [K, N, ...] (``S[k, n]`` shaped like one sample's outputs):

* GGN: ``S`` = the loss's Hessian factor;
* exact Fisher: the loss's Fisher factor;
* empirical Fisher: ``S[0, n] = √Z ∇_{f_n} L(f, y)``, K = 1, so
  ``F_emp = Z Σ_n ∇_θ L_n ∇_θ L_nᵀ`` where ``L_n`` is sample n's term of the loss as written
  and Z its normalizer (``L = (1/Z) Σ ℓ``; Z = 1 for the sum). For the mean this is
  ``(1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with ℓ_n the sample's unnormalized loss (curvlinops' convention);
* Monte-Carlo Fisher: the empirical one at targets ỹ_m drawn from the model's predictive,
  averaged over M draws: ``S[m, n] = √(Z/M) ∇_{f_n} L̃(f, ỹ_m)`` with L̃ the loss's
  negative log-likelihood (:meth:`~curvfx.losses.Loss.likelihood_loss`: L itself, without
  label smoothing, with √w for BCE entry weights w), so that it estimates the exact one.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from curvfx._engines import generator_on
from curvfx._errors import check_autograd, inside_transform
from curvfx._pytree import leaves, sample_of, sample_split, tree_map
from curvfx.losses import AutogradLoss, Loss

__all__ = ["FISHER_KINDS", "check_reduction_at", "factor_diagonal", "factor_product", "output_factor"]

FISHER_KINDS = ("exact", "empirical", "mc")
PyTree = Any


def output_factor(
    loss: Loss,
    outputs: Tensor,
    y: Tensor,
    kind: str,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample output factor ``S`` [K, *outputs.shape] of the curvature ``kind``.

    ``kind``: "ggn", or a Fisher kind in :data:`FISHER_KINDS` (see the module docstring).
    """
    if kind == "ggn":
        return loss.hessian_factor(outputs, y)
    if kind == "exact":
        return loss.fisher_factor(outputs, y)
    if kind == "empirical":
        loss.check(outputs, y)
        return _gradient_factor(loss, outputs, [y])
    generator = generator_on(generator, outputs.device)
    draws = [loss.sample_targets(outputs, generator, observed=y) for _ in range(num_samples)]
    return _gradient_factor(loss.likelihood_loss(), outputs, draws)


def factor_product(S: Tensor, u: Tensor) -> Tensor:
    """``M u`` with ``M = blockdiag_n(Σ_k s_kn s_knᵀ)``, for ``S`` [K, N, ...] and ``u`` [N, ...]."""
    dots = (S * u).flatten(2).sum(-1)  # [K, N]: s_knᵀ u_n
    return (S * dots.reshape(*dots.shape, *([1] * (u.dim() - 1)))).sum(0)


def factor_diagonal(
    sample_outputs,
    params: PyTree,
    x: Any,
    S: Tensor,
    chunk_size: int | None = None,
    per_sample: bool = False,
) -> PyTree:
    """``diag(Σ_n Σ_k J_nᵀ s_kn s_knᵀ J_n) = Σ_n Σ_k (J_nᵀ s_kn)²`` as a pytree like ``params``.

    With ``per_sample=True`` each leaf is instead ``[Σ_k ‖J_nᵀ s_kn‖²]_n`` [N], the leaf's
    share of each sample's squared norm. ``sample_outputs(params, x_n)`` gives one sample's
    outputs; the samples are vmapped, ``chunk_size`` at a time, and the K factor columns of
    each sample are back-propagated together (vmap over k). Cost: N·K vector-Jacobian
    products batched; memory ``chunk_size · K · P``.
    """

    def one_sample(xn, sn):  # sn [K, *sample_output_shape]
        _, vjp_fn = vjp(lambda p: sample_outputs(p, xn), params)
        if sn.shape[0] == 1:  # one column: no inner vmap (nor its batching-rule bugs, e.g. PReLU's)
            grads = tree_map(lambda g: g.unsqueeze(0), vjp_fn(sn[0])[0])
        else:
            grads = vmap(lambda s: vjp_fn(s)[0])(sn)  # leaves [K, *shape]: J_nᵀ s_kn
        _check_shapes(grads, params, sn.shape[0])
        return tree_map(lambda g: (g**2).sum(0), grads)

    x, dims = sample_split(x)
    try:
        squares = vmap(one_sample, in_dims=(dims, 1), chunk_size=chunk_size, randomness="different")(x, S)
    except RuntimeError as err:  # a layer without a batching rule (e.g. native RNNs): a loop
        warnings.warn(
            f"the per-sample route could not vmap this model ({str(err).splitlines()[0][:120]}); "
            "looping over samples and factor columns instead",
            RuntimeWarning,
            stacklevel=2,
        )
        squares = _stack([_one_sample_looped(sample_outputs, params, x, S, n) for n in range(S.shape[1])])
    if per_sample:
        return tree_map(lambda d: d.reshape(d.shape[0], -1).sum(1), squares)
    return tree_map(lambda d: d.sum(0), squares)


def _one_sample_looped(sample_outputs, params: PyTree, x: Any, S: Tensor, n: int) -> PyTree:
    """``Σ_k (J_nᵀ s_kn)²`` for sample n without vmap: one vjp per factor column."""
    xn = sample_of(x, n)
    _, vjp_fn = vjp(lambda p: sample_outputs(p, xn), params)
    grads = [vjp_fn(S[k, n])[0] for k in range(S.shape[0])]
    return tree_map(lambda *g: sum(gi**2 for gi in g), *grads)


def _check_shapes(grads: PyTree, params: PyTree, k: int) -> None:
    """Raise RuntimeError (the loop fallback) if a batching rule returned misshapen gradients."""
    for g, p in zip(leaves(grads), leaves(params)):
        if g.shape != (k, *p.shape):
            raise RuntimeError(f"a vmapped vjp returned shape {list(g.shape)}, expected {[k, *p.shape]}")


def _stack(trees: list[PyTree]) -> PyTree:
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def _loss_gradient(loss: Loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``∇_f L(f, targets)`` at ``f = outputs``.

    By ``torch.func.grad`` inside transforms or for outputs or targets with a graph (the
    result then keeps it), else by the loss's closed form (:meth:`Loss.gradient`) or one
    plain backward pass.
    """
    if inside_transform() or outputs.requires_grad or getattr(targets, "requires_grad", False):
        return grad(lambda f: loss(f, targets))(outputs)
    closed = loss.gradient(outputs, targets)
    if closed is not None:
        return closed
    with torch.enable_grad():
        f = outputs.detach().requires_grad_()
        return torch.autograd.grad(loss(f, targets), f)[0]


def check_reduction_at(loss: AutogradLoss, outputs: Tensor, targets: Tensor) -> None:
    """:meth:`AutogradLoss.check_reduction` at ``outputs`` (the loss's gradient taken here)."""
    _check_reduction(loss, outputs, targets, _loss_gradient(loss, outputs, targets))


def _check_reduction(loss: AutogradLoss, outputs: Tensor, targets: Tensor, gradient: Tensor) -> None:
    """:meth:`AutogradLoss.check_reduction`, skipped where vmap batches the values (over batches)."""
    try:
        loss.check_reduction(outputs, targets, gradient)
    except RuntimeError as err:  # vmap: the check's branches would depend on batched values
        if "data-dependent" not in str(err):
            raise


def _gradient_factor(loss: Loss, outputs: Tensor, targets: list[Tensor]) -> Tensor:
    """``S[m] = √(Z_m / M) ∇_f L(f, ỹ_m)`` stacked over the M target sets."""
    check_autograd()
    rows = []
    for t in targets:
        r = _loss_gradient(loss, outputs, t)  # ∇_f L(f, t): sample n's row is ∇ L_n
        if isinstance(loss, AutogradLoss):  # Z is declared, not known: check it
            _check_reduction(loss, outputs, t, r)
        rows.append(r * torch.sqrt(torch.as_tensor(loss.normalizer(t), dtype=r.dtype) / len(targets)))
    return torch.stack(rows)
