"""Optimizers driven by curvfx's curvature transforms, operators and solvers."""

from curvfx.optim.adahessian import AdaHessian
from curvfx.optim.curvature_optimizer import CURVATURES, Curvature, CurvatureOptimizer
from curvfx.optim.gauss_newton import GaussNewton
from curvfx.optim.hessian_free import HessianFree
from curvfx.optim.kfac import KFAC
from curvfx.optim.levenberg_marquardt import LevenbergMarquardt
from curvfx.optim.natural_gradient import DiagonalNaturalGradient
from curvfx.optim.sum_of_squares import SumOfSquares

__all__: list[str] = [
    "CURVATURES",
    "KFAC",
    "AdaHessian",
    "Curvature",
    "CurvatureOptimizer",
    "DiagonalNaturalGradient",
    "GaussNewton",
    "HessianFree",
    "LevenbergMarquardt",
    "SumOfSquares",
]
