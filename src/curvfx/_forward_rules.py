"""Forward-mode rules: cheaper tangents for affine layers, and tangents reverse mode can differentiate.

Inside :class:`ForwardRules` (a ``TorchFunctionMode`` entered with a forward-mode dual level):

* **Constant input.** Torch's formula for an affine map ``y = x Wᵀ + b`` (``F.linear``,
  ``F.conv1d/2d/3d``) is ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``; when ``x`` carries no tangent (the
  model's input, seen by the first layer) it still multiplies a zero ``ẋ`` by ``W``, one
  full product of the layer's size (a third of the tangent work of a 784-256-256-10 MLP).
  Such calls compute ``y`` from the primal weights (keeping the reverse-mode graph to them)
  and ``ẏ = x Ẇᵀ + ḃ`` directly.
* **Wide dense layers** (``differentiable=True``): a dense layer whose input and weight
  carry tangents and whose weight outsizes its rows runs as
  :func:`curvfx._dual_linear.dual_linear`, one autograd node whose backward pass forms the
  weight's gradient in one product instead of two and a sum.
* **Differentiable tangents** (``differentiable=True``, for the reverse-over-forward HVP
  ``H v = ∇_θ (∇f·v)``, which back-propagates through the tangents). Some of torch's
  forward-mode formulas cannot be differentiated in reverse mode: softmax, log-softmax,
  cross-entropy, logsumexp and attention modify a saved result in place (an error), and
  layer norm and batch norm in train mode give wrong second derivatives without an error
  (torch 2.13, against dense Hessians). ReLU's tangent is ``ẋ ⊙ 1[x > 0]``: torch's
  formula gives the same numbers, but back-propagating through it also sends a zero
  gradient to ``x`` (a filled tensor and a sum per layer: 7 % of the HVP of the
  784-1024-1024-10 MLP at N = 64). Only the operations in :data:`TRUSTED` use
  torch's formula, each checked against a dense Hessian in ``tests/test_forward_rules.py``.
  Normalization layers, softmax, log-softmax, logsumexp and attention run as
  :mod:`curvfx._decompositions` (the same values from checked operations) when listed
  in ``decompose``; otherwise they raise :class:`UntrustedTangents` like the cases below.
  ``F.mse_loss`` gets the tangent of its closed form, ``(2/Z) Σ (x - t)(ẋ - ṫ)``, and
  ``F.cross_entropy`` of class indices (no weight, no smoothing) the tangent
  ``Σ_i c_i (p_i·ẋ_i - ẋ_{i,y_i})``. Any other operation with a tangent input and a scalar
  output (a loss) gets ``ẏ = ⟨∇y, ẋ⟩`` from a backward pass with its graph,
  differentiable wherever double backprop is. Any other operation with a tangent input
  and a tensor output, an in-place or ``out=`` call of an operation outside
  :data:`TRUSTED`, or a ``torch.func`` transform inside the function raises
  :class:`UntrustedTangents`, and the caller uses double backprop instead.

* **Padding rows.** Torch's backward gives the row ``padding_idx`` of an embedding table no
  gradient (the row is a constant of the model), but its forward formula ``ẏ = Ẇ[ids]``
  reads that row's tangent too, so forward-mode products would disagree with the
  reverse-mode ones (a GGN ``J_revᵀ H J_fwd``, not symmetric). ``F.embedding`` with a
  ``padding_idx`` returns the padding positions' outputs detached (same values, no
  tangent, no gradient), also under ``torch.func`` transforms.

Every other call without tangent inputs runs unchanged; so does every other call under a
``torch.func`` transform when ``differentiable=False``.
"""

from __future__ import annotations

from collections.abc import Collection

import optree
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvfx._decompositions import DECOMPOSITIONS
from curvfx._dual_linear import dual_linear, worth_fusing
from curvfx._errors import inside_transform
from curvfx.losses import CrossEntropyLoss

__all__ = ["TRUSTED", "ForwardRules", "UntrustedTangents"]

_SPATIAL_DIMS = {F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}  # op(input, weight, bias=None, *config)
_RELU = frozenset({F.relu, torch.relu, torch.Tensor.relu})  # out of place (F.relu's inplace=False)

_PRIMITIVES = all(  # torch's dual-number primitives, used without forward_ad's wrappers where present
    hasattr(m, a) for m, a in ((fwad, "_current_level"), (torch, "_make_dual"), (torch, "_unpack_dual"))
)

