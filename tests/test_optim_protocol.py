"""The model-based optimizers' protocol (float64): CurvatureOptimizer against dense truths, state_dict
resume, no graph kept over 200 steps, frozen parameters, param groups, determinism, clear errors."""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
from torch import nn

import curvfx
from curvfx.optim import (
    CURVATURES,
    AdaHessian,
    Curvature,
    CurvatureOptimizer,
    DiagonalNaturalGradient,
    HessianFree,
)

DTYPE = torch.float64


def problem(n: int = 24):
    """A 3-8-2 tanh MLP regression (MSE) and a classification twin (CE), fixed seeds."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=DTYPE)
    y = torch.sin(X[:, :2]) + 0.1 * torch.randn(n, 2, generator=g, dtype=DTYPE)

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)

    return make, X, y


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name -> (constructor(params, model, generator), loss); small settings keep 200 steps fast
OPTIMIZERS = {
    "hessian_free": lambda params, model, g: HessianFree(
        params, model=model, loss_fn=nn.MSELoss(), cg_maxiter=4, damping=0.1
    ),
    "hessian_free_mc_fisher": lambda params, model, g: HessianFree(
        params, model=model, loss_fn=nn.MSELoss(), cg_maxiter=4, curvature="mc_fisher", generator=g
    ),
    "adahessian": lambda params, model, g: AdaHessian(
        params, model=model, loss_fn=nn.MSELoss(), lr=0.05, update_each=2, generator=g
    ),
    "adahessian_exact_ggn": lambda params, model, g: AdaHessian(
        params, model=model, loss_fn=nn.MSELoss(), lr=0.05, curvature="ggn", method="exact"
    ),
    "natural_gradient_mc": lambda params, model, g: DiagonalNaturalGradient(
        params, model=model, loss_fn=nn.MSELoss(), fisher_type="mc", num_samples=2, generator=g
    ),
    "natural_gradient_empirical": lambda params, model, g: DiagonalNaturalGradient(
        params, model=model, loss_fn=nn.MSELoss(), update_each=3
    ),
}
NAMES = list(OPTIMIZERS)


def run(name, model, X, y, steps, params=None, seed=0):
    opt = OPTIMIZERS[name](list(model.parameters()) if params is None else params, model, gen(seed))
    losses = [opt.step((X, y)) for _ in range(steps)]
    return opt, losses


# ---------------------------------------------------------------------------------------
# CurvatureOptimizer: the curvature at the current parameters, against dense truths


class Probe(CurvatureOptimizer):
    """The smallest subclass: exposes the helpers."""

    def __init__(self, params, *, model, loss_fn, generator=None):
        super().__init__(params, {}, model=model, loss_fn=loss_fn, generator=generator)


def dense_loss_hessian_and_ggn(model, loss_fn, X, y, names):
    """∇²L and Jᵀ(∇²_f L)J over the named parameters, by torch.autograd.functional on a flat vector.

    Also returns the gradient, the loss, the output Jacobian J [N·C, P] and the empirical
    Fisher Z Σ_n ∇L_n ∇L_nᵀ (Z = N·C for the MSE mean; ∇L_n by autograd of the loss with
    only sample n's outputs depending on θ).
    """
    base = {n: p.detach() for n, p in model.named_parameters()}
    x0 = torch.cat([base[n].reshape(-1) for n in names])

    def params_of(x):
        out, start = dict(base), 0
        for n in names:
            out[n] = x[start : start + base[n].numel()].view_as(base[n])
            start += base[n].numel()
        return out

    def outputs(x):
        return torch.func.functional_call(model, params_of(x), (X,))

    def loss(x):
        return loss_fn(outputs(x), y)

    H = torch.autograd.functional.hessian(loss, x0)
    J = torch.autograd.functional.jacobian(outputs, x0).reshape(-1, x0.numel())
    f = outputs(x0).detach()
    H_f = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(f.shape), y), f.reshape(-1))
    g = torch.autograd.functional.jacobian(loss, x0)
    EF = torch.zeros(len(x0), len(x0), dtype=x0.dtype)
    for n in range(len(y)):
        theta = x0.clone().requires_grad_(True)
        out = outputs(theta)
        live = (torch.arange(len(y)) == n)[:, None]
        (gn,) = torch.autograd.grad(loss_fn(torch.where(live, out, out.detach()), y), theta)
        EF += y.numel() * torch.outer(gn, gn)
    return H, J.T @ H_f @ J, g, float(loss(x0)), J, EF


def mc_fisher_rms_error(J, N, C, M):
    """√E‖F_M − G‖²_F for the MSE mean: F_M − G = (2/(NC)) Σ_n J_nᵀ (W_n − I) J_n with W_n the mean
    of M outer products z zᵀ, z ~ N(0, I_C) (targets f + z/√2); for B = J_n J_nᵀ,
    E tr((W−I)B(W−I)B) = (tr(B)² + tr(B²))/M, and the samples are independent."""
    B = J.reshape(N, C, -1) @ J.reshape(N, C, -1).transpose(1, 2)  # [N, C, C]
    traces = B.diagonal(dim1=1, dim2=2).sum(1)
    return (2 / (N * C)) * float(((traces**2 + (B @ B).diagonal(dim1=1, dim2=2).sum(1)).sum() / M).sqrt())


@pytest.mark.parametrize("kind", ["ggn", "hessian", "exact_fisher", "empirical_fisher", "mc_fisher"])
def test_curvature_matches_dense_truth_on_a_subset_of_parameters(kind):
    """Operator, gradient and loss over the optimized subset (a frozen bias, an unoptimized layer).

    The MC Fisher (M = 2000 draws of the optimizer's generator) is compared with the GGN (its
    expectation for MSE) within 3 root-mean-square errors, computed in closed form; it is also
    more than 0.3 of them away (a draw, not the GGN itself).
    """
    make, X, y = problem()
    model = make()
    model[0].bias.requires_grad_(False)
    params = [model[0].weight, model[0].bias, model[2].bias]  # model[2].weight not optimized
    opt = Probe(params, model=model, loss_fn=nn.MSELoss(), generator=gen(5))
    M = 2000
    c = opt.curvature((X, y), kind, damping=0.25, num_samples=M if kind == "mc_fisher" else 1)
    H, G, g, loss, J, EF = dense_loss_hessian_and_ggn(model, nn.MSELoss(), X, y, ["0.weight", "2.bias"])
    C = {"hessian": H, "empirical_fisher": EF}.get(kind, G)
    truth = C + 0.25 * torch.eye(len(g), dtype=DTYPE)
    assert isinstance(c, Curvature) and c.params == [model[0].weight, model[2].bias]
    dense = c.operator.to_dense()
    if kind == "mc_fisher":
        rms = mc_fisher_rms_error(J, *y.shape, M)
        assert rms < 0.05 * float(G.norm())  # the bound below is tight enough to see a wrong scale
        assert 0.3 * rms < float((dense - truth).norm()) < 3 * rms, (float((dense - truth).norm()), rms)
        assert torch.allclose(dense, dense.T, atol=1e-14)  # one fixed draw for every product
    else:
        assert torch.allclose(dense, truth, atol=1e-12)
    assert torch.allclose(c.gradient, g, atol=1e-13) and float(c.loss) == pytest.approx(loss, rel=1e-14)
    assert [tuple(t.shape) for t in c.split(c.gradient)] == [(8, 3), (2,)]


def test_loss_at_and_add_to_params():
    """loss_at(d) is L(θ + d) and changes nothing (buffers included); add_to_params moves θ by d."""
    _, X, y = problem()
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)
    opt = Probe(model.parameters(), model=model, loss_fn=nn.MSELoss())
    state = copy.deepcopy(model.state_dict())
    theta = curvfx.ravel([p.detach().clone() for p in model.parameters()])
    d = torch.randn(len(theta), dtype=DTYPE, generator=gen(3))
    value = opt.loss_at((X, y), d)
    for (name, tensor), before in zip(model.state_dict().items(), state.values()):
        assert torch.equal(tensor, before), name
    opt.add_to_params(d)
    assert torch.equal(curvfx.ravel([p.detach() for p in model.parameters()]), theta + d)
    with torch.no_grad():
        expected = float(nn.MSELoss()(copy.deepcopy(model)(X), y))  # train mode: batch statistics
    assert value == pytest.approx(expected, rel=1e-13)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_pass_updates_batchnorm_statistics_once():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(DTYPE)
    X, y = torch.randn(10, 3, dtype=DTYPE), torch.randn(10, 4, dtype=DTYPE)
    opt = Probe(model.parameters(), model=model, loss_fn=nn.MSELoss())
    c = opt.curvature((X, y), "ggn")
    assert int(model[1].num_batches_tracked) == 1
    _ = c.operator @ torch.ones(c.operator.shape[0], dtype=DTYPE)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda m: DiagonalNaturalGradient(m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss()),
        lambda m: AdaHessian(
            m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss(), curvature="ggn", method="exact"
        ),
        lambda m: curvfx.optim.KFAC(
            m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss(), fisher_type="type-2"
        ),
    ],
    ids=["DiagonalNaturalGradient", "AdaHessian-ggn-exact", "KFAC-type-2"],
)
def test_a_refused_step_leaves_batchnorm_statistics_alone(make):
    """Curvature that needs independent samples is refused before the step's forward pass
    (that pass used to advance BatchNorm's running statistics, then the step raised)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE).train()
    X, y = torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="needs independent samples"):
        make(model).step((X, y))
    for (name, tensor), before in zip(model.state_dict().items(), state.values()):
        assert torch.equal(tensor, before), name


# ---------------------------------------------------------------------------------------
# every model-based optimizer


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_identically(name):
    """Save after 3 steps, load into a fresh optimizer (other generator seed): the same next 3 steps."""
    make, X, y = problem()
    model = make()
    opt, _ = run(name, model, X, y, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](list(twin.parameters()), twin, gen(99))
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer, weights_only=False))
    for _ in range(3):
        assert torch.equal(opt.step((X, y)), twin_opt.step((X, y)))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_generator_state_without_a_generator_warns(name):
    """An optimizer without a generator cannot resume the saved one's draws: a warning (if it drew)."""
    make, X, y = problem()
    model = make()
    opt, _ = run(name, model, X, y, 1)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](list(twin.parameters()), twin, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin_opt.load_state_dict(opt.state_dict())
    resumable = [w for w in caught if "does not resume identically" in str(w.message)]
    assert len(resumable) == (opt.generator is not None)


@pytest.mark.parametrize("name", NAMES)
def test_memory_is_flat_over_200_steps(name):
    """No autograd graph or growing state: live tensors and state size constant from step 10 to 210."""
    make, X, y = problem()
    model = make()
    opt = run(name, model, X, y, 10)[0]
    loss = opt.step((X, y))

    def census():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some deprecated module attributes warns
            warnings.simplefilter("ignore")
            live = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        assert all(t.grad_fn is None and not t.requires_grad for t in state)
        return live, sum(t.numel() for t in state)

    before = census()
    for _ in range(200):
        loss = opt.step((X, y))
    assert loss.grad_fn is None and not loss.requires_grad
    assert census() == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_fixed_seed_is_deterministic_and_training_helps(name):
    make, X, y = problem()
    models = [make(), make()]
    losses = [run(name, m, X, y, 8)[1] for m in models]
    assert [float(a) for a in losses[0]] == [float(b) for b in losses[1]]
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    assert float(losses[0][-1]) < float(losses[0][0])


@pytest.mark.parametrize("name", NAMES)
def test_frozen_and_unlisted_parameters_stay_put(name):
    """A frozen parameter in the groups and a parameter not passed are not updated; a parameter
    frozen mid-run is skipped from then on."""
    make, X, y = problem()
    model = make()
    model[0].bias.requires_grad_(False)
    fixed = {"0.bias": model[0].bias.clone(), "2.weight": model[2].weight.clone()}
    opt, _ = run(name, model, X, y, 3, params=[model[0].weight, model[0].bias, model[2].bias])
    assert torch.equal(model[0].bias, fixed["0.bias"]) and torch.equal(model[2].weight, fixed["2.weight"])
    model[2].bias.requires_grad_(False)
    bias, weight = model[2].bias.clone(), model[0].weight.clone()
    opt.step((X, y))
    assert torch.equal(model[2].bias, bias) and not torch.equal(model[0].weight, weight)


@pytest.mark.parametrize("name", NAMES)
def test_two_param_groups_with_default_options_equal_one_group(name):
    make, X, y = problem()
    models = [make(), make()]
    run(name, models[0], X, y, 4)
    groups = [{"params": list(models[1][0].parameters())}, {"params": list(models[1][2].parameters())}]
    run(name, models[1], X, y, 4, params=groups)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [AdaHessian, DiagonalNaturalGradient])
