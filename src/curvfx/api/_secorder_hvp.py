"""torch-secorder's curvature-vector products (``torch_secorder.core.hvp``) on :func:`curvfx.hvp`.

torch-secorder passes the loss as a closure ``func()`` that reads the parameter tensors
themselves. curvfx's transforms take pure functions ``f(params)``, so each closure is turned
into one (:func:`curvfx.api._closures.pure_function`) that evaluates ``func()`` with every
torch operation seeing a stand-in tensor wherever it would read one of ``params`` (a
``TorchFunctionMode``). The parameters are never written to, so nothing needs restoring,
and an HVP is then one :func:`curvfx.hvp` call. A closure that reaches a parameter past
torch's function dispatch (a custom ``torch.autograd.Function``, or a tensor computed from
the parameter before the closure runs, ``w2 = w * 1.0``) is detected and refused rather
than differentiated wrongly. Every evaluation of one closure made pure replays the
random numbers of its first (dropout draws one mask), and a tensor listed twice in
``params`` is refused.

Vectors take torch-secorder's forms: one tensor shaped like the only parameter (the result
is one tensor), a flat tensor [P] (the result is flat [P]), or a list of tensors matching
``params`` (the result is a list). The model functions use the model's trainable
parameters in ``named_parameters()`` order; their vectors and results are lists over
``model.parameters()`` (frozen parameters get zero entries).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from curvfx._arguments import check_count, check_flag, check_number
from curvfx._errors import check_batch
from curvfx.api._closures import check_callable, param_list, pure_function
from curvfx.api._vectors import (
    Vector,
    model_parts,
    model_result,
    model_vector,
    vector_as_list,
    vector_from_list,
)
from curvfx.func import ggn_vp, hvp
from curvfx.losses import get_loss

__all__ = ["approximate_hvp", "exact_hvp", "gauss_newton_product", "graph_if", "model_hvp"]


def exact_hvp(
    func: Callable[[], Tensor],
    params: Iterable[Tensor],
    v: Vector,
    create_graph: bool = False,
) -> Vector:
    """Hessian-vector product ``H v`` of a scalar closure, ``H = ∇²_θ func()`` [P, P].

    θ are the tensors in ``params`` as ``func`` reads them. Computed by :func:`curvfx.hvp`
    (double backprop, about two gradients' cost) on ``func`` made pure.

    Differs from torch-secorder in: 1. bad input raises ``ValueError``/``TypeError`` naming
    the argument (torch-secorder lets autograd raise ``RuntimeError``); 2. ``params`` may be
    any iterable (``model.parameters()``) and ``v`` may also be a flat tensor [P];
    3. a parameter ``func`` does not read gets a zero block instead of an error.

    Args:
        func: Closure returning a scalar tensor (the loss), reading the tensors in ``params``.
        params: The tensors θ to differentiate with respect to (a list or any iterable).
        v: One tensor shaped like the only parameter, a flat tensor [P], or a list of
            tensors shaped like ``params``.
        create_graph: If True, the result is differentiable with respect to ``params`` (and
            ``v``): it is computed by ``torch.func`` (``vjp`` of ``grad``) on the parameter
            tensors themselves, so third derivatives such as ``∇_θ (vᵀ H(θ) v)`` follow by
            autograd. ``func`` is then evaluated twice, with the same random numbers (as
            :func:`approximate_hvp`).

    Returns:
        ``H v`` in the form of ``v`` (one tensor, flat [P], or a list like ``params``).

    Raises:
        TypeError: If ``func`` is not callable or ``params`` holds non-tensors.
        ValueError: If ``v`` does not match ``params`` (names the entry and shapes),
            ``params`` lists one tensor twice (names both positions), ``func`` is not
            scalar, reads none of ``params``, reads one through a custom
            ``torch.autograd.Function`` or a tensor computed from it before ``func``, or
            (``create_graph=True``) updates a tensor in place, as BatchNorm does in train
            mode.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> exact_hvp(lambda: x[0] ** 2 + 2 * x[1] ** 2, [x], torch.tensor([1.0, 1.0]))
        tensor([2., 4.])
    """
    params = param_list(params)
    pure = pure_function(func, params)
    v_list, form = vector_as_list(v, params)
    check_flag(create_graph, "create_graph")
    if create_graph:  # torch.func on θ itself keeps the outer autograd graph
        with torch.enable_grad():
            pure([p.detach().requires_grad_() for p in params])  # checks the substitution
        out = _differentiable_hvp(pure, params, v_list)
    else:
        with graph_if(False):
            out = hvp(pure, params, v_list, strategy="autograd")
    return vector_from_list(out, form)


def approximate_hvp(
    func: Callable[[], Tensor],
    params: Iterable[Tensor],
    v: Vector,
    num_samples: int = 1,
    damping: float = 0.0,
) -> Vector:
    """``H v + damping · v`` by central differences of gradients, without second derivatives.

        H v ≈ (1/m) Σ_j (∇f(θ + h_j v) - ∇f(θ - h_j v)) / (2 h_j),   h_j = h · 2^(-j/m)

    for j = 0 … m-1 (m = ``num_samples`` steps spread over one octave, averaged), with
    ``h = ε^(1/3) (1 + ‖θ_v‖) / ‖v‖``: ε the machine epsilon of the
    parameters' dtype and ``θ_v`` the parameters restricted to the entries where v ≠ 0.
    This step balances the O(h²) truncation error against the rounding error of central
    differences, which arises only in the entries the step moves, so a large parameter block
    that v does not touch (an embedding table) does not enlarge it. Exact up to rounding for
    a quadratic ``func``; relative error of order ε^(2/3) otherwise (about 1e-10 in float64,
    1e-4 in float32, for MLPs, CNNs and embedding models, v dense or zero on some
    parameters), larger where f's third derivatives are large at the scale ``h‖v‖``.
    Cost: 2m gradients.

    The gradients are taken at stand-in tensors θ ± h_j v (see the module docstring): the
    parameters are never written to, so they keep their exact bits, version counters and
    ``.grad`` even when ``func`` raises. Every evaluation of ``func`` replays the random
    numbers of the first (torch's global RNG state, CPU and CUDA, is restored before each
    one), so a ``func`` with active dropout is differentiated at one fixed mask, that of
    :func:`exact_hvp` called from the same RNG state; the global RNG is left as after one
    evaluation of ``func``.

    Differs from torch-secorder in: 1. central instead of forward differences, with the
    step scaled to ‖θ_v‖ and ‖v‖ (torch-secorder: a fixed step); 2. ``num_samples`` averages
    differences at m distinct steps (deterministic); 3. the parameters are not perturbed
    in place; 4. random operations in ``func`` (dropout) draw the same numbers at every
    point (torch-secorder: new ones per gradient, so the differences measure the change of
    mask, not H); 5. errors as in :func:`exact_hvp`.

    Args:
        func: Closure returning a scalar tensor, reading the tensors in ``params``.
        params: The tensors θ (a list or any iterable).
        v: Vector in a form accepted by :func:`exact_hvp`.
        num_samples: m, the number of step sizes averaged (a positive int).
        damping: λ, a finite number; ``λ v`` is added to the result.

    Returns:
        The estimate of ``H v + λ v`` in the form of ``v``.

    Raises:
        ValueError: If ``num_samples`` is not a positive int, ``damping`` not a finite
            number, or as :func:`exact_hvp`.
        TypeError: As :func:`exact_hvp`.
    """
    params = param_list(params)
    pure = pure_function(func, params)
    v_list, form = vector_as_list(v, params)
    m = check_count(num_samples, "num_samples")
    damping = check_number(damping, "damping", low=-math.inf)
    theta = [p.detach() for p in params]
    v_list = [vi.detach() for vi in v_list]
    total = [torch.zeros_like(t) for t in theta]
    h = _step_size(theta, v_list)
    if h > 0.0:
        for j in range(m):
            step = h * 2.0 ** (-j / m)
            plus = _gradient(pure, [t + step * vi for t, vi in zip(theta, v_list)])  # ∇f(θ + h_j v)
            minus = _gradient(pure, [t - step * vi for t, vi in zip(theta, v_list)])  # ∇f(θ - h_j v)
            total = [s + (a - b) / (2.0 * step) for s, a, b in zip(total, plus, minus)]
    out = [s / m + damping * vi.detach() for s, vi in zip(total, v_list)]
    return vector_from_list(out, form)


def model_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    v: Vector,
    create_graph: bool = False,
) -> Vector:
    """Hessian-vector product of ``L(θ) = loss_fn(model(x), y)``, the loss as written.

    θ are the model's trainable parameters in ``named_parameters()`` order. Computed by
    :func:`curvfx.hvp` on the model made pure (:func:`curvfx.make_functional`), about two
    gradients' cost.

    Differs from torch-secorder in: 1. the forward pass uses copies of the buffers, so
    BatchNorm running statistics are left unchanged; 2. frozen parameters
    (``requires_grad=False``) get zero entries; 3. errors name the argument.

    Args:
        model: The ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (a torch loss or any callable).
        x: Input batch.
        y: Targets.
        v: One tensor (a model with one parameter), a flat tensor [P] over
            ``model.parameters()``, or a list of tensors shaped like ``model.parameters()``
            (or like its trainable parameters only).
        create_graph: If True, the result is differentiable with respect to the model's
            parameters (``torch.func`` ``vjp`` of ``grad`` on the parameters themselves).

    Returns:
        ``H v`` in the form of ``v``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``loss_fn`` not callable.
        ValueError: If ``v`` does not match the parameters or the loss is not scalar.
    """
    check_flag(create_graph, "create_graph")
    fn, params, index = model_parts(model, create_graph)
    v_tree, form, like = model_vector(v, model, params, index)
    check_callable(loss_fn, "loss_fn")
    check_batch(x, None)  # an empty batch has a nan loss; y is the loss's, as written
    strategy = "rev-rev" if create_graph else "autograd"
    loss = get_loss(loss_fn)  # a torch loss checks its targets (no broadcasting); a callable is as written
    with graph_if(create_graph):
        out = hvp(lambda p: loss.checked_call(fn(p, x), y), params, v_tree, strategy=strategy)
    return model_result(out, form, like, index)


def gauss_newton_product(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    v: Vector,
    create_graph: bool = False,
) -> Vector:
    """Generalized Gauss-Newton-vector product of ``loss_fn(model(x), y)``, the loss as written.

        G v = Jᵀ (H_f (J v)),   J = ∂ model(x) / ∂θ [N·C, P],   H_f = ∇²_f loss_fn(f, y)

    H_f keeps the loss's reduction: ``nn.MSELoss()`` gives ``H_f = 2/(N·C) I``, so
    ``G = 2/(N·C) JᵀJ``. Computed by :func:`curvfx.ggn_vp` (one forward pass with Jv, one
    backward pass), never forming J. For a model linear in θ, G equals the Hessian.

    Differs from torch-secorder in: 1. it returns the GGN product (torch-secorder's returns
    zeros); 2. as :func:`model_hvp` 1–3.

    Args:
        model: The ``nn.Module``.
        loss_fn: A torch loss (module or function) or any ``loss_fn(outputs, targets)``
            (its output Hessian is then taken by autograd).
        x: Input batch.
        y: Targets.
        v: Vector in a form accepted by :func:`model_hvp`.
        create_graph: If True, the result is differentiable with respect to the model's
            parameters (``torch.func`` ``jvp`` and ``vjp`` on the parameters themselves).

    Returns:
        ``G v`` in the form of ``v``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If ``v`` does not match the parameters, the batch is empty or ``y``
            does not fit the loss.
    """
    check_flag(create_graph, "create_graph")
    fn, params, index = model_parts(model, create_graph)
    v_tree, form, like = model_vector(v, model, params, index)
    strategy = "func" if create_graph else "auto"
    with graph_if(create_graph):
        out = ggn_vp(fn, loss_fn, params, x, y, v_tree, strategy=strategy)
    return model_result(out, form, like, index)


def graph_if(create_graph: bool) -> contextlib.AbstractContextManager:
    """No context for ``create_graph``, else ``torch.no_grad()`` (a result without a graph).

    The engines record their own graph inside, so the value is computed either way, also
    for parameters or vectors that require grad.
    """
    return contextlib.nullcontext() if create_graph else torch.no_grad()


def _differentiable_hvp(pure: Callable, params: list[Tensor], v_list: list[Tensor]) -> list[Tensor]:
    """``H v`` by ``torch.func`` on the parameters themselves (``vjp`` of ``grad``)."""
    try:
        return hvp(pure, params, v_list, strategy="rev-rev")
    except RuntimeError as err:
        if "mutate a captured Tensor" not in str(err):
            raise
        raise ValueError(
            "func: updates a tensor in place (e.g. BatchNorm running statistics in train mode), "
            "which create_graph=True cannot differentiate (it runs func under torch.func); call "
            "model.eval(), or use model_hvp, which leaves the buffers alone"
        ) from err


def _gradient(pure: Callable[[list[Tensor]], Tensor], point: list[Tensor]) -> list[Tensor]:
    """∇f at ``point`` (detached), zeros for parameters the value does not depend on."""
    with torch.enable_grad():
        p = [t.detach().requires_grad_() for t in point]
        value = pure(p)
        if not value.requires_grad:
            return [torch.zeros_like(t) for t in p]
        grads = torch.autograd.grad(value, p, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(p, grads)]


def _step_size(theta: list[Tensor], v: list[Tensor]) -> float:
    """The central-difference step ``h = ε^(1/3) (1 + ‖θ_v‖) / ‖v‖`` (0 for ``v = 0``).

    ``θ_v`` is θ restricted to the entries where v ≠ 0 (the others are zeroed) and ε the
    machine epsilon of θ's dtype. Why: the computed points ``θ ± h v`` differ from the exact
    ones by rounding of order ε|θ_i|, but only in the entries the step moves (``θ_i + h·0 =
    θ_i`` exactly); divided by the step length ``h‖v‖`` this is a relative error of
    ε‖θ_v‖ / (h‖v‖) in the direction, against a truncation error of order (h‖v‖)². The step
    length ε^(1/3) (1 + ‖θ_v‖) balances the two at ε^(2/3) (the 1 covers θ_v ≈ 0, where
    the gradient's own rounding dominates). A large parameter block that ``v`` does not
    touch (an embedding table) thus does not enlarge h.
    """
    v_norm = float(torch.sqrt(sum((vi**2).sum() for vi in v)))
    if v_norm == 0.0:
        return 0.0
    moved = sum((torch.where(vi != 0, t, 0) ** 2).sum() for t, vi in zip(theta, v))  # ‖θ_v‖²
    return torch.finfo(theta[0].dtype).eps ** (1.0 / 3.0) * (1.0 + float(torch.sqrt(moved))) / v_norm
