"""The model zoo (issue #11): every operator and exact estimator on real architectures.

Models (``zoo.py``): a GPT-style decoder (causal SDPA, LayerNorm, GELU, tied output
embedding, cross-entropy on [N, V, T] logits with ignored targets), a ResNet-style CNN
with BatchNorm2d in train and in eval mode, a GroupNorm CNN, LSTM and GRU classifiers, a
model called as ``model(**{"input_ids", "attention_mask"})``, a LoRA model (frozen base,
trainable adapters) and an MLP with ``ReLU(inplace=True)``. For each: Hessian, GGN, Fisher
(exact, empirical, MC) and Jacobian against dense float64 truths built without curvfx
(``zoo.ZooTruth``), exact diagonals and traces, the top eigenvalue, and no side effects
(params, buffers, .grad, hooks, train flags, global settings; ``helpers.unchanged``).
The model with dropout in train mode is in ``test_randomness.py``: its truths need the
operator's mask seed (Hessian, GGN, exact Fisher and Jacobian products, exact diagonals,
trace and top eigenvalue under ``randomness="fixed"``; ``"off"`` against ``model.eval()``).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from cases import slice_batch
from dense import assert_close_rel, rel_err
from helpers import GGN_STRATEGIES, HVP_STRATEGIES, hvp_or_none, unchanged
from operator_checks import assert_matches_dense
from torch import Tensor
from zoo import ZOO, ZOO_BY_NAME, ZooTruth, zoo_truth

import curvfx
from curvfx.losses import get_loss

OPERATORS = ("hessian", "ggn", "fisher_exact", "fisher_empirical", "fisher_mc")
GAUSS_NEWTON = OPERATORS[1:]
MC_SEED = 5
MC_DRAWS = 2
IDS = [case.name for case in ZOO]


def _rnn(name: str) -> bool:
    return name.startswith(("lstm", "gru"))


@pytest.fixture(params=ZOO, ids=IDS)
def case(request):
    """Every zoo case."""
    return request.param


@pytest.fixture(autouse=True)
def _expected_warnings(request):
    """Native RNNs have no vmap batching rule: curvfx warns and loops over columns/samples."""
    with warnings.catch_warnings():
        params = getattr(request.node, "callspec", None)
        case = params.params.get("case") if params else None
        if case is not None and _rnn(case.name):
            warnings.filterwarnings("ignore", message=".*(could not be vmapped|could not vmap).*")
        yield


def build(case, operator: str, problem):
    """The curvfx operator ``operator`` of ``problem`` (MC draws seeded by MC_SEED)."""
    model, loss_fn, data = problem.model, problem.loss_fn, (problem.x, problem.y)
    if operator == "hessian":
        return curvfx.hessian(model, loss_fn, data)
    if operator == "ggn":
        return curvfx.ggn(model, loss_fn, data)
    kind = operator.removeprefix("fisher_")
    extra = {}
    if kind == "mc":
        extra = {"num_samples": MC_DRAWS, "generator": torch.Generator().manual_seed(MC_SEED)}
    return curvfx.fisher(model, loss_fn, data, kind=kind, **extra)


def mc_truth(truth: ZooTruth, op) -> Tensor:
    """The MC Fisher's dense matrix at the targets it draws: the mean of the empirical Fisher there.

    The operator draws, for its one batch, ``num_samples`` target sets from the predictive
    at the outputs with a generator seeded ``op.seed + 0`` (see ``FisherOperator``); the
    same draws are made here, and the matrix at them is built densely without curvfx.
    """
    loss = get_loss(truth.problem.loss_fn)
    g = torch.Generator().manual_seed(op.seed)
    draws = [loss.sample_targets(truth.outputs, g, observed=truth.problem.y) for _ in range(op.num_samples)]
    return sum(truth.empirical_fisher(d) for d in draws) / len(draws)


def truth_matrix(truth: ZooTruth, operator: str, op=None) -> Tensor:
    """The dense truth of ``operator`` (every zoo loss is canonical: exact Fisher == GGN)."""
    if operator == "hessian":
        return truth.hessian
    if operator in ("ggn", "fisher_exact"):
        return truth.ggn
    if operator == "fisher_empirical":
        return truth.empirical_fisher_at_data
    return mc_truth(truth, op)


@functools.cache
def _eigvalsh(name: str, operator: str) -> Tensor:
    case = ZOO_BY_NAME[name]
    truth = zoo_truth(case)
    op = build(case, operator, case.make())
    return torch.linalg.eigvalsh(truth_matrix(truth, operator, op))


# ---------------------------------------------------------------------------------------
# products


@pytest.mark.parametrize("operator", OPERATORS)
def test_operator_matches_dense(case, operator):
    truth = zoo_truth(case)
    problem = case.make()
    with unchanged(problem):
        op = build(case, operator, problem)
        assert_matches_dense(op, truth_matrix(truth, operator, op))


def test_mc_truth_is_not_the_exact_fisher(case):
    """The MC check above is meaningful: its draws give a matrix away from the exact one."""
    truth = zoo_truth(case)
    op = build(case, "fisher_mc", case.make())
    assert rel_err(mc_truth(truth, op), truth.ggn) > 1e-3


def test_jacobian_matches_dense(case):
    truth = zoo_truth(case)
    problem = case.make()
    with unchanged(problem):
        J = curvfx.jacobian(problem.model, problem.x)
        assert_matches_dense(J, truth.jacobian)


# ---------------------------------------------------------------------------------------
# exact diagonal and trace


@pytest.mark.parametrize("operator", OPERATORS)
def test_exact_diagonal_matches_dense(case, operator):
    truth = zoo_truth(case)
    problem = case.make()
    with unchanged(problem):
        op = build(case, operator, problem)
        if case.batchnorm_train and operator != "hessian":
            with pytest.raises(ValueError, match=r"batch statistics.*model\.eval\(\)"):
                curvfx.diagonal(op, method="exact")
            return
        # Hessian: no factored diagonal; curvfx takes P products with identity columns
        d = curvfx.diagonal(op, method="exact")
    assert_close_rel(d, torch.diagonal(truth_matrix(truth, operator, op)), tol=1e-10)


@pytest.mark.parametrize("operator", OPERATORS)
def test_exact_trace_matches_dense(case, operator):
    truth = zoo_truth(case)
    problem = case.make()
    with unchanged(problem):
        op = build(case, operator, problem)
        if case.batchnorm_train and operator != "hessian":
            with pytest.raises(ValueError, match="batch statistics"):
                curvfx.trace(op, method="exact")
            return
        t = curvfx.trace(op, method="exact")
    expected = torch.trace(truth_matrix(truth, operator, op))
    assert isinstance(t, Tensor) and t.dim() == 0
    assert_close_rel(t, expected, tol=1e-10)


# ---------------------------------------------------------------------------------------
# top eigenvalue


@pytest.mark.parametrize("operator", OPERATORS)
def test_top_eigenvalue_matches_eigvalsh(case, operator):
    problem = case.make()
    with unchanged(problem), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not converged is a failure here
        if _rnn(case.name):
            warnings.filterwarnings("ignore", message=".*could not be vmapped.*")
        op = build(case, operator, problem)
        top = curvfx.eigsh(op, k=1, generator=torch.Generator().manual_seed(0), return_eigenvectors=False)
    assert top.shape == (1,)
    assert_close_rel(top[0], _eigvalsh(case.name, operator)[-1], tol=1e-8)


# ---------------------------------------------------------------------------------------
# per-sample transforms


def test_per_sample_transforms_match_dense(case):
    problem = case.make()
    fn, params = curvfx.make_functional(problem.model)
    args = (fn, problem.loss_fn, params, problem.x, problem.y)
    if case.batchnorm_train:
        for transform in (curvfx.per_sample_grad, curvfx.per_sample_grad_norms):
            with pytest.raises(ValueError, match="batch statistics"):
                transform(*args)
        with pytest.raises(ValueError, match="batch statistics"):
            curvfx.per_sample_jacobian(fn, params, problem.x)
        return
    truth = zoo_truth(case)
    n = problem.num_samples
    with unchanged(problem):
        grads = curvfx.per_sample_grad(*args)
        norms = curvfx.per_sample_grad_norms(*args)
        jac = curvfx.per_sample_jacobian(fn, params, problem.x)
    got = torch.cat([g.reshape(n, -1) for g in grads.values()], 1)
    assert_close_rel(got, truth.per_sample_grads, tol=1e-10)
    assert_close_rel(norms, truth.per_sample_grads.norm(dim=1), tol=1e-10)
    out = truth.outputs[0].numel()
    got_jac = torch.cat([j.reshape(n, out, -1) for j in jac.values()], 2)
    assert_close_rel(got_jac, truth.jacobian.reshape(n, out, truth.num_params), tol=1e-10)


@pytest.mark.parametrize("name", ["lstm-ce_sum", "gru-mse_mean"])
def test_per_sample_transforms_loop_over_samples_for_native_rnns(name):
    """The native RNN kernels have no vmap batching rule: a warned loop, not a crash."""
    problem = ZOO_BY_NAME[name].make()
    fn, params = curvfx.make_functional(problem.model)
    with pytest.warns(RuntimeWarning, match="per_sample_grad: could not vmap.*looping over samples"):
        curvfx.per_sample_grad(fn, problem.loss_fn, params, problem.x, problem.y)
    with pytest.warns(RuntimeWarning, match="per_sample_jacobian: could not vmap.*looping over samples"):
        curvfx.per_sample_jacobian(fn, params, problem.x)


# ---------------------------------------------------------------------------------------
# every engine of the transforms (the operators use "auto")


def _random(n: int, seed: int = 11) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("strategy", HVP_STRATEGIES)
def test_hvp_strategy_matches_dense(case, strategy):
    truth = zoo_truth(case)
    problem = case.make()
    v = _random(truth.num_params)
    with unchanged(problem):
        fn, params = curvfx.make_functional(problem.model)
        got = hvp_or_none(
            lambda p: problem.loss_fn(fn(p, problem.x), problem.y), params, v, strategy, mse=case.mse
        )
    if got is None:
        pytest.skip(f"{strategy!r} declines this function (ValueError; see helpers.hvp_or_none)")
    assert_close_rel(got, truth.hessian @ v, tol=1e-10)


@pytest.mark.parametrize("strategy", GGN_STRATEGIES)
def test_ggn_strategy_matches_dense(case, strategy):
    truth = zoo_truth(case)
    problem = case.make()
    v = _random(truth.num_params)
    with unchanged(problem):
        fn, params = curvfx.make_functional(problem.model)
        got = curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)
    assert_close_rel(got, truth.ggn @ v, tol=1e-10)


@pytest.mark.parametrize("backend", ["structured", "generic"])
@pytest.mark.parametrize("operator", GAUSS_NEWTON)
def test_exact_diagonal_backends_match_dense(case, operator, backend):
    if case.batchnorm_train:
        pytest.skip("no exact diagonal with BatchNorm in train mode (test_exact_diagonal_matches_dense)")
    truth = zoo_truth(case)
    problem = case.make()
    with unchanged(problem):
        op = build(case, operator, problem)
        d = op._exact_diagonal(backend=backend)
    assert_close_rel(d, torch.diagonal(truth_matrix(truth, operator, op)), tol=1e-10)


# ---------------------------------------------------------------------------------------
# model-specific checks


@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher_empirical"])
@pytest.mark.parametrize("name", ["gpt-ce_ignore_mean", "dict_input-ce_mean", "lstm-ce_sum"])
def test_batches_combine_to_the_whole_batch(name, operator):
    """Data as a list of unequal batches (different ignored counts for the GPT): same matrix."""
    case = ZOO_BY_NAME[name]
    truth = zoo_truth(case)
    problem = case.make()
    batches = [(slice_batch(problem.x, a, b), problem.y[a:b]) for a, b in [(0, 1), (1, problem.num_samples)]]
    with unchanged(problem), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(could not be vmapped|could not vmap).*")
        op = {"hessian": curvfx.hessian, "ggn": curvfx.ggn, "fisher_empirical": curvfx.empirical_fisher}[
            operator
        ](problem.model, problem.loss_fn, batches)
        expected = truth_matrix(truth, operator)
        assert_close_rel(op @ _random(truth.num_params), expected @ _random(truth.num_params), tol=1e-10)
        assert_close_rel(op.to_dense(), expected, tol=1e-10)
        if operator != "hessian":
            d = curvfx.diagonal(op, method="exact")
            assert_close_rel(d, torch.diagonal(expected), tol=1e-10)


def test_zoo_sizes_stay_small():
    """Dense truths stay cheap: P <= ~400, N <= 4."""
    for case in ZOO:
        truth = zoo_truth(case)
        assert truth.num_params <= 400 and truth.problem.num_samples <= 4, case.name


def test_gpt_head_is_tied_and_counted_once():
    problem = ZOO_BY_NAME["gpt-ce_ignore_mean"].make()
    model = problem.model
    assert model.lm_head.weight is model.tok_emb.weight
    _, params = curvfx.make_functional(model)
    assert "lm_head.weight" not in params and "tok_emb.weight" in params
    assert (problem.y == -100).any()


def test_batchnorm_train_matches_batch_truth_and_differs_from_eval():
    """Train-mode BatchNorm: the products are those of the whole batch's loss; eval differs."""
    case = ZOO_BY_NAME["resnet_bn_train-ce_mean"]
    problem = case.make()
    assert problem.model.training
    v = _random(zoo_truth(case).num_params, seed=3)
    with unchanged(problem):
        train_ggn = curvfx.ggn(problem.model, problem.loss_fn, (problem.x, problem.y)) @ v
    problem.model.eval()
    eval_ggn = curvfx.ggn(problem.model, problem.loss_fn, (problem.x, problem.y)) @ v
    assert rel_err(eval_ggn, train_ggn) > 1e-3


