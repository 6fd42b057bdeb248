"""Estimators against dense truths (torch.linalg), by convergence with seeded generators."""

from __future__ import annotations

import copy
import math
import sys
import types
from typing import ClassVar

import pytest
import torch
from torch import nn

import curvfx
from curvfx.estimators import (
    CGInfo,
    cg,
    density,
    diagonal,
    eigsh,
    probes,
    spectral_density,
    trace,
)
from curvfx.operators._base import DenseOperator, FunctionOperator, LinearOperator, identity

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------
# matrices


def symmetric(P: int, seed: int = 0) -> torch.Tensor:
    """A random symmetric (indefinite) matrix, exactly symmetric."""
    M = torch.randn(P, P, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    return (M + M.T) / 2


def psd(P: int, seed: int = 0) -> torch.Tensor:
    """A random symmetric positive definite matrix."""
    B = torch.randn(P, P, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    M = B @ B.T / P + 0.1 * torch.eye(P, dtype=DTYPE)
    return (M + M.T) / 2


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(λ) Uᵀ for a random orthogonal U, exactly symmetric."""
    P = eigenvalues.shape[0]
    G = torch.randn(P, P, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    U, _ = torch.linalg.qr(G)
    M = U @ torch.diag(eigenvalues.to(DTYPE)) @ U.T
    return (M + M.T) / 2


def decaying(P: int = 100, rate: float = 0.8, seed: int = 0) -> torch.Tensor:
    """A PSD matrix with eigenvalues 10 · rate^j: a fast-decaying spectrum."""
    return with_spectrum(10 * rate ** torch.arange(P, dtype=DTYPE), seed)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Counting(LinearOperator):
    """A dense symmetric operator that counts its products (columns) and matmat calls."""

    symmetric = True

    def __init__(self, matrix: torch.Tensor):
        self.matrix, self.shape = matrix, tuple(matrix.shape)
        self.dtype, self.device = matrix.dtype, matrix.device
        self.num_products, self.num_calls = 0, 0

    def _matvec(self, v):
        self.num_products, self.num_calls = self.num_products + 1, self.num_calls + 1
        return self.matrix @ v

    def _matmat(self, V):
        self.num_products, self.num_calls = self.num_products + V.shape[1], self.num_calls + 1
        return self.matrix @ V


@pytest.fixture
def float64_default():
    """Callables are taken in torch's default dtype: make it float64 for the test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------
# probes


def test_probes_distributions_and_reproducibility():
    R = probes(1000, 8, "rademacher", gen(0), DTYPE)
    assert R.shape == (1000, 8) and R.dtype == DTYPE and bool((R.abs() == 1).all())
    N = probes(4000, 3, "normal", gen(0), torch.float32)
    assert N.dtype == torch.float32
    assert abs(float(N.mean())) < 0.05 and abs(float(N.var()) - 1) < 0.05
    assert torch.equal(probes(50, 4, generator=gen(3)), probes(50, 4, generator=gen(3)))
    assert not torch.equal(probes(50, 4, generator=gen(3)), probes(50, 4, generator=gen(4)))


def test_probes_without_generator_follow_the_global_seed():
    torch.manual_seed(11)
    first = probes(20, 2)
    torch.manual_seed(11)
    assert torch.equal(first, probes(20, 2))


# ---------------------------------------------------------------------------------------
# exact trace and diagonal


def test_exact_trace_and_diagonal_of_dense():
    M = symmetric(30)
    for A in (M, DenseOperator(M)):
        torch.testing.assert_close(trace(A), torch.trace(M))
        torch.testing.assert_close(diagonal(A), torch.diagonal(M), rtol=0, atol=0)
    N = torch.randn(7, 7, dtype=DTYPE, generator=gen(1))  # not symmetric
    torch.testing.assert_close(diagonal(DenseOperator(N).T), torch.diagonal(N))


def test_exact_diagonal_of_sum_and_damping_uses_the_terms():
    M, N = symmetric(12, 0), symmetric(12, 1)
    A = DenseOperator(M) - 2.0 * DenseOperator(N) + 0.5 * identity(12)
    expected = torch.diagonal(M - 2 * N) + 0.5
    torch.testing.assert_close(diagonal(A), expected)
    torch.testing.assert_close(trace(A), expected.sum())


def test_exact_generic_fallback_multiplies_identity_columns(float64_default):
    M = symmetric(300)
    counted = Counting(M)
    torch.testing.assert_close(diagonal(counted), torch.diagonal(M), rtol=0, atol=0)
    assert counted.num_products == 300 and counted.num_calls == 2  # 256 + 44 columns
    torch.testing.assert_close(trace(lambda v: M @ v, size=300), torch.trace(M))


def test_exact_fallback_refused_above_max_size():
    A = FunctionOperator(lambda v: 2 * v, 50, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"P = 50 products.*max_size=50.*'xdiag'"):
        diagonal(A, max_size=49)
    with pytest.raises(ValueError, match=r"max_size=50.*'hutch\+\+'"):
        trace(A, max_size=10)
    torch.testing.assert_close(trace(A, max_size=50), torch.tensor(100.0, dtype=DTYPE))


def test_exact_uses_the_operators_own_trace_and_diagonal():
    class Factored(LinearOperator):
        symmetric = True
        shape, dtype, device = (4, 4), DTYPE, torch.device("cpu")

        def _matvec(self, v):
            raise AssertionError("exact trace/diagonal must not multiply")

        def _exact_diagonal(self):
            return torch.arange(4.0, dtype=DTYPE)

    torch.testing.assert_close(diagonal(Factored()), torch.arange(4.0, dtype=DTYPE))
    torch.testing.assert_close(trace(Factored()), torch.tensor(6.0, dtype=DTYPE))
    Factored._exact_trace = lambda self: torch.tensor(-1.0, dtype=DTYPE)
    torch.testing.assert_close(trace(Factored()), torch.tensor(-1.0, dtype=DTYPE))
    _, std = trace(Factored(), return_std=True)
    assert float(std) == 0.0


# ---------------------------------------------------------------------------------------
# stochastic trace


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_trace_within_four_standard_errors(method, distribution):
    M = psd(80) + with_spectrum(torch.linspace(-1, 3, 80), 5)  # indefinite, slow decay
    exact = torch.trace(M)
    for seed in range(5):
        estimate, std = trace(
            M,
            method,
            num_samples=30,
            distribution=distribution,
            generator=gen(seed),
            return_std=True,
        )
        assert float(std) > 0
        assert abs(float(estimate - exact)) <= 4 * float(std), (seed, estimate, exact, std)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_in_blocks_of_probes(distribution, monkeypatch):
    # large P: the probes are drawn and applied a block at a time (here 3 columns of P = 40)
    from curvfx.estimators._probes import probes

    trace_module = sys.modules["curvfx.estimators.trace"]
    M = symmetric(40)
    real, seen = trace_module.products, []

    def spy(op, V, who):
        seen.append(V.shape[1])
        return real(op, V, who)

    monkeypatch.setattr(trace_module, "PROBE_NUMBERS", 3 * 40 + 7)
    monkeypatch.setattr(trace_module, "products", spy)
    estimate, std = trace(
        M, "hutchinson", num_samples=8, distribution=distribution, generator=gen(3), return_std=True
    )
    assert seen == [3, 3, 2]
    g = gen(3)
    blocks = [probes(40, k, distribution, g, DTYPE) for k in (3, 3, 2)]
    terms = torch.cat([(V * (M @ V)).sum(0) for V in blocks])
    torch.testing.assert_close(estimate, terms.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, terms.std() / math.sqrt(8), rtol=1e-12, atol=1e-12)


def test_standard_error_matches_the_spread_of_hutchinson():
    M = symmetric(40)
    # Var(ωᵀMω) = 2 (‖M‖_F² - Σ M_ii²) for Rademacher ω
    true_se = math.sqrt(2 * (M.square().sum() - M.diagonal().square().sum()) / 50)
    stds = [
        float(trace(M, "hutchinson", num_samples=50, generator=gen(s), return_std=True)[1]) for s in range(20)
    ]
    assert 0.8 * true_se < sum(stds) / len(stds) < 1.2 * true_se


def test_hutchpp_and_xtrace_beat_hutchinson_on_a_decaying_spectrum():
    M = decaying(100, 0.8)
    exact = float(torch.trace(M))

    def mean_error(method: str) -> float:
        errors = [abs(float(trace(M, method, num_samples=30, generator=gen(s))) - exact) for s in range(20)]
        return sum(errors) / len(errors)

    hutchinson, hutchpp, xtrace = (mean_error(m) for m in ("hutchinson", "hutch++", "xtrace"))
    assert hutchpp < 0.5 * hutchinson, (hutchpp, hutchinson)
    assert xtrace < hutchpp, (xtrace, hutchpp)


def test_trace_converges_within_a_budget():
    M = decaying(120, 0.7)
    exact = float(torch.trace(M))
    for method, budget in (("hutch++", 60), ("xtrace", 40)):
        estimate = float(trace(M, method, num_samples=budget, generator=gen(0)))
        assert abs(estimate - exact) / exact < 1e-3, method


def test_low_rank_is_exact_and_products_are_batched():
    G = torch.randn(60, 4, dtype=DTYPE, generator=gen(2))
    M = G @ G.T
    for method, m in (("hutch++", 15), ("xtrace", 10)):
        counted = Counting((M + M.T) / 2)
        estimate = trace(counted, method, num_samples=m, distribution="normal", generator=gen(1))
        torch.testing.assert_close(estimate, torch.trace(M))
        assert counted.num_calls == 2 and counted.num_products <= m
    counted = Counting(M)
    trace(counted, "hutchinson", num_samples=17, generator=gen(0))
    assert counted.num_calls == 1 and counted.num_products == 17


def test_trace_of_a_non_symmetric_matrix():
    N = torch.randn(50, 50, dtype=DTYPE, generator=gen(3)) + 5 * torch.eye(50, dtype=DTYPE)
    for method in ("hutchinson", "hutch++", "xtrace"):
        estimate, std = trace(N, method, num_samples=40, generator=gen(0), return_std=True)
        assert abs(float(estimate - torch.trace(N))) <= 4 * float(std)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_reproducible(method):
    M = symmetric(40)
    first = trace(M, method, num_samples=12, generator=gen(7), return_std=True)
    again = trace(M, method, num_samples=12, generator=gen(7), return_std=True)
    other = trace(M, method, num_samples=12, generator=gen(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other)
    torch.manual_seed(3)
    without = trace(M, method, num_samples=12)
    torch.manual_seed(3)
    assert torch.equal(without, trace(M, method, num_samples=12))


def test_trace_keeps_the_dtype():
    M = symmetric(20).float()
    assert trace(M, "hutch++", num_samples=9, generator=gen(0)).dtype == torch.float32
    assert diagonal(M, "xdiag", num_samples=8, generator=gen(0)).dtype == torch.float32


# ---------------------------------------------------------------------------------------
# stochastic diagonal


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_within_four_standard_errors(method):
    M = decaying(80, 0.9) + 0.1 * symmetric(80, 3)
    exact = torch.diagonal(M)
    for seed in range(3):
        estimate, std = diagonal(M, method, num_samples=40, generator=gen(seed), return_std=True)
        assert estimate.shape == std.shape == (80,)
        error = estimate - exact
        assert float(error.norm()) <= 4 * float(std.norm()), seed
        assert float((error.abs() > 4 * std).float().mean()) < 0.05, seed


@pytest.mark.parametrize("m", [4, 6])
def test_xtrace_and_xdiag_stay_unbiased_when_rademacher_sketch_columns_coincide(m):
    """blockdiag(ones(4, 4), 0): A ω is a multiple of one vector for every ±1 probe, so the
    sketch's columns coincide and leaving one out may remove nothing. The leave-one-out
    projectors then come from an SVD (before: XTrace's mean 4.38 for trace 4, z = 17)."""
    M = torch.block_diag(torch.ones(4, 4, dtype=DTYPE), torch.zeros(4, 4, dtype=DTYPE))
    draws = 1500
    traces = torch.stack([trace(M, "xtrace", num_samples=m, generator=gen(s)) for s in range(draws)])
    diagonals = torch.stack([diagonal(M, "xdiag", num_samples=m, generator=gen(s)) for s in range(draws)])
    se = traces.std() / draws**0.5
    assert abs(float(traces.mean()) - 4.0) <= 4 * float(se), (float(traces.mean()), float(se))
    se_diag = diagonals.std(0) / draws**0.5 + 1e-12
    assert bool(((diagonals.mean(0) - M.diagonal()).abs() <= 4.5 * se_diag).all())


def test_xdiag_beats_hutchinson_on_a_decaying_spectrum_and_is_exact_at_low_rank():
    M = decaying(100, 0.7)
    exact = torch.diagonal(M)

    def mean_error(method: str) -> float:
        errors = [
            float((diagonal(M, method, num_samples=40, generator=gen(s)) - exact).norm()) for s in range(10)
        ]
        return sum(errors) / len(errors)

    assert mean_error("xdiag") < 0.1 * mean_error("hutchinson")
    G = torch.randn(50, 3, dtype=DTYPE, generator=gen(0))
    N = G @ torch.randn(3, 50, dtype=DTYPE, generator=gen(1))  # rank 3, not symmetric
    estimate = diagonal(N, "xdiag", num_samples=8, distribution="normal", generator=gen(2))
    torch.testing.assert_close(estimate, torch.diagonal(N))


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_reproducible(method):
    M = symmetric(30)
    first = diagonal(M, method, num_samples=10, generator=gen(5))
    assert torch.equal(first, diagonal(M, method, num_samples=10, generator=gen(5)))
    assert not torch.equal(first, diagonal(M, method, num_samples=10, generator=gen(6)))


# ---------------------------------------------------------------------------------------
# eigsh


@pytest.mark.parametrize("make", [symmetric, psd], ids=["symmetric", "psd"])
def test_eigsh_matches_eigvalsh(make):
    M = make(60)
    truth = torch.linalg.eigvalsh(M)
    for which, expected in (("largest", truth.flip(0)[:3]), ("smallest", truth[:3])):
        values, vectors = eigsh(M, k=3, which=which, generator=gen(0))
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-8)
        assert vectors.shape == (60, 3)
        torch.testing.assert_close(M @ vectors, vectors * values, rtol=0, atol=1e-7)
        torch.testing.assert_close(vectors.T @ vectors, torch.eye(3, dtype=DTYPE), atol=1e-10, rtol=0)


def test_eigsh_stops_early_once_converged():
    eigenvalues = torch.cat([torch.tensor([50.0, 40.0, 30.0]), torch.rand(297, generator=gen(0))])
    counted = Counting(with_spectrum(eigenvalues))
    values = eigsh(counted, k=3, generator=gen(1), return_eigenvectors=False)
    torch.testing.assert_close(values, torch.tensor([50.0, 40.0, 30.0], dtype=DTYPE), rtol=1e-10, atol=0)
    assert counted.num_products < 40 and counted.num_calls == counted.num_products


def test_eigsh_finds_repeated_eigenvalues():
    M = torch.diag(torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0, 1.0, 0.5, 0.0], dtype=DTYPE))
    values, vectors = eigsh(M, k=4, generator=gen(0))
    torch.testing.assert_close(values, torch.tensor([5.0, 5.0, 5.0, 2.0], dtype=DTYPE))
    torch.testing.assert_close(M @ vectors, vectors * values, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        eigsh(torch.zeros(5, 5, dtype=DTYPE), k=2, generator=gen(0))[0], torch.zeros(2, dtype=DTYPE)
    )


