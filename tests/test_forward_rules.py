"""The forward-mode rules of :mod:`curvfx._forward_rules`, against torch's formulas and dense Hessians.

* Affine layers: one call under ``torch.autograd.forward_ad`` with and without
  :class:`ForwardRules`, in float64, comparing the output, its tangent and the
  reverse-mode gradients through the output and through the tangent to the primal input
  and weights.
* Differentiable tangents: the reverse-over-forward HVP (``strategy="rev-fwd"``) of a
  function around each operation in :data:`TRUSTED` (each must be covered), and around
  losses whose own forward-mode formula torch cannot back-propagate, equals the dense
  Hessian (``torch.autograd.functional.hessian``) times v; functions with operations the
  rules cannot make differentiable fall back to double backprop (and are exact too).
"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvfx
from curvfx._decompositions import DECOMPOSITIONS
from curvfx._forward_rules import TRUSTED, ForwardRules

D = torch.float64


def _run(op, x, weight, bias, w_tangent, b_tangent, x_tangent, options, rules):
    """(y, ẏ, ∂(y·r + ẏ·s)/∂(x, W, b)) for ``op(x, W, b, **options)`` with the given tangents."""
    x = x.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    with fwad.dual_level():
        wd = w if w_tangent is None else fwad.make_dual(w, w_tangent)
        bd = b if (b is None or b_tangent is None) else fwad.make_dual(b, b_tangent)
        xd = x if x_tangent is None else fwad.make_dual(x, x_tangent)
        if rules:
            with ForwardRules():
                out = op(xd, wd, bd, **options)
        else:
            out = op(xd, wd, bd, **options)
        y, tangent = fwad.unpack_dual(out)
    leaves = [x, w] + ([] if b is None else [b])
    r = torch.linspace(-1, 1, y.numel(), dtype=D).reshape(y.shape)  # cotangents
    s = torch.linspace(0.5, -2, y.numel(), dtype=D).reshape(y.shape)
    objective = (y * r).sum() + (0 if tangent is None else (tangent * s).sum())
    grads = torch.autograd.grad(objective, leaves, allow_unused=True, materialize_grads=True)
    return y.detach(), None if tangent is None else tangent.detach(), grads


CASES = {
    "linear": (F.linear, (7, 5), (3, 5), {}),
    "linear, 3-d input": (F.linear, (2, 7, 5), (3, 5), {}),
    "conv1d": (F.conv1d, (4, 2, 9), (3, 2, 3), {"padding": 1}),
    "conv2d": (F.conv2d, (4, 2, 6, 5), (6, 1, 3, 3), {"stride": 2, "groups": 2}),
    "conv2d unbatched": (F.conv2d, (2, 6, 5), (3, 2, 3, 3), {"padding": "same"}),
    "conv3d": (F.conv3d, (2, 2, 4, 4, 3), (3, 2, 2, 2, 2), {"dilation": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "tangents",
    ["weight and bias", "weight only", "bias only", "no bias", "input has a tangent", "input only"],
)
def test_rules_equal_torch_formulas(case, tangents):
    op, x_shape, w_shape, options = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=D)
    weight = torch.randn(w_shape, generator=g, dtype=D)
    bias = None if tangents == "no bias" else torch.randn(w_shape[0], generator=g, dtype=D)
    no_weight_tangent = tangents in ("bias only", "input only")
    w_tangent = None if no_weight_tangent else torch.randn(w_shape, generator=g, dtype=D)
    b_tangent = torch.randn(w_shape[0], generator=g, dtype=D)
    if bias is None or tangents in ("weight only", "input only"):
        b_tangent = None
    x_tangent = torch.randn(x_shape, generator=g, dtype=D) if tangents.startswith("input") else None
    args = (op, x, weight, bias, w_tangent, b_tangent, x_tangent, options)
    y0, t0, g0 = _run(*args, rules=False)
    y1, t1, g1 = _run(*args, rules=True)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    assert t0 is not None and t1 is not None
    torch.testing.assert_close(t1, t0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rules_skip_the_zero_input_product():
    """Under the rules, a first linear layer does two products (y and ẏ), not three."""
    x, w = torch.randn(8, 5, dtype=D), torch.randn(3, 5, dtype=D)
    with fwad.dual_level(), ForwardRules():
        with torch.profiler.profile() as prof:
            F.linear(x, fwad.make_dual(w, torch.ones_like(w)))
    products = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    assert len(products) == 2


def test_a_weight_outsizing_its_rows_takes_one_node_for_value_and_tangent():
    """Differentiable rules fuse a dense layer whose input and weight have tangents when the
    weight outsizes the rows (curvfx._dual_linear); other layers and plain rules do not."""
    w, v = torch.randn(8, 6, dtype=D), torch.randn(8, 6, dtype=D)

    def node(rows, differentiable):
        x = torch.randn(rows, 6, dtype=D, requires_grad=True)
        with torch.enable_grad(), fwad.dual_level():
            xd = fwad.make_dual(x, torch.randn_like(x))
            with ForwardRules(differentiable=differentiable):
                out = F.linear(xd, fwad.make_dual(w.requires_grad_(), v))
            nodes, frontier = [], [out.grad_fn]
            for _ in range(3):  # the dual's view, the node that computed it, its inputs
                nodes += frontier
                frontier = [f for node in frontier for f, _ in node.next_functions if f is not None]
            return " ".join(type(node).__name__ for node in nodes)

    assert "DualLinear" in node(1, True)  # 48 > 2 · 1 · 14
    assert "DualLinear" not in node(2, True)  # 48 < 2 · 2 · 14
    assert "DualLinear" not in node(1, False)


def test_wide_layers_at_a_small_batch_give_the_dense_hessian():
    """A model whose hidden layer takes the fused route (8·16 > 2·2·24), frozen bias included."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    model[2].bias.requires_grad_(False)
    fn, params = curvfx.make_functional(model)
    x, y = torch.randn(2, 3, dtype=D), torch.tensor([1, 0])
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(*flat):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(params, flat)), (x,)), y)

    _, hv = torch.autograd.functional.hvp(loss, tuple(params.values()), tuple(v.values()))
    out = curvfx.hvp(lambda p: F.cross_entropy(fn(p, x), y), params, v, strategy="rev-fwd")
    for k, truth in zip(params, hv):
        torch.testing.assert_close(out[k], truth, rtol=1e-10, atol=1e-12)


