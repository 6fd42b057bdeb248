"""Demo: an HVP and a GGN-vector product for a built-in small model, checked against dense matrices.

Run with ``python -m curvfx``. Uses a 2-layer tanh MLP on synthetic data (no downloads).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.functional import hessian
from torch.func import jacrev

import curvfx


def main() -> None:
    """Print an HVP and a GGN-vp, their agreement with dense truths, and their cost."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(32, 8, dtype=torch.double), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    fn, params = curvfx.make_functional(model)
    theta = curvfx.ravel(params)
    v = torch.randn_like(theta)
    print(f"model: {model}\nP = {theta.numel()} parameters, batch N = {x.shape[0]}, 3 classes")

    def loss_at(p):
        return loss_fn(fn(p, x), y)

    hv = curvfx.hvp(loss_at, params, v)
    gv = curvfx.ggn_vp(fn, loss_fn, params, x, y, v)
    print(f"\nH v   [first 5]: {hv[:5].tolist()}")
    print(f"G v   [first 5]: {gv[:5].tolist()}")

    dense_h = hessian(lambda t: loss_at(curvfx.unravel(t, params)), theta)
    outputs = fn(params, x)
    jac = jacrev(lambda t: fn(curvfx.unravel(t, params), x))(theta).reshape(-1, theta.numel())
    h_out = hessian(lambda f: loss_fn(f.reshape(outputs.shape), y), outputs.reshape(-1))
    dense_g = jac.T @ h_out @ jac
    print(f"\nrelative error of H v vs dense Hessian: {_rel(hv, dense_h @ v):.1e}")
    print(f"relative error of G v vs dense Jᵀ H_f J: {_rel(gv, dense_g @ v):.1e}")

    print("\ncost as ratios to one gradient: python benchmarks/bench_core.py")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


if __name__ == "__main__":
    main()
