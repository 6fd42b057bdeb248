"""The K-FAC optimizer: beats tuned Adam, resumes from a state_dict, keeps memory flat (float64)."""

from __future__ import annotations

import copy
import gc
import io
import itertools
import warnings

import pytest
import torch
from torch import nn

import curvfx
from curvfx.optim import KFAC

DTYPE = torch.float64
STEPS = 50
BATCH = 64

# The grids (the same data, batches and number of steps for both optimizers):
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
KFAC_GRID = tuple(itertools.product((0.1, 0.3), (1e-3, 1e-2)))  # (lr, damping), other options default


def mlp_problem():
    """3-class classification of 256 points in 8-D by a random tanh teacher; MLP 8-32-32-3."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g, dtype=DTYPE)
    W = torch.randn(8, 3, generator=g, dtype=DTYPE)
    y = (2 * torch.tanh(X @ W) + 0.3 * torch.sin(3 * X[:, :3])).argmax(1)

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(
            DTYPE
        )

    return make, X, y


def cnn_problem():
    """3-class labels of 128 8×8 images from a random conv teacher; 2 conv layers + linear."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 1, 8, 8, generator=g, dtype=DTYPE)
    k = torch.randn(3, 1, 3, 3, generator=g, dtype=DTYPE)
    y = torch.nn.functional.conv2d(X, k).relu().mean((2, 3)).argmax(1)

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
    """Consecutive mini-batches of BATCH samples, cycling through the data."""
    for i in itertools.count():
        start = (i * BATCH) % len(y)
        yield X[start : start + BATCH], y[start : start + BATCH]


def full_loss(model, X, y) -> float:
    with torch.no_grad():
        return float(nn.CrossEntropyLoss()(model(X), y))


def train_adam(make, X, y, lr) -> float:
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _, (xb, yb) in zip(range(STEPS), batches(X, y)):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(xb), yb).backward()
        opt.step()
    return full_loss(model, X, y)


def train_kfac(make, X, y, lr, damping) -> float:
    model = make()
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        lr=lr,
        damping=damping,
        generator=torch.Generator().manual_seed(0),
    )
    for _, batch in zip(range(STEPS), batches(X, y)):
        opt.step(batch)
    return full_loss(model, X, y)


@pytest.mark.parametrize("problem", [mlp_problem, cnn_problem], ids=["mlp", "cnn"])
def test_beats_tuned_adam(problem):
    """After 50 steps on the same batches, the best K-FAC of its grid beats the best Adam of its."""
    make, X, y = problem()
    adam = min(train_adam(make, X, y, lr) for lr in ADAM_LRS)
    kfac = min(train_kfac(make, X, y, lr, damping) for lr, damping in KFAC_GRID)
    assert kfac < adam, (kfac, adam)


def test_state_dict_round_trip_resumes_identically():
    """Save after 3 steps (inverse from step 2 kept), load into a copy: the same next 3 steps."""
    make, X, y = cnn_problem()
    model = make()
    options = dict(lr=0.1, damping=1e-2, inverse_update_steps=2, fisher_type="mc", weight_decay=1e-4)
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    data = batches(X, y)
    for _ in range(3):
        opt.step(next(data))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(
        twin.parameters(),
        model=twin,
        loss_fn=nn.CrossEntropyLoss(),
        generator=torch.Generator().manual_seed(99),
        **options,
    )
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer, weights_only=False))
    for _ in range(3):
        batch = next(data)
        assert torch.equal(opt.step(batch), twin_opt.step(batch))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_memory_is_flat_over_200_steps():
    """No autograd graph or growing state: live tensors and state size constant from step 10 to 210."""
    make, X, y = mlp_problem()
    model = make()
    opt = KFAC(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), lr=0.1, inverse_update_steps=5)
    data = batches(X, y)

    def census():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some deprecated module attributes warns
            warnings.simplefilter("ignore")
            live = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        assert all(t.grad_fn is None and not t.requires_grad for t in state)
        return live, sum(t.numel() for t in state)

    for _ in range(10):
        loss = opt.step(next(data))
    before = census()
    for _ in range(200):
        loss = opt.step(next(data))
    assert loss.grad_fn is None
    assert census() == before


