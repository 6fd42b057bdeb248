"""Curvature transforms on pure functions: hvp, ggn_vp, per_sample_grad, per_sample_jacobian.

Every transform takes parameters as a pytree (dict, list, tuple, nested) and accepts a
vector either as a pytree shaped like the parameters or as a flat tensor [P] (leaves in
dicts in insertion order, see :func:`curvfx.ravel`); the result has the form of the vector.

Engines. Each product has a plain-autograd engine (fastest eager, measured in
``benchmarks/``) and a ``torch.func`` engine. ``strategy="auto"`` picks the autograd
engine when called eagerly and the ``torch.func`` engine when called inside a
``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...), so every transform composes
with ``torch.func``: ``vmap(lambda v: hvp(f, params, v))(V)`` is a matrix product.

Randomness. Each product evaluates the model once, so a model with active dropout yields
the curvature of the network under the mask drawn in that forward pass (a new mask on each
call). Call ``model.eval()`` for a deterministic operator. The per-sample transforms vmap
over samples with ``randomness="different"``: every sample draws its own mask, as in a
batched forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from curvfx._pytree import as_tree, flatten, leaves, ravel, tree_map, unflatten
from curvfx.functional import as_function
from curvfx.losses import get_loss

__all__ = ["ggn_vp", "hvp", "per_sample_grad", "per_sample_jacobian"]

PyTree = Any
HVP_STRATEGIES = ("auto", "autograd", "rev-rev", "fwd-rev")
GGN_STRATEGIES = ("auto", "autograd", "forward-ad", "func")


def hvp(
    f: Callable[[PyTree], Tensor], params: PyTree, v: PyTree | Tensor, *, strategy: str = "auto"
) -> PyTree | Tensor:
    """Hessian-vector product of a scalar function, ``H v`` with ``H = ∇²_θ f(θ)`` at ``params``.

    Args:
        f: Scalar function of the parameter pytree.
        params: Parameter pytree θ (leaves: tensors).
        v: Pytree shaped like ``params``, or a flat tensor [P].
        strategy: ``"autograd"`` (reverse-over-reverse double backprop with
            ``torch.autograd``; the fastest eager engine, 2.0–2.6× a gradient),
            ``"rev-rev"`` (``vjp`` of ``grad`` with ``torch.func``), ``"fwd-rev"`` (``jvp``
            of ``grad``; torch 2.13 cannot differentiate ``F.mse_loss`` this way and a
            ``ValueError`` says so), or ``"auto"``: ``"autograd"`` eagerly, ``"rev-rev"``
            inside a ``torch.func`` transform.

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
    tree, flat = as_tree(v, params)
    engine = _pick(strategy, HVP_STRATEGIES, eager="autograd", composable="rev-rev")
    if engine == "autograd":
        out = _hvp_autograd(f, params, tree)
    elif engine == "rev-rev":
        out = vjp(grad(_scalar(f)), params)[1](tree)[0]
    else:
        try:
            out = jvp(grad(_scalar(f)), (params,), (tree,))[1]
        except RuntimeError as err:
            if "ZeroTensors are immutable" not in str(err):
                raise
            raise ValueError(
                "strategy: 'fwd-rev' cannot differentiate this function in this torch "
                "version (ZeroTensors are immutable, e.g. F.mse_loss); use 'rev-rev' or 'autograd'"
            ) from err
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
    gives ``H_f = 2/(N·C) I``. J is never formed: one forward pass gives f and a graph for
    Jv, the loss gives ``H_f Jv`` (closed form for the losses in :mod:`curvfx.losses`,
    autograd otherwise) and one backward pass gives ``Jᵀ H_f J v``. The model is evaluated
    once per product (one dropout mask).

    Args:
        fn: Pure ``fn(params, x)``, or an ``nn.Module`` (then ``params`` is a dict of its
            trainable parameters, as from :func:`curvfx.make_functional`).
        loss_fn: A torch loss module or function, a :class:`curvfx.losses.Loss`, or any
            ``loss_fn(outputs, targets) -> scalar``.
        params: Parameter pytree θ.
        x: Batch input (tensor, tuple or mapping of tensors, see ``make_functional``).
        y: Targets.
        v: Pytree shaped like ``params``, or a flat tensor [P].
        strategy: ``"autograd"`` (``torch.autograd``: Jv as the derivative of
            ``u ↦ Jᵀu`` by double backprop, then ``Jᵀ(H_f Jv)``; the default eager engine),
            ``"forward-ad"`` (``torch.autograd.forward_ad`` dual parameters give f and Jv in
            one forward pass, then one backward pass; faster on some convolutional
            models), ``"func"`` (the same double-vjp with ``torch.func``), or ``"auto"``:
            ``"autograd"`` eagerly, ``"func"`` inside a ``torch.func`` transform.
            ``benchmarks/bench_core.py`` times them.

    Returns:
        ``G v`` in the form of ``v``.

    Raises:
        ValueError: If ``v`` does not match ``params``, the batch is empty, ``y`` does
            not fit the loss, or ``strategy`` is unknown.
    """
    fn, params = as_function(fn, params)
    loss = get_loss(loss_fn)
    tree, flat = as_tree(v, params)
    _check_batch(x, y)
    engine = _pick(strategy, GGN_STRATEGIES, eager="autograd", composable="func")
    if engine == "autograd":
        out = _ggn_vp_autograd(fn, loss, params, x, y, tree)
    elif engine == "forward-ad":
        out = _ggn_vp_forward_ad(fn, loss, params, x, y, tree)
    else:
        outputs, vjp_fn = vjp(lambda p: fn(p, x), params)
        loss.check(outputs, y)
        jv = vjp(vjp_fn, torch.zeros_like(outputs))[1]((tree,))[0]  # Jv: transpose of u -> Jᵀu
        out = vjp_fn(loss.hessian_vp(outputs, y, jv))[0]  # Jᵀ H Jv
    return ravel(out) if flat else out


def per_sample_grad(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    loss_fn: Any,
    params: PyTree,
    x: Any,
    y: Tensor,
    chunk_size: int | None = None,
) -> PyTree:
    """Gradient of each sample's own loss term, ``g_n = ∇_θ loss_fn(fn(θ, x_n), y_n)``.

    ``x_n``, ``y_n`` are sample n as a batch of one, so ``g_n`` is the gradient of the loss
    applied to that sample alone, with its own reduction: for ``reduction="mean"`` the
    batch gradient is ``(1/N) Σ_n g_n`` (when every sample counts equally: same number of
    entries, no ignored positions), for ``"sum"`` it is ``Σ_n g_n``. No ``1/N`` is folded
    into ``g_n``.

    Computed as ``vmap(grad)`` over samples, ``chunk_size`` samples at a time (all at once
    if None). Dropout draws a separate mask per sample.

    Returns:
        A pytree like ``params``, each leaf [N, *leaf.shape].

    Raises:
        ValueError: If the batch is empty, ``x`` and ``y`` disagree on N, or the model
            couples samples (BatchNorm in train mode has no per-sample gradient; call
            ``model.eval()``).
    """
    fn, params = as_function(fn, params)
    loss = get_loss(loss_fn)
    _check_batch(x, y)
    _check_independent_samples(fn, "per_sample_grad")

    def sample_loss(p, xn, yn):
        xb, yb = _as_batch_of_one(xn), yn.unsqueeze(0)
        outputs = fn(p, xb)
        loss.check(outputs, yb)
        return loss(outputs, yb)

    return vmap(
        grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size, randomness="different"
    )(params, x, y)


def per_sample_jacobian(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    params: PyTree,
    x: Any,
    chunk_size: int | None = None,
) -> PyTree:
    """Jacobian of each sample's outputs, ``J_n = ∂ fn(θ, x_n) / ∂θ``.

    Computed as ``vmap(jacrev)`` over samples, each sample evaluated as a batch of one,
    ``chunk_size`` samples at a time (all at once if None) to bound memory: the result
    holds N·C·P numbers.

    Returns:
        A pytree like ``params``, each leaf [N, *output_shape, *leaf.shape] where
        ``output_shape`` is one sample's output shape (``fn(θ, x).shape[1:]``).

    Raises:
        ValueError: If the batch is empty or the model couples samples (BatchNorm in train
            mode).
    """
    fn, params = as_function(fn, params)
    _check_batch(x, None)
    _check_independent_samples(fn, "per_sample_jacobian")

    def sample_outputs(p, xn):
        return fn(p, _as_batch_of_one(xn))[0]

    return vmap(
        jacrev(sample_outputs), in_dims=(None, 0), chunk_size=chunk_size, randomness="different"
    )(params, x)


def _pick(strategy: str, allowed: tuple[str, ...], *, eager: str, composable: str) -> str:
    if strategy not in allowed:
        raise ValueError(f"strategy: expected one of {allowed}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    return composable if _inside_transform() else eager


def _inside_transform() -> bool:
    """Whether we run under a ``torch.func`` transform (where ``torch.autograd`` cannot be used)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _scalar(f):
    def checked(p):
        value = f(p)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"f: must return a scalar tensor, got {_describe(value)}")
        return value.reshape(())

    return checked


