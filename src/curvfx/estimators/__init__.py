"""Estimators over any square operator: trace, diagonal, eigenpairs, spectral density, CG.

Each accepts a :class:`~curvfx.operators.LinearOperator`, a dense square tensor, or a
``matvec`` callable with ``size=``, works on flat vectors [P], and takes its randomness
from an explicit ``generator``.
"""

from curvfx.estimators._probes import probes
from curvfx.estimators.diagonal import diagonal
from curvfx.estimators.eigen import eigsh
from curvfx.estimators.layers import LayerCurvature, layer_curvature
from curvfx.estimators.solve import CGInfo, cg
from curvfx.estimators.spectral import density, spectral_density
from curvfx.estimators.trace import trace

__all__ = [
    "CGInfo",
    "LayerCurvature",
    "cg",
    "density",
    "diagonal",
    "eigsh",
    "layer_curvature",
    "probes",
    "spectral_density",
    "trace",
]
