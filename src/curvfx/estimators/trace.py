"""Trace of a square operator: exact, or estimated by Hutchinson, Hutch++ or XTrace."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvfx._arguments import check_count
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
from curvfx.estimators.diagonal import _exact_diagonal
from curvfx.operators._base import LinearOperator
from curvfx.operators._distributed import process_group_of

__all__ = ["METHODS", "trace"]

METHODS = ("exact", "hutchinson", "hutch++", "xtrace")
# Hutchinson's probes and their products, per block of probes: at most this many numbers
# each (32 MiB in float32). Fresh buffers of several hundred MB page-fault on every call:
# on a 784-1024-1024-10 MLP (P = 1.9M) 20 probes in blocks of 4 took 0.91 of the time of one
# [P, 20] block and a tenth of its memory; below P = 420k all 20 stay one block.
PROBE_NUMBERS = 2**23


def trace(
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
    """Trace tr(A) = Σ_i A_ii of a square operator A [P, P], exact or estimated.

    Methods (m = ``num_samples`` products with A, ω ~ ``distribution``, E[ω ωᵀ] = I):

    * ``"exact"``: ``A._exact_trace()`` if the operator has it, else the sum of
      :func:`curvfx.estimators.diagonal` with ``method="exact"`` (free for operators with
      an exact diagonal, else P products, refused above ``max_size``).
    * ``"hutchinson"``: (1/m) Σ_i ω_iᵀ A ω_i (Hutchinson 1989), the probes drawn and
      applied in matmats of up to ``PROBE_NUMBERS // P`` columns (memory ∝ that block, not
      m). Standard error: sample standard deviation of the m terms / √m.
    * ``"hutch++"``: with k = ⌊m/3⌋ and Q = orth(A S) for k probes S,
      tr(QᵀAQ) + (1/r) Σ_i g_iᵀ (I-QQᵀ) A (I-QQᵀ) g_i over r = m - 2k probes g_i
      (Meyer, Musco, Musco, Woodruff 2021). Cost: k + k + r = m products in two matmats.
      Standard error: that of the residual Hutchinson part (Q is held fixed).
    * ``"xtrace"``: with s = m/2 probes Ω and Q R = A Ω, the mean over i of the
      leave-one-out estimates tr(Q_iᵀAQ_i) + ω_iᵀ(I-Q_iQ_iᵀ)A(I-Q_iQ_iᵀ)ω_i, Q_i an
      orthonormal basis of A Ω_{-i} (Epperly, Tropp, Webber 2024, "XTrace"). Cost:
      s + s = m products in two matmats. Standard error: standard deviation of the s
      leave-one-out estimates / √s, the paper's error estimate (a heuristic: the
      estimates are not independent).

    Hutch++ and XTrace are exact for A of rank ≤ k (resp. s - 1) and converge as 1/m
    instead of 1/√m for matrices with a decaying spectrum. None of the methods assumes
    A symmetric.

    Differs from Meyer et al. 2021 in: r = m - 2⌊m/3⌋ residual probes (the remainder);
    the residual probes are projected once, (I-QQᵀ)G, and multiplied together with Q.
    Differs from Epperly et al. 2024 in: plain (unnormalized) probes, without the
    "improved" sphere normalization; a rank-deficient sketch is handled as described in
    ``leave_one_out_vectors``.

    Args:
        A: A :class:`~curvfx.operators.LinearOperator`, a dense square tensor [P, P], or a
            callable ``v [P] -> A v [P]`` together with ``size`` (taken in torch's default
            dtype on the CPU; wrap it in ``FunctionOperator`` for another dtype/device).
        method: ``"exact"``, ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        num_samples: m, the number of products with A (stochastic methods). ``"hutch++"``
            needs m ≥ 3, ``"xtrace"`` an even m with m/2 ≤ P.
        distribution: Probe distribution, ``"rademacher"`` or ``"normal"``.
        generator: Source of the probes. ``None``: a fresh generator seeded by one draw of
            torch's global RNG (reproducible under ``torch.manual_seed``).
        size: P, required when ``A`` is a callable.
        max_size: Largest P for which ``"exact"`` may fall back to P products.
        return_std: Also return the estimated standard error (0 for ``"exact"``).
        progress: Show a tqdm bar over the products (needs ``tqdm``).

    Returns:
        tr(A) as a 0-d tensor, or ``(estimate, standard_error)`` if ``return_std``.

    Raises:
        ValueError: For an unknown ``method`` or ``distribution`` (checked for every
            method), a bad ``num_samples``, a ``size`` that contradicts an operator or
            tensor A, a non-square, empty (P = 0) or non-floating A, or products with
            another shape or dtype than the probes or with non-finite entries.
        TypeError: For an ``A`` of none of the accepted forms, a ``generator`` that is not
            a ``torch.Generator`` (for every method), or ``return_std``/``progress`` that
            is not a bool.

    Example:
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
        >>> trace(M)
        tensor(6., dtype=torch.float64)
        >>> g = torch.Generator().manual_seed(0)
        >>> estimate, std = trace(M, "hutchinson", num_samples=100, generator=g, return_std=True)
        >>> float(std)  # Rademacher probes: ωᵀMω = tr(M) exactly for a diagonal M
        0.0
        >>> xt = trace(M, "xtrace", num_samples=8, distribution="normal", generator=g)
        >>> round(float(xt), 8)  # rank(M) < m/2: exact
        6.0

    References:
        Hutchinson (1989), A stochastic estimator of the trace of the influence matrix
        for Laplacian smoothing splines. Meyer, Musco, Musco, Woodruff (2021), Hutch++:
        optimal stochastic trace estimation. Epperly, Tropp, Webber (2024), XTrace:
        making the most of every sample in stochastic trace estimation.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    check_options(distribution, generator, return_std=return_std, progress=progress)
    op = square_operator(A, size, "trace")
    P = op.shape[0]
    if method == "exact":
        estimate = _exact(op, max_size, progress)
        return (estimate, torch.zeros_like(estimate)) if return_std else estimate
    m = _check_num_samples(method, num_samples, P, return_std)
    g = make_generator(generator, op.device, process_group_of(op))
    op = working_precision(op) if method != "hutchinson" else op
    part = {"hutchinson": _hutchinson, "hutch++": _hutchpp, "xtrace": _xtrace}[method]
    with progress_bar(progress, m, f"trace ({method})") as bar:
        estimate, std = part(op, m, distribution, g, bar)
    return (estimate, std) if return_std else estimate


