"""curvfx: curvature of PyTorch models as composable torch.func transforms and operators."""

from curvfx import losses
from curvfx._pytree import ravel, unravel
from curvfx.estimators import CGInfo, cg, density, diagonal, eigsh, spectral_density, trace
from curvfx.func import (
    fisher_vp,
    ggn_vp,
    hvp,
    model_jvp,
    model_vjp,
    per_sample_grad,
    per_sample_jacobian,
)
from curvfx.functional import make_functional
from curvfx.operators import (
    LinearOperator,
    empirical_fisher,
    fisher,
    ggn,
    hessian,
    identity,
    jacobian,
)

__version__ = "0.1.0"

__all__ = [
    "CGInfo",
    "LinearOperator",
    "cg",
    "density",
    "diagonal",
    "eigsh",
    "empirical_fisher",
    "fisher",
    "fisher_vp",
    "ggn",
    "ggn_vp",
    "hessian",
    "hvp",
    "identity",
    "jacobian",
    "losses",
    "make_functional",
    "model_jvp",
    "model_vjp",
    "per_sample_grad",
    "per_sample_jacobian",
    "ravel",
    "spectral_density",
    "trace",
    "unravel",
]