@pytest.mark.parametrize("copies", [2, 3, 4])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigsh_finds_every_copy_of_a_repeated_eigenvalue_among_many_others(copies, which):
    """One start vector's Krylov space holds one direction per eigenspace: the other copies
    come from the runs on the complement of the pairs found (many distinct eigenvalues, so
    the first run does not exhaust its Krylov space before it converges)."""
    spectrum = torch.linspace(0.1, 4.9, 100, dtype=DTYPE)
    extreme = 5.0 if which == "largest" else 0.0
    spectrum[:copies] = extreme
    M = with_spectrum(spectrum)
    for seed in range(5):  # the copies' accuracy: about k · tol · ‖A‖ (tol = √ε)
        values, vectors = eigsh(M, k=copies, which=which, num_iters=100, generator=gen(seed))
        torch.testing.assert_close(values, torch.full((copies,), extreme, dtype=DTYPE), atol=2e-6, rtol=0)
        torch.testing.assert_close(M @ vectors, vectors * values, atol=2e-6, rtol=0)
        torch.testing.assert_close(vectors.T @ vectors, torch.eye(copies, dtype=DTYPE), atol=1e-8, rtol=0)
    ordered = spectrum.sort(descending=which == "largest").values  # k one past the copies
    values = eigsh(M, k=copies + 1, which=which, num_iters=100, generator=gen(0), return_eigenvectors=False)
    torch.testing.assert_close(values, ordered[: copies + 1], atol=2e-6, rtol=0)


