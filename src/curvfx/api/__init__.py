"""Drop-in, corrected versions of the functions documented by the libraries curvfx replaces.

Each seed module re-expresses a peer's documented API on curvfx's transforms, operators and
estimators (no second implementation of the math); the names are exported at top level.
"""

from curvfx.api._laplax import create_ggn_mv, create_ggn_mv_without_data

__all__: list[str] = ["create_ggn_mv", "create_ggn_mv_without_data"]