def _hvp_autograd(f, params, v):
    p_leaves, spec = flatten(params)
    v_leaves = spec.flatten_up_to(v)
    with torch.enable_grad():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        value = _scalar(f)(unflatten(spec, p))
        g = torch.autograd.grad(value, p, create_graph=True, allow_unused=True)
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        hv = (
            torch.autograd.grad(
                [g[i] for i in live], p, grad_outputs=[v_leaves[i] for i in live], allow_unused=True
            )
            if live
            else [None] * len(p)
        )
    return unflatten(spec, [torch.zeros_like(pi) if h is None else h for pi, h in zip(p, hv)])


def _ggn_vp_autograd(fn, loss, params, x, y, v):
    p_leaves, spec = flatten(params)
    v_leaves = spec.flatten_up_to(v)
    with torch.enable_grad():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        outputs = fn(unflatten(spec, p), x)
        loss.check(outputs, y)
        u = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, p, u, create_graph=True, allow_unused=True)  # Jᵀu
        live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        jv = (
            torch.autograd.grad([jtu[i] for i in live], u, [v_leaves[i] for i in live])[0]
            if live
            else torch.zeros_like(outputs)
        )  # Jv = ∂(Jᵀu)ᵀv/∂u
        hjv = loss.hessian_vp(outputs.detach(), y, jv)  # H Jv
        out = torch.autograd.grad(outputs, p, grad_outputs=hjv, allow_unused=True)  # Jᵀ H Jv
    return unflatten(spec, [torch.zeros_like(pi) if o is None else o for pi, o in zip(p, out)])