_T = torch.Tensor
TRUSTED = frozenset(
    {  # as torch's function mode sees them: `a + b` is Tensor.add, `1 / a` Tensor.__rdiv__
        # products
        F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, _T.matmul, _T.__rmatmul__,
        torch.mm, _T.mm, torch.bmm, _T.bmm,
        # arithmetic, in place too
        torch.add, _T.add, _T.add_, torch.sub, _T.sub, _T.__rsub__, torch.mul, _T.mul, _T.mul_,
        torch.div, _T.div, _T.__rdiv__, torch.neg, _T.neg, torch.pow, _T.pow, _T.__pow__,
        # elementwise functions and activations
        torch.exp, _T.exp, torch.log, _T.log, torch.sqrt, _T.sqrt, torch.rsqrt, _T.rsqrt,
        torch.sin, _T.sin, torch.cos, _T.cos, F.relu, torch.relu, _T.relu, torch.relu_,
        _T.relu_, torch.tanh, _T.tanh, torch.sigmoid, _T.sigmoid, F.gelu, F.silu,
        # shapes, views and copies
        torch.reshape, _T.reshape, _T.view, torch.flatten, _T.flatten, torch.transpose,
        _T.transpose, torch.permute, _T.permute, _T.t, torch.unsqueeze, _T.unsqueeze,
        torch.squeeze, _T.squeeze, _T.expand, _T.contiguous, _T.clone, _T.__getitem__,
        torch.split, _T.split, torch.chunk, _T.chunk, torch.cat, torch.stack, _T.T.__get__,
        _T.mT.__get__,
        # reductions, pooling, lookups
        torch.sum, _T.sum, torch.mean, _T.mean, F.max_pool1d, F.max_pool2d, F.max_pool3d,
        F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.embedding,
    }
)  # fmt: skip


_PASS = TRUSTED | {  # and the dual-number API, and queries that return no tensor
    torch._make_dual, torch._unpack_dual, _T.is_floating_point, _T.is_complex, _T.dim,
    _T.size, _T.numel, _T.__len__, _T.shape.__get__, _T.dtype.__get__, _T.device.__get__,
    _T.requires_grad.__get__, _T.ndim.__get__,
}  # fmt: skip


class UntrustedTangents(RuntimeError):
    """The function does an operation whose tangent :class:`ForwardRules` cannot make differentiable."""


class ForwardRules(TorchFunctionMode):
    """The rules of the module docstring.

    ``differentiable``: tangents will be back-propagated. ``decompose``: the operations of
    :data:`~curvfx._decompositions.DECOMPOSITIONS` to run decomposed (default: all); the
    others raise :class:`UntrustedTangents`, for callers that prefer double backprop there.
    """

    def __init__(self, differentiable: bool = False, decompose: Collection = DECOMPOSITIONS):
        super().__init__()
        self.differentiable = differentiable
        self.decompose = decompose

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            return _embedding(args, kwargs)
        if func in _LOSS_RULES and self.differentiable and not inside_transform():
            return _LOSS_RULES[func](args, kwargs)
        if inside_transform():
            if self.differentiable:
                raise UntrustedTangents("a torch.func transform inside the function")
            return func(*args, **kwargs)
        if func in _SPATIAL_DIMS and len(args) >= 2:
            out = _affine(func, args, kwargs, self.differentiable)
            if out is not None:
                return out
        if self.differentiable and func in _RELU and not _relu_in_place(args, kwargs):
            return _relu(args[0] if args else kwargs["input"])
        if not self.differentiable or func in _PASS or not _has_tangent(args, kwargs):
            return func(*args, **kwargs)
        if _in_place(func, kwargs):
            raise UntrustedTangents(
                f"{getattr(func, '__name__', func)} writes a tensor with a tangent in place"
            )
        decomposed = DECOMPOSITIONS.get(func)
        if decomposed is None:
            return _scalar_tangent(func, args, kwargs)
        if func not in self.decompose:
            raise UntrustedTangents(f"{getattr(func, '__name__', func)} would run decomposed")
        try:
            return decomposed(*args, **kwargs)  # checked operations only (the mode is off in here)
        except NotImplementedError as err:
            raise UntrustedTangents(f"{getattr(func, '__name__', func)}: {err}") from err


def _embedding(args, kwargs) -> Tensor:
    """``F.embedding`` whose outputs at ``padding_idx`` are constants, as torch's backward has them."""
    out = F.embedding(*args, **kwargs)
    pad = args[2] if len(args) > 2 else kwargs.get("padding_idx")
    if pad is None:
        return out
    ids = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    pad = pad if pad >= 0 else weight.shape[0] + pad
    return torch.where((ids == pad).unsqueeze(-1), out.detach(), out)