def test_linear_with_a_1d_weight_or_a_broadcast_bias_keeps_torch_formula():
    """F.linear takes a weight [in] (output without the out dim) and a bias [1, out]: not fused."""

    def f(z):
        h = z[:2].sin()
        return _cube(F.linear(h, z[2])) + _cube(F.linear(h, z, z[3:4, :4] * 0 + z[3, :4]))

    def g(z):  # a weight [16, 12] the fused route would take (16·12 > 2·1·28), a bias [1, 16]
        return _cube(F.linear(z[:1, :12].sin(), z[:, :12], z[1:2]))

    for fun, shape in ((f, (4, 6)), (g, (16, 16))):
        z, v = torch.randn(shape, dtype=D), torch.randn(shape, dtype=D)
        truth = _dense_hvp(fun, z, v)
        for strategy in ("rev-fwd", "auto"):
            torch.testing.assert_close(curvfx.hvp(fun, z, v, strategy=strategy), truth)


def test_dual_linear_refuses_tangents_that_require_grad():
    """Its backward gives the weight's and bias's tangents no gradient: they must be constants."""
    from curvfx._dual_linear import dual_linear

    a, a_t = torch.randn(1, 6, dtype=D), torch.randn(1, 6, dtype=D)
    w, w_t = torch.randn(8, 6, dtype=D), torch.randn(8, 6, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="tangents must be constants"):
        dual_linear(a, a_t, w, w_t, None, None)


