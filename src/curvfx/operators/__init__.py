"""Matrix-free linear operators: the base, arithmetic, and the curvature operators over data."""

from curvfx.operators._base import (
    DenseOperator,
    FunctionOperator,
    IdentityOperator,
    LinearOperator,
    as_operator,
    identity,
)
from curvfx.operators.curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    JacobianOperator,
    empirical_fisher,
    fisher,
    ggn,
    hessian,
    jacobian,
)
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
