"""Attention and recurrent models: curvature products work and settings are restored."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvfx


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, -1))
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn, self.out = cell(8, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


MODELS = {"sdpa": Attention, "lstm": lambda: Recurrent(nn.LSTM), "gru": lambda: Recurrent(nn.GRU)}


def _problem(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x = torch.randn(4, 5, 8, dtype=torch.double)
    y = torch.randint(0, 3, (4,))
    return model, x, y


def _settings():
    return (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cudnn.enabled,
    )


@pytest.mark.parametrize("name", MODELS)
def test_products_match_dense_and_restore_settings(name):
    model, x, y = _problem(name)
    loss = nn.CrossEntropyLoss()
    fn, params = curvfx.make_functional(model)
    theta = curvfx.ravel(params)
    before = _settings()
    with sdpa_kernel([SDPBackend.MATH]):  # the dense truth needs a differentiable kernel too
        H = hessian(lambda t: loss(fn(curvfx.unravel(t, params), x), y), theta)
    v = torch.randn_like(theta)
    for strategy in ("autograd", "rev-rev"):
        Hv = curvfx.hvp(lambda p: loss(fn(p, x), y), params, v, strategy=strategy)
        assert (Hv - H @ v).norm() <= 1e-10 * (H @ v).norm()
    G = curvfx.ggn(model, loss, (x, y))
    for strategy in ("auto", "forward-ad", "func"):
        Gv = curvfx.ggn_vp(fn, loss, params, x, y, v, strategy=strategy)
        assert (Gv - G.to_dense() @ v).norm() <= 1e-10 * Gv.norm()
    d = curvfx.diagonal(G, "exact")  # RNNs: the per-sample route loops (no vmap rule)
    assert (d - G.to_dense().diagonal()).norm() <= 1e-10 * d.norm()
    assert _settings() == before


def test_pure_function_with_attention():
    model, x, y = _problem("sdpa")
    fn, params = curvfx.make_functional(model)

    def pure(p, inputs):  # a plain function, not a module: curvfx cannot see its layers
        return fn(p, inputs)

    G = curvfx.ggn(pure, nn.CrossEntropyLoss(), (x, y), params=params)
    v = torch.randn(G.shape[0], dtype=torch.double)
    assert torch.allclose(G @ v, curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y)) @ v, rtol=1e-12, atol=1e-14)


def test_only_the_math_attention_kernel_inside():
    from torch.nn.attention import _cur_sdpa_kernel_backends

    from curvfx._kernels import derivable_kernels

    before = _cur_sdpa_kernel_backends()
    with derivable_kernels():
        assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
        with derivable_kernels():  # nested: unchanged
            assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
    assert _cur_sdpa_kernel_backends() == before
