"""Diagonal of a square operator: exact, or estimated by Hutchinson or XDiag."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvfx._arguments import check_count
from curvfx._errors import all_finite
from curvfx.estimators._checks import (
    OperatorLike,
    check_options,
    products,
    square_operator,
    working_precision,
)
from curvfx.estimators._probes import make_generator, probes
from curvfx.estimators._progress import progress_bar
from curvfx.estimators._sketch import leave_one_out_vectors
from curvfx.operators._base import (
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    SumOperator,
    TransposedOperator,
)
from curvfx.operators._distributed import process_group_of

__all__ = ["METHODS", "diagonal"]

METHODS = ("exact", "hutchinson", "xdiag")
_CHUNK = 256  # identity columns per product in the generic exact diagonal


def diagonal(
    A: OperatorLike,
    method: str = "exact",
    *,
    num_samples: int = 100,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    size: int | None = None,
    max_size: int = 4096,
    return_std: bool = False,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Diagonal d = (A_11, …, A_PP) of a square operator A [P, P], exact or estimated.

    Methods (m = ``num_samples`` products with A, ω ~ ``distribution``, E[ω ωᵀ] = I):

    * ``"exact"``: ``A._exact_diagonal()`` if the operator has it (curvature operators
      compute it from the loss factors); the sum of the terms' diagonals for ``A + B``,
      ``c * A`` and ``A + λ I``; the matrix diagonal of a dense operator; else P products
      with the identity columns (``_CHUNK`` at a time), refused when P > ``max_size``.
    * ``"hutchinson"``: (1/m) Σ_i ω_i ⊙ A ω_i (Bekas, Kokiopoulou, Saad 2007), unbiased
      for both distributions; Rademacher probes give the smaller variance,
      Var = Σ_{k≠j} A_jk² per entry and sample. Standard error: entrywise sample standard
      deviation / √m.
    * ``"xdiag"``: with s = m/2 probes Ω and Q R = A Ω, the mean over i of the
      leave-one-out estimates diag(Q_iQ_iᵀA) + ω_i ⊙ (I - Q_iQ_iᵀ) A ω_i, Q_i an
      orthonormal basis of A Ω_{-i} (Epperly, Tropp, Webber 2024, "XDiag"). Cost:
      s products with A and s with Aᵀ (= A for a symmetric operator), m in all, in two
      matmats. Standard error: entrywise standard deviation of the s leave-one-out
      estimates / √s (a heuristic: the estimates are not independent).

    The result is always flat [P], in the order of ``curvfx.ravel``; get the parameter
    pytree with ``curvfx.unravel(d, params)``.

    Differs from Bekas et al. 2007 in: no division by Σ ω_i ⊙ ω_i (that ratio is biased
    for normal probes; for Rademacher probes it is 1). Differs from Epperly et al. 2024
    in: normal probes are allowed; a rank-deficient sketch is handled as described in
    ``leave_one_out_vectors``.

    Args:
        A: A :class:`~curvfx.operators.LinearOperator`, a dense square tensor [P, P], or a
            callable ``v [P] -> A v [P]`` together with ``size`` (taken in torch's default
            dtype on the CPU; wrap it in ``FunctionOperator`` for another dtype/device).
        method: ``"exact"``, ``"hutchinson"`` or ``"xdiag"``.
        num_samples: m, the number of products (stochastic methods); ``"xdiag"`` needs an
            even m with m/2 ≤ P.
        distribution: Probe distribution, ``"rademacher"`` or ``"normal"``.
        generator: Source of the probes. ``None``: a fresh generator seeded by one draw of
            torch's global RNG (reproducible under ``torch.manual_seed``).
        size: P, required when ``A`` is a callable.
        max_size: Largest P for which ``"exact"`` may fall back to P products.
        return_std: Also return the entrywise standard error [P] (zeros for ``"exact"``).
        progress: Show a tqdm bar over the products (needs ``tqdm``).

    Returns:
        The diagonal [P], or ``(estimate, standard_error)``, both [P], if ``return_std``.

    Raises:
        ValueError: For an unknown ``method`` or ``distribution`` (checked for every
            method), a bad ``num_samples``, a ``size`` that contradicts an operator or
            tensor A, a non-square, empty (P = 0) or non-floating A, an exact diagonal
            costlier than ``max_size`` products, or products with another shape or dtype
            than the probes or with non-finite entries.
        TypeError: For an ``A`` of none of the accepted forms, a ``generator`` that is not
            a ``torch.Generator`` (for every method), or ``return_std``/``progress`` that
            is not a bool.

    Example:
        >>> M = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> diagonal(M)
        tensor([2., 3.], dtype=torch.float64)

    References:
        Bekas, Kokiopoulou, Saad (2007), An estimator for the diagonal of a matrix.
        Epperly, Tropp, Webber (2024), XTrace: making the most of every sample in
        stochastic trace estimation.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    check_options(distribution, generator, return_std=return_std, progress=progress)
    op = square_operator(A, size, "diagonal")
    P = op.shape[0]
    if method == "exact":
        estimate = _exact_diagonal(op, max_size=max_size, progress=progress)
        return (estimate, torch.zeros_like(estimate)) if return_std else estimate
    m = check_count(num_samples, "num_samples", {"hutchinson": 1, "xdiag": 2}[method])
    with_std = {"hutchinson": 2, "xdiag": 4}[method]
    if return_std and m < with_std:
        raise ValueError(
            f"num_samples: return_std=True needs at least two averaged terms, "
            f"num_samples >= {with_std} for {method!r}, got {m}"
        )
    if method == "xdiag" and (m % 2 or m // 2 > P):
        raise ValueError(f"num_samples: xdiag needs an even m with m/2 <= P = {P}, got m = {m}")
    g = make_generator(generator, op.device, process_group_of(op))
    op = working_precision(op) if method == "xdiag" else op
    part = {"hutchinson": _hutchinson, "xdiag": _xdiag}[method]
    with progress_bar(progress, m, f"diagonal ({method})") as bar:
        estimates = part(op, m, distribution, g, bar)  # [P, n] terms whose mean is d
    estimate = estimates.mean(1)
    if not return_std:
        return estimate
    return estimate, estimates.std(1) / math.sqrt(estimates.shape[1])


def _exact_diagonal(
    op: LinearOperator, *, max_size: int = 4096, progress: bool = False, who: str = "diagonal"
) -> Tensor:
    """diag(A) [P] exactly: the operator's own ``_exact_diagonal()``, else generically.

    Generic rules, tried in order: ``A._exact_diagonal()``; Σ c_i diag(A_i) for a sum;
    diag(Aᵀ) = diag(A); the ones of an identity; the matrix diagonal of a dense operator;
    else A e_j for all identity columns e_j, ``_CHUNK`` columns per product (P products,
    allowed only for P ≤ ``max_size``).
    """
    check_count(max_size, "max_size")
    P = op.shape[0]
    own = getattr(op, "_exact_diagonal", None)
    if callable(own):
        d = own()
        if not isinstance(d, Tensor) or d.shape != (P,):
            raise ValueError(f"{who}: {type(op).__name__}._exact_diagonal() must return [P] = [{P}]")
    elif isinstance(op, SumOperator):
        d = sum(
            c * _exact_diagonal(A_i, max_size=max_size, progress=progress, who=who)
            for A_i, c in zip(op.ops, op.coeffs)
        )
    elif isinstance(op, TransposedOperator):
        d = _exact_diagonal(op.op, max_size=max_size, progress=progress, who=who)
    elif isinstance(op, IdentityOperator):
        d = torch.ones(P, dtype=op.dtype, device=op.device)
    elif isinstance(op, DenseOperator):
        d = op.matrix.diagonal().clone()
    else:
        d = _diagonal_by_columns(op, max_size, progress, who)
    if not all_finite(d):
        raise ValueError(f"{who}: the exact diagonal of A has non-finite entries (inf/nan)")
    return d


def _diagonal_by_columns(op: LinearOperator, max_size: int, progress: bool, who: str) -> Tensor:
    """(A e_j)_j for every identity column e_j: P products."""
    P = op.shape[0]
    if P > max_size:
        alternatives = (
            "'hutchinson', 'hutch++' or 'xtrace'" if who == "trace" else ("'hutchinson' or 'xdiag'")
        )
        raise ValueError(
            f"{who}: {type(op).__name__} has no exact diagonal of its own; the generic one "
            f"costs P = {P} products with A, more than max_size = {max_size}. Pass "
            f"max_size={P} to pay that cost, or use method={alternatives}"
        )
    d = torch.empty(P, dtype=op.dtype, device=op.device)
    with progress_bar(progress, P, f"{who} (exact, {P} products)") as bar:
        for start in range(0, P, _CHUNK):
            stop = min(start + _CHUNK, P)
            cols = torch.arange(start, stop, device=op.device)
            E = torch.zeros(P, stop - start, dtype=op.dtype, device=op.device)
            E[cols, cols - start] = 1  # e_start … e_stop-1
            d[start:stop] = products(op, E, who)[cols, cols - start]
            bar.update(stop - start)
    return d


def _hutchinson(op, m, distribution, generator, bar) -> Tensor:
    """The m terms ω_i ⊙ A ω_i [P, m]."""
    V = probes(op.shape[0], m, distribution, generator, op.dtype, op.device)
    AV = products(op, V, "diagonal")
    bar.update(m)
    return V * AV


def _xdiag(op, m, distribution, generator, bar) -> Tensor:
    """The s leave-one-out estimates diag(Q_iQ_iᵀA) + ω_i ⊙ (I - Q_iQ_iᵀ) A ω_i [P, s]."""
    s = m // 2
    Om = probes(op.shape[0], s, distribution, generator, op.dtype, op.device)
    Y = products(op, Om, "diagonal")  # A Ω
    bar.update(s)
    Q, R = torch.linalg.qr(Y)
    Z = products(op, Q, "diagonal", transpose=True)  # Aᵀ Q, so QᵀA = Zᵀ
    bar.update(s)
    V = leave_one_out_vectors(R)  # Q_i Q_iᵀ = Q (I - V_i V_iᵀ) Qᵀ, V [s, s, d]
    # diag(Q_iQ_iᵀA) = diag(QQᵀA) - Σ_j (Q v_ij) ⊙ (Z v_ij)
    QV, ZV = torch.einsum("pa,aid->pid", Q, V), torch.einsum("pa,aid->pid", Z, V)
    in_range = (Q * Z).sum(1, keepdim=True) - (QV * ZV).sum(-1)
    # (I - Q_iQ_iᵀ) A ω_i = y_i - Q c_i,  c_i = r_i - V_i (V_iᵀ r_i),  r_i = Qᵀ A ω_i = R e_i
    C = R - torch.einsum("aid,bid,bi->ai", V, V, R)
    return in_range + Om * (Y - Q @ C)
