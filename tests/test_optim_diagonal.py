"""AdaHessian and DiagonalNaturalGradient: steps against independent dense truths, spatial averaging,
update_each, and training an MLP and a CNN (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvfx
from curvfx.optim import AdaHessian, DiagonalNaturalGradient

DTYPE = torch.float64
BATCH = 64


def mlp_problem():
    """3-class labels of 256 points in 8-D from a random tanh teacher; MLP 8-32-3."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g, dtype=DTYPE)
    W = torch.randn(8, 3, generator=g, dtype=DTYPE)
    y = (2 * torch.tanh(X @ W) + 0.3 * torch.sin(3 * X[:, :3])).argmax(1)

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)).to(DTYPE)

    return make, X, y


def cnn_problem():
    """3-class labels of 128 8×8 images from a random conv teacher; 2 conv layers + linear."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 1, 8, 8, generator=g, dtype=DTYPE)
    k = torch.randn(3, 1, 3, 3, generator=g, dtype=DTYPE)
    y = F.conv2d(X, k).relu().mean((2, 3)).argmax(1)

    def make():
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(1, 6, 3),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 3),
        ).to(DTYPE)

    return make, X, y


def batches(X, y):
    for i in itertools.count():
        start = (i * BATCH) % len(y)
        yield X[start : start + BATCH], y[start : start + BATCH]


def full_loss(model, X, y) -> float:
    with torch.no_grad():
        return float(nn.CrossEntropyLoss()(model(X), y))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# name -> constructor(params, model); lr: one value that works on both problems (40 steps), from
# (0.05, 0.15, 0.5) for AdaHessian and (0.01, 0.02, 0.05, 0.1) for the natural gradient
TRAINERS = {
    "adahessian": lambda params, model: AdaHessian(
        params, model=model, loss_fn=nn.CrossEntropyLoss(), lr=0.15, generator=gen()
    ),
    "adahessian_exact_ggn_every_2": lambda params, model: AdaHessian(
        params,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        lr=0.05,
        curvature="ggn",
        method="exact",
        update_each=2,
    ),
    "natural_gradient_empirical": lambda params, model: DiagonalNaturalGradient(
        params, model=model, loss_fn=nn.CrossEntropyLoss(), lr=0.02, damping=1e-2
    ),
    "natural_gradient_mc": lambda params, model: DiagonalNaturalGradient(
        params,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        lr=0.02,
        damping=1e-2,
        fisher_type="mc",
        generator=gen(),
    ),
    "natural_gradient_exact": lambda params, model: DiagonalNaturalGradient(
        params, model=model, loss_fn=nn.CrossEntropyLoss(), lr=0.02, damping=1e-2, fisher_type="exact"
    ),
}


@pytest.mark.parametrize("problem", [mlp_problem, cnn_problem], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", list(TRAINERS))
def test_reduces_the_training_loss(name, problem):
    """40 mini-batch steps halve the full-data cross-entropy of an MLP and a CNN."""
    make, X, y = problem()
    model = make()
    start = full_loss(model, X, y)
    opt = TRAINERS[name](model.parameters(), model)
    for _, batch in zip(range(40), batches(X, y)):
        opt.step(batch)
    assert full_loss(model, X, y) < start / 2


# ---------------------------------------------------------------------------------------
# AdaHessian against a dense truth


def dense_ggn_diagonal_and_gradient(model, X, y):
    """diag(Jᵀ (∇²_f L) J) and ∇L by torch.autograd.functional on the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    x0 = curvfx.ravel(list(base.values()))

    def outputs(x):
        return torch.func.functional_call(
            model, dict(zip(names, curvfx.unravel(x, list(base.values())))), (X,)
        )

    J = torch.autograd.functional.jacobian(outputs, x0)
    f = outputs(x0).detach()
    H_f = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o.reshape(f.shape), y), f.reshape(-1))
    J = J.reshape(-1, x0.numel())
    g = torch.autograd.functional.jacobian(lambda x: F.cross_entropy(outputs(x), y), x0)
    return torch.diagonal(J.T @ H_f @ J), g


def test_adahessian_steps_match_the_formula_with_the_dense_ggn_diagonal():
    """Two steps with the exact GGN diagonal D: m, v, bias corrections, hessian_power, weight decay."""
    make, X, y = mlp_problem()
    X, y = X[:16], y[:16]
    model, reference = make(), make()
    lr, (b1, b2), eps, wd, k = 0.1, (0.8, 0.9), 1e-3, 0.01, 0.5
    opt = AdaHessian(
        model.parameters(),
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        hessian_power=k,
        curvature="ggn",
        method="exact",
    )
    theta = curvfx.ravel([p.detach().clone() for p in reference.parameters()])
    m = v = torch.zeros_like(theta)
    for t in (1, 2):
        D, g = dense_ggn_diagonal_and_gradient(reference, X, y)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * D * D
        theta = (1 - lr * wd) * theta - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)) ** (k / 2) + eps)
        with torch.no_grad():
            for p, new in zip(reference.parameters(), curvfx.unravel(theta, list(reference.parameters()))):
                p.copy_(new)
        opt.step((X, y))
        assert torch.allclose(curvfx.ravel([p.detach() for p in model.parameters()]), theta, atol=1e-12)