def test_per_group_learning_rate(cls):
    """lr = 0 in one group keeps it; the other group takes the step it takes alone (a diagonal method)."""
    make, X, y = problem()
    models = [make(), make()]
    kw = dict(loss_fn=nn.MSELoss(), lr=0.02)
    if cls is AdaHessian:
        kw.update(curvature="ggn", method="exact")
    groups = [
        {"params": list(models[0][0].parameters()), "lr": 0.0},
        {"params": list(models[0][2].parameters())},
    ]
    cls(groups, model=models[0], **kw).step((X, y))
    cls(list(models[1].parameters()), model=models[1], **kw).step((X, y))
    fresh = make()
    assert all(torch.equal(p, q) for p, q in zip(models[0][0].parameters(), fresh[0].parameters()))
    assert all(torch.equal(p, q) for p, q in zip(models[0][2].parameters(), models[1][2].parameters()))
    assert not torch.equal(models[0][2].weight, fresh[2].weight)


# ---------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", NAMES)
def test_errors_name_the_problem(name):
    make, X, y = problem()
    model = make()
    opt = OPTIMIZERS[name](list(model.parameters()), model, gen())
    with pytest.raises(TypeError, match="not a closure"):
        opt.step(lambda: (model(X), nn.MSELoss()(model(X), y)))
    with pytest.raises(ValueError, match=r"batch \(X, y\)"):
        opt.step(X)
    with pytest.raises(ValueError, match=r"batch \(X, y\)"):
        opt.step((X, y, y))
    with pytest.raises(ValueError, match="targets y"):
        opt.step((X, [1.0, 2.0]))
    opt.loss = curvfx.losses.get_loss(lambda out, target: (out - target) ** 2)  # no reduction
    with pytest.raises(ValueError, match="scalar"):
        opt.step((X, y))
    other = make()
    with pytest.raises(ValueError, match="not a parameter of model"):
        OPTIMIZERS[name](list(other.parameters()), model, gen())
    with pytest.raises(TypeError, match=r"nn\.Module"):
        OPTIMIZERS[name](list(model.parameters()), [model], gen())
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = OPTIMIZERS[name](list(model.parameters()), model, gen())
    with pytest.raises(ValueError, match="no parameter requires grad"):
        frozen.step((X, y))