@pytest.mark.parametrize(
    "options",
    [
        dict(
            fisher_type="type-2", damping_method="exact", momentum=0.0, kl_clip=None, inverse_update_steps=1
        ),
        dict(fisher_type="empirical", kfac_approx="reduce", factor_update_steps=3),
        dict(fisher_type="mc", num_samples=4, weight_decay=1e-3),
    ],
    ids=["type2-exact", "empirical-reduce", "mc4-wd"],
)
def test_options_train(options):
    """Every Fisher type, damping method and option trains the CNN (loss down 3×, 30 steps)."""
    make, X, y = cnn_problem()
    model = make()
    start = full_loss(model, X, y)
    opt = KFAC(
        model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), lr=0.1, damping=1e-2, **options
    )
    for _, batch in zip(range(30), batches(X, y)):
        opt.step(batch)
    assert full_loss(model, X, y) < start / 3


def test_batchnorm_in_train_mode():
    """A CNN with BatchNorm in train mode: the default Fisher ("mc") trains the parameters given
    (BatchNorm's own left out: their exact diagonal needs independent samples); "type-2" raises
    at the step, naming BatchNorm (its B would depend on how the Hessian factor's columns pair
    up across samples)."""
    _, X, y = cnn_problem()

    def make():
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3)
        ).to(DTYPE)

    model = make()
    params = [p for name, p in model.named_parameters() if not name.startswith("1.")]
    start = full_loss(model, X, y)
    opt = KFAC(params, model=model, loss_fn=nn.CrossEntropyLoss(), lr=0.1, damping=1e-2)
    assert opt.param_groups[0]["fisher_type"] == "mc"
    for _, batch in zip(range(30), batches(X, y)):
        opt.step(batch)
    assert model.training and full_loss(model, X, y) < start / 3
    model = make()
    params = [p for name, p in model.named_parameters() if not name.startswith("1.")]
    opt = KFAC(params, model=model, loss_fn=nn.CrossEntropyLoss(), fisher_type="type-2")
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"'type-2'.*batch statistics.*fisher_type='mc'"):
        opt.step((X[:32], y[:32]))
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # no step taken


def test_frozen_parameters_groups_and_no_side_effects():
    """Frozen parameters stay put; per-group lr; a parameter frozen later restarts the factors."""
    make, X, y = mlp_problem()
    model = make()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    groups = [{"params": list(model[:2].parameters())}, {"params": list(model[2:].parameters()), "lr": 0.05}]
    opt = KFAC(groups, model=model, loss_fn=nn.CrossEntropyLoss(), lr=0.1)
    for _ in range(3):
        opt.step((X[:32], y[:32]))
    assert torch.equal(model[0].weight, frozen)
    assert all(p.grad is None for p in model.parameters())
    assert "kfac_A" not in opt.state[model[0].weight] and "kfac_A" in opt.state[model[0].bias]
    model[2].bias.requires_grad_(False)  # the last-but-one layer's block shrinks to [W] alone
    bias = model[2].bias.clone()
    opt.step((X[:32], y[:32]))
    assert torch.equal(model[2].bias, bias)
    assert opt.state[model[2].weight]["kfac_A"].shape == (32, 32)


def test_errors_name_the_problem():
    make, X, _ = mlp_problem()
    model = make()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        KFAC(model.parameters(), model=[model], loss_fn=loss)
    for bad in (
        dict(lr=-1.0),
        dict(momentum=1.0),
        dict(damping=float("nan")),
        dict(fisher_type="exact"),
        dict(inverse_update_steps=0),
        dict(damping_method="pi"),
        dict(kl_clip=0.0),
        dict(num_samples=2, fisher_type="type-2"),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KFAC(model.parameters(), model=model, loss_fn=loss, **bad)
    with pytest.raises(ValueError, match="damping"):
        KFAC(
            [{"params": [model[0].weight]}, {"params": [model[0].bias], "damping": 1.0}],
            model=model,
            loss_fn=loss,
        )
    opt = KFAC(model.parameters(), model=model, loss_fn=loss)
    with pytest.raises(ValueError, match="batch"):
        opt.step(X)
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: 0.0)


def test_exported():
    assert curvfx.optim.KFAC is KFAC


# -- the documented update, step by step ------------------------------------------------------


