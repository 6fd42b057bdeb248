"""curvfx: curvature of PyTorch models as composable torch.func transforms and operators."""

from curvfx import losses
from curvfx._pytree import ravel, unravel
from curvfx.func import ggn_vp, hvp, per_sample_grad, per_sample_jacobian
from curvfx.functional import make_functional

__version__ = "0.1.0"

__all__ = [
    "ggn_vp",
    "hvp",
    "losses",
    "make_functional",
    "per_sample_grad",
    "per_sample_jacobian",
    "ravel",
    "unravel",
]