def test_model_jvp_with_a_frozen_first_weight():
    """A first layer whose weight is constant (only its bias has a tangent) gives the exact J v."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    model[0].weight.requires_grad_(False)
    fn, params = curvfx.make_functional(model)
    x = torch.randn(5, 4, dtype=D)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    jac = torch.func.jacrev(lambda p: fn(p, x))(params)
    truth = sum((jac[k].reshape(10, -1) @ v[k].reshape(-1)) for k in params).reshape(5, 2)
    torch.testing.assert_close(curvfx.model_jvp(fn, params, x, v), truth, rtol=1e-12, atol=1e-12)


def test_model_vmapping_inside_keeps_torch_formulas():
    """A model that vmaps over its samples inside the forward-mode pass gives the exact J v."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    params = {k: p.detach() for k, p in net.named_parameters()}

    def fn(p, x):
        return torch.vmap(lambda xn: torch.func.functional_call(net, p, (xn,)))(x)

    x = torch.randn(5, 4, dtype=D)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    jac = torch.func.jacrev(lambda p: fn(p, x))(params)
    truth = sum((jac[k].reshape(10, -1) @ v[k].reshape(-1)) for k in params).reshape(5, 2)
    torch.testing.assert_close(curvfx.model_jvp(fn, params, x, v), truth, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# reverse-over-forward HVP: f(z) for z [4, 6]; every case is nonlinear in z

_Y = torch.tensor([1, 0, 5, 2])
_R = torch.linspace(-1, 1, 24, dtype=D).reshape(4, 6)
_X = torch.linspace(-2, 2, 2 * 3 * 36, dtype=D).reshape(2, 3, 6, 6).sin()
_T = torch.Tensor


def _cube(t):
    return (t**3).sum()


def _inplace_relu(z):
    w = z * 1.5
    return _cube(F.relu(w, inplace=True))


def _iadd(z):
    w = z * z
    w += z
    return _cube(w)


def _imul(z):
    w = z + 1
    w *= z
    return _cube(w)


def _add_(z):
    w = z.sin()
    w.add_(z)
    return _cube(w)


def _mul_(z):
    w = z.sin()
    w.mul_(z)
    return _cube(w)


def _relu_(z):
    w = z - 0.1
    torch.relu_(w)
    return _cube(w)


def _tensor_relu_(z):
    w = z - 0.1
    w.relu_()
    return _cube(w)


HVP_CASES = {
    # products, the affine rule included
    "linear constant input": lambda z: _cube(F.linear(_R[:, :4], z[:3, :4], z[3, :3])),
    "linear": lambda z: _cube(F.linear(z, z[:3] * 0.5)),
    "linear, every tangent": lambda z: _cube(F.linear(z.sin(), z[:3] * 0.5, z[3, :3])),
    "linear, weight outsizing its rows (fused)": lambda z: (  # the weight's tangent is v's
        _cube(F.linear(z[:1].sin(), z, z[0, :4]))
        + _cube(F.linear(z[1:2].cos().reshape(1, 1, 6), z))
        + _cube(F.linear(z[2:3] ** 2, z, _R[0, :4]))
    ),
    "conv2d input and bias": lambda z: _cube(
        F.conv2d(z.reshape(1, 2, 3, 4), z[:2, :2].reshape(1, 2, 2, 1), z[2, :1], padding=1)
    ),
    "conv1d": lambda z: _cube(F.conv1d(z.reshape(2, 2, 6), z[:3, :4].reshape(3, 2, 2))),
    "conv2d": lambda z: _cube(F.conv2d(_X, z[:2, :3].reshape(2, 3, 1, 1), z[3, :2], padding=1)),
    "conv2d both": lambda z: _cube(F.conv2d(z.reshape(1, 1, 4, 6), z[:2, :2].reshape(1, 1, 2, 2))),
    "conv3d": lambda z: _cube(F.conv3d(z.reshape(1, 1, 2, 3, 4), z[0, :2].reshape(1, 1, 1, 1, 2))),
    "matmul": lambda z: _cube(torch.matmul(z, z.T)),
    "Tensor.matmul": lambda z: _cube(z.matmul(z.mT)),
    "@": lambda z: _cube(z @ z.t()),
    "rmatmul": lambda z: _cube(_R.T @ z) + _cube(_T.__rmatmul__(z, _R.T)),
    "mm": lambda z: _cube(torch.mm(z, z.T)) + _cube(z.mm(z.T)),
    "bmm": lambda z: (
        _cube(torch.bmm(z.reshape(2, 2, 6), z.reshape(2, 6, 2)))
        + _cube(z.reshape(2, 2, 6).bmm(z.reshape(2, 6, 2)))
    ),
    # arithmetic
    "add": lambda z: _cube(torch.add(z, z * z)) + _cube(z.add(1.0)) + _cube(z + z.sin()) + _cube(2.0 + z),
    "sub": lambda z: _cube(torch.sub(z, z * z)) + _cube(z.sub(z.cos())) + _cube(z - 1.0) + _cube(1.0 - z),
    "mul": lambda z: _cube(torch.mul(z, z)) + _cube(z.mul(z.sin())) + _cube(z * 3.0) + _cube(2.0 * z),
    "div": lambda z: (
        _cube(torch.div(z, z * z + 1)) + _cube(z.div(2.0)) + _cube(z / 3.0) + _cube(1.0 / (z * z + 1))
    ),
    "neg and pow": lambda z: (
        _cube(torch.neg(z)) + _cube(z.neg()) + _cube(-z) + torch.pow(z, 4).sum() + z.pow(3).sum()
    ),
    "in-place add and mul": lambda z: _iadd(z) + _imul(z) + _add_(z) + _mul_(z),
    # activations
    "elementwise functions": lambda z: (
        _cube(torch.exp(z) + z.exp())
        + _cube(torch.log(z * z + 1) + (z * z + 2).log())
        + _cube(torch.sqrt(z * z + 1) + (z * z + 2).sqrt())
        + _cube(torch.rsqrt(z * z + 1) + (z * z + 2).rsqrt())
        + _cube(torch.sin(z) + z.sin())
        + _cube(torch.cos(z) + z.cos())
    ),
    "copies": lambda z: _cube(z.clone() * z),
    "relu": lambda z: (
        _cube(F.relu(z)) + _cube(torch.relu(z - 0.2)) + _cube(z.relu()) + _cube(F.relu(input=z + 0.1))
    ),
    "relu at exact zeros": lambda z: (F.relu(z - z.detach()) * z * z).sum(),  # relu'(0) = 0, as torch
    "relu in place": lambda z: _inplace_relu(z) + _relu_(z) + _tensor_relu_(z),
    "tanh and sigmoid": lambda z: (
        _cube(torch.tanh(z)) + _cube(z.tanh()) + _cube(torch.sigmoid(z)) + _cube(z.sigmoid())
    ),
    "gelu and silu": lambda z: _cube(F.gelu(z)) + _cube(F.gelu(z, approximate="tanh")) + _cube(F.silu(z)),
    # shapes and views
    "reshape and view": lambda z: (
        _cube(torch.reshape(z, (6, 4)) @ z) + _cube(z.reshape(3, 8).view(8, 3) @ z[:3])
    ),
    "flatten": lambda z: _cube(torch.flatten(z) * z.flatten()),
    "transpose and permute": lambda z: (
        _cube(torch.transpose(z, 0, 1) @ z)
        + _cube(z.transpose(0, 1) @ z)
        + _cube(torch.permute(z, (1, 0)) @ z.permute(1, 0).T)
    ),
    "squeeze and unsqueeze": lambda z: (
        _cube(torch.unsqueeze(z, 0) * z.unsqueeze(1).squeeze(1)) + _cube(torch.squeeze(z[None]) * z)
    ),
    "expand and contiguous": lambda z: _cube(z[:1].expand(4, 6).contiguous() * z),
    "getitem": lambda z: _cube(z[[0, 2], 1:] * z[1:3, :5]),
    "split and chunk": lambda z: (
        _cube(torch.split(z, 2)[0] * z.split(2)[1]) + _cube(torch.chunk(z, 2, 1)[0] * z.chunk(2, 1)[1])
    ),
    "cat and stack": lambda z: _cube(torch.cat([z, z * z]) @ z.T) + _cube(torch.stack([z, z.sin()]) * z),
    # reductions, pooling, lookups
    "sum and mean": lambda z: (
        torch.sum(z * z, 1).pow(3).sum()
        + (z * z).sum(0).pow(3).sum()
        + torch.mean(z * z, 1).pow(3).sum()
        + (z * z).mean(0).pow(3).sum()
    ),
    "max pool": lambda z: (
        _cube(F.max_pool1d(z[None], 2))
        + _cube(F.max_pool2d(z[None], 2))
        + _cube(F.max_pool3d(z.reshape(1, 1, 2, 2, 6), 2))
    ),
    "avg pool": lambda z: (
        _cube(F.avg_pool1d(z[None], 2))
        + _cube(F.avg_pool2d(z[None], 2))
        + _cube(F.avg_pool3d(z.reshape(1, 1, 2, 2, 6), 2))
    ),
    "adaptive avg pool": lambda z: (
        _cube(F.adaptive_avg_pool1d(z[None], 4))
        + _cube(F.adaptive_avg_pool2d(z[None], 3))
        + _cube(F.adaptive_avg_pool3d(z.reshape(1, 1, 2, 2, 6), 2))
    ),
    "embedding": lambda z: _cube(F.embedding(torch.tensor([[0, 2], [3, 2]]), z)),
    # losses (scalar outputs) whose own forward-mode formula torch cannot back-propagate
    "cross_entropy": lambda z: (
        F.cross_entropy(z, _Y) + F.cross_entropy(z, _Y, label_smoothing=0.1, reduction="sum")
    ),
    "cross_entropy ignore_index": lambda z: F.cross_entropy(z * z, _Y, ignore_index=5),
    "nll_loss": lambda z: F.nll_loss(z * z.sin(), _Y),
    "kl_div": lambda z: F.kl_div(z.sin(), _R.softmax(1), reduction="batchmean"),
    "mse and bce": lambda z: F.mse_loss(z.sin(), _R) + F.binary_cross_entropy_with_logits(z, _R.sigmoid()),
    # run as curvfx._decompositions
    "log_softmax": lambda z: (
        _cube(F.log_softmax(z, 1)) + _cube(torch.log_softmax(z, 0)) + _cube(z.log_softmax(-1))
    ),
    "softmax": lambda z: _cube(F.softmax(z, 1)) + _cube(torch.softmax(z, 0)) + _cube(z.softmax(-1)),
    "logsumexp": lambda z: _cube(torch.logsumexp(z, 1)) + _cube(z.logsumexp((0, 1), keepdim=True)),
    "layer_norm": lambda z: _cube(F.layer_norm(z, (6,), _R[0], _R[1])) + _cube(F.layer_norm(z, (4, 6))),
    "rms_norm": lambda z: _cube(F.rms_norm(z, (6,), _R[0])) + _cube(F.rms_norm(z, (4, 6), eps=1e-3)),
    "group_norm": lambda z: _cube(F.group_norm(z.reshape(2, 4, 3), 2, _R[0, :4], _R[1, :4])),
    "batch_norm train": lambda z: (
        _cube(F.batch_norm(z, None, None, _R[0], _R[1], training=True))
        + _cube(
            F.batch_norm(z.reshape(2, 3, 4), torch.zeros(3, dtype=D), torch.ones(3, dtype=D), training=True)
        )
    ),
    "batch_norm eval": lambda z: _cube(
        F.batch_norm(z.reshape(2, 3, 4), _R[0, :3], _R[1, :3].exp(), _R[2, :3], None)
    ),
    "attention": lambda z: (
        _cube(
            F.scaled_dot_product_attention(
                z.reshape(1, 4, 6), z[[3, 1, 2, 0]].reshape(1, 4, 6), z.reshape(1, 4, 6), is_causal=True
            )
        )
        + _cube(
            F.scaled_dot_product_attention(
                z.reshape(2, 2, 6),
                z.reshape(2, 2, 6),
                z.reshape(2, 2, 6),
                attn_mask=torch.tensor([[True, False], [True, True]]),
                scale=0.3,
            )
        )
        + _cube(
            F.scaled_dot_product_attention(
                z.reshape(2, 2, 6), z.reshape(2, 2, 6), z.reshape(2, 2, 6), attn_mask=z[:2, :2]
            )
        )
    ),
}


def _dense_hvp(f, z, v):
    """Dense Hessian of f at z times v (math attention: the fused kernels have no double backward)."""
    with sdpa_kernel([SDPBackend.MATH]):
        H = torch.autograd.functional.hessian(f, z).reshape(z.numel(), -1)
        return (H @ v.reshape(-1)).reshape(z.shape)


@pytest.mark.parametrize("case", list(HVP_CASES))
def test_reverse_over_forward_equals_dense_hessian(case):
    f = HVP_CASES[case]
    z = torch.linspace(-1.3, 1.1, 24, dtype=D).reshape(4, 6) + 0.05 * torch.randn(
        4, 6, dtype=D, generator=torch.Generator().manual_seed(0)
    )
    v = torch.randn(4, 6, dtype=D, generator=torch.Generator().manual_seed(1))
    truth = _dense_hvp(f, z, v)
    for strategy in ("rev-fwd", "auto"):
        torch.testing.assert_close(curvfx.hvp(f, z, v, strategy=strategy), truth, rtol=1e-10, atol=1e-10)


def test_every_trusted_operation_is_checked():
    """Each operation in TRUSTED or DECOMPOSITIONS is called with a tangent input by some case above."""
    seen = set()

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            leaves = [
                t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
            ]
            if any(fwad.unpack_dual(t).tangent is not None for t in leaves):
                seen.add(func)
            return func(*args, **kwargs)

    z = torch.linspace(-1.3, 1.1, 24, dtype=D).reshape(4, 6)
    for f in HVP_CASES.values():
        with fwad.dual_level(), Spy():
            f(fwad.make_dual(z, torch.ones_like(z)))
    assert not [getattr(op, "__qualname__", op) for op in TRUSTED | set(DECOMPOSITIONS) if op not in seen]


_LSTM = torch.nn.LSTM(6, 3).double()


def _sigmoid_in_place(z):
    w = z * 2
    w.sigmoid_()
    return _cube(w)


def _item_assignment(z):
    w = z * 2
    w[0] = z[1] ** 2  # a row with a tangent written into a tensor with one
    w[1:3, 2:] = torch.sin(z[2:, :4])
    buffer = torch.zeros(4, 6, dtype=z.dtype)
    buffer[1] = z[3] * z[0]  # into a tensor without a tangent
    return _cube(w) + _cube(buffer)


def _vmapped_inside(z):
    return _cube(torch.vmap(lambda row: row.sin() * row)(z))


FALLBACK_CASES = {  # tensor-valued operations outside TRUSTED, in-place writes, transforms inside
    "cross_entropy per sample": lambda z: _cube(F.cross_entropy(z, _Y, reduction="none")),
    "recurrent layer": lambda z: _cube(_LSTM(z.reshape(4, 1, 6))[0]),
    "grouped-query attention": lambda z: _cube(
        F.scaled_dot_product_attention(
            z.reshape(1, 4, 1, 6), z[:2].reshape(1, 2, 1, 6), z[2:].reshape(1, 2, 1, 6), enable_gqa=True
        )
    ),
    "untrusted in-place op": _sigmoid_in_place,
    "item assignment": _item_assignment,
    "vmap inside": _vmapped_inside,
}


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_untrusted_functions_fall_back_to_double_backprop(case):
    """ "auto" gives the exact HVP by double backprop; "rev-fwd" says it cannot."""
    f = FALLBACK_CASES[case]
    z = torch.linspace(-1.3, 1.1, 24, dtype=D).reshape(4, 6)
    v = torch.randn(4, 6, dtype=D, generator=torch.Generator().manual_seed(1))
    truth = _dense_hvp(f, z, v)
    torch.testing.assert_close(curvfx.hvp(f, z, v), truth, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="rev-fwd"):
        curvfx.hvp(f, z, v, strategy="rev-fwd")


@pytest.mark.parametrize(
    "case, engine",
    [
        ("linear", "rev-fwd"),
        ("cross_entropy", "rev-fwd"),
        ("layer_norm", "autograd"),
        ("attention", "autograd"),
    ],
)
def test_auto_uses_double_backprop_where_a_decomposition_is_needed(case, engine, monkeypatch):
    """ "auto" runs reverse-over-forward without decompositions; with one it takes double backprop."""
    calls = []
    monkeypatch.setattr(
        curvfx._engines, "hessian_vps", lambda *a: calls.append("autograd") or _double_backprop(*a)
    )
    f = HVP_CASES[case]
    z = torch.linspace(-1.3, 1.1, 24, dtype=D).reshape(4, 6)
    v = torch.randn(4, 6, dtype=D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(curvfx.hvp(f, z, v), _dense_hvp(f, z, v), rtol=1e-10, atol=1e-10)
    assert calls == ([] if engine == "rev-fwd" else ["autograd"])


_double_backprop = curvfx._engines.hessian_vps


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "broadcast", "target with a tangent"])
def test_mse_loss_closed_form_tangent_gives_the_hessian(reduction):
    """rev-fwd HVP through F.mse_loss's closed-form tangent, against a dense Hessian."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    fn, params = curvfx.make_functional(model)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    loss = {
        "mean": lambda o: F.mse_loss(o, y),
        "sum": lambda o: F.mse_loss(o, y, reduction="sum"),
        "none": lambda o: (F.mse_loss(o, y, reduction="none") * torch.arange(1.0, 3.0, dtype=o.dtype)).sum(),
        "broadcast": lambda o: F.mse_loss(o[:, :1], y[0, :1]),
        "target with a tangent": lambda o: F.mse_loss(o[:, :1], torch.tanh(o[:, 1:])),
    }[reduction]
    theta = curvfx.ravel(params)
    v = torch.randn_like(theta)
    H = torch.autograd.functional.hessian(lambda t: loss(fn(curvfx.unravel(t, params), x)), theta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # broadcasting in mse_loss
        Hv = curvfx.hvp(lambda p: loss(fn(p, x)), params, v, strategy="rev-fwd")
    assert torch.allclose(Hv, H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    [
        "mean", "sum", "ignored", "ignored class", "ignored past C", "uint8", "positional", "module",
        "sequence", "sequence ignored", "weight", "smoothing", "probabilities", "none",
    ],
)  # fmt: skip
def test_cross_entropy_tangent_gives_the_hessian(case):
    """rev-fwd HVP through F.cross_entropy, for its options: the closed-form tangent for class
    indices without weight or smoothing, the tangent of the backward pass for the others."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 6)).double()
    fn, params = curvfx.make_functional(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2, 0])
    w = torch.arange(1.0, 4.0, dtype=torch.float64)
    loss = {
        "mean": lambda o: F.cross_entropy(o[:, :3], y),
        "sum": lambda o: F.cross_entropy(o[:, :3], y, reduction="sum"),
        "ignored": lambda o: F.cross_entropy(o[:, :3], torch.tensor([0, -100, 1, 2, -100])),
        "ignored class": lambda o: F.cross_entropy(o[:, :3], y, ignore_index=2, reduction="sum"),
        "ignored past C": lambda o: F.cross_entropy(o[:, :3], y.where(y != 1, 255), ignore_index=255),
        "uint8": lambda o: F.cross_entropy(o[:, :3], y.where(y != 1, 255).byte(), ignore_index=255),
        "positional": lambda o: F.cross_entropy(o[:, :3], y, None, None, 0, None, "sum"),
        "module": lambda o: torch.nn.CrossEntropyLoss(ignore_index=1)(o[:, :3], y),
        "sequence": lambda o: F.cross_entropy(
            o.reshape(5, 3, 2), torch.tensor([[0, 1], [2, 2], [1, 0], [0, 0], [2, 1]])
        ),
        "sequence ignored": lambda o: F.cross_entropy(
            o.reshape(5, 3, 2), torch.tensor([[0, -100], [2, 2], [-100, 0], [0, 0], [2, 1]])
        ),
        "weight": lambda o: F.cross_entropy(o[:, :3], y, weight=w),
        "smoothing": lambda o: F.cross_entropy(o[:, :3], y, label_smoothing=0.2),
        "probabilities": lambda o: F.cross_entropy(o[:, :3], torch.softmax(o[:, 3:].detach(), 1)),
        "none": lambda o: (F.cross_entropy(o[:, :3], y, reduction="none") * w[:1]).sum(),
    }[case]
    theta = curvfx.ravel(params)
    v = torch.randn_like(theta)
    H = torch.autograd.functional.hessian(lambda t: loss(fn(curvfx.unravel(t, params), x)), theta)
    strategy = "auto" if case == "none" else "rev-fwd"  # per-entry losses: auto's double backprop
    Hv = curvfx.hvp(lambda p: loss(fn(p, x)), params, v, strategy=strategy)
    assert torch.allclose(Hv, H @ v, rtol=1e-10, atol=1e-12)
