"""HessianFree: beats a tuned Adam, keeps exact CG iterates, backtracks, adapts λ, line-searches (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import curvfx
from curvfx.optim import HessianFree
from curvfx.optim.hessian_free import DAMPING_DECREASE, _cg_iterates, _checkpoints

DTYPE = torch.float64
STEPS, BATCH = 25, 64

# The grids (the same mini-batches and number of steps for both optimizers):
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
HF_GRID = (1.0, 0.1)  # initial damping λ₀; cg_maxiter=10, other options default


def regression_problem():
    """y = sin(2 x₀) x₁ + cos(x₂)/2 on 256 points in 3-D; MLP 3-16-16-1 (tanh)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 3, generator=g, dtype=DTYPE)
    y = torch.sin(2 * X[:, :1]) * X[:, 1:2] + 0.5 * torch.cos(X[:, 2:3])

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(
            DTYPE
        )

    return make, X, y


def batches(X, y):
    """Consecutive mini-batches of BATCH samples, cycling through the data."""
    for i in itertools.count():
        start = (i * BATCH) % len(y)
        yield X[start : start + BATCH], y[start : start + BATCH]


def full_loss(model, X, y) -> float:
    with torch.no_grad():
        return float(nn.MSELoss()(model(X), y))


def train_adam(make, X, y, lr) -> float:
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _, (xb, yb) in zip(range(STEPS), batches(X, y)):
        opt.zero_grad()
        nn.MSELoss()(model(xb), yb).backward()
        opt.step()
    return full_loss(model, X, y)


def train_hf(make, X, y, damping) -> float:
    model = make()
    opt = HessianFree(model.parameters(), model=model, loss_fn=nn.MSELoss(), damping=damping, cg_maxiter=10)
    for _, batch in zip(range(STEPS), batches(X, y)):
        opt.step(batch)
    return full_loss(model, X, y)


def test_beats_tuned_adam_on_mlp_regression():
    """After 25 mini-batch steps, the best HF of its grid is 3× below the best Adam of its grid."""
    make, X, y = regression_problem()
    adam = min(train_adam(make, X, y, lr) for lr in ADAM_LRS)
    hf = min(train_hf(make, X, y, damping) for damping in HF_GRID)
    assert hf < adam / 3, (hf, adam)


# ---------------------------------------------------------------------------------------
# the CG iterates


