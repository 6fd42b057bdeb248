"""Drop-in, corrected versions of the functions documented by the libraries curvfx replaces.

Each seed module re-expresses a peer's documented API on curvfx's transforms, operators and
estimators (no second implementation of the math); the names are exported at top level.
"""

from curvfx.api._laplax import create_ggn_mv, create_ggn_mv_without_data
from curvfx.api._secorder import (
    approximate_hvp,
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    exact_hvp,
    gauss_newton_matrix_approximation,
    gauss_newton_product,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
    hessian_trace,
    model_hvp,
)

__all__: list[str] = [
    "approximate_hvp",
    "create_ggn_mv",
    "create_ggn_mv_without_data",
    "empirical_fisher_diagonal",
    "empirical_fisher_trace",
    "exact_hvp",
    "gauss_newton_matrix_approximation",
    "gauss_newton_product",
    "generalized_fisher_diagonal",
    "generalized_fisher_trace",
    "hessian_trace",
    "model_hvp",
]
