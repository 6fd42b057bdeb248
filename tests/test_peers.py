"""curvfx against the peer libraries curvlinops and BackPACK, quantity by quantity (float64).

Small models (an MLP 4-5-C with tanh or ReLU; a CNN Conv2d(2, 2, 3, padding=1) + ReLU +
Flatten + Linear(32, C)) and the losses ``MSELoss``, ``CrossEntropyLoss`` and
``BCEWithLogitsLoss`` with ``reduction="mean"`` and ``"sum"``, N = 8 samples. Each peer's
tests are skipped when it is not installed. What is compared, and the conversion from the
peer's number to curvfx's (Z is the loss's normalizer: N for cross-entropy, N·C for MSE
and BCE with "mean", 1 for "sum"; docs/conventions.md):

curvlinops (operators multiplied by the identity, or by a few columns for Monte Carlo),
always on two batches of 3 and 5 samples, so that the batch weights are checked too:

* ``HessianLinearOperator``, ``GGNLinearOperator``, ``EFLinearOperator`` = ``curvfx.hessian``,
  ``curvfx.ggn``, ``curvfx.empirical_fisher``: the same loss as written, no conversion
  (curvlinops' EF is ``c Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with ``c = 1/Z``, curvfx's ``(1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ``).
* ``JacobianLinearOperator`` / ``TransposedJacobianLinearOperator`` = ``curvfx.jacobian`` on
  the concatenated inputs (outputs row-major, batches stacked).
* ``FisherMCLinearOperator`` draws its targets from its own random stream, so it is compared
  in expectation: with ``mc_samples=M`` it approaches ``curvfx.fisher(kind="exact")`` as
  1/√M (the same predictive distributions, N(f, I/2) for MSE included).
* ``KFACLinearOperator`` with ``separate_weight_and_bias=False`` = ``curvfx.kfac`` (same
  Fisher type and approximation); with the default ``True`` it is curvfx's joint [W | b]
  block restricted to the weight-weight and bias-bias sub-blocks (the bias's input factor
  is the mean of the ones column, 1). ``fisher_type="mc"`` is compared in expectation with
  curvfx's type-2 KFAC. ``KFACInverseLinearOperator`` with ``use_exact_damping=True`` =
  ``op.inverse(λ)``, with ``use_heuristic_damping=True`` = ``op.inverse(λ,
  method="heuristic")`` (the same π), and on ``EKFACLinearOperator`` = ``ekfac(...).inverse(λ)``.
  (tests/test_kfac.py::test_matches_curvlinops covers further models and EKFAC itself.)

BackPACK (one backward pass with the extension on an ``extend``-ed deep copy):

* ``BatchGrad``: ∇(ℓ_n/Z), the per-sample terms of the batch loss; curvfx's
  ``per_sample_grad`` is the gradient of the loss on sample n alone, ∇ℓ_n/(Z/N) for "mean":
  × N for "mean", × 1 for "sum". ``BatchL2Grad`` (squared norms per parameter, summed
  over the parameters) likewise × N² against ``per_sample_grad_norms``².
* ``SumGradSquared`` = Σ_n (∇ℓ_n/Z)²: × Z gives ``diagonal(empirical_fisher)``.
* ``DiagGGNExact``, ``DiagHessian``: of the loss as written, no conversion. Their batched
  versions ``BatchDiagGGNExact`` / ``BatchDiagHessian`` are of ℓ_n/Z: × N ("mean") gives the
  diagonal of curvfx's operator on sample n alone. ``SqrtGGNExact`` S: SᵀS = ``ggn``.
* ``KFLR`` (type-2): ``[B, A]`` per Linear parameter = ``B`` and ``A[:in, :in]`` of curvfx's
  joint block, bias ``[B]``. For a convolution BackPACK sums the input factor over the T
  output positions and the output gradients over the positions before their outer product:
  its A is T × curvfx's "expand" A, its B curvfx's "reduce" B (both exact, as factors).
  (test_kfac.py::test_matches_backpack_kflr covers the tanh MLP with CE-mean and MSE-sum.)
* ``KFAC`` (MC) and ``DiagGGNMC``, in expectation: their B and diagonal approach curvfx's
  type-2 B and exact diagonal GGN. BackPACK supports ``BCEWithLogitsLoss`` only for one
  output, so its BCE cases use C = 1.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import pytest
import torch
from dense import assert_close_rel, rel_err
from torch import nn

import curvfx

DTYPE = torch.float64
N = 8
SPLIT = 3  # two batches: samples [0, 3) and [3, 8)


# -- problems -------------------------------------------------------------------------------


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def mlp(act, c):
    return nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, c))


def cnn(c):
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, c))


MODELS = {  # name: (factory of C outputs, input shape of one sample)
    "mlp-tanh": (lambda c: mlp(nn.Tanh, c), (4,)),
    "mlp-relu": (lambda c: mlp(nn.ReLU, c), (4,)),
    "cnn": (cnn, (2, 4, 4)),
}

LOSSES = {  # name: (loss, targets of n samples and c outputs)
    "mse_mean": (nn.MSELoss(), lambda n, c: rand(n, c, seed=3)),
    "mse_sum": (nn.MSELoss(reduction="sum"), lambda n, c: rand(n, c, seed=3)),
    "ce_mean": (
        nn.CrossEntropyLoss(),
        lambda n, c: torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(2)),
    ),
    "ce_sum": (
        nn.CrossEntropyLoss(reduction="sum"),
        lambda n, c: torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(2)),
    ),
    "bce_mean": (nn.BCEWithLogitsLoss(), lambda n, c: (rand(n, c, seed=4) > 0).to(DTYPE)),
    "bce_sum": (nn.BCEWithLogitsLoss(reduction="sum"), lambda n, c: (rand(n, c, seed=4) > 0).to(DTYPE)),
}


def problem(model_name, loss_name, c=3):
    """``(model, loss, x, y)`` with N samples; the model seeded (global RNG left alone), float64."""
    factory, shape = MODELS[model_name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = factory(c).to(DTYPE)
    loss, targets = LOSSES[loss_name]
    return model, loss, rand(N, *shape), targets(N, c)


def batches(x, y):
    return [(x[:SPLIT], y[:SPLIT]), (x[SPLIT:], y[SPLIT:])]


def normalizer(loss_name, c):
    """Z of the loss on all N samples."""
    if loss_name.endswith("sum"):
        return 1
    return N if loss_name.startswith("ce") else N * c


def is_mean(loss_name):
    return loss_name.endswith("mean")


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def eye(model):
    return torch.eye(num_params(model), dtype=DTYPE)


# -- curvlinops -------------------------------------------------------------------------------


@pytest.fixture
def curvlinops():
    return pytest.importorskip("curvlinops")


@contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def curvlinops_op(cls, model, loss, data, **options):
    """A curvlinops operator over all parameters (no determinism check: it costs products)."""
    return cls(model, loss, list(model.parameters()), data, check_deterministic=False, **options)


OPERATORS = {  # curvfx constructor: curvlinops class name
    "hessian": (curvfx.hessian, "HessianLinearOperator"),
    "ggn": (curvfx.ggn, "GGNLinearOperator"),
    "empirical_fisher": (curvfx.empirical_fisher, "EFLinearOperator"),
}


@pytest.mark.parametrize("kind", list(OPERATORS))
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_curvlinops_curvature_matrices(curvlinops, model_name, loss_name, kind):
    """Hessian, GGN and empirical Fisher over two unequal batches: the same matrices."""
    model, loss, x, y = problem(model_name, loss_name)
    data = batches(x, y)
    ours, theirs = OPERATORS[kind]
    with quiet():
        expected = curvlinops_op(getattr(curvlinops, theirs), model, loss, data) @ eye(model)
    assert_close_rel(ours(model, loss, data).to_dense(), expected, tol=1e-10)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_curvlinops_jacobian(curvlinops, model_name):
    """J [N·C, P] and Jᵀ: curvlinops stacks the batches' Jacobians, curvfx takes all inputs."""
    model, _, x, y = problem(model_name, "ce_mean")
    J = curvfx.jacobian(model, x).to_dense()
    with quiet():
        args = (model, list(model.parameters()), batches(x, y))
        theirs = curvlinops.JacobianLinearOperator(*args, check_deterministic=False)
        theirs_T = curvlinops.TransposedJacobianLinearOperator(*args, check_deterministic=False)
        assert_close_rel(J, theirs @ eye(model), tol=1e-12)
        assert_close_rel(J.T, theirs_T @ torch.eye(J.shape[0], dtype=DTYPE), tol=1e-12)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_curvlinops_mc_fisher_in_expectation(curvlinops, loss_name):
    """``FisherMCLinearOperator`` with M draws → curvfx's exact Fisher, error ~ 1/√M.

    On 4 columns V: ‖F_M V − F V‖ / ‖F V‖ is 3–14 % at M = 100 and ≤ 0.7 % at M = 20,000
    for these seeds; a wrong scaling (1/N, 2, the MSE variance) would be off by ≥ 50 %.
    """
    model, loss, x, y = problem("mlp-tanh", loss_name)
    data = batches(x, y)
    V = rand(num_params(model), 4, seed=11)
    exact = curvfx.fisher(model, loss, data, kind="exact") @ V
    errors = []
    with quiet():
        for mc_samples in (100, 20_000):
            F = curvlinops_op(
                curvlinops.FisherMCLinearOperator, model, loss, data, mc_samples=mc_samples, seed=0
            )
            errors.append(rel_err(F @ V, exact))
    assert errors[1] < 0.025 and errors[1] < errors[0] / 3, errors


