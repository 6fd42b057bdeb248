"""Bad input raises ValueError/TypeError whose message names the argument or the problem."""

from __future__ import annotations

import pytest
import torch
from cases import CASES_BY_NAME
from helpers import functional, loss_of_params
from torch import nn

import curvfx
from curvfx.losses import get_loss

V = r"\bv\b"
TARGETS = r"(?i)target|\by\b"
ERRORS = (ValueError, TypeError)
EMPTY = r"(?i)empty"

_REGRESSION = CASES_BY_NAME["mlp_tanh-mse_mean"]
_CLASSIFICATION = CASES_BY_NAME["mlp_relu-ce_mean"]
_PYTREE = CASES_BY_NAME["pytree_fn-mse_sum"]


def _bad_vectors(params):
    """(id, bad v, match) for a dict of params."""
    names = list(params)
    good = {k: torch.ones_like(t) for k, t in params.items()}
    P = sum(t.numel() for t in params.values())
    missing = {k: good[k] for k in names[1:]}
    extra = {**good, "nonexistent.weight": torch.ones(2, dtype=torch.float64)}
    wrong_shape = {**good, names[0]: torch.ones(params[names[0]].numel() + 1, dtype=torch.float64)}
    transposed = {**good, names[0]: good[names[0]].T.contiguous()}
    return [
        ("missing-key", missing, V),
        ("extra-key", extra, V),
        ("list-not-dict", list(good.values()), V),
        ("leaf-shape", wrong_shape, V),
        ("leaf-transposed", transposed, V),
        ("flat-too-short", torch.ones(P - 1, dtype=torch.float64), V),
        ("flat-too-long", torch.ones(P + 1, dtype=torch.float64), V),
        ("flat-2d", torch.ones(1, P, dtype=torch.float64), V),
        ("leaf-not-tensor", {**good, names[0]: 1.0}, V),
        ("tree-float32", {k: t.float() for k, t in good.items()}, "dtype"),
        ("flat-float32", torch.ones(P, dtype=torch.float32), "dtype"),
        ("tree-meta-device", {k: t.to("meta") for k, t in good.items()}, "device"),
        ("flat-meta-device", torch.ones(P, dtype=torch.float64, device="meta"), "device"),
    ]


_BAD_IDS = [b[0] for b in _bad_vectors({"w": torch.ones(2, 2, dtype=torch.float64)})]


@pytest.mark.parametrize("index", range(len(_BAD_IDS)), ids=_BAD_IDS)
def test_hvp_rejects_bad_v(index):
    problem = _REGRESSION.make()
    fn, params = functional(problem)
    _, v, match = _bad_vectors(params)[index]
    with pytest.raises(ERRORS, match=match):
        curvfx.hvp(loss_of_params(problem, fn), params, v)


@pytest.mark.parametrize("index", range(len(_BAD_IDS)), ids=_BAD_IDS)
def test_ggn_vp_rejects_bad_v(index):
    problem = _CLASSIFICATION.make()
    fn, params = functional(problem)
    _, v, match = _bad_vectors(params)[index]
    with pytest.raises(ERRORS, match=match):
        curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v)


def test_nested_pytree_v_with_wrong_structure():
    problem = _PYTREE.make()
    fn, params = functional(problem)
    w, b = params["layer"]
    (w2,) = params["out"]
    bad = [
        {"layer": (w, b), "out": (w2,)},  # tuple where params have a list
        {"layer": [w, b], "out": [w2]},  # list where params have a tuple
        {"layer": [w], "out": (w2,)},
        {"layer": [w, b, b], "out": (w2,)},
        {"layer": [w, b[:-1]], "out": (w2,)},
    ]
    f = loss_of_params(problem, fn)
    for v in bad:
        with pytest.raises(ERRORS, match=V):
            curvfx.hvp(f, params, v)
        with pytest.raises(ERRORS, match=V):
            curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v)


# ---------------------------------------------------------------------------------------
# targets


def _targets_mismatch_cases():
    reg, cls = _REGRESSION.make(), _CLASSIFICATION.make()
    N = reg.num_samples
    return [
        ("mse-transposed", reg, reg.y.T.contiguous()),
        ("mse-broadcastable", reg, reg.y[:, :1].contiguous()),
        ("mse-flat", reg, reg.y.reshape(-1)),
        ("mse-fewer-samples", reg, reg.y[:-1]),
        ("ce-one-hot-long", cls, nn.functional.one_hot(cls.y, 3)),
        ("ce-column", cls, cls.y[:, None]),
        ("ce-fewer-samples", cls, cls.y[:-1]),
        ("ce-extra-dim", cls, cls.y.reshape(N, 1).expand(N, 2).contiguous()),
        ("ce-probs-wrong-classes", cls, torch.full((N, 4), 0.25, dtype=torch.float64)),
    ]


_TARGET_IDS = [c[0] for c in _targets_mismatch_cases()]


@pytest.mark.parametrize("index", range(len(_TARGET_IDS)), ids=_TARGET_IDS)
def test_ggn_vp_rejects_targets_of_wrong_shape(index):
    _, problem, y = _targets_mismatch_cases()[index]
    fn, params = functional(problem)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    with pytest.raises(ERRORS, match=TARGETS):
        curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, y, v)


@pytest.mark.parametrize("index", range(len(_TARGET_IDS)), ids=_TARGET_IDS)
def test_loss_methods_reject_targets_of_wrong_shape(index):
    _, problem, y = _targets_mismatch_cases()[index]
    fn, params = functional(problem)
    outputs = fn(params, problem.x).detach()
    loss = get_loss(problem.loss_fn)
    with pytest.raises(ERRORS, match=TARGETS):
        loss.hessian_vp(outputs, y, torch.ones_like(outputs))
    with pytest.raises(ERRORS, match=TARGETS):
        loss.hessian_factor(outputs, y)


