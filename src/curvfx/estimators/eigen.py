"""Extreme eigenvalues and eigenvectors of a symmetric operator by Lanczos (``eigsh``)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from curvfx.estimators._checks import OperatorLike, check_count, square_operator
from curvfx.estimators._lanczos import lanczos, tridiagonal
from curvfx.estimators._probes import make_generator, probes
from curvfx.estimators._progress import progress_bar
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
    steps, a ``RuntimeWarning`` says so and the current Ritz pairs are returned. Exact
    (to rounding) when ``num_iters = P``. Cost: t products with A (one per step),
    memory P·t, plus O(t³) per convergence check.

    Differs from Lanczos (1950) / ARPACK in: no implicit restarts (the basis grows to
    ``num_iters``); two passes of classical Gram-Schmidt against the whole basis at every
    step; a Krylov space exhausted to the tolerance (β_t ≤ tol · max(|α|, β)) is continued
    from a fresh random vector orthogonal to it instead of being declared converged, so
    repeated eigenvalues are found with their multiplicity.

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
        ValueError: For an unknown ``which``, k or ``num_iters`` out of range, a
            non-square or non-symmetric A, or products with non-finite entries.

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
    op = square_operator(A, size, "eigsh", symmetric=True)
    P = op.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P:
        raise ValueError(f"k: expected an int with 1 <= k <= P = {P}, got {k!r}")
    if num_iters is None:
        num_iters = min(P, 4 * max(2 * k + 1, 20))
    check_count(num_iters, "num_iters", k)
    if num_iters > P:
        raise ValueError(f"num_iters: at most P = {P} Lanczos steps are possible, got {num_iters}")
    tol = torch.finfo(op.dtype).eps ** 0.5 if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol: expected a positive float, got {tol!r}")

    g = make_generator(generator, op.device, process_group_of(op))
    v0 = probes(P, 1, "normal", g, op.dtype, op.device)
    checked = [0]

    def stop_fn(alphas: Tensor, betas: Tensor) -> bool:
        t = alphas.shape[1]
        if t < k or t - checked[0] < max(1, -(-t // 10)):
            return False
        checked[0] = t
        return bool(_ritz(alphas, betas, k, which, tol)[3].all())

    with progress_bar(progress, num_iters, f"eigsh ({which} {k})") as bar:
        alphas, betas, basis = lanczos(op, v0, num_iters, g, bar, "eigsh", stop_fn, tol)
    theta, Y, residual, converged = _ritz(alphas, betas, k, which, tol)
    if not bool(converged.all()):
        warnings.warn(
            f"eigsh: {int((~converged).sum())} of {k} Ritz pairs did not reach the relative "
            f"residual tol = {tol:.1e} in {alphas.shape[1]} Lanczos steps (largest residual "
            f"{float(residual.max()):.1e}); increase num_iters (at most P = {P})",
            RuntimeWarning,
            stacklevel=2,
        )
    if not return_eigenvectors:
        return theta
    return theta, basis[:, :, 0].T @ Y  # u_i = Q_t y_i


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
