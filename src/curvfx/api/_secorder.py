"""torch-secorder's documented functions, drop-in and corrected (see ``docs/migration-torch-secorder.md``).

Products with a curvature matrix live in :mod:`curvfx.api._secorder_hvp`, traces and
diagonals in :mod:`curvfx.api._secorder_approx`; each docstring lists where its numbers
differ from torch-secorder's.
"""

from curvfx.api._secorder_approx import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    gauss_newton_matrix_approximation,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
    hessian_trace,
)
from curvfx.api._secorder_hvp import approximate_hvp, exact_hvp, gauss_newton_product, model_hvp

__all__ = [
    "approximate_hvp",
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