@pytest.mark.parametrize("index", range(len(_TARGET_IDS)), ids=_TARGET_IDS)
def test_per_sample_grad_rejects_targets_of_wrong_shape(index):
    _, problem, y = _targets_mismatch_cases()[index]
    fn, params = functional(problem)
    with pytest.raises(ERRORS, match=TARGETS):
        curvfx.per_sample_grad(fn, problem.loss_fn, params, problem.x, y)


@pytest.mark.parametrize("case_name", ["mlp_tanh-mse_mean", "mlp_relu-ce_mean"])
def test_loss_hessian_vp_rejects_v_of_wrong_shape(case_name):
    problem = CASES_BY_NAME[case_name].make()
    fn, params = functional(problem)
    outputs = fn(params, problem.x).detach()
    loss = get_loss(problem.loss_fn)
    with pytest.raises(ERRORS, match=V):
        loss.hessian_vp(outputs, problem.y, torch.ones(outputs.shape[0], 1, dtype=outputs.dtype))


# ---------------------------------------------------------------------------------------
# empty batches


def _empty(problem):
    x = problem.x
    x0 = tuple(t[:0] for t in x) if isinstance(x, tuple) else x[:0]
    return x0, problem.y[:0]


@pytest.mark.parametrize("case_name", ["mlp_tanh-mse_mean", "mlp_relu-ce_sum", "two_inputs-ce_sum"])
def test_empty_batch_is_rejected(case_name):
    problem = CASES_BY_NAME[case_name].make()
    fn, params = functional(problem)
    x0, y0 = _empty(problem)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    with pytest.raises(ValueError, match=EMPTY):
        curvfx.ggn_vp(fn, problem.loss_fn, params, x0, y0, v)
    with pytest.raises(ValueError, match=EMPTY):
        curvfx.per_sample_grad(fn, problem.loss_fn, params, x0, y0)
    with pytest.raises(ValueError, match=EMPTY):
        curvfx.per_sample_jacobian(fn, params, x0)


def test_loss_rejects_empty_outputs():
    loss = get_loss(nn.CrossEntropyLoss())
    outputs = torch.zeros(0, 3, dtype=torch.float64)
    targets = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(ValueError, match=EMPTY):
        loss.hessian_factor(outputs, targets)
    with pytest.raises(ValueError, match=EMPTY):
        loss.hessian_vp(outputs, targets, outputs)


# ---------------------------------------------------------------------------------------
# names, types, strategies


def test_unknown_strategy_is_rejected():
    problem = _CLASSIFICATION.make()
    fn, params = functional(problem)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    with pytest.raises(ValueError, match="strategy"):
        curvfx.hvp(loss_of_params(problem, fn), params, v, strategy="newton")
    with pytest.raises(ValueError, match="strategy"):
        curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy="rev-rev")


def test_hvp_of_non_scalar_function_is_rejected():
    problem = _REGRESSION.make()
    fn, params = functional(problem)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    with pytest.raises(ERRORS, match=r"(?i)scalar"):
        curvfx.hvp(lambda p: fn(p, problem.x), params, v)


def test_make_functional_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        curvfx.make_functional(lambda x: x)


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_make_functional_rejects_embeddings_that_scale_gradients_by_frequency(bag):
    layer = (nn.EmbeddingBag if bag else nn.Embedding)(5, 2, scale_grad_by_freq=True)
    with pytest.raises(ValueError, match=r"model: embedding '1' has scale_grad_by_freq=True"):
        curvfx.make_functional(nn.Sequential(nn.Identity(), layer))
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        curvfx.ggn(nn.Sequential(layer), nn.MSELoss(), (torch.tensor([[1, 2]]), torch.zeros(1, 2)))


def test_batchnorm_without_running_statistics_couples_samples_in_eval_mode():
    """BatchNorm(track_running_stats=False) normalizes with batch statistics even in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    model = model.double().eval()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss = nn.CrossEntropyLoss()
    fn, params = curvfx.make_functional(model)
    assert fn.couples_samples
    with pytest.raises(ValueError, match=r"batch statistics.*track_running_stats=False"):
        curvfx.diagonal(curvfx.ggn(model, loss, (x, y)), method="exact")
    with pytest.raises(ValueError, match=r"batch statistics.*track_running_stats=False"):
        curvfx.per_sample_grad(fn, loss, params, x, y)
    model[1] = nn.BatchNorm1d(4).double().eval()  # running statistics: samples independent
    assert not curvfx.make_functional(model)[0].couples_samples


def test_per_sample_gradients_refuse_a_bce_weight_with_a_batch_dimension():
    """One sample alone has no loss under a [N, C] weight (torch cannot evaluate it either)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    loss = nn.BCEWithLogitsLoss(weight=torch.rand(6, 3, dtype=torch.float64))
    fn, params = curvfx.make_functional(model)
    for transform in (curvfx.per_sample_grad, curvfx.per_sample_grad_norms):
        with pytest.raises(ValueError, match=r"weight: shape \[6, 3\] does not broadcast to the outputs"):
            transform(fn, loss, params, x, y)
    G = curvfx.ggn(model, loss, (x, y)).to_dense()  # the batch loss itself is fine
    assert torch.allclose(G, G.T)


def test_get_loss_rejects_non_callable():
    with pytest.raises(TypeError, match="loss"):
        get_loss(3)
