"""Curvature transforms on pure functions: hvp, ggn_vp, per_sample_grad, per_sample_jacobian.

Every transform takes parameters as a pytree (dict, list, tuple, nested) and accepts a
vector either as a pytree shaped like the parameters or as a flat tensor [P] (leaves in
dicts in insertion order, see :func:`curvfx.ravel`); the result has the form of the vector.
The curvature products (``hvp``, ``ggn_vp``, ``fisher_vp``) also take a matrix V [P, K] of
K flat vectors and return [P, K]: eagerly, the K products share one forward pass (and,
for the HVP, one first backward pass) and loop over the columns through the retained
graph, as PyHessian does for its probes; inside a ``torch.func`` transform or with a
``torch.func`` strategy the columns are vmapped.

Engines. Each product has eager engines built on ``torch.autograd`` (the fastest,
measured in ``benchmarks/``: reverse-over-forward for ``hvp``, forward-mode Jv then one
backward pass for ``ggn_vp``) and a ``torch.func`` engine. ``strategy="auto"`` picks the
fastest eager engine when called eagerly and the ``torch.func`` engine when called inside a
``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...), so every transform composes
with ``torch.func``: ``vmap(lambda v: hvp(f, params, v))(V)`` is a matrix product. It also
picks the ``torch.func`` engine when a tensor the product reads (parameters, vector, data)
requires grad while gradients are recorded, so that the result carries the autograd graph
(an eager engine named explicitly then raises ``ValueError``; ``torch.no_grad()`` gives the
value alone at the fastest engine). Under ``torch.inference_mode()`` every product raises.

Randomness. Each product evaluates the model once, so a model with active dropout yields
the curvature of the network under the mask drawn in that forward pass (a new mask on each
call). Call ``model.eval()`` for a deterministic operator. The per-sample transforms
(defined in :mod:`curvfx._per_sample`, exported here) vmap over samples with
``randomness="different"``: every sample draws its own mask, as in a batched forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.checkpoint import CheckpointError

from curvfx import _engines
from curvfx._arguments import check_count
from curvfx._errors import check_batch, check_output, check_real, check_targets, describe, needs_graph
from curvfx._factors import FISHER_KINDS, factor_product, output_factor
from curvfx._kernels import ComposedOps, within
from curvfx._per_sample import per_sample_grad, per_sample_grad_norms, per_sample_jacobian
from curvfx._pytree import as_columns, as_tree, leaves, ravel
from curvfx.functional import as_function, check_reads
from curvfx.losses import get_loss

__all__ = [
    "fisher_vp",
    "ggn_vp",
    "hvp",
    "model_jvp",
    "model_vjp",
    "per_sample_grad",
    "per_sample_grad_norms",
    "per_sample_jacobian",
]

PyTree = Any
HVP_STRATEGIES = ("auto", "rev-fwd", "autograd", "rev-rev", "fwd-rev")  # documented in hvp
GGN_STRATEGIES = ("auto", "autograd", "forward-ad", "func", "func-vjp")


def hvp(
    f: Callable[[PyTree], Tensor], params: PyTree, v: PyTree | Tensor, *, strategy: str = "auto"
) -> PyTree | Tensor:
    """Hessian-vector product of a scalar function, ``H v`` with ``H = ∇²_θ f(θ)`` at ``params``.

    Args:
        f: Scalar function of the parameter pytree.
        params: Parameter pytree θ (leaves: tensors).
        v: Pytree shaped like ``params``, a flat tensor [P], or a matrix [P, K] of K
            flat vectors (result [P, K]; see the module docstring).
        strategy: ``"rev-fwd"`` (reverse-over-forward, ``∇_θ (∇f·v)``: one forward pass with dual
            parameters carrying the directional derivative, then one backward pass through
            it; torch's forward-mode formulas are used only where they back-propagate
            correctly, normalization, softmax and attention run decomposed, losses take
            their tangent from their backward pass (MSE and plain cross-entropy from their
            closed forms), see :mod:`curvfx._forward_rules`; a ``ValueError`` for anything
            else, such as a recurrent layer), ``"autograd"`` (reverse-over-reverse double
            backprop with ``torch.autograd``), ``"rev-rev"`` (``vjp`` of ``grad`` with
            ``torch.func``), ``"fwd-rev"`` (``jvp`` of ``grad``; torch 2.13 cannot
            differentiate ``F.mse_loss`` this way and a ``ValueError`` says so), or
            ``"auto"``: eagerly ``"rev-fwd"`` for functions that need no decomposition but
            batch norm's (the fastest there: 1.9× a gradient on the benchmark CNN against
            2.2–2.3× for double backprop) and ``"autograd"`` otherwise (faster than the
            decomposed ``"rev-fwd"`` with layer or group norm and attention) and for the
            shared forward pass of a matrix V; ``"rev-rev"`` inside a ``torch.func``
            transform.

    Returns:
        ``H v`` in the form of ``v``.

    Raises:
        ValueError: If ``v`` does not match ``params`` (structure, shapes, dtype, device),
            ``f`` is not scalar, or ``strategy`` is unknown.

    Example:
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> hvp(lambda p: (p["w"] ** 3).sum(), params, torch.tensor([1.0, 0.0]))
        tensor([6., 0.])
    """
    check_real(params, "params")
    engine = _engines.pick(
        strategy, HVP_STRATEGIES, eager="auto-eager", composable="rev-rev", inputs=(params, v)
    )
    f = within(ComposedOps, f)  # weight norm, PReLU in f: see curvfx._kernels
    columns = as_columns(v, params)
    if columns is not None:
        if engine in ("auto-eager", "autograd"):  # one forward and first backward for all columns
            return _stacked(_engines.hessian_vps(f, params, columns))
        if engine == "rev-fwd":
            return _stacked([_engines.hessian_vp(f, params, c, engine) for c in columns])
        return _vmapped_columns(lambda c: hvp(f, params, c, strategy=strategy), v)
    tree, flat = as_tree(v, params)
    out = _engines.hessian_vp(f, params, tree, engine)
    return ravel(out) if flat else out


def ggn_vp(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    loss_fn: Any,
    params: PyTree,
    x: Any,
    y: Tensor,
    v: PyTree | Tensor,
    *,
    strategy: str = "auto",
) -> PyTree | Tensor:
    """Generalized Gauss-Newton-vector product of the loss as written.

        G v = Jᵀ (H_f (J v)),   J = ∂f/∂θ [N·C, P],   H_f = ∇²_f loss_fn(f, y),   f = fn(params, x)

    J is the Jacobian of all outputs and H_f keeps the loss's reduction: ``MSELoss()``
    gives ``H_f = 2/(N·C) I``. J is never formed: a forward pass gives f and Jv, the loss
    gives ``H_f Jv`` (closed form for the losses in :mod:`curvfx.losses`, autograd
    otherwise) and one backward pass gives ``Jᵀ H_f J v``. The eager engines evaluate the
    model once per product (one dropout mask).

    Args:
        fn: Pure ``fn(params, x)``, or an ``nn.Module`` (then ``params`` is a dict of its
            trainable parameters, as from :func:`curvfx.make_functional`).
        loss_fn: A torch loss module or function, a :class:`curvfx.losses.Loss`, or any
            ``loss_fn(outputs, targets) -> scalar``.
        params: Parameter pytree θ.
        x: Batch input (tensor, tuple or mapping of tensors, see ``make_functional``).
        y: Targets.
        v: Pytree shaped like ``params``, a flat tensor [P], or a matrix [P, K] (result [P, K]).
        strategy: ``"forward-ad"`` (``torch.autograd.forward_ad`` dual parameters give f
            and Jv in one forward pass, then one backward pass: the fastest eager engine,
            1.6–2.2× a gradient), ``"autograd"`` (Jv as the derivative of ``u ↦ Jᵀu`` by
            double backprop, then ``Jᵀ(H_f Jv)``), ``"func"`` (``torch.func.jvp`` then
            ``torch.func.vjp``: two forward passes replaying the same random numbers,
            so dropout masks agree), ``"func-vjp"`` (one ``torch.func.vjp`` and Jv by
            transposing it: one forward pass; what compiled operators use), or
            ``"auto"``: ``"forward-ad"`` eagerly (``"autograd"`` if an operation of the
            model has no forward-mode derivative), ``"func"`` inside a ``torch.func``
            transform. ``benchmarks/run.py`` times them.

    Returns:
        ``G v`` in the form of ``v``.

    Raises:
        ValueError: If ``v`` does not match ``params``, the batch is empty, ``y`` does
            not fit the loss, or ``strategy`` is unknown.
    """
    return _gauss_newton(
        fn, loss_fn, params, x, y, v, strategy, lambda loss, f: partial(loss.hessian_vp, f, y)
    )


def fisher_vp(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    loss_fn: Any,
    params: PyTree,
    x: Any,
    y: Tensor,
    v: PyTree | Tensor,
    *,
    kind: str = "exact",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    strategy: str = "auto",
) -> PyTree | Tensor:
    """Fisher-vector product ``F v = Σ_n J_nᵀ F_n J_n v`` of the loss as written.

    ``kind`` chooses the output-space matrix ``F_n`` of sample n (Z is the loss's
    normalizer, ``L = (1/Z) Σ ℓ`` for the mean, Z = 1 for the sum):

    * ``"exact"``: ``F_n = c E_{ỹ ~ p(·|f_n)}[∇_f ℓ ∇_f ℓᵀ]`` from the loss's Fisher factor
      (equals the GGN for MSE, cross-entropy and BCE with logits);
    * ``"empirical"``: ``F_n = Z ∇_{f_n} L ∇_{f_n} Lᵀ`` at the given targets ``y``, so
      ``F = Z Σ_n ∇_θ L_n ∇_θ L_nᵀ`` with ``L_n`` sample n's term of L (for the mean
      ``(1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ``): per-sample gradients, never the squared batch gradient;
    * ``"mc"``: the empirical formula at ``num_samples`` targets per sample drawn from the
      model's predictive (``generator``), averaged; an unbiased estimate of ``"exact"``.

    J is never formed: one forward pass, one Jv, the output-space product, one backward pass
    (engines as in :func:`ggn_vp`). Per-sample gradients are not materialized either.

    Returns:
        ``F v`` in the form of ``v``.

    Raises:
        ValueError: If ``kind`` is unknown, ``num_samples`` is not a positive int, the loss
            has no Fisher for this kind (e.g. a generic callable with ``"exact"``/``"mc"``),
            or as :func:`ggn_vp`.
    """
    check_fisher_kind(kind, num_samples)

    def fisher_f(loss, f):  # u ↦ F_f u from the output factor of the kind (drawn once)
        return partial(factor_product, output_factor(loss, f, y, kind, num_samples, generator))

    return _gauss_newton(fn, loss_fn, params, x, y, v, strategy, fisher_f)


def model_jvp(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    params: PyTree,
    x: Any,
    v: PyTree | Tensor,
) -> Tensor:
    """Jacobian-vector product of the model, ``J v`` [shaped like the outputs], J = ∂f/∂θ.

    Forward-mode AD (dual numbers; ``torch.func.jvp`` inside transforms): one forward pass.
    """
    fn, params = as_function(fn, params)
    tree, _ = as_tree(v, params)
    check_batch(x, None)
    check_real(params, "params")
    differentiable = needs_graph((params, tree, x))
    if differentiable:  # torch.func only: check the model's reads first
        check_reads(fn, params, x)
    model_at = lambda p: check_output(fn(p, x))  # noqa: E731
    return _engines.model_jvp(model_at, params, tree, differentiable)[1]


def model_vjp(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    params: PyTree,
    x: Any,
    u: Tensor,
) -> PyTree:
    """Vector-Jacobian product of the model, ``Jᵀ u`` as a pytree like ``params``.

    ``u`` is shaped like the outputs ``fn(params, x)``. One forward and one backward pass.
    """
    fn, params = as_function(fn, params)
    check_batch(x, None)
    check_real(params, "params")
    if not isinstance(u, Tensor):
        raise TypeError(f"u: expected a tensor shaped like the outputs, got {describe(u)}")
    differentiable = needs_graph((params, u, x))
    if differentiable:  # torch.func only: check the model's reads first
        check_reads(fn, params, x)
    return _engines.model_vjp(lambda p: check_output(fn(p, x)), params, u, differentiable)


def _gauss_newton(fn, loss_fn, params, x, y, v, strategy: str, output_product) -> PyTree | Tensor:
    """``Jᵀ M J v`` with ``M = output_product(loss, f)`` (u ↦ M u): validation, engine, form of ``v``."""
    fn, params = as_function(fn, params)
    loss = get_loss(loss_fn)
    check_batch(x, check_targets(y))
    check_real(params, "params")
    engine = _engines.pick(
        strategy, GGN_STRATEGIES, eager="auto-eager", composable="auto-func", inputs=(params, v, x, y)
    )
    if engine in ("auto-func", "func", "func-vjp"):  # torch.func only: check the model's reads first
        check_reads(fn, params, x)
    columns = as_columns(v, params)
    if columns is not None and engine in ("auto-func", "func", "func-vjp"):
        return _vmapped_columns(
            lambda c: _gauss_newton(fn, loss, params, x, y, c, strategy, output_product), v
        )
    model_at = lambda p: check_output(fn(p, x))  # noqa: E731
    product_at = partial(output_product, loss)
    check = partial(loss.check, targets=y)
    if columns is not None:
        return _stacked(_engines.gauss_newton_vps(model_at, params, columns, product_at, check))
    tree, flat = as_tree(v, params)
    try:
        out = _engines.gauss_newton_vp(model_at, params, tree, product_at, check, engine)
    except (NotImplementedError, CheckpointError) as err:  # explicit forward mode ("auto" falls back)
        if strategy not in ("forward-ad", "func"):
            raise
        raise ValueError(
            f"strategy: {strategy!r} cannot differentiate this model in forward mode ({err}); "
            "use 'auto' or 'autograd'"
        ) from err
    return ravel(out) if flat else out


def _stacked(columns: list[PyTree]) -> Tensor:
    """Flat results of K columns as a matrix [P, K], each column contiguous in memory (a view of [K, P])."""
    first = leaves(columns[0])
    out = first[0].new_empty(len(columns), sum(leaf.numel() for leaf in first))
    for row, column in zip(out, columns):
        torch.cat([leaf.reshape(-1) for leaf in leaves(column)], out=row)
    return out.T


def _vmapped_columns(product: Callable[[Tensor], Tensor], V: Tensor) -> Tensor:
    """``product`` of each column of V [P, K], batched by vmap (one random draw for all columns)."""
    return vmap(product, in_dims=1, out_dims=1, randomness="same")(V)


def check_fisher_kind(kind: str, num_samples: int) -> None:
    """Validate a Fisher ``kind`` and ``num_samples`` (public-boundary check)."""
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind: expected one of {FISHER_KINDS}, got {kind!r}")
    check_count(num_samples, "num_samples")
