"""Optimizers driven by curvfx's curvature transforms, operators and solvers."""

from curvfx.optim.gauss_newton import GaussNewton

__all__: list[str] = ["GaussNewton"]
