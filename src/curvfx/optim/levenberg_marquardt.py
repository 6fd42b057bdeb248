"""Levenberg-Marquardt for residual closures: Gauss-Newton's solve with damping adapted by the gain ratio."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from curvfx._arguments import check_count, check_number
from curvfx.optim._least_squares import (
    SOLVERS,
    Closure,
    check_closure,
    flat_params,
    linearize,
    residuals_at,
    set_flat,
    solve_normal_equations,
    trainable,
)
from curvfx.optim.curvature_optimizer import check_options, shared_options

__all__ = ["LevenbergMarquardt"]

_RULES = {
    "damping": ("float>", 0.0, None),
    "marquardt_scaling": ("bool",),
    "batched": ("bool",),
    "solver": ("choice", SOLVERS),
    "max_trials": ("int", 1),
}


class LevenbergMarquardt(torch.optim.Optimizer):
    """Levenberg-Marquardt for nonlinear least squares, f(θ) = r(θ)ᵀr(θ), with adaptive damping.

    Each :meth:`step` evaluates the residuals r [m] returned by the closure and their
    Jacobian J = ∂r/∂θ [m, P] once, then tries steps d solving the damped normal equations

        (JᵀJ + λ S) d = -Jᵀr,   S = I, or S = diag(s) with ``marquardt_scaling``

    (the solve of :class:`GaussNewton`, shared with it), with s_j the running maximum over
    steps of (JᵀJ)_jj (MINPACK's scaling; it makes the method invariant to rescaling
    parameters). A trial is judged by the gain ratio of actual to predicted decrease

        ρ = (f(θ) - f(θ + d)) / (‖r‖² - ‖r + J d‖²)

    and accepted if ρ > 0: θ ← θ + d, λ ← λ · max(1/3, 1 - (2ρ - 1)³), ν ← 2. A rejected
    trial sets λ ← ν λ, ν ← 2ν and solves again with the same J (Nielsen 1999), up to
    ``max_trials`` trials; if none is accepted the parameters stay put. λ carries over to
    the next step. Small λ gives Gauss-Newton steps, large λ short gradient steps. The
    actual decrease is computed as (r - r₁)ᵀ(r + r₁) with r₁ = r(θ + d), without the
    cancellation of f(θ) - f(θ + d) (an irreducible part of f would hide small decreases).
    The predicted decrease is dᵀJᵀJd + 2λ dᵀSd > 0 for d ≠ 0; where it is not positive, or
    where the step changes no residual at all (a stationary point, to rounding: every trial
    would be rejected while λ grows without bound), the step ends without a counted trial
    and λ is kept.

    Closure protocol (torchzero's, as :class:`GaussNewton`): ``closure(backward=True)``
    returns the residual vector r [m] as a 1-D tensor; the optimizer calls
    ``closure(False)`` once with grad mode for J, and once per trial under ``torch.no_grad``.
    It never reads or writes ``.grad``.

    Cost per step: J (m backward passes, one vmapped pass with ``batched=True``) and per
    trial one solve (``"dense"``: a Cholesky factorization of a P × P, or m × m when m < P,
    matrix; ``"cg"``: matrix-free CG with products Jᵀ(J v)) and one closure evaluation.

    Differs from Nielsen (1999) / Madsen, Nielsen & Tingleff (2004, Alg. 3.16) in: 1. λ is
    set directly (``damping``), not as τ·max (JᵀJ)_jj. 2. One :meth:`step` is one
    accepted (or ``max_trials`` rejected) trial; stopping tests are the caller's.
    3. The scaling S is optional (Marquardt 1963).

    Args:
        params: Parameters or param groups; every group must use the same options.
        damping: Initial λ > 0.
        marquardt_scaling: Damp with S = diag(s) (above) instead of I.
        batched: Compute J by one vmapped backward pass (as :class:`GaussNewton`).
        solver: ``"dense"`` or ``"cg"`` (as :class:`GaussNewton`).
        max_trials: Most trials (solves) per step.
        cg_tol: CG's relative residual tolerance; default max(10⁻¹⁰, 100·eps of the dtype).
        cg_maxiter: Most CG iterations per solve; default 10·P.

    After each step the state of the first parameter holds ``step``, ``loss`` (f before
    the step), ``damping`` (λ for the next step), ``nu`` (ν), ``trials``, ``accepted``
    and ``rho`` (of the last trial); with ``marquardt_scaling`` each parameter's state holds
    its part of s as ``scale``. ``state_dict`` round-trips all of it.

    Raises:
        ValueError: For invalid options (``cg_tol`` must be a finite float > 0 or None),
            options that differ between groups, or no trainable parameters; in
            :meth:`step` as :class:`GaussNewton` does.
        TypeError: For a flag (``marquardt_scaling``, ``batched``) that is not a bool.

    Example:
        >>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        >>> opt = LevenbergMarquardt([x])
        >>> def closure(backward=True):  # Rosenbrock: f = (1 - x₀)² + 100 (x₁ - x₀²)²
        ...     return torch.stack([1 - x[0], 10 * (x[1] - x[0] ** 2)])
        >>> for _ in range(30):
        ...     _ = opt.step(closure)
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64))
        True

    References:
        Levenberg (1944); Marquardt (1963), An algorithm for least-squares estimation of
        nonlinear parameters. Nielsen (1999), Damping parameter in Marquardt's method.
        Madsen, Nielsen & Tingleff (2004), Methods for non-linear least squares problems.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        damping: float = 1e-3,
        *,
        marquardt_scaling: bool = False,
        batched: bool = True,
        solver: str = "dense",
        max_trials: int = 10,
        cg_tol: float | None = None,
        cg_maxiter: int | None = None,
    ):
        defaults = dict(
            damping=damping,
            marquardt_scaling=marquardt_scaling,
            batched=batched,
            solver=solver,
            max_trials=max_trials,
            cg_tol=cg_tol,
            cg_maxiter=cg_maxiter,
        )
        _check(defaults)
        super().__init__(params, defaults)
        self._options()

    def _options(self) -> dict[str, Any]:
        return shared_options(
            self.param_groups, (*_RULES, "cg_tol", "cg_maxiter"), "LevenbergMarquardt", _check
        )

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:
        """One Levenberg-Marquardt step; returns f = rᵀr at the parameters before the step (0-d tensor).

        Args:
            closure: ``closure(backward=True)`` returning the residual vector r [m].

        Raises:
            ValueError: If ``closure`` is None, returns something other than a non-empty
                finite 1-D tensor with the parameters' dtype and device, or has no
                autograd graph to the parameters.
            TypeError: If ``closure`` returns a non-tensor or takes no ``backward``
                argument.
        """
        closure = check_closure(closure)
        options = self._options()
        params = trainable(self.param_groups)
        state = self.state[self.param_groups[0]["params"][0]]
        lam, nu = float(state.get("damping", options["damping"])), float(state.get("nu", 2.0))
        lin = linearize(closure, params, batched=options["batched"])
        J, r = lin.jacobian, lin.residuals
        f0 = float(lin.loss)
        scale = self._scale(params, J) if options["marquardt_scaling"] else None
        cg_tol = options["cg_tol"] or max(1e-10, 100 * torch.finfo(J.dtype).eps)
        x0 = flat_params(params)
        accepted, rho, trials = False, math.nan, 0
        try:
            while trials < options["max_trials"]:
                damping = lam if scale is None else lam * scale  # λ S
                d, _ = solve_normal_equations(
                    J, r, damping, solver=options["solver"], cg_tol=cg_tol, cg_maxiter=options["cg_maxiter"]
                )
                Jd = J @ d
                predicted = -float(2 * torch.dot(r, Jd) + torch.dot(Jd, Jd))  # ‖r‖² - ‖r + J d‖²
                if not predicted > 0:  # = dᵀJᵀJd + 2λ dᵀSd > 0 unless d = 0: stationary
                    break
                set_flat(params, x0 + d)
                r1 = residuals_at(closure, x0)
                actual = float(torch.dot(r - r1, r + r1))  # f(θ) - f(θ + d), without cancellation
                if actual == 0:  # the step changes no residual: stationary (to rounding)
                    break
                trials += 1
                rho = actual / predicted if math.isfinite(actual) else -math.inf
                if rho > 0:
                    accepted = True
                    lam, nu = lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
                    break
                lam, nu = lam * nu, 2 * nu
        finally:
            if not accepted:
                set_flat(params, x0)
        state.update(
            step=state.get("step", 0) + 1,
            loss=f0,
            damping=lam,
            nu=nu,
            trials=trials,
            accepted=accepted,
            rho=rho,
        )
        return lin.loss

    def _scale(self, params: list[Tensor], J: Tensor) -> Tensor:
        """The scaling s = max(s_prev, diag(JᵀJ)) [P], stored per parameter (MINPACK's running maximum)."""
        column_sq = (J * J).sum(0)  # diag(JᵀJ)
        parts, start = [], 0
        for p in params:
            new = column_sq[start : start + p.numel()]
            start += p.numel()
            old = self.state[p].get("scale")
            s = new if old is None else torch.maximum(old.reshape(-1), new)
            self.state[p]["scale"] = s.reshape(p.shape).clone()
            parts.append(s)
        s = torch.cat(parts)
        # a column that was always zero gets s = 1, so that λ S stays positive definite
        return torch.where(s > 0, s, torch.ones_like(s))


def _check(group: dict[str, Any]) -> None:
    check_options(group, _RULES)
    if group["cg_tol"] is not None:
        check_number(group["cg_tol"], "cg_tol")
    if group["cg_maxiter"] is not None:
        check_count(group["cg_maxiter"], "cg_maxiter")
