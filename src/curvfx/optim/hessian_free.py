"""Hessian-free optimization (Martens, 2010): truncated CG on the damped GGN, adaptive damping."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._arguments import check_number
from curvfx._pytree import ravel
from curvfx.estimators import cg
from curvfx.operators import LinearOperator, empirical_fisher, fisher, ggn, hessian
from curvfx.operators._compile import compile_options
from curvfx.optim.curvature_optimizer import (
    CURVATURES,
    Curvature,
    CurvatureOptimizer,
    check_batch,
    check_options,
    check_samples_used,
    shared_options,
)

__all__ = ["LINE_SEARCHES", "HessianFree"]

LINE_SEARCHES = (None, "backtracking")
DAMPING_DECREASE = 2 / 3  # λ ← λ·2/3 when ρ > 3/4 (Martens 2010, §4.1)
DAMPING_INCREASE = 3 / 2  # λ ← λ·3/2 when ρ < 1/4
ARMIJO_C = 1e-2  # L(θ + t d) ≤ L(θ) + c t gᵀd (Martens & Sutskever 2012, §8.8)
BACKTRACK_FACTOR = 0.8  # t ← 0.8 t after a rejected trial
MAX_TRIALS = 20  # t = 1, 0.8, ..., 0.8¹⁹ ≈ 0.014; no step if all fail

_RULES = {
    "damping": ("float>", 0.0, None),
    "min_damping": ("float", 0.0, None),
    "curvature": ("choice", CURVATURES),
    "cg_maxiter": ("int", 1),
    "cg_tol": ("float>", 0.0, None),
    "warm_start": ("unit",),
    "line_search": ("choice", LINE_SEARCHES),
    "adapt_damping": ("bool",),
    "num_samples": ("int", 1),
}


class HessianFree(CurvatureOptimizer):
    """Hessian-free (truncated Newton) optimization of a model on mini-batches (Martens 2010).

    Each :meth:`step` on a batch ``(X, y)``, with L(θ) = ``loss_fn(model(X), y)``, g = ∇L
    and C the curvature of kind ``curvature`` (GGN by default; Hessian, or a Fisher) on
    that batch:

    1. Truncated CG (:func:`curvfx.cg`) on (C + λI) d = -g, from d₀ = ζ d_prev (the last
       CG iterate of the previous step, decayed by ζ = ``warm_start``), for at most
       ``cg_maxiter`` iterations or until ‖r‖ ≤ ``cg_tol``·‖g‖; CG also stops at
       non-positive curvature (an indefinite Hessian). The iterates at the checkpoints
       i = ⌈γʲ⌉ (γ = ``checkpoint_ratio``) and the last one are kept.
    2. CG-iterate backtracking: d = the kept iterate with the smallest L(θ + d) (one
       forward pass each).
    3. Reduction ratio ρ = (L(θ + d) - L(θ)) / q(d), q(d) = gᵀd + ½ dᵀCd the undamped
       quadratic model (one product with C); λ ← λ·2/3 if ρ > 3/4, λ ← λ·3/2 if ρ < 1/4
       or ρ is undefined at g ≠ 0 (q(d) ≥ 0: CG found no descent direction; at g = 0, a
       stationary point, λ stays). When CG stops at
       once (d = 0: the damped curvature along the gradient, κ + λ with κ = gᵀCg/‖g‖², is
       not positive), λ ← max(λ·3/2, -2κ), so that the next step has one (one more
       product with C) (if ``adapt_damping``; λ ≥ ``min_damping``).
    4. θ ← θ + t d: t = 1 without line search (Martens 2010), or with
       ``line_search="backtracking"`` the first t in 1, 0.8, 0.8², … with
       L(θ + t d) ≤ L(θ) + 10⁻²·t·gᵀd (Martens & Sutskever 2012); none: t = 0 (the step
       is rejected and λ grows, as ρ < 0).

    Cost per step: one gradient, k ≤ ``cg_maxiter`` curvature products (about two
    gradients each for the GGN and Fisher, three for the Hessian), one more for a warm
    start and one for q(d), and one forward pass per kept iterate and per line-search
    trial. Memory: one vector [P] per kept iterate (about log(k)/log(γ) of them).

    Differs from Martens (2010) in: 1. CG stops by its relative residual, not by Martens'
    relative progress in q. 2. Backtracking picks the best kept iterate rather than
    walking back while the loss decreases. 3. No structural damping and no
    preconditioner; the curvature uses the gradient's batch (not a subset of it).

    Protocol: see :class:`CurvatureOptimizer` (``step(batch)``, no closure). Loss
    evaluations at trial points use the model as a pure function, so BatchNorm running
    statistics update once per step (in the gradient pass) and the model should be
    deterministic (no active dropout) for ρ to mean anything.

    Args:
        params: Parameters (or param groups) of ``model``; every group must use the same
            options (one solve per step).
        model: The ``nn.Module`` that owns ``params``.
        loss_fn: The loss (see :class:`CurvatureOptimizer`).
        damping: Initial λ > 0 (Tikhonov damping); it is adapted after each step.
        curvature: ``"ggn"`` (default, ⪰ 0), ``"hessian"``, ``"mc_fisher"``,
            ``"exact_fisher"`` or ``"empirical_fisher"``.
        cg_maxiter: Most CG iterations per step (Martens: 250; a mini-batch does with less).
        cg_tol: Relative residual at which CG stops.
        warm_start: ζ in [0, 1]; 0 starts CG from zero.
        checkpoint_ratio: γ > 1 of the kept iterates (Martens: 1.3), or None to keep only
            the last iterate (one CG run without restarts, no CG-iterate backtracking).
        line_search: ``"backtracking"`` (default) or None.
        adapt_damping: Adapt λ by ρ (Levenberg-Marquardt style); False keeps λ fixed.
        min_damping: Lower bound of λ.
        num_samples: MC targets per sample for ``"mc_fisher"``.
        generator: Seeds the MC targets (``"mc_fisher"``).
        compile: ``False`` (default), ``True`` or a dict of ``torch.compile`` options,
            passed to the curvature operator (see ``docs/compile.md``; not for
            ``"mc_fisher"``). The optimizer then keeps one operator across steps (it reads
            the parameters, updated in place, and the current batch), so its products are
            compiled once per batch shape, not once per step; it is rebuilt when the
            trainable parameters or the curvature kind change. Pays when a run takes many
            CG iterations in all (compiling costs seconds to a minute).

    After each step, the state of the first parameter (:meth:`global_state`) holds
    ``step``, ``damping`` (λ for the next step), ``loss``, ``rho``, ``cg_iters``,
    ``cg_iterate`` (the iteration of the chosen iterate) and ``step_size`` (t); each
    parameter's state holds ``direction`` (its part of the last CG iterate, for the warm
    start).

    Raises:
        TypeError: If ``compile`` is not a bool or a dict, or ``adapt_damping`` not a bool.
        ValueError: For an invalid option, options that differ between groups,
            ``num_samples`` other than 1 without ``curvature="mc_fisher"`` (nothing else
            draws samples), or ``compile`` with ``curvature="mc_fisher"``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> X = torch.randn(128, 2)
        >>> y = torch.sin(3 * X[:, :1]) * X[:, 1:]
        >>> opt = HessianFree(model.parameters(), model=model, loss_fn=torch.nn.MSELoss())
        >>> losses = [float(opt.step((X, y))) for _ in range(20)]
        >>> losses[-1] < 0.1 * losses[0]
        True

    References:
        Martens (2010), Deep learning via Hessian-free optimization. Martens & Sutskever
        (2012), Training deep and recurrent networks with Hessian-free optimization.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_fn: Any,
        damping: float = 1.0,
        curvature: str = "ggn",
        cg_maxiter: int = 50,
        cg_tol: float = 1e-4,
        warm_start: float = 0.95,
        checkpoint_ratio: float = 1.3,
        line_search: str | None = "backtracking",
        adapt_damping: bool = True,
        min_damping: float = 1e-8,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        compile: bool | dict = False,
    ):
        compile_options(compile)  # TypeError for anything but a bool or a dict
        if compile is not False and curvature == "mc_fisher":
            raise ValueError("compile: not supported for curvature='mc_fisher' (its MC targets do not trace)")
        self.compile = compile
        self._kept: tuple[tuple, LinearOperator, list] | None = None  # (key, operator, [current batch])
        defaults = dict(
            damping=damping,
            curvature=curvature,
            cg_maxiter=cg_maxiter,
            cg_tol=cg_tol,
            warm_start=warm_start,
            checkpoint_ratio=checkpoint_ratio,
            line_search=line_search,
            adapt_damping=adapt_damping,
            min_damping=min_damping,
            num_samples=num_samples,
        )
        _check(defaults)
        super().__init__(params, defaults, model=model, loss_fn=loss_fn, generator=generator)
        self._options()

    def _options(self) -> dict[str, Any]:
        return shared_options(self.param_groups, (*_RULES, "checkpoint_ratio"), "HessianFree", _check)

    @torch.no_grad()
    def step(self, batch: tuple[Any, Tensor]) -> Tensor:  # type: ignore[override]
        """One Hessian-free step on ``batch = (X, y)``; returns L(θ) before the step (0-d tensor).

        Raises:
            TypeError: If ``batch`` is a closure.
            ValueError: If ``batch`` is not an ``(X, y)`` pair, the loss is not a finite
                scalar, or an option is invalid.
        """
        options = self._options()
        glob = self.global_state()
        lam = float(glob.get("damping", options["damping"]))
        if self.compile is False:
            c = self.curvature(batch, options["curvature"], num_samples=options["num_samples"])
        else:
            c = self._kept_curvature(batch, options["curvature"])
        loss0, g = float(c.loss), c.gradient
        x0 = self._warm_start(c.params, options["warm_start"])
        checkpoints = _checkpoints(options["cg_maxiter"], options["checkpoint_ratio"])
        iterates = _cg_iterates(c.operator, -g, lam, x0, checkpoints, options["cg_tol"])
        # CG-iterate backtracking: the kept iterate with the lowest loss (ties: the later one)
        losses = [self.loss_at(batch, x) for _, x in iterates]
        best = min(range(len(iterates)), key=lambda i: (losses[i], -i))
        cg_iterate, d = iterates[best]
        loss_d = losses[best]
        # reduction ratio ρ against the undamped quadratic model q(d) = gᵀd + ½ dᵀCd
        slope = float(torch.dot(g, d))
        q = slope + 0.5 * float(torch.dot(d, c.operator @ d))
        rho = (loss_d - loss0) / q if q < 0 else -math.inf if loss_d > loss0 else math.nan
        if options["adapt_damping"]:
            if rho > 0.75:
                lam = max(lam * DAMPING_DECREASE, options["min_damping"])
            elif rho < 0.25 or not math.isfinite(loss_d) or (math.isnan(rho) and bool(g.any())):
                lam = max(lam * DAMPING_INCREASE, _positive_damping(c.operator, g, d))
        t = 1.0 if math.isfinite(loss_d) else 0.0
        if options["line_search"] == "backtracking":
            t = self._backtrack(batch, d, loss0, slope, loss_d)
        if t:
            self.add_to_params(d, alpha=t)
        for p, part in zip(c.params, c.split(iterates[-1][1])):
            self.state[p]["direction"] = part.clone()
        glob.update(
            step=glob.get("step", 0) + 1,
            damping=lam,
            loss=loss0,
            rho=rho,
            cg_iters=iterates[-1][0],
            cg_iterate=cg_iterate,
            step_size=t,
        )
        return c.loss

    def _kept_curvature(self, batch: Any, kind: str) -> Curvature:
        """The gradient, and the compiled operator of ``kind`` kept from earlier steps, on ``batch``.

        The operator is built on a one-item list of batches and on the parameters'
        detached views: each step puts its batch in the list, and in-place parameter
        updates show through the views, so the compiled graphs stay valid and are reused.
        """
        if kind == "mc_fisher":
            raise ValueError("compile: not supported for curvature='mc_fisher' (its MC targets do not trace)")
        check_batch(batch, type(self).__name__)
        loss, g = self.gradient(batch)
        params = self.trainable()
        key = (kind, tuple(id(p) for p in params), tuple(p.data_ptr() for p in params))
        if self._kept is None or self._kept[0] != key:
            data = [tuple(batch)]
            values = {self._names[id(p)]: p.detach() for p in params}
            op = _CONSTRUCTORS[kind](self.model_fn, self.loss, data, params=values, compile=self.compile)
            self._kept = (key, op, data)
        self._kept[2][0] = tuple(batch)
        return Curvature(self._kept[1], g, loss, params)

    def _warm_start(self, params: list[Tensor], decay: float) -> Tensor | None:
        """ζ d_prev, from each parameter's saved part (zeros where none is saved), or None."""
        if decay == 0 or not any("direction" in self.state[p] for p in params):
            return None
        parts = [self.state[p].get("direction", torch.zeros_like(p)) for p in params]
        return decay * ravel(parts)

    def _backtrack(self, batch: Any, d: Tensor, loss0: float, slope: float, loss_d: float) -> float:
        """Armijo backtracking along d: the first accepted t in 1, 0.8, …, or 0."""
        slope = min(slope, 0.0)
        t, loss_t = 1.0, loss_d  # L(θ + d) is known from the CG-iterate backtracking
        for _ in range(MAX_TRIALS):
            if loss_t <= loss0 + ARMIJO_C * t * slope:
                return t
            t *= BACKTRACK_FACTOR
            loss_t = self.loss_at(batch, t * d)
        return 0.0