def test_eigsh_warns_when_not_converged_and_is_reproducible():
    M = symmetric(200)
    with pytest.warns(RuntimeWarning, match="increase num_iters"):
        first = eigsh(M, k=2, num_iters=5, generator=gen(0), return_eigenvectors=False)
    with pytest.warns(RuntimeWarning):
        again = eigsh(M, k=2, num_iters=5, generator=gen(0), return_eigenvectors=False)
    assert torch.equal(first, again)


def test_eigsh_of_a_callable(float64_default):
    M = psd(40)
    values = eigsh(lambda v: M @ v, k=2, size=40, generator=gen(0), return_eigenvectors=False)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(M).flip(0)[:2], atol=1e-8, rtol=0)


def test_to_scipy_eigsh_agrees():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    M = psd(50)
    values = scipy_linalg.eigsh(DenseOperator(M).to_scipy(), k=3, which="LA")[0]
    torch.testing.assert_close(
        torch.from_numpy(values).sort(descending=True).values,
        eigsh(M, k=3, generator=gen(0), return_eigenvectors=False),
        atol=1e-8,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------
# spectral density


def test_spectral_density_quadrature():
    M = psd(100) + with_spectrum(torch.linspace(-2, 1, 100), 4)
    nodes, weights = spectral_density(M, num_probes=20, num_steps=30, generator=gen(0))
    assert nodes.shape == weights.shape == (20, 30)
    torch.testing.assert_close(weights.sum(1), torch.ones(20, dtype=DTYPE))
    truth = torch.linalg.eigvalsh(M)
    assert float(nodes.min()) >= float(truth[0]) - 1e-8 and float(nodes.max()) <= float(truth[-1]) + 1e-8
    # the mean Σ τ θ / B estimates tr(M)/P; Var(ωᵀMω) = 2 (‖M‖_F² - Σ M_ii²) (Rademacher)
    mean = float((weights * nodes).sum()) / 20
    se = math.sqrt(2 * (M.square().sum() - M.diagonal().square().sum()) / 20) / 100
    assert abs(mean - float(torch.trace(M)) / 100) <= 4 * se
    grid = torch.linspace(float(truth[0]) - 1, float(truth[-1]) + 1, 2001, dtype=DTYPE)
    phi = density(nodes, weights, grid, sigma=0.05)
    assert abs(float(torch.trapezoid(phi, grid)) - 1) < 1e-6 and bool((phi >= 0).all())


def test_spectral_density_with_a_full_krylov_space_finds_the_eigenvalues():
    M = torch.diag(torch.tensor([3.0, 1.0, 1.0, -2.0], dtype=DTYPE))
    nodes, weights = spectral_density(M, num_probes=2, num_steps=4, generator=gen(0))
    for row_nodes, row_weights in zip(nodes, weights):  # exhausted after 3 steps: a restart
        support = row_nodes[row_weights > 1e-12]
        torch.testing.assert_close(support.sort().values, torch.tensor([-2.0, 1.0, 3.0], dtype=DTYPE))
        torch.testing.assert_close(row_weights.sum(), torch.tensor(1.0, dtype=DTYPE))
    first = spectral_density(M, num_probes=2, num_steps=4, generator=gen(0))
    assert torch.equal(first[0], nodes) and torch.equal(first[1], weights)


# ---------------------------------------------------------------------------------------
# cg


def test_cg_solves_the_damped_system():
    M = psd(80)
    b = torch.randn(80, dtype=DTYPE, generator=gen(0))
    for damping in (0.0, 0.3):
        x, info = cg(M, b, damping=damping, tol=1e-10)
        assert isinstance(info, CGInfo) and info.converged and 0 < info.num_iters <= 80
        residual = torch.linalg.vector_norm(b - M @ x - damping * x)
        assert float(residual) <= 1e-10 * float(b.norm()) * 1.01
        assert math.isclose(info.residual_norm, float(residual), rel_tol=1e-3, abs_tol=1e-13)
    x, info = cg(M, b, damping=0.3, tol=1e-10, x0=x)  # a warm start that is the answer
    assert info.converged and info.num_iters <= 2
    x, info = cg(M, torch.zeros(80, dtype=DTYPE))
    assert info.converged and info.num_iters == 0 and float(x.abs().max()) == 0


def test_cg_takes_and_returns_pytrees():
    like = {"w": torch.zeros(3, 4, dtype=DTYPE), "b": torch.zeros(4, dtype=DTYPE)}
    op = DenseOperator(psd(16))
    op.in_like = like
    b = {"w": torch.randn(3, 4, dtype=DTYPE, generator=gen(0)), "b": torch.ones(4, dtype=DTYPE)}
    x, info = cg(op, b, tol=1e-12)
    assert set(x) == {"w", "b"} and x["w"].shape == (3, 4) and info.converged
    b_flat = torch.cat([b["w"].reshape(-1), b["b"]])
    x_flat = torch.cat([x["w"].reshape(-1), x["b"]])
    torch.testing.assert_close(op.matrix @ x_flat, b_flat)
    with pytest.raises(ValueError, match=r"b\['w'\]: shape \[4, 3\]"):
        cg(op, {"w": torch.zeros(4, 3, dtype=DTYPE), "b": torch.zeros(4, dtype=DTYPE)})
    with pytest.raises(TypeError, match="pass a flat tensor"):
        cg(psd(16), b)


def test_cg_jacobi_preconditioner_needs_fewer_iterations():
    scales = 10.0 ** torch.linspace(-3, 3, 100, dtype=DTYPE)
    S = torch.diag(scales.sqrt())
    M = S @ (psd(100) + 5 * torch.eye(100, dtype=DTYPE)) @ S  # badly scaled, diagonally dominant
    M = (M + M.T) / 2
    b = torch.randn(100, dtype=DTYPE, generator=gen(1))
    _, plain = cg(M, b, tol=1e-8, maxiter=2000)
    x, jacobi = cg(M, b, tol=1e-8, preconditioner=diagonal(M))
    assert jacobi.converged and jacobi.num_iters < plain.num_iters / 3, (jacobi, plain)
    assert float((b - M @ x).norm()) <= 1.01e-8 * float(b.norm())
    _, as_callable = cg(M, b, tol=1e-8, preconditioner=lambda r: r / torch.diagonal(M))
    assert as_callable.num_iters == jacobi.num_iters


def test_cg_stops_on_negative_curvature():
    M = torch.diag(torch.tensor([1.0, 2.0, -3.0], dtype=DTYPE))
    x, info = cg(M, torch.ones(3, dtype=DTYPE))
    assert not info.converged and info.num_iters < 3 and bool(x.isfinite().all())
    _, info = cg(M, torch.ones(3, dtype=DTYPE), damping=4.0, tol=1e-12)  # damped: PD
    assert info.converged


def test_cg_with_a_zero_right_hand_side_returns_zero_whatever_x0():
    x, info = cg(2 * torch.eye(3, dtype=DTYPE), torch.zeros(3, dtype=DTYPE), x0=torch.ones(3, dtype=DTYPE))
    assert torch.equal(x, torch.zeros(3, dtype=DTYPE)) and info.converged and info.num_iters == 0


def test_cg_reports_the_true_residual_in_float32():
    """The recursive residual drifts in float32; converged and residual_norm use b - (A + λI) x."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    A64 = Q @ torch.diag(torch.logspace(-3, 3, 300, dtype=torch.float64)) @ Q.T
    A, b = A64.float(), torch.randn(300, generator=g).float()
    for tol in (1e-6, 1e-8):
        x, info = cg(A, b, damping=1e-3, tol=tol, maxiter=2000)
        true = float(
            torch.linalg.vector_norm(
                b.double() - (A64 + 1e-3 * torch.eye(300, dtype=torch.float64)) @ x.double()
            )
        )
        assert info.residual_norm == pytest.approx(true, rel=0.05)
        assert info.converged == (info.residual_norm <= tol * float(torch.linalg.vector_norm(b)))
    assert not info.converged  # 1e-8 is below float32's reach here: reported, not claimed


def test_cg_maxiter():
    M = psd(50)
    _, info = cg(M, torch.ones(50, dtype=DTYPE), tol=1e-14, maxiter=3)
    assert not info.converged and info.num_iters == 3


# ---------------------------------------------------------------------------------------
# progress bars


class FakeBar:
    instances: ClassVar[list] = []

    def __init__(self, total=None, desc="", unit=""):
        self.total, self.n = total, 0
        FakeBar.instances.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s=""):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_progress_bar_counts_products(monkeypatch):
    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = FakeBar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    FakeBar.instances = []
    M = psd(30)
    trace(M, "hutch++", num_samples=12, generator=gen(0), progress=True)
    diagonal(Counting(M), progress=True)
    eigsh(M, k=1, num_iters=10, tol=0.1, generator=gen(0), progress=True)
    cg(M, torch.ones(30, dtype=DTYPE), progress=True)
    spectral_density(M, num_probes=2, num_steps=5, generator=gen(0), progress=True)
    counts = [(bar.total, bar.n) for bar in FakeBar.instances]
    assert counts[:2] == [(12, 12), (30, 30)] and counts[4] == (5, 5)
    assert counts[2][0] == 10 and 0 < counts[2][1] <= 10  # eigsh: steps done
    assert counts[3][0] == 300 and counts[3][1] > 0  # cg: iterations of at most 10 P


def test_progress_without_tqdm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"pip install 'curvfx\[progress\]'"):
        trace(psd(5), "hutchinson", num_samples=2, generator=gen(0), progress=True)


# ---------------------------------------------------------------------------------------
# bad input


def test_unknown_names():
    M = psd(10)
    with pytest.raises(ValueError, match=r"method: expected one of .*got 'hutch'"):
        trace(M, "hutch")
    with pytest.raises(ValueError, match=r"method: .*got 'xtrace'"):
        diagonal(M, "xtrace")
    with pytest.raises(ValueError, match=r"distribution: .*got 'gauss'"):
        trace(M, "hutchinson", distribution="gauss", generator=gen(0))
    with pytest.raises(ValueError, match="distribution"):
        spectral_density(M, distribution="uniform", generator=gen(0))
    with pytest.raises(ValueError, match="which: expected 'largest' or 'smallest', got 'LM'"):
        eigsh(M, which="LM")


def test_bad_counts():
    M = psd(10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            trace(M, "hutchinson", num_samples=bad)
    with pytest.raises(ValueError, match="num_samples: expected an int >= 3"):
        trace(M, "hutch++", num_samples=2)
    with pytest.raises(ValueError, match="even m"):
        trace(M, "xtrace", num_samples=5)
    with pytest.raises(ValueError, match="m/2 <= P = 10"):
        diagonal(M, "xdiag", num_samples=22)
    with pytest.raises(ValueError, match=r"return_std=True needs .* >= 2"):
        trace(M, "hutchinson", num_samples=1, return_std=True)
    with pytest.raises(ValueError, match=r"k: expected an int with 1 <= k <= P = 10, got 11"):
        eigsh(M, k=11)
    with pytest.raises(ValueError, match="k: "):
        eigsh(M, k=0)
    with pytest.raises(ValueError, match="num_iters: at most P = 10"):
        eigsh(M, k=1, num_iters=11)
    with pytest.raises(ValueError, match="num_steps: at most P = 10"):
        spectral_density(M, num_steps=11)
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(M, num_probes=0)
    with pytest.raises(ValueError, match="sigma"):
        density(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(5), sigma=0)
    with pytest.raises(ValueError, match="damping"):
        cg(M, torch.ones(10, dtype=DTYPE), damping=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        cg(M, torch.ones(10, dtype=DTYPE), maxiter=-1)


def test_non_finite_products():
    def nan_product(v):
        return torch.full_like(v, float("nan"))

    op = FunctionOperator(nan_product, 8, dtype=DTYPE)
    b = torch.ones(8, dtype=DTYPE)
    calls = [
        lambda: trace(op, "hutchinson", num_samples=4, generator=gen(0)),
        lambda: trace(op, "hutch++", num_samples=6, generator=gen(0)),
        lambda: trace(op, "xtrace", num_samples=4, generator=gen(0)),
        lambda: trace(op),
        lambda: diagonal(op, "xdiag", num_samples=4, generator=gen(0)),
        lambda: eigsh(op, generator=gen(0)),
        lambda: spectral_density(op, num_steps=3, generator=gen(0)),
        lambda: cg(op, b),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="non-finite"):
            call()
    with pytest.raises(ValueError, match="b: has non-finite"):
        cg(psd(3), torch.tensor([1.0, float("inf"), 0.0], dtype=DTYPE))


def test_bad_operators_and_vectors():
    with pytest.raises(ValueError, match="size: required"):
        trace(lambda v: v, "hutchinson")
    with pytest.raises(ValueError, match="size: required"):
        eigsh(lambda v: v)
    with pytest.raises(TypeError, match="A: expected a LinearOperator"):
        diagonal([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"square matrix \[P, P\]"):
        trace(torch.zeros(3, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match="must be square"):
        diagonal(DenseOperator(torch.zeros(3, 4, dtype=DTYPE)))
    N = torch.randn(6, 6, dtype=DTYPE, generator=gen(0))
    for call in (lambda: eigsh(N), lambda: cg(N, torch.ones(6, dtype=DTYPE)), lambda: spectral_density(N)):
        with pytest.raises(ValueError, match=r"must be symmetric.*DenseOperator"):
            call()
    with pytest.raises(ValueError, match=r"expected a flat vector \[6\]"):
        cg(psd(6), torch.ones(5, dtype=DTYPE))
    with pytest.raises(ValueError, match="dtype/device"):
        cg(psd(6), torch.ones(6))
    with pytest.raises(ValueError, match="preconditioner: the diagonal must be finite and positive"):
        cg(psd(6), torch.ones(6, dtype=DTYPE), preconditioner=torch.zeros(6, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"preconditioner: a diagonal must be \[P\] = \[6\]"):
        cg(psd(6), torch.ones(6, dtype=DTYPE), preconditioner=torch.ones(5, dtype=DTYPE))
    with pytest.raises(TypeError, match=r"generator: expected a torch.Generator"):
        trace(psd(6), "hutchinson", generator=0)
    with pytest.raises(ValueError, match=r"A V returned a tensor of shape \[3, 2\]"):
        trace(FunctionOperator(lambda v: v[:3], 6, dtype=DTYPE), "hutchinson", num_samples=2)


# ---------------------------------------------------------------------------------------
# reported standard errors of hutch++, xtrace, xdiag against the spread over seeds


def test_reported_standard_errors_match_the_spread_over_seeds():
    """Mean reported std over 100 seeds against the empirical std of the 100 estimates.

    On this indefinite, slowly decaying spectrum (m = 12) the ratios are 0.91 (hutch++),
    0.84 (xtrace: its leave-one-out estimates are positively correlated, so the std of their
    mean is a slight underestimate) and 0.87 (xdiag, norm over the entries; each entry
    0.71-1.07) for seeds 0-99; over six blocks of 50 seeds they ranged over 0.72-1.0 and
    0.77-0.88 (xdiag). The empirical std of 100 estimates has a relative standard error of
    about 1/√(2·99) ≈ 7%. Bounds [0.6, 1.6] (entries [0.4, 2.5]): a standard error off by
    2× fails, ×0.1 and ×10 by far.
    """
    M = with_spectrum(torch.linspace(-1, 3, 40), 5)
    seeds = range(100)
    for method in ("hutch++", "xtrace"):
        estimates, stds = (
            torch.stack(t)
            for t in zip(
                *[trace(M, method, num_samples=12, generator=gen(s), return_std=True) for s in seeds]
            )
        )
        ratio = float(stds.mean() / estimates.std())
        assert 0.6 < ratio < 1.6, (method, ratio)
    estimates, stds = (
        torch.stack(t)
        for t in zip(
            *[diagonal(M, "xdiag", num_samples=12, generator=gen(s), return_std=True) for s in seeds]
        )
    )
    spread = estimates.std(0)
    ratio = float(stds.mean(0).norm() / spread.norm())
    assert 0.6 < ratio < 1.6, ("xdiag", ratio)
    per_entry = stds.mean(0) / spread
    assert 0.4 < float(per_entry.min()) and float(per_entry.max()) < 2.5, per_entry


# ---------------------------------------------------------------------------------------
# density: the Gaussian kernel, the mixture, its moments


def _normal_pdf(x: torch.Tensor, mean: float, sigma: float) -> torch.Tensor:
    return torch.exp(-((x - mean) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))


def test_density_of_one_node_is_the_normal_pdf():
    grid = torch.linspace(-3, 5, 161, dtype=DTYPE)
    for nodes, weights in (
        (torch.tensor([[0.7]], dtype=DTYPE), torch.tensor([[1.0]], dtype=DTYPE)),
        (torch.tensor([0.7], dtype=DTYPE), torch.tensor([1.0], dtype=DTYPE)),  # [m]: one probe
    ):
        for sigma in (0.3, 1.7):
            phi = density(nodes, weights, grid, sigma=sigma)
            torch.testing.assert_close(phi, _normal_pdf(grid, 0.7, sigma), rtol=1e-12, atol=0)


def test_density_is_the_weighted_mixture_with_the_right_moments():
    """(1/B) Σ_l Σ_i τ_li N(θ_li, σ²) on a grid; its mean and variance by quadrature on a wide
    grid are μ = (1/B) Σ τθ and (1/B) Σ τθ² − μ² + σ²."""
    nodes = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, 3.5]], dtype=DTYPE)
    weights = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=DTYPE)  # rows sum to 1
    sigma = 0.4
    grid = torch.linspace(-4, 6, 201, dtype=DTYPE)
    expected = (
        sum(weights[b, i] * _normal_pdf(grid, float(nodes[b, i]), sigma) for b in range(2) for i in range(3))
        / 2
    )
    torch.testing.assert_close(density(nodes, weights, grid, sigma=sigma), expected, rtol=1e-12, atol=0)
    wide = torch.linspace(-12, 14, 26001, dtype=DTYPE)  # ±8σ beyond the nodes; trapezoid is exact to ~1e-12
    phi = density(nodes, weights, wide, sigma=sigma)
    mass = float(torch.trapezoid(phi, wide))
    mean = float(torch.trapezoid(wide * phi, wide))
    second = float(torch.trapezoid(wide**2 * phi, wide))
    mu = float((weights * nodes).sum() / 2)
    assert mass == pytest.approx(1.0, abs=1e-10)
    assert mean == pytest.approx(mu, abs=1e-10)
    variance = float((weights * nodes**2).sum() / 2) - mu**2 + sigma**2
    assert second - mean**2 == pytest.approx(variance, rel=1e-9)


# ---------------------------------------------------------------------------------------
# spectral_density: Gauss quadrature weights


def test_spectral_density_weights_of_a_diagonal_matrix_with_a_full_krylov_space():
    """diag(3, 1, 1, −2), q = ω/‖ω‖ with ω Rademacher: τ = (qᵀe_j)² = 1/4 per eigenvector, so
    the nodes −2, 1, 3 carry 1/4, 1/2 (two eigenvectors), 1/4; the restart node, weight 0.
    Weights are summed per distinct node (the eigenvalue 1 appears twice in T)."""
    M = torch.diag(torch.tensor([3.0, 1.0, 1.0, -2.0], dtype=DTYPE))
    nodes, weights = spectral_density(M, num_probes=3, num_steps=4, generator=gen(0))
    for row_nodes, row_weights in zip(nodes, weights):
        distinct = torch.tensor([-2.0, 1.0, 3.0], dtype=DTYPE)
        near = (row_nodes[:, None] - distinct).abs() < 1e-8  # [m, 3]
        assert bool(near.any(1).all()), row_nodes  # every node is an eigenvalue
        mass = (row_weights[:, None] * near).sum(0)
        torch.testing.assert_close(mass, torch.tensor([0.25, 0.5, 0.25], dtype=DTYPE), rtol=0, atol=1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_spectral_density_is_gauss_quadrature_for_the_drawn_probes(distribution):
    """Σ_i τ_li θ_li^k = q_lᵀ A^k q_l / ‖q_l‖² for k < 2m, not for k = 2m.

    The probes are the first draw of the generator (``probes(P, B, distribution, g)``): the
    same seed reproduces them. A is scaled to ‖A‖₂ ≈ 1 so that the moments stay O(1)."""
    P, B, m = 30, 3, 5
    A = symmetric(P, 7) / math.sqrt(P)
    nodes, weights = spectral_density(
        A, num_probes=B, num_steps=m, distribution=distribution, generator=gen(4)
    )
    Q = probes(P, B, distribution, gen(4), DTYPE)
    Q = Q / Q.norm(dim=0)
    AkQ = Q.clone()
    for k in range(2 * m + 1):
        exact = (Q * AkQ).sum(0)  # q_lᵀ A^k q_l
        quadrature = (weights * nodes**k).sum(1)
        if k < 2 * m:
            torch.testing.assert_close(quadrature, exact, rtol=0, atol=1e-11)
        else:  # degree 2m: Gauss quadrature underestimates the even moment by a clear amount
            assert bool((exact - quadrature > 1e-6).all()), (exact, quadrature)
        AkQ = A @ AkQ


# ---------------------------------------------------------------------------------------
# layer_curvature with a stochastic trace


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_layer_curvature_hutchinson_traces_within_four_standard_errors(kind):
    """Per-layer Hutchinson traces against the traces of the dense blocks.

    Truths over the flat parameters, blocks by index: torch.autograd.functional.hessian for
    the Hessian, Jᵀ(∇²_f L)J with J from jacrev for the GGN. The standard error of m
    Rademacher probes is √(2(‖A_l‖²_F − Σ_i (A_l)_ii²)/m), computed from the dense block
    (layer_curvature returns no std); every |tr(A_l)| exceeds 6 of them, so a wrong block or
    a scale error of 2× fails.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = gen(1)
    X = torch.randn(16, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (16,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    named = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def outputs(theta):
        params, i = {}, 0
        for k, p in named.items():
            params[k] = theta[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.func.functional_call(model, params, (X,))

    if kind == "hessian":
        A = torch.autograd.functional.hessian(lambda t: loss_fn(outputs(t), y), flat)
        op = curvfx.hessian(model, loss_fn, (X, y))
    else:
        J = torch.func.jacrev(lambda t: outputs(t).reshape(-1))(flat)
        f = outputs(flat).detach()
        H_f = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(f.shape), y), f.reshape(-1))
        A = J.T @ H_f @ J
        op = curvfx.ggn(model, loss_fn, (X, y))
    m = 1000
    result = curvfx.layer_curvature(op, trace_method="hutchinson", num_samples=m, generator=gen(2))
    assert list(result) == ["0", "2"]
    start = 0
    for layer, info in result.items():
        size = named[f"{layer}.weight"].numel() + named[f"{layer}.bias"].numel()
        block = A[start : start + size, start : start + size]
        start += size
        se = math.sqrt(2 * float(block.square().sum() - block.diagonal().square().sum()) / m)
        exact = float(block.trace())
        assert info.num_params == size
        assert abs(exact) > 6 * se, (layer, exact, se)  # the bound below can see a 2× error
        assert abs(float(info.trace) - exact) <= 4 * se, (layer, float(info.trace), exact, se)
        assert abs(float(info.trace) - exact) > 1e-9 * se  # estimated (random), not the exact trace


def test_sixteen_bit_operators_run_every_estimator_in_float32():
    """QR, eigh and SVD have no 16-bit kernels: the estimators keep float32 vectors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    G64 = curvfx.ggn(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), (x.double(), y)).to_dense()
    G16 = curvfx.ggn(copy.deepcopy(model).bfloat16(), nn.CrossEntropyLoss(), (x.bfloat16(), y))
    top = float(torch.linalg.eigvalsh(G64)[-1])
    assert float(curvfx.eigsh(G16, k=1, generator=gen(0))[0][0]) == pytest.approx(top, rel=3e-2)
    P = G64.shape[0]
    for method in ("hutch++", "xtrace"):
        assert float(trace(G16, method, num_samples=2 * (P // 2), generator=gen(1))) == pytest.approx(
            float(G64.trace()), rel=3e-2
        )
    d = diagonal(G16, "xdiag", num_samples=2 * (P // 2), generator=gen(2))
    assert float((d.double() - G64.diagonal()).norm() / G64.diagonal().norm()) < 5e-2
    nodes, weights = spectral_density(G16, num_probes=2, num_steps=10, generator=gen(3))
    assert nodes.dtype == torch.float32 and float(weights.sum(1).min()) == pytest.approx(1.0, rel=1e-5)
    K = curvfx.kfac(copy.deepcopy(model).bfloat16(), nn.CrossEntropyLoss(), (x.bfloat16(), y))
    K64 = curvfx.kfac(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), (x.double(), y))
    assert float(K.logdet(damping=0.1)) == pytest.approx(float(K64.logdet(damping=0.1)), rel=3e-2)


def test_cg_callback_sees_every_iterate_and_restarts_stop_when_they_stall():
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=DTYPE))
    M = Q @ torch.diag(torch.logspace(0, 2, 60, dtype=DTYPE)) @ Q.T
    M = (M + M.T) / 2
    b = torch.randn(60, generator=g, dtype=DTYPE)
    seen = []
    x, info = cg(M, b, tol=1e-10, callback=lambda t, xt: seen.append((t, xt)))
    assert [t for t, _ in seen] == list(range(1, info.num_iters + 1))
    for t, xt in seen[:: max(1, len(seen) // 5)]:  # x_t of the run = a run stopped after t iterations
        alone, _ = cg(M, b, tol=1e-300, maxiter=t)
        assert float((xt - alone).norm() / alone.norm()) < 1e-10
    assert torch.equal(seen[-1][1], x)
    # float32 beyond its reach: restarts stop once one no longer halves the true residual
    Q32, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=DTYPE))
    A = (Q32 @ torch.diag(torch.logspace(0, 4, 300, dtype=DTYPE)) @ Q32.T).float()
    A = (A + A.T) / 2
    _, info = cg(A, torch.randn(300, generator=g).float(), tol=1e-6, maxiter=3000)
    assert not info.converged and info.num_iters < 1500
