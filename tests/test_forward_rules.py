"""The forward-mode rules for affine layers with a constant input equal torch's own formulas.

Each case runs one call under ``torch.autograd.forward_ad`` twice, with and without
:class:`ConstantInputTangents`, in float64, and compares the output, its tangent and the
reverse-mode gradients through the output to the primal weights.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F

import curvfx
from curvfx._forward_rules import ConstantInputTangents

D = torch.float64


def _run(op, x, weight, bias, w_tangent, b_tangent, x_tangent, options, rules):
    """(y, ẏ, ∂(y·r)/∂(W, b)) for ``op(x, W, b, **options)`` with the given tangents."""
    w = weight.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    with fwad.dual_level():
        wd = w if w_tangent is None else fwad.make_dual(w, w_tangent)
        bd = b if (b is None or b_tangent is None) else fwad.make_dual(b, b_tangent)
        xd = x if x_tangent is None else fwad.make_dual(x, x_tangent)
        if rules:
            with ConstantInputTangents():
                out = op(xd, wd, bd, **options)
        else:
            out = op(xd, wd, bd, **options)
        y, tangent = fwad.unpack_dual(out)
    leaves = [w] + ([] if b is None else [b])
    r = torch.linspace(-1, 1, y.numel(), dtype=D).reshape(y.shape)  # a cotangent
    grads = torch.autograd.grad((y * r).sum(), leaves)
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
    "tangents", ["weight and bias", "weight only", "bias only", "no bias", "input has a tangent"]
)
def test_rules_equal_torch_formulas(case, tangents):
    op, x_shape, w_shape, options = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=D)
    weight = torch.randn(w_shape, generator=g, dtype=D)
    bias = None if tangents == "no bias" else torch.randn(w_shape[0], generator=g, dtype=D)
    w_tangent = None if tangents == "bias only" else torch.randn(w_shape, generator=g, dtype=D)
    b_tangent = torch.randn(w_shape[0], generator=g, dtype=D)
    if bias is None or tangents == "weight only":
        b_tangent = None
    x_tangent = torch.randn(x_shape, generator=g, dtype=D) if tangents == "input has a tangent" else None
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
    with fwad.dual_level(), ConstantInputTangents():
        with torch.profiler.profile() as prof:
            F.linear(x, fwad.make_dual(w, torch.ones_like(w)))
    products = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    assert len(products) == 2


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