def same_parameter(model):
    """[P, P] True where row and column belong to the same parameter tensor."""
    owner = torch.cat([torch.full((p.numel(),), i) for i, p in enumerate(model.parameters())])
    return owner[:, None] == owner[None, :]


KFAC_CASES = [  # (model, approximation): for an MLP "expand" and "reduce" coincide
    ("mlp-tanh", "expand"),
    ("cnn", "expand"),
    ("cnn", "reduce"),
]


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize(("model_name", "approx"), KFAC_CASES)
def test_curvlinops_kfac_joint_and_separate_bias(curvlinops, model_name, approx, loss_name, fisher_type):
    """KFAC over two batches: ``separate_weight_and_bias=False`` is curvfx's KFAC; the
    default ``True`` is its weight-weight and bias-bias sub-blocks."""
    model, loss, x, y = problem(model_name, loss_name)
    data = batches(x, y)
    ours = curvfx.kfac(model, loss, data, fisher_type=fisher_type, kfac_approx=approx).to_dense()
    with quiet():
        for separate in (False, True):
            theirs = curvlinops_op(
                curvlinops.KFACLinearOperator,
                model,
                loss,
                data,
                fisher_type=fisher_type,
                kfac_approx=approx,
                separate_weight_and_bias=separate,
            )
            expected = theirs @ eye(model)
            assert_close_rel(ours * same_parameter(model) if separate else ours, expected, tol=1e-10)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("loss_name", ["mse_sum", "ce_mean", "bce_mean"])