@pytest.mark.parametrize(
    "cls, bad",
    [
        (HessianFree, dict(damping=0.0)),
        (HessianFree, dict(curvature="fisher")),
        (HessianFree, dict(cg_maxiter=0)),
        (HessianFree, dict(warm_start=1.5)),
        (HessianFree, dict(warm_start=float("nan"))),
        (HessianFree, dict(checkpoint_ratio=1.0)),
        (HessianFree, dict(line_search="wolfe")),
        (AdaHessian, dict(betas=(0.9, 1.0))),
        (AdaHessian, dict(betas=(0.9,))),
        (AdaHessian, dict(betas=(0.9, "0.99"))),
        (AdaHessian, dict(hessian_power=2.0)),
        (AdaHessian, dict(method="lanczos")),
        (AdaHessian, dict(update_each=0)),
        (AdaHessian, dict(lr=float("nan"))),
        (DiagonalNaturalGradient, dict(fisher_type="type-2")),
        (DiagonalNaturalGradient, dict(momentum=1.0)),
        (DiagonalNaturalGradient, dict(damping=-1.0)),
        (DiagonalNaturalGradient, dict(num_samples=2)),
    ],
    ids=lambda v: getattr(v, "__name__", None) or next(iter(v)),
)
def test_invalid_options_name_the_option(cls, bad):
    make, _, _ = problem()
    model = make()
    with pytest.raises(ValueError, match=next(iter(bad))):
        cls(model.parameters(), model=model, loss_fn=nn.MSELoss(), **bad)


