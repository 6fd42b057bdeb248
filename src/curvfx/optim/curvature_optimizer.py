"""The base of curvfx's model-based optimizers: the curvature at the current parameters on a batch.

A custom second-order optimizer subclasses :class:`CurvatureOptimizer` and, in its
``step(batch)``, asks ``self.curvature(batch, "ggn")`` for a :class:`Curvature`: the
operator (a :class:`curvfx.LinearOperator` over the trainable parameters), the gradient
and the loss. It then combines curvfx's solvers and estimators on them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvfx import _errors
from curvfx._arguments import check_count, check_flag, check_number
from curvfx._errors import check_generator, describe
from curvfx._pytree import ravel, unravel
from curvfx.functional import call_with_inputs, make_functional
from curvfx.losses import get_loss
from curvfx.operators import LinearOperator, fisher, ggn, hessian, identity
from curvfx.optim._least_squares import trainable

__all__ = [
    "CURVATURES",
    "Curvature",
    "CurvatureOptimizer",
    "check_batch",
    "check_options",
    "check_samples_used",
    "shared_options",
]

CURVATURES = ("ggn", "hessian", "mc_fisher", "exact_fisher", "empirical_fisher")
_FISHER_KINDS = {"mc_fisher": "mc", "exact_fisher": "exact", "empirical_fisher": "empirical"}


@dataclass(frozen=True)
class Curvature:
    """The curvature of the batch loss L(θ) at the current parameters θ (all detached).

    Attributes:
        operator: C + λI [P, P] as a :class:`curvfx.LinearOperator` (C the curvature of
            the chosen kind, λ the damping), flat in the order of ``params``; pytree inputs
            are dicts keyed by parameter name. It reads the parameters' storage: it is the
            curvature at θ until the parameters change.
        gradient: ∇_θ L [P], flat in the same order (None if not asked for).
        loss: L(θ), a 0-d tensor (None if the gradient was not asked for).
        params: The trainable parameters θ (``requires_grad=True``), in param-group order.
    """

    operator: LinearOperator
    gradient: Tensor | None
    loss: Tensor | None
    params: list[Tensor]

    def split(self, v: Tensor) -> list[Tensor]:
        """A flat vector v [P] as one tensor per parameter, shaped like ``params``."""
        return list(unravel(v, self.params))


class CurvatureOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that knows its model and loss, so it can build curvature.

    Protocol (all of curvfx's model-based optimizers): construct with the parameters to
    optimize (or param groups, as any optimizer) and, by keyword, the ``model`` that owns
    them and the ``loss_fn``; call ``step(batch)`` with one batch ``(X, y)``. The loss is
    ``L(θ) = loss_fn(model(X), y)``, reduction included, exactly as in
    :func:`curvfx.ggn`. There is no closure and no ``backward()``: the optimizer evaluates
    the model itself, and it never reads or writes ``.grad``.

    Which parameters: those in the param groups that have ``requires_grad=True`` at the
    time of the step (a parameter frozen later is skipped from then on); the model's
    other parameters and its buffers are held fixed. All of them share one dtype and device.

    What a subclass uses, in its ``step(batch)``:

    * :meth:`curvature` ``(batch, kind, damping=λ)`` → :class:`Curvature`, the operator
      C + λI of ``kind`` in :data:`CURVATURES`, the gradient and the loss;
    * :meth:`gradient` ``(batch)`` → ``(loss, g)`` alone (steps that reuse old curvature);
    * :meth:`loss_at` ``(batch, d)`` → L(θ + d) without changing the parameters;
    * :meth:`add_to_params` ``(d, alpha)``: θ ← θ + α d;
    * :meth:`trainable` → the trainable parameters, and ``self.generator``.

    The gradient comes from one ordinary forward and backward pass of the module (so
    BatchNorm running statistics update once per step, as in SGD); the operators and
    :meth:`loss_at` evaluate the model as a pure function (:func:`curvfx.make_functional`)
    and change no buffer. ``state_dict`` also saves the generator's state, and
    ``load_state_dict`` restores it, so a resumed run draws the same probes.

    Args:
        params: Parameters or param groups, as for any ``torch.optim.Optimizer``; each
            must be a parameter of ``model``.
        defaults: Default options of the param groups (as ``torch.optim.Optimizer``).
        model: The ``nn.Module`` that owns ``params``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``: a torch loss (module or
            function), a :class:`curvfx.losses.Loss`, or any callable (see
            :func:`curvfx.losses.get_loss`).
        generator: Source of randomness (probes, MC targets); None: torch's global RNG.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``loss_fn`` is not callable.
        ValueError: If a parameter in ``params`` is not a parameter of ``model``.

    Example:
        A damped Newton-CG optimizer in a few lines:

        >>> import curvfx
        >>> class NewtonCG(CurvatureOptimizer):
        ...     def __init__(self, params, *, model, loss_fn, damping=1e-3):
        ...         super().__init__(params, dict(damping=damping), model=model, loss_fn=loss_fn)
        ...
        ...     @torch.no_grad()
        ...     def step(self, batch):
        ...         c = self.curvature(batch, "ggn", damping=self.defaults["damping"])
        ...         d, _ = curvfx.cg(c.operator, -c.gradient, tol=1e-10)  # (G + λI) d = -g
        ...         self.add_to_params(d)
        ...         return c.loss
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
        >>> opt = NewtonCG(model.parameters(), model=model, loss_fn=torch.nn.MSELoss(), damping=1e-10)
        >>> _ = opt.step((X, y))  # a linear model: one Newton step to the least-squares solution
        >>> A = torch.cat([X, torch.ones(20, 1, dtype=torch.float64)], dim=1)
        >>> best = float(torch.nn.functional.mse_loss(A @ torch.linalg.lstsq(A, y).solution, y))
        >>> abs(float(opt.step((X, y))) - best) < 1e-8  # the loss after the first step
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        model: nn.Module,
        loss_fn: Any,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected the nn.Module that owns the parameters, got {describe(model)}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "model: curvfx.optim optimizers are single-process (gradient and curvature of this "
                "rank's batch only), so the ranks of a DistributedDataParallel model would drift "
                "apart; pass model.module in a single process"
            )
        self.model, self.loss_fn, self.generator = model, loss_fn, check_generator(generator)
        self.loss = get_loss(loss_fn)
        self.model_fn, _ = make_functional(model)
        super().__init__(params, defaults)
        names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"params: a parameter of shape {list(p.shape)} is not a parameter of "
                        f"model ({type(model).__name__}); pass model.parameters() or a subset"
                    )
        self._names = names

    # -- what a subclass uses ----------------------------------------------------------------
    def trainable(self) -> list[Tensor]:
        """The parameters to update now: those with ``requires_grad``, in param-group order.

        Raises:
            ValueError: If there is none, or they differ in dtype or device.
        """
        return trainable(self.param_groups)

    def gradient(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(L(θ), ∇_θ L [P])`` on ``batch`` by one forward and backward pass of the module.

        Raises:
            TypeError: If ``batch`` is a callable (a closure) or not a pair.
            ValueError: If ``batch`` is not an ``(X, y)`` pair with tensor targets of the
                inputs' batch size N, the targets do not fit the loss and the model's
                outputs (e.g. class indices out of range; the loss's ``check``), or the
                loss is not a finite scalar that depends on the trainable parameters.
        """
        x, y = check_batch(batch, type(self).__name__)
        params = self.trainable()
        with torch.enable_grad():
            loss = self.loss.checked_call(call_with_inputs(self.model, x), y)
            _check_loss(loss)
            if not loss.requires_grad:
                raise ValueError(
                    "loss_fn: the loss does not depend on the trainable parameters (no autograd "
                    "graph); does the model run under torch.no_grad() or detach its parameters?"
                )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        g = ravel([torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, params)])
        return loss.detach(), g

    def curvature(
        self,
        batch: Any,
        kind: str = "ggn",
        *,
        damping: float = 0.0,
        num_samples: int = 1,
        gradient: bool = True,
    ) -> Curvature:
        """The curvature operator C + λI of ``kind`` at the current θ on ``batch``, and ∇L, L.

        ``kind`` (the loss as written, see :mod:`curvfx.operators.curvature`):
        ``"ggn"`` (:func:`curvfx.ggn`), ``"hessian"`` (:func:`curvfx.hessian`),
        ``"mc_fisher"``, ``"exact_fisher"``, ``"empirical_fisher"`` (:func:`curvfx.fisher`
        of that kind; "mc" draws ``num_samples`` targets per sample from
        ``self.generator``). Building the operator costs nothing; each product costs about
        two (GGN, Fisher) or three (Hessian) gradients. The gradient costs one forward and
        backward pass; ``gradient=False`` skips it (``gradient`` and ``loss`` are then
        None).

        Raises:
            ValueError: For an unknown ``kind``, a negative or non-finite ``damping``, or
                a bad batch (see :meth:`gradient`).
        """
        if kind not in CURVATURES:
            raise ValueError(f"kind: expected one of {CURVATURES}, got {kind!r}")
        damping = check_number(damping, "damping", strict=False)
        x, y = check_batch(batch, type(self).__name__)
        loss, g = self.gradient((x, y)) if gradient else (None, None)
        params = self.trainable()
        values = {self._names[id(p)]: p.detach() for p in params}
        if kind == "ggn":
            op = ggn(self.model_fn, self.loss, (x, y), params=values)
        elif kind == "hessian":
            op = hessian(self.model_fn, self.loss, (x, y), params=values)
        else:
            op = fisher(
                self.model_fn,
                self.loss,
                (x, y),
                kind=_FISHER_KINDS[kind],
                num_samples=num_samples,
                generator=self.generator,
                params=values,
            )
        if damping:
            op = op + damping * identity(op.shape[0])
        return Curvature(op, g, loss, params)

    @torch.no_grad()
    def loss_at(self, batch: Any, d: Tensor | None = None) -> float:
        """L(θ + d) on ``batch`` (d flat [P], None for d = 0), without changing parameters or buffers.

        Returns ``inf`` where the loss is not finite.

        Raises:
            ValueError: For a bad batch or targets that do not fit the loss, as
                :meth:`gradient`; for a ``d`` that is not [P] in the parameters' dtype.
        """
        x, y = check_batch(batch, type(self).__name__)
        params = self.trainable()
        steps = _split(d, params) if d is not None else [None] * len(params)
        values = {
            self._names[id(p)]: p.detach() if s is None else p.detach() + s for p, s in zip(params, steps)
        }
        loss = self.loss.checked_call(self.model_fn(values, x), y)
        _check_loss(loss, finite=False)
        value = float(loss)
        return value if math.isfinite(value) else math.inf

    @torch.no_grad()
    def add_to_params(self, d: Tensor, alpha: float = 1.0) -> None:
        """θ ← θ + α d for the trainable parameters, d flat [P] in their order."""
        params = self.trainable()
        for p, step in zip(params, _split(d, params)):
            p.add_(step, alpha=alpha)

    def global_state(self) -> dict[str, Any]:
        """The optimizer-wide state (step count, damping, ...), kept with the first parameter.

        As torch's ``LBFGS``, it lives in ``self.state`` of the first parameter of the first
        group, so ``state_dict`` saves it.
        """
        return self.state[self.param_groups[0]["params"][0]]

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` plus the generator's state (if any)."""
        state = super().state_dict()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state (as ``torch.optim.Optimizer``), restoring the generator's state if saved.

        A saved generator state with no generator here (``generator=None``) warns: the
        draws then come from torch's global RNG, and the run does not resume identically.
        """
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is None:
            return
        if self.generator is None:
            warnings.warn(
                "state_dict: it holds the state of the saved optimizer's generator, but this one "
                "has none (generator=None): its probes and sampled targets come from torch's global "
                "RNG, so the run does not resume identically; pass a torch.Generator to restore it",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.generator.set_state(generator_state.cpu())


def check_batch(batch: Any, who: str) -> tuple[Any, Tensor]:
    """``batch`` as ``(X, y)``; a clear error for a closure or a malformed batch.

    Raises:
        TypeError: If ``batch`` is a callable (a closure).
        ValueError: If ``batch`` is not a pair ``(X, y)`` with tensor targets, or X holds no
            tensors or an empty batch (:func:`curvfx._errors.check_batch`; the targets are
            checked against the outputs by the loss).
    """
    if callable(batch) and not isinstance(batch, Tensor):
        raise TypeError(
            f"{who}.step takes one batch (X, y), not a closure: the optimizer evaluates "
            f"loss_fn(model(X), y) itself; call opt.step((X, y))"
        )
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise ValueError(f"{who}.step: expected a batch (X, y), got {describe(batch)}")
    if not isinstance(batch[1], Tensor):
        raise ValueError(
            f"{who}.step: the targets y of the batch (X, y) must be a tensor, got {describe(batch[1])}"
        )
    _errors.check_batch(batch[0], None)
    return batch[0], batch[1]


def check_options(group: dict[str, Any], rules: dict[str, tuple]) -> None:
    """Validate ``group[key]`` by ``rules[key] = (kind, ...)``, naming the key (see :mod:`curvfx._arguments`).

    Numbers and flags are stored back as Python scalars (a one-element tensor or a numpy
    value given as an option would otherwise reach ``torch``'s in-place updates as is).

    Kinds: ``("float", low, high)`` a finite number in [low, high) (high None: no bound),
    ``("float>", low, high)`` in (low, high), ``("unit",)`` in [0, 1] (:func:`check_number`);
    ``("int", low)`` an int ≥ low (:func:`check_count`); ``("bool",)`` (:func:`check_flag`);
    ``("betas",)`` a pair of numbers in [0, 1); ``("choice", values)`` one of ``values``.

    Raises:
        TypeError: If a ``"bool"`` option is not a bool.
        ValueError: If any other option breaks its rule.
    """
    for key, (kind, *args) in rules.items():
        value = group[key]
        if kind in ("float", "float>"):
            low, high = args[0], math.inf if args[1] is None else args[1]
            group[key] = check_number(value, key, strict=kind == "float>", low=low, high=high)
        elif kind == "unit":
            group[key] = check_number(value, key, strict=False, high=1.0, strict_high=False)
        elif kind == "int":
            group[key] = check_count(value, key, args[0])
        elif kind == "choice":
            if value not in args[0]:
                raise ValueError(f"{key}: expected one of {args[0]}, got {value!r}")
        elif kind == "bool":
            group[key] = check_flag(value, key)
        elif kind == "betas":
            if not (isinstance(value, tuple | list) and len(value) == 2):
                raise ValueError(f"{key}: expected a pair of floats in [0, 1), got {value!r}")
            group[key] = tuple(
                check_number(beta, f"{key}[{i}]", strict=False, high=1.0) for i, beta in enumerate(value)
            )


def check_samples_used(num_samples: int, used: bool, sampler: str) -> None:
    """ValueError unless ``num_samples`` is 1 or the options draw samples (``used``).

    ``sampler`` names the settings that draw samples, e.g. ``"fisher_type='mc'"``: a
    ``num_samples`` that nothing uses is refused rather than silently ignored.
    """
    if not used and num_samples != 1:
        raise ValueError(f"num_samples: only {sampler} draws samples, got {num_samples}")


def shared_options(
    groups: list[dict[str, Any]], keys: tuple[str, ...], who: str, check: Callable[[dict], None]
) -> dict[str, Any]:
    """Validate every param group with ``check``, then the options all groups must agree on.

    One curvature computation per step needs one value of each of ``keys``.
    """
    for group in groups:
        check(group)
    first = groups[0]
    for group in groups[1:]:
        for key in keys:
            if group[key] != first[key]:
                raise ValueError(
                    f"{key}: every param group of {who} must use the same value (one curvature "
                    f"computation per step), got {first[key]!r} and {group[key]!r}"
                )
    return {key: first[key] for key in keys}


def _split(d: Any, params: list[Tensor]) -> list[Tensor]:
    """A flat step d [P] as one tensor per parameter; ValueError if d is not [P] of their dtype/device."""
    size = sum(p.numel() for p in params)
    if not isinstance(d, Tensor) or d.shape != (size,):
        raise ValueError(
            f"d: expected a flat vector [P] = [{size}] over the trainable parameters, got {describe(d)}"
        )
    like = params[0]
    if d.dtype != like.dtype or d.device != like.device:
        raise ValueError(
            f"d: dtype/device {d.dtype}/{d.device} do not match the parameters' {like.dtype}/{like.device}"
        )
    return list(unravel(d, params))


def _check_loss(loss: Any, *, finite: bool = True) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(
            f"loss_fn: must return a scalar (0-d tensor), got {describe(loss)}; use a 'mean' or "
            "'sum' reduction"
        )
    if finite and not bool(torch.isfinite(loss)):
        raise ValueError("loss_fn: the loss is not finite (inf/nan) at the current parameters")