def test_adahessian_averages_conv_kernels_spatially():
    """Conv weights [out, in, kh, kw]: D is the mean of |diag| over (kh, kw); other parameters keep it."""
    make, X, y = cnn_problem()
    model = make()
    batch = (X[:32], y[:32])
    opt = AdaHessian(
        model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), curvature="ggn", method="exact"
    )
    D = curvfx.diagonal(curvfx.ggn(model, nn.CrossEntropyLoss(), batch), "exact")  # before the step
    opt.step(batch)
    for p, d in zip(model.parameters(), curvfx.unravel(D, list(model.parameters()))):
        stored = opt.state[p]["hessian_diag"]
        expected = d.abs().mean((2, 3), keepdim=True).expand_as(d) if p.dim() == 4 else d.abs()
        assert torch.allclose(stored, expected, rtol=1e-10, atol=1e-15)
    model2 = make()
    opt2 = AdaHessian(
        model2.parameters(),
        model=model2,
        loss_fn=nn.CrossEntropyLoss(),
        curvature="ggn",
        method="exact",
        spatial_average=False,
    )
    opt2.step(batch)
    assert torch.allclose(opt2.state[model2[0].weight]["hessian_diag"], D[: 6 * 9].view(6, 1, 3, 3).abs())


def test_update_each_amortizes_the_curvature():
    """update_each=3: the diagonal is computed on steps 1, 4, 7 and reused in between."""
    make, X, y = mlp_problem()
    model = make()
    opt = AdaHessian(
        model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), update_each=3, generator=gen()
    )
    calls = []
    original = opt.curvature

    def counted(*args, **kwargs):
        calls.append(opt.global_state().get("step", 0) + 1)
        return original(*args, **kwargs)

    opt.curvature = counted
    diagonals = []
    for _, batch in zip(range(7), batches(X, y)):
        opt.step(batch)
        diagonals.append(opt.state[model[0].weight]["hessian_diag"].clone())
    assert calls == [1, 4, 7]
    assert torch.equal(diagonals[0], diagonals[2]) and not torch.equal(diagonals[2], diagonals[3])


def test_adahessian_hutchinson_diagonal_is_seeded():
    """Hutchinson probes come from the generator: the stored D is z ⊙ Hz for the generator's probe."""
    make, X, y = mlp_problem()
    batch = (X[:32], y[:32])
    model = make()
    opt = AdaHessian(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), generator=gen(7))
    H = curvfx.hessian(make(), nn.CrossEntropyLoss(), batch)
    expected = curvfx.diagonal(H, "hutchinson", num_samples=1, generator=gen(7)).abs()
    opt.step(batch)
    stored = curvfx.ravel([opt.state[p]["hessian_diag"] for p in model.parameters()])
    assert torch.allclose(stored, expected, atol=1e-14)


# ---------------------------------------------------------------------------------------
# DiagonalNaturalGradient against per-sample gradients


def empirical_fisher_diagonal_and_gradient(model, X, y):
    """(1/N) Σ_n (∇ℓ_n)² and ∇L for the mean cross-entropy, one sample at a time."""
    params = list(model.parameters())
    per_sample = [
        curvfx.ravel(torch.autograd.grad(F.cross_entropy(model(X[n : n + 1]), y[n : n + 1]), params))
        for n in range(len(y))
    ]
    G = torch.stack(per_sample)
    return (G * G).mean(0), G.mean(0)


def test_natural_gradient_steps_match_per_sample_truth():
    """Two steps: F̄ running average with bias correction, damping, weight decay, momentum."""
    make, X, y = mlp_problem()
    X, y = X[:16], y[:16]
    model, reference = make(), make()
    lr, lam, mu, rho, wd = 0.05, 1e-2, 0.5, 0.7, 1e-3
    opt = DiagonalNaturalGradient(
        model.parameters(),
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        lr=lr,
        damping=lam,
        momentum=mu,
        fisher_decay=rho,
        weight_decay=wd,
    )
    theta = curvfx.ravel([p.detach().clone() for p in reference.parameters()])
    F_bar, buf = torch.zeros_like(theta), None
    for n in (1, 2):
        Fd, g = empirical_fisher_diagonal_and_gradient(reference, X, y)
        F_bar = rho * F_bar + (1 - rho) * Fd
        u = (g + wd * theta) / (F_bar / (1 - rho**n) + lam)
        buf = u if buf is None else mu * buf + u
        theta = theta - lr * buf
        with torch.no_grad():
            for p, new in zip(reference.parameters(), curvfx.unravel(theta, list(reference.parameters()))):
                p.copy_(new)
        opt.step((X, y))
        assert torch.allclose(curvfx.ravel([p.detach() for p in model.parameters()]), theta, atol=1e-12)


def test_natural_gradient_exact_fisher_is_the_ggn_diagonal_for_cross_entropy():
    make, X, y = mlp_problem()
    X, y = X[:16], y[:16]
    model = make()
    D, g = dense_ggn_diagonal_and_gradient(make(), X, y)
    theta = curvfx.ravel([p.detach().clone() for p in model.parameters()])
    opt = DiagonalNaturalGradient(
        model.parameters(),
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        lr=0.1,
        damping=0.1,
        fisher_type="exact",
    )
    opt.step((X, y))
    moved = curvfx.ravel([p.detach() for p in model.parameters()]) - theta
    assert torch.allclose(moved, -0.1 * g / (D + 0.1), atol=1e-12)
