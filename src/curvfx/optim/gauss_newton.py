"""Gauss-Newton for residual closures: torchzero's ``GaussNewton`` as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from curvfx._arguments import check_count, check_flag, check_number
from curvfx.optim._least_squares import (
    SOLVERS,
    Closure,
    backtrack,
    check_closure,
    flat_params,
    linearize,
    set_flat,
    solve_normal_equations,
    trainable,
)

__all__ = ["LINE_SEARCHES", "GaussNewton"]

LINE_SEARCHES = (None, "backtracking")
_SHARED = ("batched", "line_search", "solver", "cg_tol", "cg_maxiter")  # one solve per step


class GaussNewton(torch.optim.Optimizer):
    """Gauss-Newton method for nonlinear least squares, f(θ) = r(θ)ᵀr(θ).

    Each :meth:`step` evaluates the residuals r [m] returned by the closure, their
    Jacobian J = ∂r/∂θ [m, P] by reverse-mode autograd, and solves the regularized
    normal equations

        (JᵀJ + D) d = -Jᵀr,   D = diag(reg of each parameter's group)

    (D = reg·I with one group), then sets θ ← θ + t·d with t = 1, or with
    ``line_search="backtracking"`` the first t in 1, 1/2, ..., 2⁻¹⁹ meeting Armijo's
    condition f(θ + t d) ≤ f(θ) + 10⁻⁴·t·∇fᵀd, where ∇f = 2Jᵀr; if none does, the
    parameters stay put (t = 0). The step minimizes the linearized model ‖r + J d‖² +
    dᵀDd, so a residual vector that is linear in θ is solved in one step (up to reg).

    Closure protocol (torchzero's): ``closure(backward=True)`` returns the residual vector
    r [m] as a 1-D tensor. The optimizer always calls ``closure(False)``; the closure need
    not call ``backward`` or zero gradients, and the optimizer never reads or writes
    ``.grad``. The closure is called once per step, plus once per line-search trial
    (under ``torch.no_grad``).

    Cost per step: m backward passes for J (one vmapped pass with ``batched=True``, a loop
    with ``batched=False``) and m·P memory for J. ``solver="dense"`` factors JᵀJ + D
    [P, P] (P² memory, mP² + P³/3 flops), or J D⁻¹ Jᵀ + I [m, m] when m < P and D ≻ 0;
    ``solver="cg"`` runs :func:`curvfx.cg` with products Jᵀ(J v) + D v (2mP flops each)
    and never forms JᵀJ.

    Differs from torchzero 0.4.4's ``tz.m.GaussNewton`` (used as
    ``tz.Optimizer(params, tz.m.GaussNewton(...))``) in: 1. it is a standalone
    ``torch.optim.Optimizer`` with the step applied (lr 1); torchzero's composition with
    ``tz.m.Backtracking`` and ``tz.m.TrustCG`` becomes the options ``line_search`` and
    ``solver="cg"`` (a line search on the CG step, not a trust region); torchzero's
    ``update_freq`` and ``inner`` have no counterpart, and its positional order
    ``(reg, update_freq, batched, inner)`` differs, so pass options by keyword. 2. The
    linear system is the same (torchzero solves (JJᵀ + reg·I) z = r, d = -Jᵀz when
    m < P, and (JᵀJ + reg·I) d = -Jᵀr otherwise, with ``solve_ex``), and so is the step
    up to rounding; curvfx factors it by Cholesky (for m < P in the rescaled form
    J D⁻¹ Jᵀ + I), falls back to the pseudo-inverse when it is singular, and gives the
    minimum-norm step -J⁺r for reg = 0. 3. ``reg`` may differ between param groups (a
    diagonal D). 4. :meth:`step` returns the 0-d rᵀr; torchzero's returns the closure's
    residual vector r. Both need 1-D residuals (torchzero's step fails with a shape
    error for most other shapes, curvfx raises ``ValueError``). Parameters with
    ``requires_grad=False`` are not updated.

    Args:
        params: Parameters or param groups, as for any ``torch.optim.Optimizer``; all
            trainable ones share one dtype and device.
        reg: Regularization λ ≥ 0 added to the diagonal of JᵀJ (per param group).
        batched: Compute J by one vmapped backward pass (``is_grads_batched``) rather
            than a loop over the m residuals. Same numbers either way.
        line_search: None (full step) or ``"backtracking"`` (Armijo, as above).
        solver: ``"dense"`` or ``"cg"`` (matrix-free conjugate gradients).
        cg_tol: CG's relative residual tolerance; default max(10⁻¹⁰, 100·eps of the dtype).
        cg_maxiter: Most CG iterations per step; default 10·P.

    After each step ``optimizer.state[first parameter]`` holds ``step`` (count),
    ``loss`` (rᵀr before the step), ``step_size`` (t) and ``cg_iters`` (as torch's LBFGS
    keeps its state); it contains only Python numbers, so ``state_dict`` pickles.

    Raises:
        ValueError: For reg < 0 or non-finite, a ``cg_tol`` that is not a finite float > 0
            or None, an unknown ``solver`` or ``line_search``, options other than ``reg``
            that differ between param groups, or no trainable parameters; in :meth:`step`
            as described there.

    Example:
        >>> A = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
        >>> w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> opt = GaussNewton([w])
        >>> def closure(backward=True):
        ...     return A @ w - b  # residuals r(w) [3]
        >>> float(opt.step(closure))  # rᵀr at w = 0
        9.0
        >>> torch.allclose(w, torch.linalg.lstsq(A, b).solution)  # linear: one step
        True

    References:
        Nocedal, Wright (2006), Numerical Optimization, §10.3 (Gauss-Newton) and §3.1
        (backtracking, Armijo condition).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        reg: float = 1e-8,
        batched: bool = True,
        *,
        line_search: str | None = None,
        solver: str = "dense",
        cg_tol: float | None = None,
        cg_maxiter: int | None = None,
    ):
        defaults = dict(
            reg=reg,
            batched=batched,
            line_search=line_search,
            solver=solver,
            cg_tol=cg_tol,
            cg_maxiter=cg_maxiter,
        )
        _check_options(defaults)
        super().__init__(params, defaults)
        _shared_options(self.param_groups)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:
        """One Gauss-Newton step; returns f = rᵀr at the parameters before the step (0-d tensor).

        Args:
            closure: ``closure(backward=True)`` returning the residual vector r [m]; called
                as ``closure(False)`` under grad mode.

        Raises:
            ValueError: If ``closure`` is None, returns something other than a non-empty
                1-D tensor with the parameters' dtype and device, has non-finite entries
                or no autograd graph to the parameters.
            TypeError: If ``closure`` returns a non-tensor or takes no ``backward``
                argument.
        """
        closure = check_closure(closure)
        options = _shared_options(self.param_groups)
        params, damping = _trainable(self.param_groups)
        lin = linearize(closure, params, batched=options["batched"])
        cg_tol = options["cg_tol"]
        if cg_tol is None:
            cg_tol = max(1e-10, 100 * torch.finfo(params[0].dtype).eps)
        d, cg_iters = solve_normal_equations(
            lin.jacobian,
            lin.residuals,
            damping,
            solver=options["solver"],
            cg_tol=cg_tol,
            cg_maxiter=options["cg_maxiter"],
        )
        x0, loss = flat_params(params), lin.loss
        if options["line_search"] is None:
            set_flat(params, x0 + d)
            t = 1.0
        else:
            t, _ = backtrack(closure, params, x0, d, float(loss), lin.slope(d))
        state = self.state[self.param_groups[0]["params"][0]]
        state.update(step=state.get("step", 0) + 1, loss=float(loss), step_size=t, cg_iters=cg_iters)
        return loss