def _ggn_vp_forward_ad(fn, loss, params, x, y, v):
    p_leaves, spec = flatten(params)
    v_leaves = spec.flatten_up_to(v)
    with torch.enable_grad(), fwad.dual_level():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        duals = [fwad.make_dual(pi, vi) for pi, vi in zip(p, v_leaves)]
        outputs, jv = fwad.unpack_dual(fn(unflatten(spec, duals), x))  # f, Jv
        loss.check(outputs, y)
        if jv is None:  # outputs do not depend on params
            jv = torch.zeros_like(outputs)
        hjv = loss.hessian_vp(outputs.detach(), y, jv.detach())  # H Jv
        out = torch.autograd.grad(outputs, p, grad_outputs=hjv, allow_unused=True)  # Jᵀ H Jv
    return unflatten(spec, [torch.zeros_like(pi) if o is None else o for pi, o in zip(p, out)])


def _check_batch(x: Any, y: Tensor | None) -> None:
    x_leaves = leaves(x)
    if not x_leaves:
        raise ValueError("x: expected a tensor or a tuple/mapping of tensors, got no tensors")
    n = x_leaves[0].shape[0] if x_leaves[0].dim() > 0 else None
    if n is None or any(t.dim() == 0 or t.shape[0] != n for t in x_leaves):
        raise ValueError("x: every input tensor needs the same leading batch dimension N")
    if n == 0:
        raise ValueError("x: the batch is empty (N = 0)")
    if y is not None and (not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n):
        raise ValueError(f"y: expected targets with leading dimension N = {n}, got {_describe(y)}")


def _check_independent_samples(fn, transform: str) -> None:
    if getattr(fn, "couples_samples", False):
        raise ValueError(
            f"fn: {transform} needs independent samples, but the model has BatchNorm in "
            "train mode (its batch statistics couple the samples); call model.eval()"
        )


def _as_batch_of_one(xn: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0), xn)


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    return type(obj).__name__
