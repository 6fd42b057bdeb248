"""Shared argument checks of the estimators: one operator normalization, products, counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvfx._errors import all_finite, describe
from curvfx._pytree import as_tree, ravel
from curvfx.operators._base import LinearOperator, as_operator

__all__ = ["check_count", "flat_vector", "products", "square_operator", "working_precision"]

OperatorLike = LinearOperator | Tensor | Callable[[Tensor], Tensor]


def square_operator(
    A: OperatorLike, size: int | None, who: str, *, symmetric: bool = False
) -> LinearOperator:
    """``A`` as a square :class:`LinearOperator` (normalized once, by ``as_operator``).

    Raises:
        ValueError: If ``A`` is not square, or not symmetric where ``symmetric`` is asked;
            the message names ``who``.
        TypeError: If ``A`` is none of the accepted forms.
    """
    if isinstance(A, Tensor) and (A.dim() != 2 or A.shape[0] != A.shape[1]):
        raise ValueError(f"{who}: A must be a square matrix [P, P], got {describe(A)}")
    op = as_operator(A, size)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{who}: A must be square, got shape {list(op.shape)}")
    if symmetric and not op.symmetric:
        raise ValueError(
            f"{who}: A must be symmetric ({type(op).__name__}.symmetric is False); a dense "
            "matrix that is symmetric up to rounding can be passed as (M + M.T) / 2 or as "
            "DenseOperator(M, symmetric=True)"
        )
    return op


def working_precision(op: LinearOperator) -> LinearOperator:
    """``op`` with float32 vectors where its dtype is 16-bit, else ``op`` itself.

    QR, eigh and SVD have no 16-bit kernels, and sketches and Lanczos recurrences lose
    their accuracy in 16 bits: the estimators that need them keep their vectors in float32
    and cast only the operator's products (results come back in float32).
    """
    if op.dtype not in (torch.float16, torch.bfloat16):
        return op
    return _Float32Vectors(op)


class _Float32Vectors(LinearOperator):
    """A 16-bit operator seen with float32 vectors (each product cast in and out)."""

    def __init__(self, op: LinearOperator):
        self.op = op
        self.shape, self.dtype, self.device = op.shape, torch.float32, op.device
        self.in_like, self.out_like = op.in_like, op.out_like
        self.symmetric, self.chunk_size = op.symmetric, op.chunk_size

    def _matvec(self, v: Tensor) -> Tensor:
        return self.op._matvec(v.to(self.op.dtype)).float()

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._matmat(V.to(self.op.dtype)).float()

    def _rmatvec(self, v: Tensor) -> Tensor:
        return self.op._rmatvec(v.to(self.op.dtype)).float()

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.op._rmatmat(V.to(self.op.dtype)).float()


def products(op: LinearOperator, V: Tensor, who: str, *, transpose: bool = False) -> Tensor:
    """A V [P, K] (or Aᵀ V) as one ``_matmat``, checked for shape and finite entries."""
    out = op._rmatmat(V) if transpose and not op.symmetric else op._matmat(V)
    if not isinstance(out, Tensor) or out.shape != V.shape:
        raise ValueError(f"{who}: the product A V returned {describe(out)}, expected shape {list(V.shape)}")
    if not all_finite(out):
        raise ValueError(
            f"{who}: the product of A with the probe vectors has non-finite entries (inf/nan); "
            "check the operator (model, data, loss)"
        )
    return out


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def flat_vector(op: LinearOperator, v: Any, name: str) -> tuple[Tensor, bool]:
    """``v`` as a flat vector [P] and whether it was a pytree (shaped like ``op.in_like``)."""
    size = op.shape[1]
    if isinstance(v, Tensor):
        if v.dim() != 1 or v.shape[0] != size:
            raise ValueError(f"{name}: expected a flat vector [{size}], got {describe(v)}")
        if v.dtype != op.dtype or v.device != op.device:
            raise ValueError(
                f"{name}: dtype/device {v.dtype}/{v.device} do not match the operator's "
                f"{op.dtype}/{op.device}"
            )
        return v, False
    if op.in_like is None:
        raise TypeError(
            f"{name}: {type(op).__name__} has no parameter pytree (in_like is None); "
            f"pass a flat tensor [{size}], got {describe(v)}"
        )
    tree, _ = as_tree(v, op.in_like, name)
    return ravel(tree), True