def _affine(func, args, kwargs, differentiable: bool) -> Tensor | None:
    """An affine call by a rule of the module docstring, or None for torch's formula.

    ``x`` without a tangent: ``(y, x Ẇᵀ + ḃ)``, None if nothing has a tangent. ``x`` with a
    tangent: :func:`curvfx._dual_linear.dual_linear` for a dense layer whose weight
    outsizes its rows when the tangents will be back-propagated (and the weight's and the
    bias's tangents are constants), else None.
    """
    x_primal, x_tangent = _unpack(args[0])
    if x_tangent is not None and not (differentiable and func is F.linear and len(args) <= 3):
        return None
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    w_primal, w_tangent = _unpack(args[1])
    b_primal, b_tangent = _unpack(bias) if isinstance(bias, Tensor) else (bias, None)
    if x_tangent is not None:
        dense = w_primal.dim() == 2 and (b_primal is None or b_primal.dim() == 1)
        constant = w_tangent is not None and not (
            w_tangent.requires_grad or (b_tangent is not None and b_tangent.requires_grad)
        )
        if not (dense and constant and worth_fusing(x_primal, w_primal)):
            return None
        return _dual(*dual_linear(x_primal, x_tangent, w_primal, w_tangent, b_primal, b_tangent))
    if w_tangent is None and b_tangent is None:
        return None
    rest, options = args[3:], {k: a for k, a in kwargs.items() if k != "bias"}
    out = func(x_primal, w_primal, b_primal, *rest, **options)
    if w_tangent is None:  # ẏ = ḃ, broadcast over the batch and spatial dims
        tangent = b_tangent.reshape((-1,) + (1,) * _SPATIAL_DIMS[func]).expand_as(out)
    else:
        tangent = func(x_primal, w_tangent, b_tangent, *rest, **options)  # x Ẇᵀ + ḃ
    return _dual(out, tangent)


def _relu(x: Tensor) -> Tensor:
    """``relu(x)`` with the tangent ``ẋ ⊙ 1[x > 0]`` (torch's derivative, 0 at x = 0).

    The tangent by ``threshold_backward`` (ReLU's own backward kernel, linear in ẋ) at the
    detached x: one fused operation where ``ẋ * (x > 0)`` took two and a float-by-bool
    product (6 against 39 µs for [128, 256] on 2 CPU threads). x detached: the mask has no
    derivative, and its backward would otherwise build a zero gradient for x (on the
    benchmark CNN, a sixth of the HVP).
    """
    primal, tangent = _unpack(x)
    out = torch.relu(primal)
    if tangent is None:
        return out
    return _dual(out, torch.ops.aten.threshold_backward(tangent, primal.detach(), 0))


def _relu_in_place(args, kwargs) -> bool:
    return bool(kwargs.get("inplace"))  # F.relu passes it on as a keyword


def _mse_loss(args, kwargs) -> Tensor:
    """``F.mse_loss`` with the tangent of its closed form: ``(2/Z) Σ d ḋ``, d = input - target.

    Z is the number of entries for ``reduction="mean"``, 1 for ``"sum"``; ``"none"`` gives
    ``2 d ḋ`` entrywise. Differentiable as the formula is; the same tangent
    :func:`_scalar_tangent` would get from the loss's backward pass, without that pass.
    """
    names = ("input", "target", "size_average", "reduce", "reduction", "weight")
    given = dict(zip(names, args)) | kwargs
    if any(given.get(option) is not None for option in ("size_average", "reduce", "weight")):
        return _scalar_tangent(F.mse_loss, args, kwargs)
    reduction = given.get("reduction", "mean")
    x, x_tangent = _unpack(given["input"])
    t, t_tangent = _unpack(given["target"])
    out = F.mse_loss(x, t, reduction=reduction)
    if x_tangent is None and t_tangent is None:
        return out
    d = x - t
    d_tangent = (x_tangent if x_tangent is not None else 0) - (t_tangent if t_tangent is not None else 0)
    entries = 2 * d * d_tangent
    tangent = entries if reduction == "none" else entries.sum() / (d.numel() if reduction == "mean" else 1)
    return _dual(out, tangent.expand_as(out) if reduction == "none" else tangent.reshape(out.shape))