_CONSTRUCTORS = {  # the operators that compile, by curvature kind (as CurvatureOptimizer.curvature)
    "ggn": ggn,
    "hessian": hessian,
    "exact_fisher": functools.partial(fisher, kind="exact"),
    "empirical_fisher": empirical_fisher,
}


def _check(group: dict[str, Any]) -> None:
    check_options(group, _RULES)
    check_samples_used(group["num_samples"], group["curvature"] == "mc_fisher", "curvature='mc_fisher'")
    if group["checkpoint_ratio"] is not None:
        check_number(group["checkpoint_ratio"], "checkpoint_ratio", low=1.0)


def _positive_damping(C: Any, g: Tensor, d: Tensor) -> float:
    """-2κ, κ = gᵀCg/‖g‖², when CG returned d = 0 at a nonzero g (else 0).

    The λ that makes the damped curvature along g, κ + λ = -κ, positive.
    """
    if bool(d.any()) or not bool(g.any()):
        return 0.0
    return -2 * float(torch.dot(g, C @ g)) / float(torch.dot(g, g))


def _checkpoints(maxiter: int, ratio: float | None) -> list[int]:
    """The iterations ⌈γʲ⌉ < ``maxiter`` (j = 0, 1, …) and ``maxiter``, increasing (None: ``maxiter``)."""
    if ratio is None:
        return [maxiter]
    points, j = set(), 0
    while (i := math.ceil(ratio**j - 1e-9)) < maxiter:
        points.add(max(i, 1))
        j += 1
    return sorted(points | {maxiter})


def _cg_iterates(
    C: LinearOperator,
    b: Tensor,
    damping: float,
    x0: Tensor | None,
    checkpoints: list[int],
    tol: float,
) -> list[tuple[int, Tensor]]:
    """One :func:`curvfx.cg` run on (C + λI) x = b from x0; its iterates ``(i, x_i)`` at the checkpoints.

    The iterates before the last are kept by ``cg``'s ``callback``; the list ends with the
    returned one, ``(num_iters, x)``.
    """
    wanted, saved = set(checkpoints[:-1]), []

    def keep(t: int, x: Tensor) -> None:
        if t in wanted:
            saved.append((t, x))

    x, info = cg(C, b, damping=damping, tol=tol, maxiter=checkpoints[-1], x0=x0, callback=keep)
    return [(t, xt) for t, xt in saved if t < info.num_iters] + [(info.num_iters, x)]