def ggn_problem():
    make, X, y = regression_problem()
    model = make()
    G = curvfx.ggn(model, nn.MSELoss(), (X[:32], y[:32]))
    b = -torch.randn(G.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    return G, b


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_kept_iterates_are_cg_iterates(warm):
    """Each kept (i, x_i) equals an independent curvfx.cg run stopped after i iterations."""
    G, b = ggn_problem()
    x0 = 0.1 * torch.ones_like(b) if warm else None
    checkpoints = _checkpoints(20, 1.3)
    assert checkpoints == [1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 20]
    iterates = _cg_iterates(G, b, 1e-4, x0, checkpoints, tol=1e-12)
    assert [i for i, _ in iterates] == checkpoints
    for i, x in iterates:
        expected, info = curvfx.cg(G, b, damping=1e-4, x0=x0, maxiter=i, tol=1e-300)
        assert info.num_iters == i
        assert float((x - expected).norm() / expected.norm()) < 1e-8, i


def test_iterates_stop_where_cg_converges():
    G, b = ggn_problem()
    iterates = _cg_iterates(G, b, 1.0, None, _checkpoints(200, 1.3), tol=1e-6)
    last, x = iterates[-1]
    assert last < 200 and [i for i, _ in iterates][:-1] == [c for c in _checkpoints(200, 1.3) if c < last]
    assert float(((G @ x) + x - b).norm() / b.norm()) <= 1e-6
    assert _cg_iterates(G, torch.zeros_like(b), 1.0, None, [1, 5], tol=1e-6)[0][0] == 0  # g = 0


def test_backtracking_takes_the_best_kept_iterate():
    """One step from rest: θ moves by the kept CG iterate with the lowest batch loss."""
    make, X, y = regression_problem()
    model = make()
    batch = (X[:64], y[:64])
    theta = curvfx.ravel([p.detach().clone() for p in model.parameters()])
    opt = HessianFree(
        model.parameters(), model=model, loss_fn=nn.MSELoss(), damping=1e-4, cg_maxiter=40, line_search=None
    )
    opt.step(batch)
    G = curvfx.ggn(make(), nn.MSELoss(), batch)
    reference = make()
    loss = nn.MSELoss()(reference(batch[0]), batch[1])
    g = curvfx.ravel(torch.autograd.grad(loss, list(reference.parameters())))
    candidates = []
    for i in _checkpoints(40, 1.3):
        d, _ = curvfx.cg(G, -g, damping=1e-4, maxiter=i, tol=1e-4)
        candidates.append((_loss_at(make, batch, d), i, d))
    _, best_i, best_d = min(candidates, key=lambda c: (c[0], -c[1]))
    moved = curvfx.ravel([p.detach() for p in model.parameters()]) - theta
    state = opt.global_state()
    assert state["cg_iterate"] == best_i and state["step_size"] == 1.0
    assert float((moved - best_d).norm() / best_d.norm()) < 1e-8
    assert best_i < state["cg_iters"], "the problem should make backtracking pick an earlier iterate"


def _loss_at(make, batch, d) -> float:
    model = make()
    with torch.no_grad():
        for p, s in zip(model.parameters(), curvfx.unravel(d, list(model.parameters()))):
            p.add_(s)
        return float(nn.MSELoss()(model(batch[0]), batch[1]))


# ---------------------------------------------------------------------------------------
# damping, line search, curvature kinds


def test_damping_shrinks_when_the_quadratic_model_is_exact():
    """A linear model under MSE: L is its own quadratic model, ρ = 1, λ ← 2/3 λ each step."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g, dtype=DTYPE), torch.randn(40, 2, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(DTYPE)
    opt = HessianFree(model.parameters(), model=model, loss_fn=nn.MSELoss(), damping=1.0, cg_maxiter=12)
    for k in range(1, 4):
        opt.step((X, y))
        state = opt.global_state()
        assert state["rho"] == pytest.approx(1.0, abs=1e-9)
        assert state["damping"] == pytest.approx(DAMPING_DECREASE**k)


def test_damping_grows_and_the_line_search_keeps_the_loss_monotone():
    """A fixed tiny λ on a sharply nonlinear fit overshoots: ρ < 1/4 raises λ (adapt) and the
    Armijo backtracking never lets the batch loss rise."""
    _, X, y = regression_problem()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(DTYPE)
    with torch.no_grad():
        model[0].weight.mul_(4)
    batch = (X[:64], 3 * y[:64])
    opt = HessianFree(model.parameters(), model=model, loss_fn=nn.MSELoss(), damping=1e-6, cg_maxiter=30)
    losses, grew = [], False
    for _ in range(10):
        before = opt.global_state().get("damping", 1e-6)
        losses.append(float(opt.step(batch)))
        state = opt.global_state()
        if state["rho"] < 0.25:
            grew = True
            assert state["damping"] == pytest.approx(before * 1.5)
    losses.append(opt.loss_at(batch))
    assert grew
    assert all(b <= a for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("curvature", ["hessian", "empirical_fisher", "exact_fisher"])
def test_other_curvatures_train(curvature):
    """The Hessian (indefinite: CG stops at negative curvature) and the Fishers also train (10 steps)."""
    make, X, y = regression_problem()
    model = make()
    start = full_loss(model, X, y)
    opt = HessianFree(
        model.parameters(), model=model, loss_fn=nn.MSELoss(), curvature=curvature, cg_maxiter=10
    )
    for _, batch in zip(range(10), batches(X, y)):
        opt.step(batch)
    assert full_loss(model, X, y) < 0.75 * start


def test_warm_start_and_checkpoint_options():
    """The saved direction is the last CG iterate; ζ = 0 and checkpoint_ratio=None also train."""
    make, X, y = regression_problem()
    results = {}
    for options in (dict(), dict(warm_start=0.0), dict(checkpoint_ratio=None)):
        model = make()
        opt = HessianFree(model.parameters(), model=model, loss_fn=nn.MSELoss(), cg_maxiter=10, **options)
        for _, batch in zip(range(6), batches(X, y)):
            opt.step(batch)
        direction = curvfx.ravel([opt.state[p]["direction"] for p in model.parameters()])
        assert direction.shape == (sum(p.numel() for p in model.parameters()),)
        if options.get("checkpoint_ratio", 1.3) is None:
            assert opt.global_state()["cg_iterate"] == opt.global_state()["cg_iters"]
        results[str(options)] = full_loss(model, X, y)
    assert all(loss < 0.85 * full_loss(make(), X, y) for loss in results.values())
    assert len(set(results.values())) == 3


def test_no_descent_direction_raises_damping_until_there_is_one():
    """Near a maximum of L = mean((cos(x·w) + 1)²) the damped Hessian is negative along g, so
    CG stops at once with d = 0 (ρ undefined): λ jumps to -2κ (κ = gᵀHg/‖g‖²), and the
    next step descends (before: d = 0 and the same λ at every step, for ever)."""

    class Cos(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1, bias=False)

        def forward(self, x):
            return torch.cos(self.lin(x))

    net = Cos().to(DTYPE)
    model = net.lin
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 0.2]], dtype=DTYPE))
    X, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=DTYPE), -torch.ones(3, 1, dtype=DTYPE)
    opt = HessianFree(net.parameters(), model=net, loss_fn=nn.MSELoss(), curvature="hessian", damping=1e-3)
    H = torch.autograd.functional.hessian(
        lambda w: ((torch.cos(X @ w) + 1) ** 2).mean(), model.weight[0].detach()
    )
    g = torch.autograd.functional.jacobian(
        lambda w: ((torch.cos(X @ w) + 1) ** 2).mean(), model.weight[0].detach()
    )
    kappa = float(g @ H @ g / (g @ g))
    assert kappa + 1e-3 < 0  # the damped curvature along g is negative
    first = float(opt.step((X, y)))
    state = opt.global_state()
    assert state["cg_iters"] == 0 and math.isnan(state["rho"])
    assert state["damping"] == pytest.approx(-2 * kappa, rel=1e-12)
    opt.step((X, y))
    assert opt.loss_at((X, y)) < first and opt.global_state()["rho"] > 0


def test_zero_gradient_leaves_parameters_and_damping():
    """At an exact minimum (g = 0) the step is d = 0: parameters unchanged, λ unchanged (ρ undefined)."""
    X = torch.eye(3, dtype=DTYPE)
    model = nn.Linear(3, 1, bias=False).to(DTYPE)
    y = model(X).detach()
    opt = HessianFree(model.parameters(), model=model, loss_fn=nn.MSELoss(), damping=0.5)
    weight = model.weight.clone()
    assert float(opt.step((X, y))) == 0.0
    assert torch.equal(model.weight, weight)
    assert opt.global_state()["damping"] == 0.5 and math.isnan(opt.global_state()["rho"])