@pytest.mark.parametrize("model_name", ["mlp-relu", "cnn"])
def test_curvlinops_kfac_and_ekfac_inverses(curvlinops, model_name, loss_name, fisher_type):
    """EKFAC, and the damped inverses: exact damping (K + λI)⁻¹ and π-damping of KFAC,
    (E + λI)⁻¹ of EKFAC ("expand": the EKFAC basis is unique, see docs/kfac.md)."""
    model, loss, x, y = problem(model_name, loss_name)
    data = batches(x, y)
    options = dict(fisher_type=fisher_type, kfac_approx="expand")
    K = curvfx.kfac(model, loss, data, **options)
    E = curvfx.ekfac(model, loss, data, **options)
    damping = 1e-2 * float(curvfx.diagonal(K, "exact").mean())
    identity = eye(model)
    with quiet():
        theirs_K = curvlinops_op(
            curvlinops.KFACLinearOperator, model, loss, data, separate_weight_and_bias=False, **options
        )
        theirs_E = curvlinops_op(
            curvlinops.EKFACLinearOperator, model, loss, data, separate_weight_and_bias=False, **options
        )
        inverse = curvlinops.KFACInverseLinearOperator
        exact = inverse(theirs_K, damping=damping, use_exact_damping=True) @ identity
        heuristic = inverse(theirs_K, damping=damping, use_heuristic_damping=True) @ identity
        exact_E = inverse(theirs_E, damping=damping, use_exact_damping=True) @ identity
    assert_close_rel(K.inverse(damping).to_dense(), exact, tol=1e-10)
    assert_close_rel(K.inverse(damping, method="heuristic").to_dense(), heuristic, tol=1e-10)
    assert_close_rel(E.to_dense(), theirs_E @ identity, tol=1e-9)
    assert_close_rel(E.inverse(damping).to_dense(), exact_E, tol=1e-10)


@pytest.mark.parametrize("loss_name", ["mse_mean", "ce_mean", "bce_sum"])
def test_curvlinops_mc_kfac_in_expectation(curvlinops, loss_name):
    """``fisher_type="mc"`` with M draws per sample → curvfx's type-2 KFAC (A is the same,
    B = E[g gᵀ] over the predictive): 12–32 % at M = 10, ≤ 1.8 % at M = 1,000 here."""
    model, loss, x, y = problem("mlp-tanh", loss_name)
    data = batches(x, y)
    type2 = curvfx.kfac(model, loss, data).to_dense()
    errors = []
    with quiet():
        for mc_samples in (10, 1000):
            theirs = curvlinops_op(
                curvlinops.KFACLinearOperator,
                model,
                loss,
                data,
                fisher_type="mc",
                mc_samples=mc_samples,
                seed=0,
                separate_weight_and_bias=False,
            )
            errors.append(rel_err(theirs @ eye(model), type2))
    assert errors[1] < 0.05 and errors[1] < errors[0] / 3, errors