@pytest.mark.parametrize(
    "cls, bad", [(HessianFree, dict(adapt_damping=1)), (AdaHessian, dict(spatial_average="False"))]
)
def test_non_bool_flags_are_a_type_error(cls, bad):
    make, _, _ = problem()
    model = make()
    with pytest.raises(TypeError, match=f"{next(iter(bad))}: expected a bool"):
        cls(model.parameters(), model=model, loss_fn=nn.MSELoss(), **bad)


@pytest.mark.parametrize(
    "cls, edge",
    [
        (HessianFree, dict(warm_start=1.0, checkpoint_ratio=None)),
        (HessianFree, dict(warm_start=0, min_damping=0)),
        (AdaHessian, dict(betas=[0, 0.5], hessian_power=1)),
        (DiagonalNaturalGradient, dict(momentum=0.0, damping=1e-300)),
    ],
)
def test_options_on_the_closed_ends_of_their_ranges_are_accepted(cls, edge):
    make, _, _ = problem()
    model = make()
    cls(model.parameters(), model=model, loss_fn=nn.MSELoss(), **edge)


@pytest.mark.parametrize(
    "cls, key, value",
    [
        (HessianFree, "cg_maxiter", 7),
        (AdaHessian, "update_each", 2),
        (DiagonalNaturalGradient, "fisher_type", "mc"),
    ],
)
def test_shared_options_must_agree_between_groups(cls, key, value):
    make, _, _ = problem()
    model = make()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), key: value}]
    with pytest.raises(ValueError, match=f"{key}: every param group"):
        cls(groups, model=model, loss_fn=nn.MSELoss())


def test_curvature_kind_and_damping_are_checked():
    make, X, y = problem()
    model = make()
    opt = Probe(model.parameters(), model=model, loss_fn=nn.MSELoss())
    with pytest.raises(ValueError, match="kind"):
        opt.curvature((X, y), "fisher")
    with pytest.raises(ValueError, match="damping"):
        opt.curvature((X, y), "ggn", damping=-1.0)
    assert set(CURVATURES) == {"ggn", "hessian", "mc_fisher", "exact_fisher", "empirical_fisher"}


def test_exported():
    for name in ("AdaHessian", "Curvature", "CurvatureOptimizer", "DiagonalNaturalGradient", "HessianFree"):
        assert name in curvfx.optim.__all__
        assert getattr(curvfx.optim, name).__module__.startswith("curvfx.optim.")
