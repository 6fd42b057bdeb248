"""Compiled operators: equal to eager and dense, compiled once, self-checked, no graph breaks."""

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import curvfx

CONSTRUCTORS = {
    "hessian": curvfx.hessian,
    "ggn": curvfx.ggn,
    "fisher_exact": lambda *a, **k: curvfx.fisher(*a, kind="exact", **k),
    "empirical_fisher": curvfx.empirical_fisher,
}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


def _bn_train():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().train()


def _data(shape, n=10):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, *shape, generator=g, dtype=torch.double)
    Y = torch.randint(0, 3, (n,), generator=g)
    return [(X[:6], Y[:6]), (X[6:], Y[6:])]  # unequal batches: two shapes


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", CONSTRUCTORS)
@pytest.mark.parametrize(
    "model, shape", [(_mlp, (4,)), (_cnn, (1, 6, 6)), (_bn_train, (4,))], ids=["mlp", "cnn", "bn"]
)
def test_compiled_products_equal_eager_and_dense(name, model, shape):
    ctor, m, data = CONSTRUCTORS[name], model(), _data(shape)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = ctor(m, nn.CrossEntropyLoss(), data, compile={"backend": counter, "fullgraph": True})
    eager = ctor(m, nn.CrossEntropyLoss(), data)
    dense = eager.to_dense()
    g = torch.Generator().manual_seed(2)
    v = torch.randn(eager.shape[0], generator=g, dtype=torch.double)
    V = torch.randn(eager.shape[0], 3, generator=g, dtype=torch.double)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no self-check failure, no loop fallback
        assert _rel(compiled @ v, dense @ v) < 1e-10
        assert _rel(compiled @ V, dense @ V) < 1e-10
        frames = counter.frame_count
        for _ in range(3):  # reused: no recompilation on later calls
            assert _rel(compiled @ v, eager @ v) < 1e-10
            assert _rel(compiled @ V, eager @ V) < 1e-10
    assert counter.frame_count == frames
    assert frames <= 4  # matvec and matmat, each at most a static and a dynamic graph


def test_self_check_falls_back_to_eager_on_a_mismatch():
    m, data = _mlp(), _data((4,))
    op = curvfx.ggn(m, nn.CrossEntropyLoss(), data, compile={"backend": "eager"})
    compiled = op._compiled_product()
    compiled.matvec = lambda x, y, v: 2 * compiled.product(x, y, v)  # a wrong compiled product
    v = torch.randn(op.shape[0], dtype=torch.double)
    truth = curvfx.ggn(m, nn.CrossEntropyLoss(), data) @ v
    with pytest.warns(RuntimeWarning, match="GGNOperator: the compiled matvec differs"):
        assert _rel(op @ v, truth) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; eager from now on
        assert _rel(op @ v, truth) < 1e-12


def test_check_false_trusts_the_compiled_product():
    m, data = _mlp(), _data((4,))
    op = curvfx.ggn(m, nn.CrossEntropyLoss(), data, compile={"backend": "eager", "check": False})
    compiled = op._compiled_product()
    compiled.matvec = lambda x, y, v: 2 * compiled.product(x, y, v)
    v = torch.randn(op.shape[0], dtype=torch.double)
    truth = curvfx.ggn(m, nn.CrossEntropyLoss(), data) @ v
    assert _rel(op @ v, 2 * truth) < 1e-12


def test_bad_compile_arguments():
    m, data = _mlp(), _data((4,))
    with pytest.raises(TypeError, match="compile"):
        curvfx.ggn(m, nn.CrossEntropyLoss(), data, compile="yes")
    with pytest.raises(ValueError, match="compile"):
        curvfx.fisher(m, nn.CrossEntropyLoss(), data, kind="mc", compile=True)


def test_transforms_work_under_a_users_torch_compile():
    m = _mlp()
    fn, params = curvfx.make_functional(m)
    (x, y), _ = _data((4,))
    loss = nn.CrossEntropyLoss()
    v = torch.randn(curvfx.ravel(params).numel(), dtype=torch.double)
    truth = curvfx.hvp(lambda p: loss(fn(p, x), y), params, v)

    @torch.compile(backend="aot_eager")
    def compiled_hvp(v):
        return curvfx.hvp(lambda p: loss(fn(p, x), y), params, v, strategy="rev-rev")

    assert _rel(compiled_hvp(v), truth) < 1e-10
    compiled_ggn = torch.compile(
        lambda v: curvfx.ggn_vp(fn, loss, params, x, y, v, strategy="func-vjp"), backend="aot_eager"
    )
    assert _rel(compiled_ggn(v), curvfx.ggn_vp(fn, loss, params, x, y, v)) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_inductor_products_equal_eager(name):
    m, data = _mlp(), _data((4,))
    compiled = CONSTRUCTORS[name](m, nn.CrossEntropyLoss(), data, compile=True)
    eager = CONSTRUCTORS[name](m, nn.CrossEntropyLoss(), data)
    v = torch.randn(eager.shape[0], dtype=torch.double)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _rel(compiled @ v, eager @ v) < 1e-10