def _exact(op: LinearOperator, max_size: int, progress: bool) -> Tensor:
    """tr(A) from ``A._exact_trace()``, else the sum of the exact diagonal."""
    exact_trace = getattr(op, "_exact_trace", None)
    if callable(exact_trace):
        value = exact_trace()
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise ValueError(f"trace: {type(op).__name__}._exact_trace() must return a 0-d tensor")
        return value
    return _exact_diagonal(op, max_size=max_size, progress=progress, who="trace").sum()


def _hutchinson(op, m, distribution, generator, bar) -> tuple[Tensor, Tensor]:
    """(1/m) Σ ω_iᵀ A ω_i and its standard error, the probes in blocks of :data:`PROBE_NUMBERS` numbers."""
    P = op.shape[0]
    per_block = max(1, PROBE_NUMBERS // P)
    terms = []
    for start in range(0, m, per_block):
        V = probes(P, min(per_block, m - start), distribution, generator, op.dtype, op.device)
        AV = products(op, V, "trace")
        bar.update(V.shape[1])
        terms.append(torch.linalg.vecdot(V, AV, dim=0))  # ω_iᵀ A ω_i (einsum's bmm: 20× slower at P = 1.9M)
    terms = torch.cat(terms)
    return terms.mean(), _standard_error(terms)


def _hutchpp(op, m, distribution, generator, bar) -> tuple[Tensor, Tensor]:
    """tr(QᵀAQ) + Hutchinson on (I-QQᵀ)A(I-QQᵀ), Q = orth(A S)."""
    k = m // 3
    W = probes(op.shape[0], m - k, distribution, generator, op.dtype, op.device)
    S, G = W[:, :k], W[:, k:]
    Q, _ = torch.linalg.qr(products(op, S, "trace"))  # orth(A S)
    bar.update(k)
    G = G - Q @ (Q.T @ G)  # (I - QQᵀ) G
    AX = products(op, torch.cat([Q, G], dim=1), "trace")
    bar.update(Q.shape[1] + G.shape[1])
    AQ, AG = AX[:, : Q.shape[1]], AX[:, Q.shape[1] :]
    terms = (G * AG).sum(0)  # g_iᵀ (I-QQᵀ) A (I-QQᵀ) g_i
    return (Q * AQ).sum() + terms.mean(), _standard_error(terms)


def _xtrace(op, m, distribution, generator, bar) -> tuple[Tensor, Tensor]:
    """Mean of the s leave-one-out estimates tr(Q_iᵀAQ_i) + ω_iᵀ(I-Q_iQ_iᵀ)A(I-Q_iQ_iᵀ)ω_i."""
    s = m // 2
    Om = probes(op.shape[0], s, distribution, generator, op.dtype, op.device)
    Y = products(op, Om, "trace")  # A Ω
    bar.update(s)
    Q, R = torch.linalg.qr(Y)
    Z = products(op, Q, "trace")  # A Q
    bar.update(s)
    H = Q.T @ Z  # QᵀAQ
    V = leave_one_out_vectors(R)  # Q_i Q_iᵀ = Q (I - V_i V_iᵀ) Qᵀ, V [s, s, d]
    W, T = Q.T @ Om, Z.T @ Om  # QᵀΩ, QᵀAᵀΩ
    # tr(Q_iᵀAQ_i) = tr(H) - tr(V_iᵀ H V_i)
    in_range = torch.trace(H) - torch.einsum("aid,ab,bid->i", V, H, V)
    # (I - Q_iQ_iᵀ) ω_i = ω_i - Q c_i,  c_i = w_i - V_i (V_iᵀ w_i)
    C = W - torch.einsum("aid,bid,bi->ai", V, V, W)
    # (ω_i - Q c_i)ᵀ (A ω_i - A Q c_i), with Qᵀ A ω_i = R e_i
    residual = (Om * Y).sum(0) - (T * C).sum(0) - (R * C).sum(0) + (C * (H @ C)).sum(0)
    estimates = in_range + residual
    return estimates.mean(), _standard_error(estimates)


def _standard_error(terms: Tensor) -> Tensor:
    """Sample standard deviation / √n (n ≥ 2 checked at the boundary; NaN for n = 1)."""
    if terms.numel() < 2:
        return torch.full((), math.nan, dtype=terms.dtype, device=terms.device)
    return terms.std() / math.sqrt(terms.numel())


def _check_num_samples(method: str, num_samples: int, P: int, return_std: bool) -> int:
    """Validate m for ``method``; ``return_std`` needs two terms in the averaged part."""
    m = check_count(num_samples, "num_samples", {"hutchinson": 1, "hutch++": 3, "xtrace": 2}[method])
    with_std = {"hutchinson": 2, "hutch++": 4, "xtrace": 4}[method]
    if return_std and m < with_std:
        raise ValueError(
            f"num_samples: return_std=True needs at least two averaged terms, "
            f"num_samples >= {with_std} for {method!r}, got {m}"
        )
    if method == "xtrace":
        if m % 2:
            raise ValueError(f"num_samples: xtrace uses m/2 probes and needs an even m, got {m}")
        if m // 2 > P:
            raise ValueError(
                f"num_samples: xtrace needs m/2 <= P = {P}, got m = {m}; "
                "use method='exact' for small operators"
            )
    return m
