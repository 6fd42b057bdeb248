"""Engines behind the transforms: the same products by plain autograd, forward-mode AD or torch.func.

Every function here takes a parameter pytree and a tangent pytree of the same structure and
returns a pytree; the public transforms in :mod:`curvfx.func` validate, pick the engine and
convert flat vectors.

The Gauss-Newton-type products share one shape, ``Jᵀ M(f) J v``, where ``M`` acts in output
space: the loss's Hessian for the GGN, a factor product for the Fisher kinds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jvp, vjp

from curvfx._decompositions import DECOMPOSITIONS
from curvfx._errors import (
    check_autograd,
    check_generator,
    describe,
    holds_values,
    inside_transform,
    needs_graph,
)
from curvfx._forward_rules import ForwardRules, UntrustedTangents
from curvfx._kernels import derivable_kernels, within
from curvfx._pytree import flatten, unflatten

__all__ = [
    "draw_seed",
    "func_jvp",
    "gauss_newton_vp",
    "gauss_newton_vps",
    "generator_on",
    "hessian_vp",
    "hessian_vps",
    "jv_by_transposition",
    "model_jvp",
    "model_vjp",
    "pick",
    "rng_state",
    "set_rng_state",
]

PyTree = Any
AUTO_DECOMPOSED = frozenset({F.batch_norm})  # what "auto" lets rev-fwd decompose
EAGER_STRATEGIES = ("rev-fwd", "autograd", "forward-ad")  # results without an autograd graph
# GGN engines: the forward-mode one, and the one used where it raises (an operation without a
# forward-mode rule: custom autograd.Functions, LSTMs, non-reentrant checkpointing, backward
# hooks, ...; any NotImplementedError or RuntimeError is retried, a genuine error then recurs)
_FALLBACKS = {"auto-eager": ("forward-ad", "autograd"), "auto-func": ("func", "func-vjp")}
OutputProduct = Callable[[Tensor], Callable[[Tensor], Tensor]]  # outputs f -> (u -> M(f) u)
OutputCheck = Callable[[Tensor], None]


def pick(strategy: str, allowed: tuple[str, ...], *, eager: str, composable: str, inputs: tuple = ()) -> str:
    """Resolve ``strategy`` for a product of the tensors ``inputs`` (params, vector, data).

    "auto" is ``eager`` (the fastest engine, built on ``torch.autograd``, whose results carry
    no graph) unless the result must be differentiable: inside a ``torch.func`` transform,
    or when a tensor of ``inputs`` requires grad while gradients are recorded
    (:func:`~curvfx._errors.needs_graph`); then it is ``composable``, the ``torch.func``
    engine. An eager strategy named explicitly in those cases raises ``ValueError`` (its
    result would silently add nothing to a gradient). Under ``torch.inference_mode()`` every
    strategy raises.
    """
    if strategy not in allowed:
        raise ValueError(f"strategy: expected one of {allowed}, got {strategy!r}")
    check_autograd()
    transformed = inside_transform()
    differentiable = needs_graph(inputs)
    if strategy == "auto":
        return composable if transformed or differentiable else eager
    if strategy in EAGER_STRATEGIES and transformed:
        raise ValueError(
            f"strategy: {strategy!r} runs torch.autograd, which cannot run inside a torch.func "
            f"transform; use 'auto' or {composable.removeprefix('auto-')!r}"
        )
    if strategy in EAGER_STRATEGIES and differentiable:
        raise ValueError(
            f"strategy: {strategy!r} gives a result without an autograd graph, but the parameters, "
            f"the vector or the data require grad; use 'auto' or {composable.removeprefix('auto-')!r} for a "
            "differentiable result, or call under torch.no_grad() (or detach them) for its value"
        )
    return strategy


def hessian_vp(f: Callable[[PyTree], Tensor], params: PyTree, v: PyTree, engine: str) -> PyTree:
    """``∇²f(params) v`` by ``engine`` in {"auto-eager", "rev-fwd", "autograd", "rev-rev", "fwd-rev"}.

    "auto-eager": "rev-fwd" decomposing only batch norm, or "autograd" (with the random
    number state of the first attempt) where "rev-fwd" raises (:func:`_with_fallback`): the
    function has an operation that would need another decomposition or that "rev-fwd"
    cannot differentiate. Measured (× a gradient, "rev-fwd" against double backprop): a
    small CNN with BatchNorm 3.7–4.0 against 4.0–4.4, the same with GroupNorm 4.3 against
    3.8, a GPT-style model (layer norm, softmax attention) 3.8–4.0 against 3.3–3.4.
    """
    if engine == "auto-eager":  # UntrustedTangents is a RuntimeError
        return _with_fallback(
            lambda: _reverse_over_forward(f, params, v, decompose=AUTO_DECOMPOSED),
            lambda: hessian_vps(f, params, [v])[0],
        )
    if engine == "rev-fwd":
        try:
            return _reverse_over_forward(f, params, v)
        except UntrustedTangents as err:
            raise ValueError(
                f"strategy: 'rev-fwd' cannot differentiate this function ({err}); use 'autograd'"
            ) from err
    if engine == "autograd":
        return hessian_vps(f, params, [v])[0]
    f = _in_derivable_kernels(f)
    if engine == "rev-rev":  # vjp of grad: Hᵀv = Hv
        _, vjp_fn, value = vjp(grad(_with_value(f), has_aux=True), params, has_aux=True)
        _check_finite(value)
        return vjp_fn(v)[0]
    try:
        gradient = grad(_with_value(_in_forward_rules(f)), has_aux=True)
        _, hv, value = jvp(gradient, (params,), (v,), has_aux=True)
        _check_finite(value)
        return hv
    except RuntimeError as err:
        if "ZeroTensors are immutable" not in str(err):
            raise
        raise ValueError(
            "strategy: 'fwd-rev' cannot differentiate this function in this torch "
            "version (ZeroTensors are immutable, e.g. F.mse_loss); use 'rev-rev' or 'autograd'"
        ) from err


def _reverse_over_forward(
    f: Callable[[PyTree], Tensor], params: PyTree, v: PyTree, decompose: Collection = DECOMPOSITIONS
) -> PyTree:
    """``H v = ∇_θ (∇f(θ)·v)``: one forward pass carrying the tangent ``∇f·v``, one backward.

    The directional derivative comes from dual parameters (forward mode, under
    :class:`ForwardRules` so that every tangent is differentiable), then one backward pass
    through both the primal and the tangent computation. A dense layer costs 8 matrix
    products of its size (double backprop: 9), the first layer 3 (double backprop: 4).
    """
    p_leaves, spec = flatten(params)
    with torch.enable_grad():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        with fwad.dual_level():
            duals = [fwad.make_dual(pi, vi) for pi, vi in zip(p, spec.flatten_up_to(v))]
            rules = within(lambda: ForwardRules(differentiable=True, decompose=decompose), f)
            value = _scalar(_in_derivable_kernels(rules))(unflatten(spec, duals))  # checks outside the rules
            slope = fwad.unpack_dual(value).tangent  # ∇f·v, with its graph
        if slope is None or not slope.requires_grad:  # f is at most linear in θ
            return _fill_zeros(spec, p, [None] * len(p))
        hv = torch.autograd.grad(slope, p, allow_unused=True)  # outside the dual level: no tangents
    return _fill_zeros(spec, p, hv)


def hessian_vps(f: Callable[[PyTree], Tensor], params: PyTree, vs: list[PyTree]) -> list[PyTree]:
    """``[∇²f(params) v for v in vs]`` by double backprop.

    One forward and one first backward pass (``g = ∇f`` with its graph) are shared by all
    tangents; each tangent then costs one backward pass, ``∇(gᵀv)``.
    """
    p_leaves, spec = flatten(params)
    with torch.enable_grad():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        value = _scalar(_in_derivable_kernels(f))(unflatten(spec, p))
        g = torch.autograd.grad(value, p, create_graph=True, allow_unused=True)  # ∇f
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        out = []
        for k, v in enumerate(vs):
            v_leaves = spec.flatten_up_to(v)
            hv = (
                torch.autograd.grad(
                    [g[i] for i in live],
                    p,
                    [v_leaves[i] for i in live],
                    allow_unused=True,
                    retain_graph=k < len(vs) - 1,
                )
                if live
                else [None] * len(p)
            )  # ∇(∇fᵀv)
            out.append(_fill_zeros(spec, p, hv))
    return out


def gauss_newton_vps(
    model_at: Callable[[PyTree], Tensor],
    params: PyTree,
    vs: list[PyTree],
    output_product: OutputProduct,
    check: OutputCheck,
) -> list[PyTree]:
    """``[Jᵀ M(f) J v for v in vs]`` by double backprop, sharing one forward pass.

    The graph of ``u ↦ Jᵀu`` is built once; each tangent then costs one backward pass
    through it (``Jv``, the transpose of ``u ↦ Jᵀu``) and one through the model (``Jᵀ M Jv``).
    ``M = output_product(f)`` is formed once, so random output factors (Monte-Carlo
    targets) are shared by all tangents, as are dropout masks.
    """
    p_leaves, spec = flatten(params)
    with torch.enable_grad():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        outputs = model_at(unflatten(spec, p))
        check(outputs)
        product = output_product(outputs.detach())
        jv_of = jv_by_transposition(outputs, p)
        out = []
        for k, v in enumerate(vs):
            jv = jv_of(spec.flatten_up_to(v))  # Jv
            last = k == len(vs) - 1
            grads = torch.autograd.grad(outputs, p, product(jv), allow_unused=True, retain_graph=not last)
            out.append(_fill_zeros(spec, p, grads))  # Jᵀ M Jv
    return out


def gauss_newton_vp(
    model_at: Callable[[PyTree], Tensor],
    params: PyTree,
    v: PyTree,
    output_product: OutputProduct,
    check: OutputCheck,
    engine: str,
) -> PyTree:
    """``Jᵀ M(f) J v`` with ``f = model_at(params)``, J = ∂f/∂θ, by ``engine``.

    Engines: "forward-ad" (dual parameters give f and Jv in one forward pass, then one
    backward pass), "autograd" (Jv as the derivative of u ↦ Jᵀu by double backprop),
    "auto-eager" ("forward-ad", falling back to "autograd" where it raises: see
    :func:`_with_fallback`) each evaluate the model once; "auto-func" is "func",
    falling back to "func-vjp" likewise; "func" (``torch.func.jvp``
    then ``torch.func.vjp``) evaluates it twice, which under ``vmap`` over tangents is
    twice as fast per column as a double-vjp; the random number state is replayed for the
    second pass, so both see the same dropout masks. "func-vjp" is that double-vjp with
    torch.func (one forward pass, no state replay: the engine that ``torch.compile``
    traces without graph breaks). ``check(f)`` validates the outputs.
    """
    if engine == "autograd":
        return gauss_newton_vps(model_at, params, [v], output_product, check)[0]
    if engine == "func-vjp":
        outputs, vjp_fn = vjp(model_at, params)
        check(outputs)
        jv = vjp(vjp_fn, torch.zeros_like(outputs))[1]((v,))[0]  # Jv: transpose of u ↦ Jᵀu
        return vjp_fn(output_product(outputs)(jv))[0]  # Jᵀ M Jv
    if engine == "func":
        rng = rng_state()
        outputs, jv = func_jvp(model_at, params, v)  # f, Jv
        check(outputs)
        set_rng_state(rng)  # the second pass draws the same dropout masks as the first
        _, vjp_fn = vjp(model_at, params)
        return vjp_fn(output_product(outputs)(jv))[0]  # Jᵀ M Jv
    if engine in _FALLBACKS:  # a forward-mode engine, or its fallback for a model without the rules
        first, second = _FALLBACKS[engine]
        return _with_fallback(
            lambda: gauss_newton_vp(model_at, params, v, output_product, check, first),
            lambda: gauss_newton_vp(model_at, params, v, output_product, check, second),
        )
    p_leaves, spec = flatten(params)
    v_leaves = spec.flatten_up_to(v)
    with torch.enable_grad():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        outputs, jv = _forward_ad(model_at, spec, p, v_leaves)  # f, Jv
        check(outputs)
        mjv = output_product(outputs.detach())(jv)  # M Jv
        out = torch.autograd.grad(outputs, p, grad_outputs=mjv, allow_unused=True)  # Jᵀ M Jv
    return _fill_zeros(spec, p, out)


def jv_by_transposition(outputs: Tensor, p: list[Tensor]) -> Callable[[list[Tensor]], Tensor]:
    """``v ↦ J v`` (v given leaf by leaf like ``p``) as the transpose of ``u ↦ Jᵀu``.

    The graph of ``Jᵀu`` (u a dummy cotangent) is built once by one backward pass with
    ``create_graph``; each ``Jv`` is then one backward pass through it, with the graph kept.
    """
    u = torch.zeros_like(outputs, requires_grad=True)
    jtu = torch.autograd.grad(outputs, p, u, create_graph=True, allow_unused=True)  # Jᵀu
    live = [i for i, t in enumerate(jtu) if t is not None and t.requires_grad]

    def jv(v_leaves: list[Tensor]) -> Tensor:
        if not live:  # the outputs do not depend on p
            return torch.zeros_like(outputs)
        return torch.autograd.grad([jtu[i] for i in live], u, [v_leaves[i] for i in live], retain_graph=True)[
            0
        ]

    return jv


def model_jvp(
    model_at: Callable[[PyTree], Tensor], params: PyTree, v: PyTree, differentiable: bool = False
) -> Tensor:
    """``(f, J v)``: outputs and Jacobian-vector product, forward mode.

    By ``torch.func`` inside transforms and when the result must carry an autograd graph
    (``differentiable``), else by dual numbers (no graph), falling back (:func:`_with_fallback`)
    to ``J v`` as the transpose of ``u ↦ Jᵀu`` where an operation has no forward-mode rule
    (spectral norm's power iteration in train mode, a custom ``autograd.Function``).
    """
    check_autograd()
    if inside_transform() or differentiable:
        return func_jvp(model_at, params, v)
    p_leaves, spec = flatten(params)
    v_leaves = spec.flatten_up_to(v)

    def forward_mode() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return _forward_ad(model_at, spec, [p.detach() for p in p_leaves], v_leaves)

    def transposed() -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            p = [leaf.detach().requires_grad_() for leaf in p_leaves]
            outputs = model_at(unflatten(spec, p))
            return outputs.detach(), jv_by_transposition(outputs, p)(v_leaves).detach()

    return _with_fallback(forward_mode, transposed)


def func_jvp(model_at: Callable[[PyTree], Tensor], params: PyTree, v: PyTree) -> tuple[Tensor, Tensor]:
    """``(f, J v)`` by ``torch.func.jvp``, with the padding rows of embeddings constant.

    Under :class:`ForwardRules`, whose padding rule makes torch's forward-mode formula of
    ``F.embedding`` agree with its backward; every other operation runs unchanged.
    """
    return jvp(_in_forward_rules(model_at), (params,), (v,))


def model_vjp(
    model_at: Callable[[PyTree], Tensor], params: PyTree, u: Tensor, differentiable: bool = False
) -> PyTree:
    """``Jᵀ u`` for ``u`` shaped like the outputs, by one backward pass.

    By ``torch.func`` inside transforms and when the result must carry an autograd graph
    (``differentiable``), else by ``torch.autograd`` (no graph).
    """
    check_autograd()
    if inside_transform() or differentiable:
        return vjp(model_at, params)[1](u)[0]
    p_leaves, spec = flatten(params)
    with torch.enable_grad():
        p = [leaf.detach().requires_grad_() for leaf in p_leaves]
        outputs = model_at(unflatten(spec, p))
        if outputs.shape != u.shape:
            raise ValueError(
                f"u: expected a tensor shaped like the outputs {list(outputs.shape)}, got {list(u.shape)}"
            )
        out = torch.autograd.grad(outputs, p, grad_outputs=u, allow_unused=True)
    return _fill_zeros(spec, p, out)


def _forward_ad(model_at, spec, p: list[Tensor], v_leaves: list[Tensor]) -> tuple[Tensor, Tensor]:
    with fwad.dual_level():
        duals = [fwad.make_dual(pi, vi) for pi, vi in zip(p, v_leaves)]
        with ForwardRules():
            out = model_at(unflatten(spec, duals))
        outputs, jv = fwad.unpack_dual(out)  # f, Jv
    return outputs, torch.zeros_like(outputs) if jv is None else jv.detach()


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _with_fallback(first: Callable[[], Any], second: Callable[[], Any]) -> Any:
    """``first()``, or ``second()`` from the same random state where ``first`` raises.

    Retried: a ``NotImplementedError`` or ``RuntimeError`` (an operation without a
    forward-mode rule, say), not a ``ValueError`` (a refused input) nor a device's
    ``OutOfMemoryError`` (a CPU allocation failure is a plain ``RuntimeError`` and is
    retried). A genuine error then recurs from ``second``, with its own traceback alone.
    """
    rng = rng_state()
    try:
        return first()
    except (ValueError, _OUT_OF_MEMORY):
        raise
    except (NotImplementedError, RuntimeError):
        pass
    set_rng_state(rng)  # the fallback draws the same dropout masks
    return second()


def rng_state() -> tuple:
    """Torch's CPU random-number state, and CUDA's when initialized (for :func:`set_rng_state`)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def kept_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Torch's global random state (CPU, and ``device``'s if CUDA) restored on exit.

    Draws inside (dropout in a checking forward pass) leave the global streams as they were.
    """
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed drawn from ``generator`` (on its own device) or, if None, from torch's global RNG."""
    device = generator.device if check_generator(generator) is not None else None
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


def generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` if it draws on ``device``'s type (or is None), else one there seeded from it.

    Torch samples on a device only with a generator of that device; a CPU generator given
    for a CUDA model (or the reverse) then still makes the draws reproducible.
    """
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    return torch.Generator(device).manual_seed(draw_seed(generator))


def set_rng_state(state: tuple) -> None:
    """Restore a state from :func:`rng_state`: the next draws repeat those after it."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _in_forward_rules(f):
    return within(ForwardRules, f)


def _in_derivable_kernels(f):
    return within(derivable_kernels, f)


def _fill_zeros(spec, p: list[Tensor], grads) -> PyTree:
    return unflatten(spec, [torch.zeros_like(pi) if g is None else g for pi, g in zip(p, grads)])


def _scalar(f):
    """``f`` checked to return a scalar, and (outside transforms) a finite one.

    A non-finite value (the mean over an empty batch is nan) has no Hessian, although
    autograd would return zeros for it.
    """

    def checked(p):
        value = f(p)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"f: must return a scalar tensor, got {describe(value)}")
        _check_finite(fwad.unpack_dual(value).primal)
        return value.reshape(())

    return checked


def _with_value(f):
    """``p -> (f(p), f(p))`` (checked scalar) for ``torch.func.grad(..., has_aux=True)``."""

    def both(p):
        value = _scalar(f)(p)
        return value, value

    return both


def _check_finite(value: Tensor) -> None:
    """Raise ``ValueError`` for a non-finite function value (where its value can be read)."""
    if not holds_values(value) or bool(torch.isfinite(value)):
        return
    raise ValueError(
        f"f: the value is {value.item()} (a mean over an empty batch?); a non-finite function has no Hessian"
    )