def reference_kfac_steps(model, loss_fn, data, groups, damping, method, factor_decay, kl_clip):
    """θ after K-FAC steps on ``data`` by the documented update (refresh every step), built by hand.

    Per step, in the optimizer docstring's order: ``g = ∇L + wd·θ`` (autograd); the factors
    of ``curvfx.kfac`` (type-2) enter running averages ``Ā ← ρĀ + (1-ρ)A`` (likewise B and
    the diagonal; the first step sets them); the damped inverse of the averages as a dense
    matrix (``"exact"``: ``inv(K̄ + λI)`` with ``K̄ = ⊕ kron(B̄, Ā) ⊕ diag(d̄)``;
    ``"heuristic"``: ``inv(B̄ + √λ/π I) ⊗ inv(Ā + π√λ I)``, ``π = √((tr Ā/in')/(tr B̄/out))``,
    ``1/(d̄ + λ)``); ``Δ`` = that
    times g; ``ν = min(1, √(κ / Σ lr² Δᵀg))``; ``m ← μm + νΔ``; ``θ ← θ - lr·m`` (lr, μ, wd
    per parameter from its group). Returns θ and the ν of each step.
    """
    params = list(model.parameters())
    per_param = [next(gr for gr in groups if any(p is q for q in gr["params"])) for p in params]

    def spread(key):  # the group's option, per entry of θ
        return torch.cat(
            [torch.full((p.numel(),), float(gr[key]), dtype=DTYPE) for p, gr in zip(params, per_param)]
        )

    lr, mu, wd = spread("lr"), spread("momentum"), spread("weight_decay")
    average, buf, nus = None, None, []
    for x, y in data:
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        grads = torch.autograd.grad(loss_fn(model(x), y), params)
        g = torch.cat([t.reshape(-1) for t in grads]) + wd * theta
        f = curvfx.kfac(model, loss_fn, (x, y)).factors
        new = [[blk.A, blk.B] for blk in f.blocks] + [[f.diagonal]]
        if average is not None:
            new = [
                [factor_decay * a + (1 - factor_decay) * b for a, b in zip(o, n)]
                for o, n in zip(average, new)
            ]
        average = new
        P = theta.numel()
        inverse = torch.zeros(P, P, dtype=DTYPE)
        K = torch.zeros(P, P, dtype=DTYPE)
        for blk, (A, B) in zip(f.blocks, average[:-1]):
            i = blk.index.reshape(-1)
            K[i.unsqueeze(1), i] = torch.kron(B, A)
            pi = ((A.trace() / A.shape[0]) / (B.trace() / B.shape[0])).sqrt()
            root = damping**0.5
            inverse[i.unsqueeze(1), i] = torch.kron(
                torch.linalg.inv(B + root / pi * torch.eye(B.shape[0], dtype=DTYPE)),
                torch.linalg.inv(A + root * pi * torch.eye(A.shape[0], dtype=DTYPE)),
            )
        (d,) = average[-1]
        K[f.diagonal_index, f.diagonal_index] = d
        inverse[f.diagonal_index, f.diagonal_index] = 1 / (d + damping)
        if method == "exact":
            inverse = torch.linalg.inv(K + damping * torch.eye(P, dtype=DTYPE))
        delta = inverse @ g
        nu = min(1.0, (kl_clip / float((lr**2 * delta * g).sum())) ** 0.5)
        nus.append(nu)
        buf = nu * delta if buf is None else mu * buf + nu * delta
        with torch.no_grad():
            start = 0
            for p in params:
                p.sub_((lr * buf)[start : start + p.numel()].view_as(p))
                start += p.numel()
    return torch.cat([p.detach().reshape(-1) for p in params]), nus


@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_two_steps_follow_the_documented_update(method):
    """Two steps with weight decay, momentum, an active KL clip, averaged factors (ρ = 0.7),
    refresh every step and two param groups (their own lr, μ, wd): θ == the hand-built update
    of :func:`reference_kfac_steps` (atol 1e-12). A LayerNorm gives diagonal entries too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with torch.no_grad():  # LayerNorm's affine parameters away from their (1, 0) init
        model[1].weight.add_(0.3 * torch.randn(6, dtype=DTYPE))
        model[1].bias.add_(0.3 * torch.randn(6, dtype=DTYPE))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (16,), generator=g))
        for _ in range(2)
    ]
    loss_fn = nn.CrossEntropyLoss()
    hyper = [dict(lr=0.3, momentum=0.9, weight_decay=0.05), dict(lr=0.1, momentum=0.5, weight_decay=0.2)]
    options = dict(damping=1e-2, factor_decay=0.7, kl_clip=0.02, damping_method=method)

    def groups(net):
        return [
            {"params": list(net[:2].parameters()), **hyper[0]},
            {"params": list(net[3].parameters()), **hyper[1]},
        ]

    opt = KFAC(
        groups(model),
        model=model,
        loss_fn=loss_fn,
        fisher_type="type-2",
        factor_update_steps=1,
        inverse_update_steps=1,
        **options,
    )
    for batch in data:
        opt.step(batch)
    options.pop("damping_method")
    theta, nus = reference_kfac_steps(twin, loss_fn, data, groups(twin), method=method, **options)
    assert all(nu < 0.9 for nu in nus), nus  # the clip is active at both steps
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, theta, rtol=0, atol=1e-12)
