"""Shared argument checks of the estimators: one operator normalization, products, counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvfx._arguments import check_count, check_flag
from curvfx._errors import all_finite, check_generator, describe
from curvfx._pytree import as_tree, ravel
from curvfx.estimators._probes import check_distribution
from curvfx.operators._base import LinearOperator, as_operator

__all__ = [
    "check_options",
    "check_product",
    "flat_vector",
    "products",
    "square_operator",
    "working_precision",
]

OperatorLike = LinearOperator | Tensor | Callable[[Tensor], Tensor]


def square_operator(
    A: OperatorLike, size: int | None, who: str, *, symmetric: bool = False
) -> LinearOperator:
    """``A`` as a square :class:`LinearOperator` (normalized once, by ``as_operator``).

    ``size`` is required for a callable ``A``; for an operator or a dense tensor it may be
    given only if it equals A's size P.

    Raises:
        ValueError: If ``A`` is not square, empty (P = 0), not floating-point, or not
            symmetric where ``symmetric`` is asked; if ``size`` is not a positive int or
            contradicts the size of an operator or tensor ``A``. The message names
            ``who`` and the argument.
        TypeError: If ``A`` is none of the accepted forms.
    """
    if size is not None:
        check_count(size, "size")
    if isinstance(A, Tensor) and (A.dim() != 2 or A.shape[0] != A.shape[1]):
        raise ValueError(f"{who}: A must be a square matrix [P, P], got {describe(A)}")
    op = as_operator(A, size)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{who}: A must be square, got shape {list(op.shape)}")
    if op.shape[0] < 1:
        raise ValueError(f"{who}: A: size P must be ≥ 1, got an empty operator of shape {list(op.shape)}")
    if not (isinstance(op.dtype, torch.dtype) and op.dtype.is_floating_point):
        raise ValueError(
            f"{who}: A: expected a floating-point operator, got dtype {op.dtype}; convert a dense "
            "matrix with M.double() or M.float()"
        )
    if size is not None and isinstance(A, LinearOperator | Tensor) and size != op.shape[0]:
        raise ValueError(
            f"size: given as {size} but A ({type(op).__name__}) has size P = {op.shape[0]}; "
            "size is only needed for a matvec callable"
        )
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
    """A V [P, K] (or Aᵀ V) as one ``_matmat``, checked by :func:`check_product`."""
    out = op._rmatmat(V) if transpose and not op.symmetric else op._matmat(V)
    return check_product(out, V, who, "A V")


def check_product(out: Any, V: Tensor, who: str, what: str) -> Tensor:
    """``out``, the product ``what`` of A with ``V``, if it is a finite tensor of V's shape and dtype.

    Raises:
        ValueError: Naming ``who`` and A, if ``out`` is not a tensor of V's shape and
            dtype (a matvec callable must return its input's dtype) or has inf/nan entries.
    """
    if not isinstance(out, Tensor) or out.shape != V.shape:
        raise ValueError(
            f"{who}: the product {what} returned {describe(out)}, expected shape {list(V.shape)}"
        )
    if out.dtype != V.dtype:
        raise ValueError(
            f"{who}: A: the product {what} returned dtype {out.dtype} for vectors of dtype {V.dtype}; "
            "A must return its input's dtype (wrap a matvec callable of another dtype in "
            "FunctionOperator(fn, size, dtype=...))"
        )
    if not all_finite(out):
        raise ValueError(
            f"{who}: the product {what} has non-finite entries (inf/nan); "
            "check the operator (model, data, loss)"
        )
    return out


def check_options(distribution: str, generator: torch.Generator | None, **flags: Any) -> None:
    """The probe options and bool flags of an estimator, checked whatever the method uses.

    Raises:
        ValueError: For an unknown ``distribution``.
        TypeError: For a ``generator`` that is not a ``torch.Generator`` (or None), or a
            flag (keyword name = argument name) that is not a bool.
    """
    check_distribution(distribution)
    check_generator(generator)
    for name, value in flags.items():
        check_flag(value, name)


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
