"""Compiled operators: equal to eager and dense, compiled once, self-checked, no graph breaks."""

import warnings

import pytest
import torch
from helpers import CONSTRUCTORS
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import curvfx
import curvfx.optim


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


# -- the Jacobian ------------------------------------------------------------------------------


def _dense_jacobian(model, x):
    """J [N·C, P] by jacrev of the outputs over the flattened parameters (an independent route)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(theta):
        parts = theta.split([s.numel() for s in shapes])
        params = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}
        buffers = {k: b.clone() for k, b in model.named_buffers()}  # BatchNorm updates copies
        return torch.func.functional_call(model, (params, buffers), (x,)).reshape(-1)

    return torch.func.jacrev(outputs)(flat)


@pytest.mark.parametrize(
    "model, shape", [(_mlp, (4,)), (_cnn, (1, 6, 6)), (_bn_train, (4,))], ids=["mlp", "cnn", "bn"]
)
def test_compiled_jacobian_equals_eager_and_dense(model, shape):
    m = model()
    x = _data(shape)[0][0]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = curvfx.jacobian(m, x, compile={"backend": counter, "fullgraph": True})
    eager = curvfx.jacobian(m, x)
    dense = _dense_jacobian(m, x)
    g = torch.Generator().manual_seed(2)
    v, V = (torch.randn(dense.shape[1], *k, generator=g, dtype=torch.double) for k in ((), (3,)))
    u, U = (torch.randn(dense.shape[0], *k, generator=g, dtype=torch.double) for k in ((), (3,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no self-check failure, no loop fallback
        for op in (compiled, eager):
            assert _rel(op @ v, dense @ v) < 1e-10  # J v
            assert _rel(op @ V, dense @ V) < 1e-10  # J V, one vmapped graph
            assert _rel(op.T @ u, dense.T @ u) < 1e-10  # Jᵀ u
            assert _rel(op.T @ U, dense.T @ U) < 1e-10  # Jᵀ U
            assert _rel(U.T @ op, U.T @ dense) < 1e-10  # Uᵀ J
        frames = counter.frame_count
        for _ in range(3):  # reused: no recompilation on later calls
            compiled @ v, compiled @ V, compiled.T @ u, compiled.T @ U
    assert counter.frame_count == frames == 4  # J v, J V, Jᵀ u, Jᵀ U: one graph each


def test_jacobian_self_check_falls_back_to_eager_on_a_mismatch():
    m = _mlp()
    x = _data((4,))[0][0]
    op = curvfx.jacobian(m, x, compile={"backend": "eager"})
    dense = _dense_jacobian(m, x)
    u = torch.randn(dense.shape[0], dtype=torch.double)
    compiled = op._compiled_product("Jᵀ")
    compiled.matvec = lambda x, y, u: 2 * compiled.product(x, y, u)  # a wrong compiled product
    with pytest.warns(RuntimeWarning, match="JacobianOperator.T: the compiled matvec differs"):
        assert _rel(op.T @ u, dense.T @ u) < 1e-12  # .T's zero probe proves nothing: u is checked
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; eager from now on
        assert _rel(op.T @ u, dense.T @ u) < 1e-12
    unchecked = curvfx.jacobian(m, x, compile={"backend": "eager", "check": False})
    wrong = unchecked._compiled_product("J")
    wrong.matvec = lambda x, y, v: 2 * wrong.product(x, y, v)
    v = torch.randn(dense.shape[1], dtype=torch.double)
    assert _rel(unchecked @ v, 2 * dense @ v) < 1e-12  # "check": False trusts it


@pytest.mark.slow
def test_inductor_jacobian_equals_dense():
    m = _mlp()
    x = _data((4,))[0][0]
    J, dense = curvfx.jacobian(m, x, compile=True), _dense_jacobian(m, x)
    v, U = torch.randn(dense.shape[1], dtype=torch.double), torch.randn(dense.shape[0], 2, dtype=torch.double)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _rel(J @ v, dense @ v) < 1e-10
        assert _rel(J.T @ U, dense.T @ U) < 1e-10


# -- estimators and HessianFree on compiled operators ---------------------------------------


def _seeded(fn, *args, **kwargs):
    return fn(*args, generator=torch.Generator().manual_seed(3), **kwargs)


def _moments(nodes, weights):
    """Σ w λᵏ, k = 0..3: the density's moments (the nodes of the null space's cluster are arbitrary)."""
    return torch.stack([(weights * nodes**k).sum() for k in range(4)])


ESTIMATORS = {
    "cg": lambda A, b: curvfx.cg(A, b, damping=0.1, tol=1e-12)[0],
    "eigsh": lambda A, b: _seeded(curvfx.eigsh, A, k=2, return_eigenvectors=False),
    "spectral_density": lambda A, b: _moments(*_seeded(curvfx.spectral_density, A, num_probes=2)),
    "trace": lambda A, b: _seeded(curvfx.trace, A, "hutchinson", num_samples=8),
    "diagonal": lambda A, b: _seeded(curvfx.diagonal, A, "hutchinson", num_samples=8),
}


@pytest.mark.parametrize(
    "name", [n if n == "cg" else pytest.param(n, marks=pytest.mark.slow) for n in ESTIMATORS]
)
def test_estimators_on_a_compiled_operator_equal_eager(name):
    m, data = _mlp(), _data((4,))
    compiled = curvfx.ggn(m, nn.CrossEntropyLoss(), data, compile={"backend": "aot_eager", "fullgraph": True})
    eager = curvfx.ggn(m, nn.CrossEntropyLoss(), data)
    b = torch.randn(eager.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.double)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _rel(ESTIMATORS[name](compiled, b), ESTIMATORS[name](eager, b)) < 1e-10


def test_hessian_free_with_compile_equals_eager_and_compiles_once():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(24, 4, generator=g, dtype=torch.double), torch.randint(0, 3, (24,), generator=g)
    batches = [(X[:12], y[:12]), (X[12:], y[12:])] * 2  # same shapes: one graph for all steps
    counter = CompileCounterWithBackend("aot_eager")
    losses = {}
    for compile in (False, {"backend": counter, "fullgraph": True}):
        m = _mlp()
        opt = curvfx.optim.HessianFree(
            m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss(), compile=compile
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            losses[bool(compile)] = torch.stack([opt.step(batch) for batch in batches])
    assert _rel(losses[True], losses[False]) < 1e-10
    assert counter.frame_count == 1  # the matvec, compiled at the first step and reused after
    with pytest.raises(ValueError, match="compile"):
        curvfx.optim.HessianFree(
            m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss(), curvature="mc_fisher", compile=True
        )
