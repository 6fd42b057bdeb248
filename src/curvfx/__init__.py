"""curvfx: curvature of PyTorch models as composable torch.func transforms and operators."""

from curvfx import losses, optim
from curvfx._pytree import ravel, unravel
from curvfx.api import *  # noqa: F403  (the seed-compatible functions)
from curvfx.api import __all__ as _api_all
from curvfx.estimators import CGInfo, cg, density, diagonal, eigsh, spectral_density, trace
from curvfx.func import (
    fisher_vp,
    ggn_vp,
    hvp,
    model_jvp,
    model_vjp,
    per_sample_grad,
    per_sample_grad_norms,
    per_sample_jacobian,
)
from curvfx.functional import make_functional
from curvfx.operators import (
    LinearOperator,
    ekfac,
    empirical_fisher,
    fisher,
    ggn,
    hessian,
    identity,
    jacobian,
    kfac,
)

__version__ = "0.1.0"

__all__ = [
    *_api_all,
    "CGInfo",
    "LinearOperator",
    "cg",
    "density",
    "diagonal",
    "eigsh",
    "ekfac",
    "empirical_fisher",
    "fisher",
    "fisher_vp",
    "ggn",
    "ggn_vp",
    "hessian",
    "hvp",
    "identity",
    "jacobian",
    "kfac",
    "losses",
    "make_functional",
    "optim",
    "model_jvp",
    "model_vjp",
    "per_sample_grad",
    "per_sample_grad_norms",
    "per_sample_jacobian",
    "ravel",
    "spectral_density",
    "trace",
    "unravel",
]