def _cross_entropy(args, kwargs) -> Tensor:
    """``F.cross_entropy`` with the tangent ``⟨∇_x y, ẋ⟩`` from the loss's closed-form gradient.

    For class indices without weight or smoothing (:meth:`CrossEntropyLoss.gradient`,
    ``∇_{x_i} y = c_i (p_i - e_{y_i})``): the tangent :func:`_scalar_tangent` would get from
    the loss's backward pass, without that pass. Other calls go to :func:`_scalar_tangent`.
    """
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")
    given = dict(zip(names, args)) | kwargs
    x, x_tangent = _unpack(given["input"])
    target, reduction = given["target"], given.get("reduction", "mean")
    if not (
        x_tangent is not None
        and x.dim() >= 2
        and isinstance(target, Tensor)
        and not target.is_floating_point()
        and reduction in ("mean", "sum")
        and all(given.get(option) is None for option in ("weight", "size_average", "reduce"))
        and not given.get("label_smoothing")
    ):
        return _scalar_tangent(F.cross_entropy, args, kwargs)
    loss = CrossEntropyLoss(reduction, ignore_index=given.get("ignore_index", -100))
    out = loss(x, target)  # torch's errors for targets that do not fit, first
    return _dual(out, (loss.gradient(x, target) * x_tangent).sum().reshape(out.shape))


_LOSS_RULES = {F.mse_loss: _mse_loss, F.cross_entropy: _cross_entropy}


def _scalar_tangent(func, args, kwargs):
    """``func`` on the primals; a scalar output ``y`` made dual with ``ẏ = Σ_i ⟨∂y/∂x_i, ẋ_i⟩``.

    ``∂y/∂x_i`` comes from a backward pass with its graph, so the tangent is differentiable
    wherever double backprop is. An operation with any other output raises
    :class:`UntrustedTangents`: its tangent would need third derivatives of torch's
    backward formulas, and some of those are wrong without an error (layer norm's).
    """
    leaves, spec = optree.tree_flatten((args, kwargs))
    inputs, tangents = [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            primal, tangent = _unpack(leaf)
            if tangent is not None:
                primal = primal if primal.requires_grad else primal.detach().requires_grad_()
                inputs.append(primal)
                tangents.append(tangent)
            leaves[i] = primal
    call_args, call_kwargs = optree.tree_unflatten(spec, leaves)
    with torch.enable_grad():
        out = func(*call_args, **call_kwargs)
        if not (isinstance(out, Tensor) and out.numel() == 1):
            if any(isinstance(o, Tensor) and o.requires_grad for o in optree.tree_leaves(out)):
                raise UntrustedTangents(
                    f"{getattr(func, '__name__', func)} has no differentiable forward-mode rule"
                )
            return out  # no differentiable output (an integer, a shape, a comparison)
        if not out.requires_grad:
            return out
        grads = torch.autograd.grad(out, inputs, create_graph=True, allow_unused=True)
    terms = [(g * t).sum() for g, t in zip(grads, tangents) if g is not None]
    return _dual(out, sum(terms).reshape(out.shape) if terms else torch.zeros_like(out))


def _in_place(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    return (
        (name.endswith("_") and not name.endswith("__"))
        or name.startswith("__i")
        or name == "__setitem__"  # y[i] = ...: returns None, writes y
        or bool(kwargs.get("inplace"))
        or kwargs.get("out") is not None
    )


def _has_tangent(args, kwargs) -> bool:
    return any(_tangent(leaf) is not None for leaf in optree.tree_leaves((args, kwargs)))


def _tangent(t) -> Tensor | None:
    return _unpack(t)[1] if isinstance(t, Tensor) else None


def _unpack(t: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(primal, tangent)`` of ``t`` at the innermost forward-mode level (tangent None if none).

    :func:`torch.autograd.forward_ad.unpack_dual` without its Python wrappers (1 µs a call
    against 3 µs; a product of a small model makes dozens of calls).
    """
    if not _PRIMITIVES:
        return fwad.unpack_dual(t)
    level = fwad._current_level
    return torch._unpack_dual(t, level=level) if level >= 0 else (t, None)


def _dual(primal: Tensor, tangent: Tensor) -> Tensor:
    """:func:`torch.autograd.forward_ad.make_dual` at the innermost level, without its wrappers.

    For floating tensors inside a level whose first duals were made by ``make_dual`` (which
    loads torch's forward-mode decompositions once): 1.3 µs a call against 4.5 µs.
    """
    if not _PRIMITIVES:
        return fwad.make_dual(primal, tangent)
    return torch._make_dual(primal, tangent, level=fwad._current_level)