def test_batchnorm_running_stats_untouched_by_every_product():
    """Running statistics and num_batches_tracked stay as they were (train mode)."""
    problem = ZOO_BY_NAME["resnet_bn_train-ce_mean"].make()
    before = {n: b.clone() for n, b in problem.model.named_buffers()}
    for operator in OPERATORS:
        op = build(None, operator, problem)
        v = torch.ones(op.shape[0], dtype=torch.float64)
        op @ v
        op @ torch.stack([v, -v], 1)
    curvfx.jacobian(problem.model, problem.x) @ v
    for n, b in problem.model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_lora_frozen_base_is_excluded():
    problem = ZOO_BY_NAME["lora-mse_sum"].make()
    _, params = curvfx.make_functional(problem.model)
    assert sorted(params) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    op = curvfx.ggn(problem.model, problem.loss_fn, (problem.x, problem.y))
    assert op.shape == (zoo_truth(ZOO_BY_NAME["lora-mse_sum"]).num_params,) * 2


def test_unchanged_detects_leftover_hooks_and_settings():
    """The side-effect check of this file catches what it claims to catch."""
    problem = ZOO_BY_NAME["relu_inplace-ce_sum"].make()
    with pytest.raises(AssertionError, match="hooks"), unchanged(problem):
        problem.model[1].register_forward_hook(lambda *args: None)
    problem = ZOO_BY_NAME["relu_inplace-ce_sum"].make()
    with pytest.raises(AssertionError, match="hooks"), unchanged(problem):
        problem.model[0].weight.register_hook(lambda g: g)
    flag = torch.backends.cuda.math_sdp_enabled()
    try:
        with pytest.raises(AssertionError, match="math_sdp"), unchanged(problem):
            torch.backends.cuda.enable_math_sdp(not flag)
    finally:
        torch.backends.cuda.enable_math_sdp(flag)
    try:
        with pytest.raises(AssertionError, match="grad_enabled"), unchanged(problem):
            torch.set_grad_enabled(False)
    finally:
        torch.set_grad_enabled(True)
    with pytest.raises(AssertionError, match="requires_grad"), unchanged(problem):
        problem.model[0].bias.requires_grad_(False)
