"""Shared parts of the least-squares optimizers: linearize a residual closure, solve, step.

A least-squares optimizer minimizes f(θ) = r(θ)ᵀr(θ) for residuals r [m] returned by a
closure. Each step linearizes r at θ (residuals r and Jacobian J [m, P]), solves the
damped normal equations (JᵀJ + D) d = -Jᵀr for a diagonal damping D ⪰ 0, and moves the
parameters along d. Gauss-Newton fixes D and optionally backtracks along d;
Levenberg-Marquardt adapts D from trial steps. Both front ends use these parts:
:func:`linearize`, :func:`solve_normal_equations`, :func:`set_flat`,
:func:`sum_of_squares` and :func:`backtrack`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvfx._errors import describe
from curvfx._pytree import ravel, unravel
from curvfx.estimators.solve import cg
from curvfx.operators._base import FunctionOperator

__all__ = [
    "ARMIJO_C",
    "BACKTRACK_FACTOR",
    "MAX_TRIALS",
    "SOLVERS",
    "Linearization",
    "backtrack",
    "check_closure",
    "flat_params",
    "linearize",
    "residual_jacobian",
    "residuals_at",
    "set_flat",
    "solve_normal_equations",
    "sum_of_squares",
    "trainable",
]

Closure = Callable[..., Tensor]
SOLVERS = ("dense", "cg")
ARMIJO_C = 1e-4  # sufficient-decrease constant c of f(θ + t d) ≤ f(θ) + c t ∇fᵀd
BACKTRACK_FACTOR = 0.5  # t ← t / 2 after a rejected trial
MAX_TRIALS = 20  # step sizes 1, 1/2, ..., 2⁻¹⁹; no step if all fail


@dataclass(frozen=True)
class Linearization:
    """Residuals and their Jacobian at the current parameters (both detached).

    Attributes:
        residuals: r(θ) [m].
        jacobian: J = ∂r/∂θ [m, P], columns in the order of the flattened parameters.
    """

    residuals: Tensor
    jacobian: Tensor

    @property
    def loss(self) -> Tensor:
        """The sum of squares f = rᵀr, a 0-d tensor."""
        return torch.dot(self.residuals, self.residuals)

    def slope(self, d: Tensor) -> float:
        """Directional derivative ∇fᵀd = 2 rᵀ(J d) of f = rᵀr along d [P]."""
        return 2.0 * float(torch.dot(self.residuals, self.jacobian @ d))


def check_closure(closure: Closure | None) -> Closure:
    """``closure`` if it can be called as ``closure(False)``; a clear error otherwise.

    Raises:
        ValueError: If ``closure`` is None.
        TypeError: If it is not callable or takes no ``backward`` argument.
    """
    if closure is None:
        raise ValueError(
            "closure: least-squares optimizers need a closure returning the residual vector, "
            "e.g. def closure(backward=True): return model(X) - y; call opt.step(closure)"
        )
    if not callable(closure):
        raise TypeError(f"closure: expected a callable, got {type(closure).__name__}")
    try:
        inspect.signature(closure).bind(False)
    except TypeError as err:
        raise TypeError(
            "closure: must accept the argument `backward` (torchzero's protocol; it is always "
            "called with backward=False), e.g. def closure(backward=True): ..."
        ) from err
    except ValueError:  # no signature (builtins): let the call decide
        pass
    return closure


def linearize(closure: Closure, params: list[Tensor], *, batched: bool) -> Linearization:
    """Evaluate ``r = closure(False)`` under grad mode and its Jacobian J [m, P] w.r.t. ``params``.

    Raises:
        TypeError: If the closure does not return a tensor.
        ValueError: If r is not 1-D and non-empty, not finite, of another dtype/device
            than the parameters, or has no autograd graph to the parameters.
    """
    with torch.enable_grad():
        r = closure(False)
        _check_residuals(r, params[0])
        if not r.requires_grad:
            raise ValueError(
                "closure: the residuals do not depend on the optimized parameters (no autograd "
                "graph); does the closure run under torch.no_grad() or detach the parameters?"
            )
        J = residual_jacobian(r, params, batched=batched)
    return Linearization(r.detach(), J)


def residual_jacobian(r: Tensor, params: list[Tensor], *, batched: bool) -> Tensor:
    """J = ∂r/∂θ [m, P] by reverse mode: one backward pass per residual.

    ``batched=True`` runs the m backward passes as one vmapped pass
    (``is_grads_batched``; a loop with a warning if an operation has no batching rule),
    ``batched=False`` as a loop. Parameters ``r`` does not depend on get zero columns.
    """
    m = r.shape[0]
    if batched:
        eye = torch.eye(m, dtype=r.dtype, device=r.device)
        try:
            grads = torch.autograd.grad(
                r, params, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            return torch.cat([_rows(g, p, m) for g, p in zip(grads, params)], dim=1)
        except RuntimeError as err:
            warnings.warn(
                f"residual_jacobian: the backward pass could not be vmapped "
                f"({str(err).splitlines()[0][:200]}); using a loop over residuals",
                RuntimeWarning,
                stacklevel=3,
            )
    rows = []
    for i in range(m):
        grads = torch.autograd.grad(r[i], params, retain_graph=i < m - 1, allow_unused=True)  # ∇r_i
        rows.append(torch.cat([_rows(g, p, None) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def solve_normal_equations(
    J: Tensor,
    r: Tensor,
    damping: float | Tensor,
    *,
    solver: str = "dense",
    cg_tol: float = 1e-10,
    cg_maxiter: int | None = None,
) -> tuple[Tensor, int]:
    """The step d [P] solving (JᵀJ + D) d = -Jᵀr, D = diag(``damping``), and CG iterations.

    ``damping`` is a float λ ≥ 0 (D = λI) or a tensor [P] ≥ 0.

    * ``"dense"``: Cholesky of JᵀJ + D [P, P]; when m < P and D ≻ 0, of the m × m matrix
      J D⁻¹ Jᵀ + I instead, using (JᵀJ + D)⁻¹Jᵀ = D⁻¹Jᵀ(J D⁻¹ Jᵀ + I)⁻¹ (cost m²P + m³
      instead of mP² + P³, and better conditioned for tiny D). With D = 0 the
      minimum-norm solution -J⁺r (the limit D → 0⁺). A singular system falls back to the
      pseudo-inverse.
    * ``"cg"``: :func:`curvfx.cg` on v ↦ Jᵀ(J v) + D v, never forming JᵀJ (memory m·P for
      J), to relative residual ``cg_tol``, at most ``cg_maxiter`` iterations (10·P).

    Returns:
        ``(d, num_cg_iters)``; ``num_cg_iters`` is 0 for ``"dense"``.
    """
    P = J.shape[1]
    D = torch.as_tensor(damping, dtype=J.dtype, device=J.device).expand(P)
    g = J.T @ r  # Jᵀr
    if solver == "cg":

        def normal_matvec(v: Tensor) -> Tensor:  # (JᵀJ + D) v = Jᵀ(J v) + D v
            return J.T @ (J @ v) + D * v

        op = FunctionOperator(normal_matvec, P, dtype=J.dtype, device=J.device, symmetric=True)
        d, info = cg(op, -g, tol=cg_tol, maxiter=cg_maxiter)
        return d, info.num_iters
    if solver != "dense":
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    if not bool((D > 0).any()):
        return -(torch.linalg.pinv(J) @ r), 0  # minimum-norm -J⁺r
    if J.shape[0] < P and bool((D > 0).all()):
        JD = J / D  # J D⁻¹ [m, P]
        K = JD @ J.T + torch.eye(J.shape[0], dtype=J.dtype, device=J.device)  # J D⁻¹ Jᵀ + I
        return -(JD.T @ _spd_solve(K, r)), 0  # -D⁻¹Jᵀ(J D⁻¹ Jᵀ + I)⁻¹ r
    A = J.T @ J + torch.diag(D)  # JᵀJ + D
    return -_spd_solve(A, g), 0


def trainable(groups: list[dict]) -> list[Tensor]:
    """The parameters of ``groups`` with ``requires_grad``, in group order.

    Raises:
        ValueError: If there is none, or they differ in dtype or device.
    """
    params = [p for group in groups for p in group["params"] if p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires grad; nothing to optimize")
    first = params[0]
    for p in params[1:]:
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                f"params: all trainable parameters need one dtype and device, got {first.dtype} "
                f"on {first.device} and {p.dtype} on {p.device}"
            )
    return params


def set_flat(params: list[Tensor], x: Tensor) -> None:
    """Write the flat vector x [P] into ``params`` in place (no autograd history)."""
    with torch.no_grad():
        for p, value in zip(params, unravel(x, params)):
            p.copy_(value)


def flat_params(params: list[Tensor]) -> Tensor:
    """A detached copy of ``params`` as one vector [P]."""
    return ravel([p.detach() for p in params]).clone()


def residuals_at(closure: Closure, like: Tensor) -> Tensor:
    """The residuals r at the current parameters, without autograd (checked, possibly non-finite)."""
    with torch.no_grad():
        r = closure(False)
    _check_residuals(r, like, finite=False)
    return r


def sum_of_squares(closure: Closure, like: Tensor) -> float:
    """The sum of squares f = rᵀr at the current parameters, without autograd (``inf`` if non-finite)."""
    r = residuals_at(closure, like)
    f = float(torch.dot(r, r))
    return f if math.isfinite(f) else math.inf


def backtrack(
    closure: Closure, params: list[Tensor], x0: Tensor, d: Tensor, f0: float, slope: float
) -> tuple[float, float]:
    """Armijo backtracking: the first t in 1, 1/2, ..., 2⁻¹⁹ with f(x0 + t d) ≤ f0 + c·t·slope.

    ``slope`` is ∇fᵀd at x0 (clipped at 0, so a non-descent d must not increase f) and
    c = ``ARMIJO_C``. The parameters are left at x0 + t d; if no trial is accepted (or the
    closure raises) they are restored to x0 and t = 0.

    Returns:
        ``(t, f(x0 + t d))``.
    """
    slope = min(slope, 0.0)
    t = 1.0
    try:
        for _ in range(MAX_TRIALS):
            set_flat(params, x0 + t * d)
            f_t = sum_of_squares(closure, x0)
            if f_t <= f0 + ARMIJO_C * t * slope:
                return t, f_t
            t *= BACKTRACK_FACTOR
    except BaseException:
        set_flat(params, x0)
        raise
    set_flat(params, x0)
    return 0.0, f0


def _check_residuals(r, like: Tensor, *, finite: bool = True) -> None:
    if not isinstance(r, Tensor):
        raise TypeError(f"closure: must return the residual vector as a tensor, got {describe(r)}")
    if r.dim() != 1 or r.shape[0] == 0:
        hint = " (a scalar: return the residuals, not their sum of squares)" if r.dim() == 0 else ""
        raise ValueError(
            f"closure: must return a non-empty 1-D residual vector [m], got {describe(r)}{hint}; "
            "flatten residuals of another shape with .reshape(-1)"
        )
    if r.dtype != like.dtype or r.device != like.device:
        raise ValueError(
            f"closure: the residuals' dtype/device {r.dtype}/{r.device} do not match the "
            f"parameters' {like.dtype}/{like.device}"
        )
    if finite and not bool(r.detach().isfinite().all()):
        raise ValueError("closure: the residuals have non-finite entries (inf/nan)")


def _rows(g: Tensor | None, p: Tensor, m: int | None) -> Tensor:
    """A parameter's Jacobian block flattened to [m, p.numel()] ([p.numel()] if m is None)."""
    shape = (p.numel(),) if m is None else (m, p.numel())
    return torch.zeros(shape, dtype=p.dtype, device=p.device) if g is None else g.reshape(shape)


def _spd_solve(A: Tensor, b: Tensor) -> Tensor:
    """A⁻¹b for a symmetric positive (semi)definite A: Cholesky, pseudo-inverse if singular."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(1), L).squeeze(1)
    return torch.linalg.pinv(A, hermitian=True) @ b
