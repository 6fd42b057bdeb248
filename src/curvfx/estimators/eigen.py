"""Extreme eigenvalues and eigenvectors of a symmetric operator by Lanczos (``eigsh``)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from curvfx._arguments import check_count, check_flag, check_number
from curvfx.estimators._checks import OperatorLike, products, square_operator, working_precision
from curvfx.estimators._lanczos import lanczos, tridiagonal
from curvfx.estimators._probes import make_generator, probes
from curvfx.estimators._progress import progress_bar
from curvfx.operators._base import LinearOperator
from curvfx.operators._distributed import process_group_of

__all__ = ["WHICH", "eigsh"]

WHICH = ("largest", "smallest")


def eigsh(
    A: OperatorLike,
    k: int = 1,
    which: str = "largest",
    *,
    num_iters: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    size: int | None = None,
    return_eigenvectors: bool = True,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The k largest or smallest eigenpairs (λ_i, u_i) of a symmetric operator A [P, P].

    Lanczos with full reorthogonalization, without restarts: from a random unit start
    vector q_1, t ≤ ``num_iters`` steps build an orthonormal Krylov basis Q_t [P, t] and
    the tridiagonal T_t = Q_tᵀ A Q_t; the Ritz pairs (θ_i, Q_t y_i), T_t y_i = θ_i y_i
    (``torch.linalg.eigh``), approximate the extreme eigenpairs. A Ritz pair has residual

        ‖A Q_t y_i - θ_i Q_t y_i‖ = β_t |e_tᵀ y_i|,

    and the run stops once the k wanted pairs have residual ≤ tol · max_j |θ_j|
    (checked at steps t ≥ k, every ⌈t/10⌉ steps). If they have not after ``num_iters``
    steps, a ``RuntimeWarning`` says so and the current Ritz pairs are returned.
    Eigenvalues are accurate to about tol · ‖A‖ (absolute): for ``"smallest"``, those
    below that scale (a curvature matrix's near-null directions) are not resolved unless
    ``tol`` is lowered.

    Repeated eigenvalues: the Krylov space of one start vector holds one direction of each
    eigenspace, so for k ≥ 2 a further run on the complement of the k pairs found,
    ``(I - U Uᵀ) A (I - U Uᵀ)`` from a start vector orthogonal to U, looks for a wanted
    eigenvalue they missed (another copy of a repeated one); each one it finds replaces
    the last pair, and the search repeats. Cost, in products with A (one column each):
    t ≤ ``num_iters`` for the main run, which is all for k = 1. For k ≥ 2 the searches
    follow: at least one (none if k = P), at most k (one more after each missed
    eigenvalue found), each a Lanczos run of up to ``num_iters`` steps that stops once its
    single Ritz pair converges. So at most (k + 1)·``num_iters`` products in all. Memory
    P·t per run, plus O(t³) per convergence check.

    Differs from Lanczos (1950) / ARPACK in: no implicit restarts (the basis grows to
    ``num_iters``); two passes of classical Gram-Schmidt against the whole basis at every
    step; a Krylov space exhausted to the tolerance (β_t ≤ tol · max(|α|, β)) is continued
    from a fresh random vector orthogonal to it instead of being declared converged; the
    deflated runs above.

    Args:
        A: A symmetric :class:`~curvfx.operators.LinearOperator`, a dense symmetric tensor
            [P, P], or a callable ``v [P] -> A v [P]`` together with ``size``.
        k: Number of eigenpairs, 1 ≤ k ≤ P.
        which: ``"largest"`` or ``"smallest"`` (algebraic, not magnitude).
        num_iters: Most Lanczos steps, k ≤ num_iters ≤ P; default
            min(P, 4 · max(2k + 1, 20)).
        tol: Relative residual tolerance; default √ε of A's dtype (1.5e-8 for float64).
        generator: Source of the start vector (and of restarts). ``None``: a fresh
            generator seeded by one draw of torch's global RNG.
        size: P, required when ``A`` is a callable.
        return_eigenvectors: Also return the eigenvectors.
        progress: Show a tqdm bar over the products (needs ``tqdm``).

    Returns:
        ``(eigenvalues [k], eigenvectors [P, k])`` — eigenvalues in descending order for
        ``"largest"``, ascending for ``"smallest"``; orthonormal flat eigenvectors (get
        pytrees with ``curvfx.unravel(u, params)``) — or the eigenvalues alone if
        ``return_eigenvectors`` is False.

    Raises:
        ValueError: For an unknown ``which``, k or ``num_iters`` out of range, a ``tol``
            that is not a finite float > 0 (or None), a non-square, non-symmetric, empty or
            non-floating A, or products with another shape or dtype than their input or
            with non-finite entries.
        TypeError: If ``return_eigenvectors`` or ``progress`` is not a bool, or
            ``generator`` is not a ``torch.Generator`` (or None).

    Example:
        >>> M = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> values, vectors = eigsh(M, k=2, generator=g)
        >>> values.round(decimals=8), vectors.shape
        (tensor([6., 5.], dtype=torch.float64), torch.Size([6, 2]))

    References:
        Lanczos (1950), An iteration method for the solution of the eigenvalue problem of
        linear differential and integral operators. Parlett (1998), The Symmetric
        Eigenvalue Problem, ch. 13.
    """
    if which not in WHICH:
        raise ValueError(f"which: expected 'largest' or 'smallest', got {which!r}")
    check_flag(return_eigenvectors, "return_eigenvectors")
    check_flag(progress, "progress")
    op = square_operator(A, size, "eigsh", symmetric=True)
    P = op.shape[0]
    k = check_count(k, "k")
    if k > P:
        raise ValueError(f"k: expected an int with 1 <= k <= P = {P}, got {k!r}")
    if num_iters is None:
        num_iters = min(P, 4 * max(2 * k + 1, 20))
    num_iters = check_count(num_iters, "num_iters", k)
    if num_iters > P:
        raise ValueError(f"num_iters: at most P = {P} Lanczos steps are possible, got {num_iters}")
    tol = torch.finfo(op.dtype).eps ** 0.5 if tol is None else check_number(tol, "tol")

    g = make_generator(generator, op.device, process_group_of(op))
    op = working_precision(op)
    with progress_bar(progress, num_iters, f"eigsh ({which} {k})") as bar:
        theta, U, residual, steps = _extreme_pairs(op, k, which, num_iters, tol, g, bar)
        _warn_unconverged(residual, tol, steps, P, "Ritz pairs")
        if k > 1:
            theta, U = _missing_copies(op, theta, U, which, num_iters, tol, g, bar)
    return (theta, U) if return_eigenvectors else theta


