"""Matrix-free linear operators: the base, arithmetic, and the curvature operators over data."""

from curvfx.operators._base import (
    DenseOperator,
    FunctionOperator,
    IdentityOperator,
    LinearOperator,
    as_operator,
    identity,
)
from curvfx.operators.constructors import empirical_fisher, fisher, ggn, hessian
from curvfx.operators.curvature import FisherOperator, GGNOperator, HessianOperator
from curvfx.operators.jacobian import JacobianOperator, jacobian
from curvfx.operators.kfac import ekfac, kfac

__all__ = [
    "DenseOperator",
    "FisherOperator",
    "FunctionOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "JacobianOperator",
    "LinearOperator",
    "as_operator",
    "ekfac",
    "empirical_fisher",
    "fisher",
    "ggn",
    "hessian",
    "identity",
    "jacobian",
    "kfac",
]
