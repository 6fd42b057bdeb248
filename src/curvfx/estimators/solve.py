"""Linear solves (A + λI) x = b with a symmetric positive (semi)definite A: conjugate gradients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvfx._arguments import check_count, check_flag, check_number
from curvfx._errors import describe
from curvfx._pytree import unravel
from curvfx.estimators._checks import OperatorLike, check_product, flat_vector, square_operator
from curvfx.estimators._progress import progress_bar
from curvfx.operators._base import LinearOperator

__all__ = ["CGInfo", "cg"]

PyTree = Any


@dataclass(frozen=True)
class CGInfo:
    """How a :func:`cg` run ended.

    Attributes:
        converged: Whether ‖r‖ ≤ tol · ‖b‖ was reached (False also after negative curvature).
        num_iters: Iterations done, each one product with A (one more product computes
            the true residual of the returned x, and one each time CG restarts from it).
        residual_norm: ‖r‖ = ‖b - (A + λI) x‖ of the returned x, computed from x (not the
            recursively updated residual, which drifts from it in low precision).
    """

    converged: bool
    num_iters: int
    residual_norm: float


def cg(
    A: OperatorLike,
    b: Tensor | PyTree,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    maxiter: int | None = None,
    x0: Tensor | PyTree | None = None,
    preconditioner: Callable[[Tensor], Tensor] | Tensor | None = None,
    size: int | None = None,
    progress: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor | PyTree, CGInfo]:
    """Solve (A + λI) x = b by (preconditioned) conjugate gradients, λ = ``damping``.

    With B = A + λI, r_0 = b - B x_0, z_0 = M⁻¹ r_0, p_0 = z_0, each iteration does

        α = r_tᵀz_t / p_tᵀBp_t,  x_{t+1} = x_t + α p_t,  r_{t+1} = r_t - α B p_t,
        z_{t+1} = M⁻¹ r_{t+1},   p_{t+1} = z_{t+1} + (r_{t+1}ᵀz_{t+1} / r_tᵀz_t) p_t

    until ‖r‖ ≤ tol · ‖b‖ (converged) or ``maxiter`` iterations. CG needs B symmetric
    positive definite: if p_tᵀBp_t ≤ 0 (negative or zero curvature, e.g. an indefinite
    Hessian without enough damping) it stops there and returns the current x with
    ``converged=False``. Convergence is judged on the true residual ``b - B x``, computed
    when the recurrence stops; if the recursive residual drifted below the tolerance while
    the true one did not (rounding, e.g. in float32), CG restarts from x, as long as each
    run at least halves the true residual. Cost: one product with A per iteration, plus
    one for the true residual after each run (and one for x_0 ≠ 0).

    Differs from Hestenes & Stiefel (1952) in: the stop on non-positive curvature (as
    in Hessian-free optimization, Martens 2010) instead of producing a meaningless step.

    Args:
        A: A symmetric :class:`~curvfx.operators.LinearOperator`, a dense symmetric tensor
            [P, P], or a callable ``v [P] -> A v [P]`` together with ``size``.
        b: Right-hand side, flat [P] or a pytree shaped like ``A.in_like`` (the params).
        damping: λ ≥ 0, added to the diagonal.
        tol: Relative residual tolerance, ‖r‖ ≤ tol · ‖b‖.
        maxiter: Most iterations; default 10 · P.
        x0: Start vector in the form of ``b``; zeros by default.
        preconditioner: M⁻¹ ≈ B⁻¹, symmetric positive definite: a callable ``r [P] ->
            M⁻¹ r [P]`` or a positive tensor d [P], the diagonal of M (applied as r / d;
            e.g. ``diagonal(A) + damping`` for the Jacobi preconditioner).
        size: P, required when ``A`` is a callable.
        progress: Show a tqdm bar over the iterations (needs ``tqdm``).
        callback: Called as ``callback(t, x_t)`` after iteration t (1, 2, …) with the flat
            iterate x_t [P] (a new tensor each time; keep it to follow the iterates).

    Returns:
        ``(x, info)``: x in the form of ``b`` (flat [P] or a pytree), and a
        :class:`CGInfo`.

    Raises:
        ValueError: For a non-symmetric, empty or non-floating A, a ``damping`` that is
            not a finite float ≥ 0 or a ``tol`` that is not a finite float > 0 (bools
            and strings included), a bad ``maxiter``, a ``b``, ``x0`` or preconditioner
            (diagonal or returned value) of the wrong shape, dtype or device, a
            non-positive diagonal preconditioner, products with A of another shape or
            dtype than their input, or non-finite values in b, the products with A or the
            preconditioned residual.
        TypeError: If ``b`` is a pytree but A has no ``in_like``, ``callback`` or
            ``preconditioner`` is of none of the accepted forms, or ``progress`` is not
            a bool.

    Example:
        >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, info = cg(M, b, tol=1e-12)
        >>> bool(torch.allclose(M @ x, b)), info.converged, info.num_iters
        (True, True, 2)

    References:
        Hestenes, Stiefel (1952), Methods of conjugate gradients for solving linear
        systems. Martens (2010), Deep learning via Hessian-free optimization.
    """
    check_flag(progress, "progress")
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback: expected a callable callback(t, x_t) or None, got {type(callback).__name__}"
        )
    op = square_operator(A, size, "cg", symmetric=True)
    P = op.shape[0]
    b_flat, was_tree = flat_vector(op, b, "b")
    damping = check_number(damping, "damping", strict=False)
    tol = check_number(tol, "tol")
    maxiter = check_count(10 * P if maxiter is None else maxiter, "maxiter", 0)
    apply_inverse = _preconditioner(preconditioner, op)
    if not bool(b_flat.isfinite().all()):
        raise ValueError("b: has non-finite entries (inf/nan)")

    def B(v: Tensor) -> Tensor:  # (A + λI) v
        out = check_product(op._matvec(v), v, "cg", "A v")
        return out + damping * v if damping else out

    with torch.no_grad():
        x, num_iters, converged, r_norm = _iterate(
            B, b_flat, x0, op, tol, maxiter, apply_inverse, progress, callback
        )
    info = CGInfo(converged=converged, num_iters=num_iters, residual_norm=r_norm)
    return (unravel(x, op.in_like) if was_tree else x), info


def _iterate(B, b, x0, op, tol, maxiter, apply_inverse, progress, callback):
    """The CG recurrence; returns (x, iterations, converged, ‖r‖ of the returned x).

    The recursively updated residual drifts from ``b - B x`` in rounding (in float32 it can
    claim ‖r‖ ≤ tol·‖b‖ while the true residual is 10× larger), so convergence is decided on
    the true residual, computed (one product) when the recurrence stops. If that one is
    still too large, CG restarts from x with it, as long as the previous run at least
    halved the true residual (beyond that, rounding bounds what more iterations can reach).
    """
    x = None if x0 is None else flat_vector(op, x0, "x0")[0].clone()
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0:  # B x = 0: x = 0 (B ≻ 0 on the iterates' space), whatever x0
        return torch.zeros_like(b), 0, True, 0.0
    threshold = tol * b_norm
    x, r = (torch.zeros_like(b), b.clone()) if x is None else (x, b - B(x))
    t, start_norm = 0, float(torch.linalg.vector_norm(r))  # r is the true residual here
    with progress_bar(progress, maxiter, "cg") as bar:
        while True:
            t_start = t
            x, t, curved, r_norm = _run(B, x, r, t, threshold, maxiter, apply_inverse, bar, b_norm, callback)
            if t > t_start:  # the recursive residual: recompute the true one
                r = b - B(x)
                r_norm = float(torch.linalg.vector_norm(r))
            converged = r_norm <= threshold and curved
            if converged or not curved or t >= maxiter or t == t_start or r_norm > 0.5 * start_norm:
                return x, t, converged, r_norm
            start_norm = r_norm


def _run(B, x, r, t, threshold, maxiter, apply_inverse, bar, b_norm, callback):
    """CG from x with residual r until the recursive ‖r‖ ≤ threshold, t = maxiter, or pᵀBp ≤ 0.

    Returns (x, t, whether the curvature stayed positive, recursive ‖r‖).
    """
    z = apply_inverse(r)
    p, rz = z.clone(), torch.dot(r, z)
    r_norm = float(torch.linalg.vector_norm(r))
    while r_norm > threshold and t < maxiter:
        Bp = B(p)
        curvature = torch.dot(p, Bp)  # p_tᵀ B p_t
        if not curvature > 0:
            return x, t, False, r_norm
        alpha = rz / curvature
        x, r = x + alpha * p, r - alpha * Bp
        z = apply_inverse(r)
        rz, rz_old = torch.dot(r, z), rz
        p = z + (rz / rz_old) * p
        r_norm = float(torch.linalg.vector_norm(r))
        t += 1
        bar.update(1)
        bar.set_postfix_str(f"|r|/|b| = {r_norm / b_norm:.1e}")
        if callback is not None:
            callback(t, x)
    return x, t, True, r_norm


def _preconditioner(preconditioner, op: LinearOperator) -> Callable[[Tensor], Tensor]:
    """The map r -> M⁻¹ r from a callable, a positive diagonal d [P] (r / d), or None (identity)."""
    P = op.shape[0]
    if preconditioner is None:
        return lambda r: r
    if isinstance(preconditioner, Tensor):
        d = preconditioner
        if d.shape != (P,) or d.dtype != op.dtype or d.device != op.device:
            raise ValueError(
                f"preconditioner: a diagonal must be [P] = [{P}] in {op.dtype} on {op.device}, "
                f"got {describe(d)} in {d.dtype} on {d.device}"
            )
        if not bool((d > 0).all()) or not bool(d.isfinite().all()):
            raise ValueError("preconditioner: the diagonal must be finite and positive")
        return lambda r: r / d
    if not callable(preconditioner):
        raise TypeError(
            "preconditioner: expected a callable r -> M⁻¹ r, a diagonal tensor [P] or None, "
            f"got {type(preconditioner).__name__}"
        )

    def apply_inverse(r: Tensor) -> Tensor:
        z = preconditioner(r)
        if not isinstance(z, Tensor) or z.shape != r.shape or not bool(z.isfinite().all()):
            raise ValueError(f"preconditioner: must return a finite tensor [P] = [{P}], got {describe(z)}")
        if z.dtype != r.dtype or z.device != r.device:
            raise ValueError(
                f"preconditioner: must return the dtype/device of b, {r.dtype}/{r.device}, "
                f"got {z.dtype}/{z.device}"
            )
        return z

    return apply_inverse
