"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvfx._arguments import check_count, check_flag, check_number
from curvfx.estimators._checks import OperatorLike, square_operator, working_precision
from curvfx.estimators._lanczos import lanczos, tridiagonal
from curvfx.estimators._probes import make_generator, probes
from curvfx.estimators._progress import progress_bar
from curvfx.operators._distributed import process_group_of

__all__ = ["density", "spectral_density"]


def spectral_density(
    A: OperatorLike,
    *,
    num_probes: int = 10,
    num_steps: int | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    size: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quadrature nodes and weights of the spectral density of a symmetric A [P, P].

    The spectral density φ(λ) = (1/P) Σ_j δ(λ - λ_j) satisfies, for a unit vector q,
    qᵀ f(A) q = Σ_j (qᵀu_j)² f(λ_j); averaging over random q estimates (1/P) tr f(A)
    = ∫ f dφ. For each of the B = ``num_probes`` probes q_l = ω_l / ‖ω_l‖, m steps of
    Lanczos give T_l = V_l diag(θ_l) V_lᵀ, and the Gauss quadrature

        qᵀ f(A) q ≈ Σ_i τ_li f(θ_li),   τ_li = (e_1ᵀ v_li)²,   Σ_i τ_li = 1,

    which is exact for polynomials f of degree < 2m. Hence φ ≈ (1/B) Σ_l Σ_i τ_li
    δ(λ - θ_li); :func:`density` smooths it. In particular (1/B) Σ_{l,i} τ_li θ_li =
    (1/B) Σ_l q_lᵀ A q_l, an estimate of tr(A)/P. Cost: m products with A, each one matmat
    over the B probes; memory P·B·m (full reorthogonalization).

    Differs from Ubaru, Chen, Saad (2017) in: full reorthogonalization (as Ghorbani et al.
    2019); a probe whose Krylov space is exhausted before m steps continues from a fresh
    random vector, whose nodes get weight 0.

    Args:
        A: A symmetric :class:`~curvfx.operators.LinearOperator`, a dense symmetric tensor
            [P, P], or a callable ``v [P] -> A v [P]`` together with ``size``.
        num_probes: B, the number of random start vectors.
        num_steps: m ≤ P, Lanczos steps per probe; default min(P, 80).
        distribution: Probe distribution, ``"rademacher"`` or ``"normal"``.
        generator: Source of the probes. ``None``: a fresh generator seeded by one draw
            of torch's global RNG.
        size: P, required when ``A`` is a callable.
        progress: Show a tqdm bar over the Lanczos steps (needs ``tqdm``).

    Returns:
        ``(nodes [B, m], weights [B, m])``; each row of ``weights`` sums to 1.

    Raises:
        ValueError: For a bad ``num_probes`` or ``num_steps``, an unknown
            ``distribution``, a non-square, non-symmetric, empty or non-floating A, or
            products with another shape or dtype than their input or non-finite entries.
        TypeError: If ``progress`` is not a bool or ``generator`` not a ``torch.Generator``.

    Example:
        >>> M = torch.diag(torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> nodes, weights = spectral_density(M, num_probes=3, num_steps=3, generator=g)
        >>> nodes.shape, bool(torch.allclose(weights.sum(1), torch.ones(3, dtype=M.dtype)))
        (torch.Size([3, 3]), True)

    References:
        Ubaru, Chen, Saad (2017), Fast estimation of tr(f(A)) via stochastic Lanczos
        quadrature. Ghorbani, Krishnan, Xiao (2019), An investigation into neural net
        optimization via Hessian eigenvalue density.
    """
    check_flag(progress, "progress")
    op = square_operator(A, size, "spectral_density", symmetric=True)
    P = op.shape[0]
    check_count(num_probes, "num_probes")
    num_steps = min(P, 80) if num_steps is None else num_steps
    check_count(num_steps, "num_steps")
    if num_steps > P:
        raise ValueError(f"num_steps: at most P = {P} Lanczos steps are possible, got {num_steps}")
    g = make_generator(generator, op.device, process_group_of(op))
    op = working_precision(op)
    V0 = probes(P, num_probes, distribution, g, op.dtype, op.device)
    with progress_bar(progress, num_steps, "spectral_density (Lanczos steps)") as bar:
        alphas, betas, _ = lanczos(op, V0, num_steps, g, bar, "spectral_density")
    nodes, vectors = torch.linalg.eigh(tridiagonal(alphas, betas))  # [B, m], [B, m, m]
    return nodes, vectors[:, 0, :] ** 2  # τ_li = (e_1ᵀ v_li)²


def density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """The Gaussian-smoothed spectral density on ``grid``.

        φ_σ(x) = (1/B) Σ_l Σ_i τ_li · exp(-(x - θ_li)² / (2σ²)) / (σ √(2π))

    for nodes θ and weights τ [B, m] from :func:`spectral_density`. It integrates to 1
    over the real line (≈ 1 on a grid covering the nodes ± a few σ). Cost: G·B·m.

    Args:
        nodes: θ [B, m] (or [m] for one probe).
        weights: τ, the shape of ``nodes``.
        grid: Points x [G] at which to evaluate.
        sigma: σ > 0, the smoothing width (in units of the eigenvalues).

    Returns:
        φ_σ(grid) [G].

    Raises:
        TypeError: If ``nodes``, ``weights`` or ``grid`` is not a floating-point tensor.
        ValueError: If ``nodes`` is not [B, m] (or [m]) with B, m ≥ 1, ``weights`` has
            another shape, ``grid`` is not 1-D, or ``sigma`` is not a finite float > 0.

    Example:
        >>> nodes = torch.tensor([[0.0, 1.0]]); weights = torch.tensor([[0.5, 0.5]])
        >>> x = torch.linspace(-3, 4, 701)
        >>> round(float(torch.trapezoid(density(nodes, weights, x, 0.3), x)), 4)
        1.0
    """
    for name, value in (("nodes", nodes), ("weights", weights), ("grid", grid)):
        if not (isinstance(value, Tensor) and value.is_floating_point()):
            raise TypeError(f"{name}: expected a floating-point tensor, got {_kind(value)}")
    if nodes.dim() not in (1, 2) or nodes.numel() == 0:
        raise ValueError(
            f"nodes: expected a tensor [B, m] (or [m]) with B, m >= 1, got shape {list(nodes.shape)}"
        )
    if weights.shape != nodes.shape:
        raise ValueError(
            f"weights: expected the shape of nodes {list(nodes.shape)}, got {list(weights.shape)}"
        )
    if grid.dim() != 1:
        raise ValueError(f"grid: expected a 1-D tensor [G], got shape {list(grid.shape)}")
    sigma = check_number(sigma, "sigma")
    nodes, weights = nodes.reshape(-1, nodes.shape[-1]), weights.reshape(-1, nodes.shape[-1])
    z = (grid[:, None, None] - nodes) / sigma  # [G, B, m]
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    return (weights * kernel).sum((1, 2)) / nodes.shape[0]


def _kind(value: object) -> str:
    """A tensor's dtype, else the type's name (for error messages)."""
    return f"a tensor of dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
