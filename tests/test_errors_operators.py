"""Bad input to the operators (curvature, Jacobian, base arithmetic) raises a clear error.

Every refusal names the argument (``match=``); where numbers matter the accepted input is
checked against a dense truth in float64.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from dense import assert_close_rel
from helpers import CONSTRUCTORS
from torch import nn

import curvfx
from curvfx.losses import AutogradLoss
from curvfx.operators import DenseOperator, FunctionOperator

DTYPE = torch.float64
ERRORS = (ValueError, TypeError)


def _regression():
    """MLP with outputs [5, 1], targets [5, 1], MSE (P = 21)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    return model, torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 1, dtype=DTYPE)


def _classification():
    """MLP with logits [5, 2], class targets [5], cross-entropy (P = 26)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    return model, torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 1, 1, 0, 1])


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _dense_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """∇²_θ loss_fn(model(x), y) by torch.autograd.functional.hessian on the flat parameters."""
    fn, params = curvfx.make_functional(model)
    flat = curvfx.ravel(params).detach()
    return torch.autograd.functional.hessian(lambda t: loss_fn(fn(curvfx.unravel(t, params), x), y), flat)


def _message(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


# ---------------------------------------------------------------------------------------
# 1. the Hessian checks its batches as the GGN does


def _bad_batches():
    """(id, model, loss, data, match) of batches the Hessian and the GGN refuse (torch would
    broadcast or index out of range); ``match`` is the Hessian's message, the loss's own."""
    reg, x, y = _regression()
    clf, xc, yc = _classification()
    ce_sum = nn.CrossEntropyLoss(reduction="sum")
    return [
        ("mse-targets-[N]-for-outputs-[N,1]", reg, nn.MSELoss(), (x, y[:, 0]), "targets"),
        ("mse-targets-[1,1]", reg, nn.MSELoss(), (x, y[:1]), "targets"),
        ("ce-class-out-of-range", clf, nn.CrossEntropyLoss(), (xc, yc + 4), "targets"),
        ("ce-N-mismatch", clf, nn.CrossEntropyLoss(), (xc, yc[:3]), "targets"),
        ("ce-probabilities-[N]", clf, nn.CrossEntropyLoss(), (xc, yc.to(DTYPE)[:, None]), "targets"),
        ("ce-sum-empty-batch", clf, ce_sum, (xc[:0], yc[:0]), "empty"),
    ]


_BAD_BATCH_IDS = [b[0] for b in _bad_batches()]


@pytest.mark.parametrize("index", range(len(_BAD_BATCH_IDS)), ids=_BAD_BATCH_IDS)
def test_hessian_refuses_the_batches_the_ggn_refuses(index):
    _, model, loss_fn, data, match = _bad_batches()[index]
    v = torch.ones(_num_params(model), dtype=DTYPE)
    from_hessian = _message(lambda: curvfx.hessian(model, loss_fn, data) @ v)
    assert re.search(match, from_hessian), from_hessian  # the message names the argument
    assert re.search(r"\b(y|targets|x)\b", _message(lambda: curvfx.ggn(model, loss_fn, data) @ v))


def _vmapped_cases():
    """(index, chunk_size) pairs; chunk_size=2 vmaps the columns (the targets are not batched there)."""
    out = []
    for index, name in enumerate(_BAD_BATCH_IDS):
        out.append(pytest.param(index, None, id=f"{name}-shared-graph"))
        out.append(pytest.param(index, 2, id=f"{name}-vmapped"))
    return out


@pytest.mark.parametrize(("index", "chunk_size"), _vmapped_cases())
def test_hessian_refuses_bad_batches_in_matmats_and_estimators(index, chunk_size):
    _, model, loss_fn, data, match = _bad_batches()[index]
    H = curvfx.hessian(model, loss_fn, data, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=match):
        H @ torch.ones(_num_params(model), 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=match):
        curvfx.trace(H)


def test_hessian_refuses_a_bad_batch_among_several():
    model, x, y = _classification()
    data = [(x[:3], y[:3]), (x[3:], y[3:] + 4)]
    with pytest.raises(ValueError, match="targets"):
        curvfx.hessian(model, nn.CrossEntropyLoss(), data) @ torch.ones(26, dtype=DTYPE)


def test_hessian_with_matching_targets_equals_the_dense_hessian():
    model, x, y = _regression()
    loss_fn = nn.MSELoss()
    H = curvfx.hessian(model, loss_fn, (x, y))
    truth = _dense_hessian(model, loss_fn, x, y)
    v = torch.randn(21, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    assert_close_rel(H.to_dense(), truth, tol=1e-10)
    assert_close_rel(H @ v, truth @ v, tol=1e-10)
    assert math.isclose(float(curvfx.trace(H)), float(truth.trace()), rel_tol=1e-10)


def test_hessian_of_an_arbitrary_callable_loss_still_works():
    model, x, _ = _classification()
    t = torch.randn(5, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    loss_fn = lambda f, target: ((f - target) ** 4).sum()  # noqa: E731
    truth = _dense_hessian(model, loss_fn, x, t)
    for loss in (loss_fn, AutogradLoss(loss_fn, reduction="sum")):
        assert_close_rel(curvfx.hessian(model, loss, (x, t)).to_dense(), truth, tol=1e-10)


# ---------------------------------------------------------------------------------------
# 2. chunk_size and factor


@pytest.mark.parametrize(
    ("chunk_size", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, ValueError), ("a", ValueError), (True, ValueError)],
    ids=["zero", "negative", "float", "str", "bool"],
)
@pytest.mark.parametrize("constructor", [*CONSTRUCTORS, "jacobian"])
def test_chunk_size_is_none_or_a_positive_int_at_construction(constructor, chunk_size, error):
    model, x, y = _classification()
    with pytest.raises(error, match="chunk_size"):
        if constructor == "jacobian":
            curvfx.jacobian(model, x, chunk_size=chunk_size)
        else:
            CONSTRUCTORS[constructor](model, nn.CrossEntropyLoss(), (x, y), chunk_size=chunk_size)


@pytest.mark.parametrize(
    ("factor", "error"),
    [
        ("2", TypeError),
        ("abc", TypeError),
        (None, TypeError),
        (True, TypeError),
        (torch.tensor([1.0, 2.0]), TypeError),
        (torch.tensor(True), TypeError),
        (1j, TypeError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (torch.tensor(math.nan), ValueError),
    ],
    ids=[
        "str-number",
        "str",
        "none",
        "bool",
        "tensor-[2]",
        "bool-tensor",
        "complex",
        "inf",
        "nan",
        "nan-tensor",
    ],
)
@pytest.mark.parametrize("constructor", list(CONSTRUCTORS))
def test_factor_is_a_finite_real_number(constructor, factor, error):
    model, x, y = _classification()
    with pytest.raises(error, match="factor"):
        CONSTRUCTORS[constructor](model, nn.CrossEntropyLoss(), (x, y), factor=factor)


@pytest.mark.parametrize(
    "factor", [2, 2.0, torch.tensor(2.0), torch.tensor(2)], ids=["int", "float", "0-dim", "0-dim-int"]
)
def test_factor_accepts_numbers_and_0_dim_tensors(factor):
    model, x, y = _classification()
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y))
    scaled = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y), factor=factor)
    assert isinstance(scaled.factor, float)
    assert_close_rel(scaled.to_dense(), 2.0 * G.to_dense(), tol=1e-12)


# ---------------------------------------------------------------------------------------
# 3a. symmetric flags


def test_symmetric_must_be_a_bool():
    N = torch.tensor([[1.0, 5.0], [0.0, 1.0]], dtype=DTYPE)
    for bad in ("no", "False", 0, 1, None):
        with pytest.raises(TypeError, match="symmetric"):
            FunctionOperator(lambda v: N @ v, 2, dtype=DTYPE, symmetric=bad)
        if bad is not None:
            with pytest.raises(TypeError, match="symmetric"):
                DenseOperator(N, symmetric=bad)
    assert DenseOperator(N).symmetric is False
    assert DenseOperator(N, symmetric=False).symmetric is False
    assert FunctionOperator(lambda v: N @ v, 2, dtype=DTYPE, symmetric=False).symmetric is False


# ---------------------------------------------------------------------------------------
# 3b. identity(n, dtype, device)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": True}, ValueError, r"\bn\b"),
        ({"n": 2.0}, ValueError, r"\bn\b"),
        ({"n": "3"}, ValueError, r"\bn\b"),
        ({"n": 0}, ValueError, r"\bn\b"),
        ({"n": 3, "dtype": "float64"}, TypeError, "dtype"),
        ({"n": 3, "dtype": float}, TypeError, "dtype"),
        ({"n": 3, "device": "nope"}, ValueError, "device"),
        ({"n": 3, "device": 1.5}, TypeError, "device"),
    ],
    ids=[
        "n-bool",
        "n-float",
        "n-str",
        "n-zero",
        "dtype-str",
        "dtype-python-type",
        "device-str",
        "device-float",
    ],
)
def test_identity_checks_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        curvfx.identity(**kwargs)


def test_identity_and_function_operator_take_dtype_and_device():
    eye = curvfx.identity(3, dtype=DTYPE, device="cpu")
    assert (eye.dtype, eye.device) == (DTYPE, torch.device("cpu"))
    v = torch.arange(3.0, dtype=DTYPE)
    assert torch.equal(eye @ v, v)
    with pytest.raises(TypeError, match="dtype"):
        FunctionOperator(lambda w: w, 3, dtype="float64")
    with pytest.raises(ValueError, match="device"):
        FunctionOperator(lambda w: w, 3, device="nope")
    with pytest.raises(ValueError, match="size"):
        FunctionOperator(lambda w: w, True)


# ---------------------------------------------------------------------------------------
# 3c. scaling by a number


@pytest.mark.parametrize(
    ("c", "error"),
    [
        ("2", TypeError),
        (True, TypeError),
        (None, TypeError),
        (torch.ones(2), TypeError),
        (math.inf, ValueError),
    ],
    ids=["str", "bool", "none", "tensor-[2]", "inf"],
)
def test_scaling_takes_a_real_number(c, error):
    A = DenseOperator(torch.eye(3, dtype=DTYPE))
    with pytest.raises(error, match=r"\bc\b"):
        A * c
    with pytest.raises(error, match=r"\bc\b"):
        c * A


def test_scaling_by_numbers_and_0_dim_tensors_matches_dense():
    M = torch.randn(3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    A = DenseOperator(M)
    for c in (2, 2.0, torch.tensor(2.0, dtype=DTYPE)):
        assert_close_rel((A * c).to_dense(), 2.0 * M, tol=1e-15)
        assert_close_rel((c * A).to_dense(), 2.0 * M, tol=1e-15)


# ---------------------------------------------------------------------------------------
# 3d. products are checked for shape, dtype and finiteness, also through to_scipy


@pytest.mark.parametrize(
    "matvec",
    [lambda v: v[:2], lambda v: v.double(), lambda v: [1.0, 2.0, 3.0], lambda v: v.unsqueeze(0)],
    ids=["short", "float64-for-float32", "list", "2-d"],
)
def test_function_operator_refuses_a_product_of_the_wrong_form(matvec):
    A = FunctionOperator(matvec, 3)
    with pytest.raises(ValueError, match="matvec"):
        A @ torch.ones(3)
    with pytest.raises(ValueError, match="matvec"):
        A @ torch.ones(3, 2)
    with pytest.raises(ValueError, match="matvec"):
        A.to_scipy().matvec(torch.ones(3).numpy())


def test_to_scipy_refuses_non_finite_products():
    pytest.importorskip("scipy.sparse.linalg")
    np = pytest.importorskip("numpy")
    model, x, y = _classification()
    S = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y)).to_scipy()
    nan = np.full(26, np.nan)
    for product in (S.matvec, S.rmatvec, lambda z: S.matmat(z[:, None])):
        with pytest.raises(ValueError, match="non-finite"):
            product(nan)


def test_to_scipy_products_match_dense_and_scipy_solvers_still_work():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(5, 4, dtype=DTYPE, generator=gen)
    S = DenseOperator(M).to_scipy()
    x4, x5 = torch.randn(4, dtype=DTYPE, generator=gen), torch.randn(5, dtype=DTYPE, generator=gen)
    assert_close_rel(torch.as_tensor(S.matvec(x4.numpy())), M @ x4, tol=1e-14)
    assert_close_rel(torch.as_tensor(S.matvec(x4[:, None].numpy())).reshape(-1), M @ x4, tol=1e-14)
    assert_close_rel(torch.as_tensor(S.rmatvec(x5.numpy())), M.T @ x5, tol=1e-14)
    assert_close_rel(torch.as_tensor(S.matmat(M.T.numpy())), M @ M.T, tol=1e-14)
    spd = M.T @ M + torch.eye(4, dtype=DTYPE)
    A = DenseOperator(spd).to_scipy()
    solution, info = scipy_linalg.cg(A, x4.numpy(), rtol=1e-12, atol=0.0)
    assert info == 0
    assert_close_rel(torch.as_tensor(solution), torch.linalg.solve(spd, x4), tol=1e-8)
    top = scipy_linalg.eigsh(A, k=1, which="LA", return_eigenvectors=False)
    assert math.isclose(float(top[0]), float(torch.linalg.eigvalsh(spd)[-1]), rel_tol=1e-8)


# ---------------------------------------------------------------------------------------
# 3e. matrices with K = 0 columns, as curvfx.hvp


@pytest.mark.parametrize("operator", ["hessian", "ggn", "sum", "dense"])
def test_matmat_refuses_zero_columns(operator):
    model, x, y = _classification()
    H = curvfx.hessian(model, nn.CrossEntropyLoss(), (x, y))
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y))
    A = {
        "hessian": H,
        "ggn": G,
        "sum": G + 0.1 * curvfx.identity(26),
        "dense": DenseOperator(torch.eye(26, dtype=DTYPE)),
    }[operator]
    with pytest.raises(ValueError, match=r"\bV\b.*K ≥ 1"):
        A @ torch.zeros(26, 0, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"\bV\b"):
        torch.zeros(0, 26, dtype=DTYPE) @ A
    with pytest.raises(ValueError, match="K ≥ 1"):  # the transform says the same
        curvfx.hvp(lambda p: (p**3).sum(), torch.ones(26, dtype=DTYPE), torch.zeros(26, 0, dtype=DTYPE))


# ---------------------------------------------------------------------------------------
# 3f. adding a number: say how to add damping


@pytest.mark.parametrize(
    "expression",
    [lambda A: A + 3.0, lambda A: 3.0 + A, lambda A: A - 3.0, lambda A: 3.0 - A],
    ids=["A+c", "c+A", "A-c", "c-A"],
)
def test_adding_a_number_says_to_add_a_multiple_of_the_identity(expression):
    A = DenseOperator(torch.eye(4, dtype=DTYPE))
    with pytest.raises(TypeError, match=r"3\.0 \* curvfx\.identity\(4\)"):
        expression(A)
    damped = A + 3.0 * curvfx.identity(4)
    assert_close_rel(damped.to_dense(), 4.0 * torch.eye(4, dtype=DTYPE), tol=1e-15)
