"""One check of a ``LinearOperator`` against a dense matrix, in every format it accepts."""

from __future__ import annotations

import optree
import torch
from dense import assert_close_rel
from torch import Tensor

import curvfx

NUM_COLUMNS = 3


def assert_matches_dense(
    op: curvfx.LinearOperator, M: Tensor, tol: float = 1e-10, atol: float = 1e-13
) -> None:
    """Assert that ``op`` is the matrix ``M`` [m, n] in every format it accepts.

    Checks ``op.shape``; ``op @ v``, ``op.matvec(v)`` for flat v [n]; ``op @ v_tree`` for a
    pytree shaped like ``op.in_like`` (when set; the result is a pytree shaped like
    ``op.out_like`` when that is set, compared leaf-wise and after ``curvfx.ravel``);
    ``op @ V``, ``op.matmat(V)`` for V [n, 3]; ``v @ op`` (= Mᵀ v) for v [m]; ``X @ op``
    for X [3, m]; ``op.to_dense()``; ``op.T.to_dense()`` (= Mᵀ). Relative errors < ``tol``
    (``atol`` matters only where the truth is zero).
    """
    m, n = M.shape
    assert tuple(op.shape) == (m, n), f"shape {tuple(op.shape)} != expected {(m, n)}"
    assert op.dtype == M.dtype, f"dtype {op.dtype} != expected {M.dtype}"
    g = torch.Generator().manual_seed(1234)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=M.dtype)

    def close(got, expected):
        assert_close_rel(got, expected, tol=tol, atol=atol)

    v = rand(n)
    close(op @ v, M @ v)
    close(op.matvec(v), M @ v)

    if op.in_like is not None:
        v_tree = curvfx.unravel(v, op.in_like)
        got = op @ v_tree
        if op.out_like is not None:
            assert not isinstance(got, Tensor) or isinstance(op.out_like, Tensor), (
                "a pytree input must give a pytree output"
            )
            expected_tree = curvfx.unravel(M @ v, op.out_like)
            assert optree.tree_structure(got, none_is_leaf=False) == optree.tree_structure(
                expected_tree, none_is_leaf=False
            ), "output pytree structure differs from out_like"
            for leaf, expected in zip(
                optree.tree_leaves(got, none_is_leaf=False),
                optree.tree_leaves(expected_tree, none_is_leaf=False),
            ):
                close(leaf, expected)
        close(curvfx.ravel(got), M @ v)

    V = rand(n, NUM_COLUMNS)
    close(op @ V, M @ V)
    close(op.matmat(V), M @ V)

    u = rand(m)
    close(u @ op, M.T @ u)
    X = rand(NUM_COLUMNS, m)
    close(X @ op, X @ M)

    D = op.to_dense()
    close(D, M)
    transposed = op.T
    close(D if transposed is op else transposed.to_dense(), M.T)  # a symmetric op is its own .T