def _check_options(group: dict[str, Any]) -> None:
    check_number(group["reg"], "reg", strict=False)
    check_flag(group["batched"], "batched")
    if group["line_search"] not in LINE_SEARCHES:
        raise ValueError(f"line_search: expected one of {LINE_SEARCHES}, got {group['line_search']!r}")
    if group["solver"] not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {group['solver']!r}")
    if group["cg_tol"] is not None:
        check_number(group["cg_tol"], "cg_tol")
    if group["cg_maxiter"] is not None:
        check_count(group["cg_maxiter"], "cg_maxiter")


def _shared_options(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The step-wide options, checked; every group must agree on them (only reg may differ)."""
    for group in groups:
        _check_options(group)
    first = groups[0]
    for group in groups[1:]:
        for key in _SHARED:
            if group[key] != first[key]:
                raise ValueError(
                    f"{key}: every param group must use the same value (one solve per step), "
                    f"got {first[key]!r} and {group[key]!r}; only reg may differ between groups"
                )
    return {key: first[key] for key in _SHARED}


def _trainable(groups: list[dict[str, Any]]) -> tuple[list[Tensor], float | Tensor]:
    """The parameters with ``requires_grad`` and the damping: a float, or [P] if groups differ."""
    params = trainable(groups)
    regs = [float(group["reg"]) for group in groups for p in group["params"] if p.requires_grad]
    if len(set(regs)) == 1:
        return params, regs[0]
    return params, torch.cat(
        [torch.full((p.numel(),), reg, dtype=p.dtype, device=p.device) for p, reg in zip(params, regs)]
    )
