"""Lanczos tridiagonalization with full reorthogonalization, for a block of start vectors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvfx.estimators._checks import products
from curvfx.estimators._probes import probes
from curvfx.operators._base import LinearOperator

__all__ = ["lanczos", "tridiagonal"]


def lanczos(
    op: LinearOperator,
    V0: Tensor,
    num_steps: int,
    generator: torch.Generator,
    bar: Any,
    who: str,
    stop_fn: Callable[[Tensor, Tensor], bool] | None = None,
    breakdown_tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run B independent Lanczos recurrences, one per column of V0 [P, B], as one matmat per step.

    For each column, with q_1 = v_0 / ‖v_0‖ and β_0 q_0 = 0:

        w = A q_t - α_t q_t - β_{t-1} q_{t-1},   α_t = q_tᵀ A q_t,
        w ← w - Q_t Q_tᵀ w  (twice: full reorthogonalization),   β_t = ‖w‖,  q_{t+1} = w / β_t

    so that Q_tᵀ A Q_t = T_t = tridiag(β, α, β) and A Q_t = Q_t T_t + β_t q_{t+1} e_tᵀ.
    If β_t ≤ ``breakdown_tol`` · max(|α|, β) (default 10 ε: the Krylov space is invariant)
    the column restarts with a random vector orthogonal to its basis and β_t is set to 0:
    T_t stays QᵀAQ (to that tolerance), block diagonal, and eigenvalues outside the
    exhausted Krylov space (other eigenvalues, further copies of repeated ones) are found
    by the next block. Cost: one product with A per step for all B columns; memory
    P·B·num_steps.

    ``stop_fn(alphas, betas)`` is called after each step without a restart and ends the
    run when it returns True. Returns ``(alphas [B, t], betas [B, t], basis [t, P, B])``,
    where ``betas[:, -1]`` is the last residual norm β_t (not part of T_t).
    """
    P, B = V0.shape
    eps = torch.finfo(op.dtype).eps
    basis = torch.empty(num_steps, P, B, dtype=op.dtype, device=op.device)
    alphas = torch.empty(B, num_steps, dtype=op.dtype, device=op.device)
    betas = torch.empty(B, num_steps, dtype=op.dtype, device=op.device)
    q = V0 / torch.linalg.vector_norm(V0, dim=0)
    scale = 0.0
    t = 0
    for t in range(num_steps):
        basis[t] = q
        w = products(op, q, who)  # A q_t
        bar.update(1)
        alpha = (q * w).sum(0)  # α_t = q_tᵀ A q_t
        w = w - alpha * q
        if t > 0:
            w = w - betas[:, t - 1] * basis[t - 1]
        w = _orthogonalized(w, basis[: t + 1])
        beta = torch.linalg.vector_norm(w, dim=0)
        alphas[:, t], betas[:, t] = alpha, beta
        scale = max(scale, float(alpha.abs().max()), float(beta.max()))
        if t + 1 == num_steps:
            break
        broken = beta <= (10 * eps if breakdown_tol is None else breakdown_tol) * scale
        if not bool(broken.any()) and stop_fn is not None:
            if stop_fn(alphas[:, : t + 1], betas[:, : t + 1]):
                break
        if bool(broken.any()):  # invariant subspace: restart those columns
            fresh = probes(P, B, "normal", generator, op.dtype, op.device)
            w = torch.where(broken, _orthogonalized(fresh, basis[: t + 1]), w)
            betas[:, t] = torch.where(broken, torch.zeros_like(beta), beta)
            q = w / torch.linalg.vector_norm(w, dim=0)
        else:
            q = w / beta
    t += 1
    return alphas[:, :t], betas[:, :t], basis[:t]


def tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    """T [B, t, t] = tridiag(β, α, β) from α [B, t] and β [B, t] (the last β unused)."""
    off = betas[:, :-1]
    return torch.diag_embed(alphas) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def _orthogonalized(w: Tensor, basis: Tensor) -> Tensor:
    """Each column of w [P, B] minus its projection on its basis [t, P, B], done twice."""
    for _ in range(2):
        w = w - torch.einsum("tpb,tb->pb", basis, torch.einsum("tpb,pb->tb", basis, w))
    return w