# -- BackPACK --------------------------------------------------------------------------------


@pytest.fixture
def backpack():
    return pytest.importorskip("backpack")


def backpack_problem(model_name, loss_name):
    """As :func:`problem`; BackPACK's ``BCEWithLogitsLoss`` needs one output (C = 1)."""
    c = 1 if loss_name.startswith("bce") else 3
    return (*problem(model_name, loss_name, c), c)


def run_backpack(backpack, model, loss, x, y, *extensions):
    """One backward pass with ``extensions`` on extended deep copies; returns the model copy."""
    bp_model = backpack.extend(copy.deepcopy(model))
    bp_loss = backpack.extend(copy.deepcopy(loss))
    with quiet(), backpack.backpack(*extensions):
        bp_loss(bp_model(x), y).backward()
    return bp_model


def gathered(bp_model, attribute, batch=False):
    """A BackPACK quantity of every parameter, flat in parameter order ([N, P] if ``batch``)."""
    parts = [getattr(p, attribute) for p in bp_model.parameters()]
    if batch:
        return torch.cat([t.reshape(N, -1) for t in parts], dim=1)
    return torch.cat([t.reshape(-1) for t in parts])


def per_sample(builder, model, loss, x, y, exact_diagonal):
    """[N, P]: the diagonal of ``builder``'s operator on each sample alone."""
    rows = []
    for n in range(N):
        op = builder(model, loss, (x[n : n + 1], y[n : n + 1]))
        rows.append(curvfx.diagonal(op, "exact") if exact_diagonal else op.to_dense().diagonal())
    return torch.stack(rows)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_backpack_first_order(backpack, model_name, loss_name):
    """BatchGrad (× N for "mean"), BatchL2Grad (× N²), SumGradSquared (× Z)."""
    from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared

    model, loss, x, y, c = backpack_problem(model_name, loss_name)
    bp = run_backpack(backpack, model, loss, x, y, BatchGrad(), BatchL2Grad(), SumGradSquared())
    scale = N if is_mean(loss_name) else 1
    fn, params = curvfx.make_functional(model)
    grads = torch.func.vmap(curvfx.ravel)(curvfx.per_sample_grad(fn, loss, params, x, y))
    assert_close_rel(scale * gathered(bp, "grad_batch", batch=True), grads, tol=1e-12)
    l2 = torch.stack([p.batch_l2 for p in bp.parameters()]).sum(0)
    assert_close_rel(scale**2 * l2, curvfx.per_sample_grad_norms(fn, loss, params, x, y) ** 2, tol=1e-12)
    ef = curvfx.diagonal(curvfx.empirical_fisher(model, loss, (x, y)), "exact")
    assert_close_rel(normalizer(loss_name, c) * gathered(bp, "sum_grad_squared"), ef, tol=1e-12)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_backpack_ggn(backpack, model_name, loss_name):
    """DiagGGNExact = exact diagonal of the GGN (and of the exact Fisher); BatchDiagGGNExact
    × N ("mean") = each sample's own; SqrtGGNExact S gives SᵀS = the GGN."""
    from backpack.extensions import BatchDiagGGNExact, DiagGGNExact, SqrtGGNExact

    model, loss, x, y, _ = backpack_problem(model_name, loss_name)
    bp = run_backpack(backpack, model, loss, x, y, DiagGGNExact(), BatchDiagGGNExact(), SqrtGGNExact())
    G = curvfx.ggn(model, loss, (x, y))
    diag = gathered(bp, "diag_ggn_exact")
    assert_close_rel(curvfx.diagonal(G, "exact"), diag, tol=1e-12)
    assert_close_rel(
        curvfx.diagonal(curvfx.fisher(model, loss, (x, y), kind="exact"), "exact"), diag, tol=1e-12
    )
    scale = N if is_mean(loss_name) else 1
    ours = per_sample(curvfx.ggn, model, loss, x, y, exact_diagonal=True)
    assert_close_rel(ours, scale * gathered(bp, "diag_ggn_exact_batch", batch=True), tol=1e-12)
    S = torch.cat([p.sqrt_ggn_exact.flatten(0, 1).flatten(1) for p in bp.parameters()], dim=1)  # [K·N, P]
    assert_close_rel(G.to_dense(), S.T @ S, tol=1e-12)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_backpack_diag_hessian(backpack, model_name, loss_name):
    """DiagHessian = diagonal of the Hessian; BatchDiagHessian × N ("mean") = each sample's."""
    from backpack.extensions import BatchDiagHessian, DiagHessian

    model, loss, x, y, _ = backpack_problem(model_name, loss_name)
    bp = run_backpack(backpack, model, loss, x, y, DiagHessian(), BatchDiagHessian())
    assert_close_rel(curvfx.diagonal(curvfx.hessian(model, loss, (x, y)), "exact"), gathered(bp, "diag_h"))
    scale = N if is_mean(loss_name) else 1
    ours = per_sample(curvfx.hessian, model, loss, x, y, exact_diagonal=False)
    assert_close_rel(ours, scale * gathered(bp, "diag_h_batch", batch=True), tol=1e-12)


