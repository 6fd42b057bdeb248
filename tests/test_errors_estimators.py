"""Bad input to the estimators, optimizers, the CLI and ravel/unravel: errors naming the argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvfx
import curvfx.__main__ as cli
from curvfx.estimators import cg, density, diagonal, eigsh, layer_curvature, probes, spectral_density, trace
from curvfx.operators import FunctionOperator, LinearOperator
from curvfx.optim import AdaHessian, GaussNewton, HessianFree, LevenbergMarquardt

DTYPE = torch.float64
BAD_TOLERANCES = ["abc", float("inf"), float("nan"), True, 0.0, -1e-3, None]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(P: int = 6) -> torch.Tensor:
    """A symmetric positive definite matrix with eigenvalues 1, ..., P."""
    U, _ = torch.linalg.qr(torch.randn(P, P, dtype=DTYPE, generator=gen(0)))
    M = U @ torch.diag(torch.arange(1.0, P + 1, dtype=DTYPE)) @ U.T
    return (M + M.T) / 2


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=DTYPE, generator=gen(1))
    y = torch.randint(0, 2, (5,), generator=gen(2))
    return model, X, y


# ---------------------------------------------------------------------------------------
# 1. tolerances, damping, callback, preconditioner


@pytest.mark.parametrize("tol", BAD_TOLERANCES[:-1], ids=repr)
def test_eigsh_tol_must_be_a_finite_positive_float(tol):
    with pytest.raises(ValueError, match=r"^tol: expected a finite float > 0"):
        eigsh(spd(), k=2, tol=tol, generator=gen())


def test_eigsh_tol_none_keeps_the_default():
    values = eigsh(spd(), k=2, tol=None, generator=gen(), return_eigenvectors=False)
    torch.testing.assert_close(values, torch.tensor([6.0, 5.0], dtype=DTYPE), rtol=0, atol=1e-8)


@pytest.mark.parametrize("tol", BAD_TOLERANCES, ids=repr)
def test_cg_tol_must_be_a_finite_positive_float(tol):
    with pytest.raises(ValueError, match=r"^tol: expected a finite float > 0"):
        cg(spd(), torch.ones(6, dtype=DTYPE), tol=tol)


@pytest.mark.parametrize("damping", [True, "0.1", float("inf"), float("nan"), -1.0], ids=repr)
def test_cg_damping_must_be_a_finite_float(damping):
    with pytest.raises(ValueError, match=r"^damping: expected a finite float >= 0"):
        cg(spd(), torch.ones(6, dtype=DTYPE), damping=damping)


def test_cg_callback_must_be_callable():
    with pytest.raises(TypeError, match=r"^callback: expected a callable"):
        cg(spd(), torch.ones(6, dtype=DTYPE), callback=3)


def test_cg_preconditioner_must_return_the_dtype_of_b():
    with pytest.raises(ValueError, match=r"^preconditioner: must return the dtype/device of b"):
        cg(spd(), torch.ones(6, dtype=DTYPE), preconditioner=lambda r: r.float())


@pytest.mark.parametrize("optimizer", [GaussNewton, LevenbergMarquardt])
@pytest.mark.parametrize("cg_tol", BAD_TOLERANCES[:-1], ids=repr)
def test_least_squares_cg_tol_must_be_a_finite_positive_float(optimizer, cg_tol):
    w = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match=r"^cg_tol: expected a finite float > 0"):
        optimizer([w], solver="cg", cg_tol=cg_tol)
    optimizer([w], solver="cg", cg_tol=None)  # None: the default


# ---------------------------------------------------------------------------------------
# 2. bool flags


@pytest.mark.parametrize("flag", ["False", "no", 0, 1, None])
def test_bool_flags_refuse_other_types(flag):
    M = spd()
    calls = {
        "return_std": [
            lambda: trace(M, "hutchinson", num_samples=4, generator=gen(), return_std=flag),
            lambda: diagonal(M, return_std=flag),
        ],
        "return_eigenvectors": [lambda: eigsh(M, generator=gen(), return_eigenvectors=flag)],
        "progress": [
            lambda: trace(M, "hutchinson", num_samples=4, generator=gen(), progress=flag),
            lambda: diagonal(M, progress=flag),
            lambda: eigsh(M, generator=gen(), progress=flag),
            lambda: spectral_density(M, num_probes=2, num_steps=3, generator=gen(), progress=flag),
            lambda: cg(M, torch.ones(6, dtype=DTYPE), progress=flag),
        ],
    }
    for name, group in calls.items():
        for call in group:
            with pytest.raises(TypeError, match=rf"^{name}: expected a bool"):
                call()


# ---------------------------------------------------------------------------------------
# 3. arguments that were silently ignored


def test_size_must_agree_with_an_operator_or_tensor():
    model, X, y = problem()
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match=r"^size: given as 3 but A \(GGNOperator\) has size P = 26"):
        trace(G, size=3)
    with pytest.raises(ValueError, match=r"^size: given as 7 .* P = 4"):
        diagonal(torch.eye(4, dtype=DTYPE), size=7)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match=r"^size: expected an int"):
            trace(lambda v: v, "hutchinson", size=bad)
    M = spd()
    torch.testing.assert_close(trace(M, size=6), torch.trace(M))  # agreeing: accepted


@pytest.mark.parametrize("estimator", [trace, diagonal])
@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_distribution_and_generator_are_checked_for_every_method(estimator, method):
    M = spd()
    with pytest.raises(ValueError, match=r"^distribution: expected one of .*got 'bogus'"):
        estimator(M, method, num_samples=4, distribution="bogus", generator=gen())
    with pytest.raises(TypeError, match=r"^generator: expected a torch.Generator"):
        estimator(M, method, num_samples=4, generator=0)


def test_layer_curvature_checks_num_samples_and_names_trace_method():
    model, X, y = problem()
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match=r"^num_samples: expected an int >= 1, got 0"):
        layer_curvature(G, num_samples=0, generator=gen())
    with pytest.raises(ValueError, match=r"^trace_method: expected one of .*got 'x'"):
        layer_curvature(G, trace_method="x")


# ---------------------------------------------------------------------------------------
# 4. operators the estimators cannot use


class _WrongDtype(LinearOperator):
    """A 4 × 4 float64 operator whose products come back in float32."""

    symmetric = True

    def __init__(self):
        self.shape, self.dtype, self.device = (4, 4), DTYPE, torch.device("cpu")

    def _matvec(self, v):
        return (2 * v).float()

    def _matmat(self, V):
        return (2 * V).float()


def test_integer_and_empty_operators_are_refused():
    ints = torch.eye(3, dtype=torch.int64)
    for call in (lambda: trace(ints, "hutchinson"), lambda: eigsh(ints), lambda: diagonal(ints)):
        with pytest.raises(ValueError, match=r"A: expected a floating-point operator, got dtype torch.int64"):
            call()
    empty = torch.zeros(0, 0, dtype=DTYPE)
    for call in (lambda: trace(empty), lambda: trace(empty, "hutchinson"), lambda: cg(empty, torch.ones(0))):
        with pytest.raises(ValueError, match=r"A: size P must be ≥ 1"):
            call()


def test_products_of_another_dtype_are_refused():
    with pytest.raises(ValueError, match=r"A: the product A V returned dtype torch.float32"):
        trace(_WrongDtype(), "hutchinson", num_samples=2, generator=gen())
    with pytest.raises(ValueError, match=r"A: the product A v returned dtype torch.float32"):
        cg(_WrongDtype(), torch.ones(4, dtype=DTYPE))
    # a callable taken in the default dtype (float32) returning float64
    with pytest.raises(ValueError, match=r"returned .*float64"):
        trace(lambda w: w.double() * 2, "hutchinson", size=4, generator=gen())
    with pytest.raises(ValueError, match=r"returned .*shape \[3"):
        trace(FunctionOperator(lambda w: w[:3], 6, dtype=DTYPE), "hutchinson", num_samples=2, generator=gen())


def test_probes_dtype_and_device_are_checked():
    with pytest.raises(TypeError, match=r"^dtype: expected a floating torch.dtype"):
        probes(3, 2, dtype="float64")
    with pytest.raises(TypeError, match=r"^dtype: "):
        probes(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^device: "):
        probes(3, 2, dtype=DTYPE, device="nope")
    assert probes(3, 2, generator=gen(), dtype=DTYPE).dtype == DTYPE


# ---------------------------------------------------------------------------------------
# 5. density


def test_density_nodes_and_sigma():
    grid = torch.linspace(0, 2, 5, dtype=DTYPE)
    ones = torch.ones(1, 1, dtype=DTYPE)
    with pytest.raises(TypeError, match=r"^nodes: expected a floating-point tensor, got list"):
        density([[0.0]], ones, grid, 0.1)
    with pytest.raises(TypeError, match=r"^nodes: expected a floating-point tensor"):
        density(torch.ones(1, 1, dtype=torch.int64), ones, grid, 0.1)
    for shape in ((2, 0), (0, 2), (0,), (1, 1, 1)):
        with pytest.raises(ValueError, match=r"^nodes: expected a tensor \[B, m\]"):
            density(torch.zeros(shape, dtype=DTYPE), torch.zeros(shape, dtype=DTYPE), grid, 0.1)
    with pytest.raises(ValueError, match=r"^weights: expected the shape of nodes"):
        density(ones, torch.ones(1, 2, dtype=DTYPE), grid, 0.1)
    for sigma in (float("inf"), float("nan"), True, "0.1", 0.0, -1.0):
        with pytest.raises(ValueError, match=r"^sigma: expected a finite float > 0"):
            density(ones, ones, grid, sigma)


# ---------------------------------------------------------------------------------------
# 6. optimizers: unused num_samples, batches checked by the loss


def test_num_samples_that_nothing_draws_is_refused():
    model, _, _ = problem()
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"^num_samples: only curvature='mc_fisher' draws samples, got 5"):
        HessianFree(model.parameters(), model=model, loss_fn=ce, num_samples=5)
    with pytest.raises(ValueError, match=r"^num_samples: only method=.* draws samples, got 7"):
        AdaHessian(model.parameters(), model=model, loss_fn=ce, method="exact", num_samples=7)
    # where samples are drawn, num_samples is accepted
    HessianFree(model.parameters(), model=model, loss_fn=ce, curvature="mc_fisher", num_samples=3)
    AdaHessian(
        model.parameters(), model=model, loss_fn=ce, method="exact", curvature="mc_fisher", num_samples=3
    )
    AdaHessian(model.parameters(), model=model, loss_fn=ce, method="hutchinson", num_samples=3)


@pytest.mark.parametrize("optimizer", [HessianFree, AdaHessian])
def test_step_checks_the_batch_with_the_loss(optimizer):
    model, X, y = problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = optimizer(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), generator=gen())
    with pytest.raises(ValueError, match=r"^targets: .*class indices in \[0, C = 2\)"):
        opt.step((X, y + 5))
    with pytest.raises(ValueError, match=r"^targets: .*shape \[5\], got \[3\]"):
        opt.step((X, y[:3]))
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)  # nothing was updated


def test_loss_at_checks_the_batch_with_the_loss():
    model, X, y = problem()
    opt = HessianFree(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"^targets: "):
        opt.loss_at((X, y + 5))


# ---------------------------------------------------------------------------------------
# 7. command line


@pytest.mark.parametrize(
    "option, value",
    [
        ("--samples", "0"),
        ("--steps", "-3"),
        ("--batch-size", "0"),
        ("--batch-size", "-4"),
        ("--threads", "-1"),
        ("--threads", "0"),
        ("--device", "nope"),
    ],
)
def test_cli_options_out_of_range_are_usage_errors(capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "--no-progress", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------
# 8. ravel / unravel


def test_unravel_checks_flat():
    like = {"a": torch.ones(2, dtype=DTYPE), "b": torch.ones(1, 3, dtype=DTYPE)}
    with pytest.raises(ValueError, match=r"^flat: expected a vector \[P\] = \[5\], got shape \[5, 1\]"):
        curvfx.unravel(torch.ones(5, 1, dtype=DTYPE), like)
    with pytest.raises(ValueError, match=r"^flat: expected a vector \[P\] = \[5\], got shape \[6\]"):
        curvfx.unravel(torch.ones(6, dtype=DTYPE), like)
    assert curvfx.unravel(torch.ones(5), like)["a"].dtype == torch.float32  # flat's dtype kept
    with pytest.raises(TypeError, match=r"^flat: expected a tensor"):
        curvfx.unravel([1.0] * 5, like)
    tree = curvfx.unravel(torch.arange(5, dtype=DTYPE), like)
    torch.testing.assert_close(tree["b"], torch.tensor([[2.0, 3.0, 4.0]], dtype=DTYPE))


def test_ravel_checks_the_leaves():
    with pytest.raises(TypeError, match=r"^tree: expected a pytree of tensors, got a leaf of type float"):
        curvfx.ravel([1.0, 2.0])
    with pytest.raises(ValueError, match=r"^tree: the leaves must share one dtype"):
        curvfx.ravel({"a": torch.ones(2), "b": torch.ones(2, dtype=DTYPE)})
    with pytest.raises(ValueError, match=r"^like: the leaves must share one dtype"):
        curvfx.unravel(torch.ones(4, dtype=DTYPE), {"a": torch.ones(2), "b": torch.ones(2, dtype=DTYPE)})


def test_ravel_and_unravel_stay_vmappable():
    like = {"a": torch.ones(2, dtype=DTYPE), "b": torch.ones(1, 3, dtype=DTYPE)}
    batch = {"a": torch.randn(4, 2, dtype=DTYPE, generator=gen()), "b": torch.randn(4, 1, 3, dtype=DTYPE)}
    flat = torch.func.vmap(curvfx.ravel)(batch)
    assert flat.shape == (4, 5)
    torch.testing.assert_close(flat[:, :2], batch["a"], rtol=0, atol=0)
    back = torch.func.vmap(lambda f: curvfx.unravel(f, like))(flat)
    torch.testing.assert_close(back["b"], batch["b"], rtol=0, atol=0)