def _warn_unconverged(residual: Tensor, tol: float, steps: int, P: int, what: str) -> None:
    """``RuntimeWarning`` for the pairs whose ``residual`` (NaN where converged) is left after ``steps``."""
    late = ~residual.isnan()
    if bool(late.any()):
        warnings.warn(
            f"eigsh: {int(late.sum())} of {late.numel()} {what} did not reach the relative "
            f"residual tol = {tol:.1e} in {steps} Lanczos steps (largest residual "
            f"{float(residual[late].max()):.1e}); increase num_iters (at most P = {P})",
            RuntimeWarning,
            stacklevel=3,
        )


def _extreme_pairs(
    op: LinearOperator,
    k: int,
    which: str,
    num_iters: int,
    tol: float,
    g: torch.Generator,
    bar: Any,
    avoid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The k wanted Ritz pairs of one Lanczos run from a random start, and their residuals.

    Returns ``(θ [k], U [P, k], residuals [k], steps)`` with NaN residuals for the pairs
    that reached the tolerance; the start is orthogonal to the columns of ``avoid`` (if
    given).
    """
    P = op.shape[0]
    v0 = probes(P, 1, "normal", g, op.dtype, op.device)
    if avoid is not None:
        v0 = v0 - avoid @ (avoid.T @ v0)
    checked = [0]

    def stop_fn(alphas: Tensor, betas: Tensor) -> bool:
        t = alphas.shape[1]
        if t < k or t - checked[0] < max(1, -(-t // 10)):
            return False
        checked[0] = t
        return bool(_ritz(alphas, betas, k, which, tol)[3].all())

    alphas, betas, basis = lanczos(op, v0, num_iters, g, bar, "eigsh", stop_fn, tol)
    theta, Y, residual, converged = _ritz(alphas, betas, k, which, tol)
    late = residual.masked_fill(converged, math.nan)
    return theta, basis[:, :, 0].T @ Y, late, alphas.shape[1]  # u_i = Q_t y_i


def _missing_copies(
    op: LinearOperator,
    theta: Tensor,
    U: Tensor,
    which: str,
    num_iters: int,
    tol: float,
    g: torch.Generator,
    bar: Any,
) -> tuple[Tensor, Tensor]:
    """Replace pairs by wanted eigenpairs the first run missed, found on the complement of U.

    The extreme eigenvalue μ of A on U's complement (:class:`_Complement`, U's directions
    set to the last of θ, so that they never win) is the best eigenvalue U lacks; while it
    beats the last of θ by more than tol · max|θ|, it takes that pair's place (θ kept
    sorted) and the search repeats.
    """
    sign = 1.0 if which == "largest" else -1.0
    for _ in range(theta.shape[0]):
        if U.shape[1] >= U.shape[0]:
            break
        steps = min(num_iters, U.shape[0])  # restarts may bring in U's directions (eigenvalue σ)
        complement = _Complement(op, U, float(theta[-1]))
        mu, u, residual, used = _extreme_pairs(complement, 1, which, steps, tol, g, bar, avoid=U)
        _warn_unconverged(residual, tol, used, U.shape[0], "searches for a missed repeated eigenvalue")
        u = u - U @ (U.T @ u)  # rounding (or a restart) may have brought in U's directions
        u = u / torch.linalg.vector_norm(u)
        scale = max(float(theta.abs().max()), float(mu.abs().max()))
        if not sign * float(mu[0] - theta[-1]) > tol * scale:
            break
        at = int((sign * theta >= sign * mu[0]).sum())  # keeps θ sorted
        theta = torch.cat([theta[:at], mu, theta[at:-1]])
        U = torch.cat([U[:, :at], u, U[:, at:-1]], dim=1)
    return theta, U


class _Complement(LinearOperator):
    """``(I - U Uᵀ) A (I - U Uᵀ) + σ U Uᵀ``: A on the complement of U's orthonormal columns.

    U's directions get the eigenvalue σ (not 0, which a run for the smallest eigenvalues
    of a semi-definite A would take for a missed one).
    """

    symmetric = True

    def __init__(self, op: LinearOperator, U: Tensor, sigma: float):
        self.op, self.U, self.sigma = op, U, sigma
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1))[:, 0]

    def _matmat(self, V: Tensor) -> Tensor:
        coefficients = self.U.T @ V
        out = products(self.op, V - self.U @ coefficients, "eigsh")
        return out - self.U @ (self.U.T @ out - self.sigma * coefficients)


def _ritz(
    alphas: Tensor, betas: Tensor, k: int, which: str, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The k wanted Ritz values θ [k], vectors y [t, k], residuals β_t|e_tᵀy| [k], converged."""
    theta, Y = torch.linalg.eigh(tridiagonal(alphas, betas)[0])  # ascending
    idx = torch.arange(theta.shape[0] - 1, theta.shape[0] - 1 - k, -1)
    if which == "smallest":
        idx = torch.arange(k)
    residual = (betas[0, -1] * Y[-1, idx]).abs()
    scale = max(float(theta.abs().max()), torch.finfo(theta.dtype).tiny)
    return theta[idx], Y[:, idx], residual, residual <= tol * scale
