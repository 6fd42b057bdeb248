"""curvfx: curvature of PyTorch models as composable torch.func transforms and operators."""

from curvfx import losses, optim
from curvfx._memory import MemoryBudgetError, memory_budget, set_memory_budget
from curvfx._pytree import ravel, unravel
from curvfx.api import *  # noqa: F403  (the seed-compatible functions)
from curvfx.api import __all__ as _api_all
from curvfx.estimators import (
    CGInfo,
    LayerCurvature,
    cg,
    density,
    diagonal,
    eigsh,
    layer_curvature,
    spectral_density,
    trace,
)
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
    "LayerCurvature",
    "LinearOperator",
    "MemoryBudgetError",
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
    "layer_curvature",
    "losses",
    "make_functional",
    "memory_budget",
    "optim",
    "model_jvp",
    "model_vjp",
    "per_sample_grad",
    "per_sample_grad_norms",
    "per_sample_jacobian",
    "ravel",
    "set_memory_budget",
    "spectral_density",
    "trace",
    "unravel",
]