def linear_blocks(K, bp_model):
    """(curvfx block, BackPACK layer) of every Linear layer, in order."""
    layers = [m for m in bp_model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return [(blk, layer) for blk, layer in zip(K.factors.blocks, layers) if isinstance(layer, nn.Linear)]


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", ["mlp-relu", "cnn"])
def test_backpack_kflr(backpack, model_name, loss_name):
    """KFLR factors: Linear [B, A] = curvfx's B and A[:in, :in], bias [B]; Conv2d A = T × the
    "expand" A, B = the "reduce" B (also its bias factor: the exact GGN of the bias)."""
    from backpack.extensions import KFLR

    model, loss, x, y, _ = backpack_problem(model_name, loss_name)
    bp = run_backpack(backpack, model, loss, x, y, KFLR())
    K = curvfx.kfac(model, loss, (x, y))
    blocks = linear_blocks(K, bp)
    assert len(blocks) == (1 if model_name == "cnn" else 2)
    for blk, layer in blocks:
        B_w, A_w = layer.weight.kflr
        (B_b,) = layer.bias.kflr
        size_in = A_w.shape[0]
        assert_close_rel(blk.B, B_w, tol=1e-12)
        assert_close_rel(blk.A[:size_in, :size_in], A_w, tol=1e-12)
        assert_close_rel(blk.B * blk.A[size_in, size_in], B_b, tol=1e-12)
    if model_name == "cnn":
        conv, positions = bp[0], 16
        B_w, A_w = conv.weight.kflr
        (B_b,) = conv.bias.kflr
        size_in = A_w.shape[0]
        expand = K.factors.blocks[0]
        reduce = curvfx.kfac(model, loss, (x, y), kfac_approx="reduce").factors.blocks[0]
        assert_close_rel(positions * expand.A[:size_in, :size_in], A_w, tol=1e-12)
        assert_close_rel(reduce.B, B_w, tol=1e-12)
        assert_close_rel(reduce.B, B_b, tol=1e-12)
        bias = curvfx.ggn(model, loss, (x, y)).restrict("0.bias").to_dense()
        assert_close_rel(bias, B_b, tol=1e-12)


@pytest.mark.parametrize("loss_name", ["mse_mean", "ce_sum", "bce_mean"])
def test_backpack_mc_in_expectation(backpack, loss_name):
    """KFAC (MC): A exact, B → curvfx's type-2 B; DiagGGNMC → the exact diagonal GGN.

    BackPACK draws from torch's global RNG (seeded here inside ``fork_rng``). Errors here
    (the largest of B's and the diagonal's): 0.7–7 % at M = 100, ≤ 1.3 % at M = 5,000.
    """
    from backpack.extensions import KFAC, DiagGGNMC

    model, loss, x, y, _ = backpack_problem("mlp-tanh", loss_name)
    K = curvfx.kfac(model, loss, (x, y))
    diag = curvfx.diagonal(curvfx.ggn(model, loss, (x, y)), "exact")
    errors = []
    for mc_samples in (100, 5000):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            bp = run_backpack(
                backpack, model, loss, x, y, KFAC(mc_samples=mc_samples), DiagGGNMC(mc_samples=mc_samples)
            )
        errs = [rel_err(gathered(bp, "diag_ggn_mc"), diag)]
        for blk, layer in linear_blocks(K, bp):
            B_w, A_w = layer.weight.kfac
            assert_close_rel(blk.A[: A_w.shape[0], : A_w.shape[0]], A_w, tol=1e-12)
            errs.append(rel_err(B_w, blk.B))
        errors.append(max(errs))
    assert errors[1] < 0.04 and errors[1] < errors[0], errors
