"""The ``LinearOperator`` base: formats (flat or pytree, vector or matrix), ``@``, arithmetic, export.

A concrete operator sets ``shape``, ``dtype``, ``device`` (and optionally ``in_like`` /
``out_like``, the pytrees that flat inputs / outputs correspond to, and ``symmetric``) and
implements ``_matvec`` on flat vectors [N] -> [M]; non-symmetric operators that support
``.T`` also implement ``_rmatvec``.
Everything else is done here once.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from curvfx._arguments import check_count, check_flag, describe_value, real_number
from curvfx._errors import all_finite, check_real, describe, inside_transform
from curvfx._memory import check_fits
from curvfx._pytree import as_tree, leaves, ravel, tree_map, unravel

__all__ = [
    "DenseOperator",
    "FunctionOperator",
    "IdentityOperator",
    "LinearOperator",
    "apply_columns",
    "as_operator",
    "fixed_params",
    "identity",
]

PyTree = Any

# dtype and device of an operator over parameters, read from its ``params`` pytree
PARAMS_DTYPE = property(lambda self: leaves(self.params)[0].dtype, doc="The parameters' dtype.")
PARAMS_DEVICE = property(lambda self: leaves(self.params)[0].device, doc="The parameters' device.")


def fixed_params(params: PyTree) -> PyTree:
    """The parameters an operator over them is the matrix at: detached, of one real dtype.

    An operator is a fixed matrix: its products carry no autograd graph to the parameters
    (differentiate the transforms of :mod:`curvfx.func` for that). Inside a ``torch.func``
    transform they are kept as given, so that the transform differentiates through them.

    Raises:
        ValueError: If the parameters are complex or not all of one dtype (the operator
            has one ``dtype``, that of its flat vectors).
    """
    check_real(params, "params")
    dtypes = sorted({str(leaf.dtype) for leaf in leaves(params)})
    if len(dtypes) > 1:
        raise ValueError(
            f"params: an operator needs all parameters in one dtype, got {', '.join(dtypes)}; "
            "convert them (e.g. model.to(torch.float32)) or pass params= of one dtype"
        )
    return params if inside_transform() else tree_map(Tensor.detach, params)


class LinearOperator:
    """A matrix A [M, N] known through its products.

    * ``A @ v`` / ``A.matvec(v)``: ``v`` a flat tensor [N] or a pytree shaped like
      ``A.in_like`` (the parameters); the result has the same form.
    * ``A @ V`` / ``A.matmat(V)``: ``V`` [N, K]; columns are batched with
      ``torch.func.vmap`` (``A.chunk_size`` columns at a time; random operations such as
      dropout or sampling draw the same values for every column, as one matvec would) and
      fall back to a loop over columns, with a warning, when the product cannot be vmapped.
    * ``v @ A`` = ``Aᵀ v``; ``A.T``; ``A + B``, ``A - B``, ``c * A``, ``-A``, ``A @ B``;
      ``A + λ * identity(N)`` for damping.
    * ``A.to_dense()`` [M, N] (materializes the matrix: M·N memory) and ``A.to_scipy()``
      (a ``scipy.sparse.linalg.LinearOperator``, e.g. for ``scipy.sparse.linalg.eigsh``).
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    in_like: PyTree | None = None
    out_like: PyTree | None = None
    symmetric: bool = False
    chunk_size: int | None = None

    # -- to implement -------------------------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        """A v for a flat vector v [N] -> [M]."""
        raise NotImplementedError(f"{type(self).__name__} is abstract")

    def _rmatvec(self, v: Tensor) -> Tensor:
        """Aᵀ v for a flat vector v [M] -> [N]."""
        if self.symmetric:
            return self._matvec(v)
        raise ValueError(
            f"{type(self).__name__} has no transpose product Aᵀ v, which this computation needs "
            "(e.g. diagonal(A, 'xdiag')); give A as a dense matrix or as an operator with a "
            "transpose, or use a method that needs A only (diagonal 'hutchinson')"
        )

    # -- products ---------------------------------------------------------------------------
    def matvec(self, v: PyTree | Tensor) -> PyTree | Tensor:
        """A v, with ``v`` flat [N] or a pytree like ``in_like``; returns the same form.

        Raises:
            ValueError: If ``v`` does not match the operator (length, structure, dtype,
                device), or the product is not a finite vector [M] of the operator's dtype
                and device.
        """
        flat, was_tree = self._flat_input(v, self.shape[1], self.in_like)
        out = self._checked(self._matvec(flat), (self.shape[0],))
        return unravel(out, self.out_like) if was_tree and self.out_like is not None else out

    def matmat(self, V: Tensor) -> Tensor:
        """A V for V [N, K] -> [M, K], columns batched by vmap.

        Raises:
            ValueError: If ``V`` is not a matrix [N, K] with K ≥ 1 columns (as
                :func:`curvfx.hvp`) of the operator's dtype and device, or the product is
                not a finite matrix [M, K] of that dtype and device.
        """
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[0] != self.shape[1] or V.shape[1] == 0:
            raise ValueError(
                f"V: expected a matrix [N, K] with N = {self.shape[1]} and K ≥ 1, got {describe(V)}"
            )
        self._check_tensor(V, "V")
        return self._checked(self._matmat(V), (self.shape[0], V.shape[1]))

    def _matmat(self, V: Tensor) -> Tensor:
        try:
            return vmap(self._matvec, in_dims=1, out_dims=1, chunk_size=self.chunk_size, randomness="same")(V)
        except RuntimeError as err:
            warnings.warn(
                f"{type(self).__name__}: the product could not be vmapped over columns "
                f"({str(err).splitlines()[0][:200]}); using a loop over columns",
                RuntimeWarning,
                stacklevel=3,
            )
            return torch.stack([self._matvec(V[:, k]) for k in range(V.shape[1])], dim=1)

    def _rmatmat(self, V: Tensor) -> Tensor:
        if self.symmetric:
            return self._matmat(V)
        return apply_columns(self._rmatvec, V, self.chunk_size, f"{type(self).__name__}.T")

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        if isinstance(other, Tensor) and other.dim() == 2:
            return self.matmat(other)
        return self.matvec(other)

    def __rmatmul__(self, other):
        if isinstance(other, Tensor) and other.dim() == 2:  # X A = (Aᵀ Xᵀ)ᵀ
            return self.T.matmat(other.T).T
        return self.T.matvec(other)

    @property
    def T(self) -> LinearOperator:
        """The transpose Aᵀ (``self`` for a symmetric operator)."""
        return self if self.symmetric else TransposedOperator(self)

    # -- arithmetic -------------------------------------------------------------------------
    def __add__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator([self, _as_operator(other, self)], [1.0, 1.0])

    def __radd__(self, other: Any) -> LinearOperator:
        """``0 + A`` is A (so that ``sum([A, B])`` works); any other non-operator is refused."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return self + other

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator([self, _as_operator(other, self)], [1.0, -1.0])

    def __rsub__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator([_as_operator(other, self), self], [1.0, -1.0])

    def __mul__(self, c: float) -> LinearOperator:
        """``c · A`` for a real number ``c`` (int, float or 0-dim real tensor, read with ``float``).

        Raises:
            TypeError: If ``c`` is an operator (use ``@``), a bool, a string, or a tensor
                that is not 0-dim and real; names ``c``.
            ValueError: If ``c`` is not finite.
        """
        if isinstance(c, LinearOperator):
            raise TypeError("use @ for operator products; * scales by a number")
        return SumOperator([self], [real_number(c, "c")])

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return SumOperator([self], [-1.0])

    # -- export -----------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The matrix [M, N], built from products with identity columns (M·N + N·N memory).

        Raises:
            MemoryBudgetError: If the matrix and the identity exceed the memory budget
                (:mod:`curvfx._memory`); the message gives the estimate.
        """
        M, N = self.shape
        check_fits(
            f"{type(self).__name__}.to_dense: the matrix [{M}, {N}] and the identity [{N}, {N}]",
            M * N + N * N,
            self.dtype,
            "use products or the estimators (curvfx.trace, curvfx.diagonal, curvfx.eigsh) instead",
        )
        return self.matmat(torch.eye(self.shape[1], dtype=self.dtype, device=self.device))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` with this operator's products (float64 numpy).

        Its products are checked as :meth:`matvec` and :meth:`matmat` check theirs.

        Raises:
            ValueError: When a product is applied: if it has non-finite entries, or the
                wrong shape, dtype or device.
        """
        try:
            from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("to_scipy needs scipy: pip install 'curvfx[scipy]'") from err

        M, N = self.shape

        def numpy_product(product):  # float64 numpy in and out, through the checked products
            def apply(x):
                t = torch.as_tensor(x, device=self.device).to(self.dtype)
                return product(t).detach().cpu().double().numpy()

            return apply

        return ScipyLinearOperator(
            shape=self.shape,
            matvec=numpy_product(lambda t: self.matvec(t.reshape(N))),
            rmatvec=numpy_product(lambda t: self._checked(self._rmatvec(t.reshape(M)), (N,))),
            matmat=numpy_product(self.matmat),
            dtype="float64",
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"

    # -- helpers ----------------------------------------------------------------------------
    def _flat_input(self, v, size: int, like: PyTree | None) -> tuple[Tensor, bool]:
        if isinstance(v, Tensor) and not (isinstance(like, Tensor) and v.shape == like.shape):
            if v.dim() != 1 or v.shape[0] != size:
                raise ValueError(f"v: expected a flat vector [{size}], got {describe(v)}")
            self._check_tensor(v, "v")
            return v, False
        if like is None:
            raise TypeError(f"v: {type(self).__name__} takes flat tensors [{size}], got {describe(v)}")
        tree, _ = as_tree(v, like)
        return ravel(tree), True

    def _check_tensor(self, v: Tensor, name: str) -> None:
        if v.dtype != self.dtype:
            raise ValueError(f"{name}: dtype {v.dtype} does not match the operator's {self.dtype}")
        if v.device != self.device:
            raise ValueError(f"{name}: device {v.device} does not match the operator's {self.device}")

    _product_name = "the product"  # what computes the products, for error messages

    def _checked(self, out: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``out`` if it is a finite tensor of ``shape`` and the operator's dtype and device."""
        self._check_result(out, shape)
        if not inside_transform() and not all_finite(out):
            raise ValueError(
                f"{type(self).__name__}: the product has non-finite entries (inf/nan); "
                "check the model, data and vector"
            )
        return out

    def _check_result(self, out: Any, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming the product unless ``out`` is a tensor of ``shape``, dtype, device."""
        if (
            isinstance(out, Tensor)
            and tuple(out.shape) == shape
            and out.dtype == self.dtype
            and out.device == self.device
        ):
            return
        got = f"{describe(out)}, {out.dtype}, {out.device}" if isinstance(out, Tensor) else describe(out)
        raise ValueError(
            f"{type(self).__name__}: {self._product_name} returned {got}; expected a tensor of "
            f"shape {list(shape)}, {self.dtype}, {self.device}"
        )


class SumOperator(LinearOperator):
    """Σ_i c_i A_i for operators of one shape (also scaling: a single term)."""

    def __init__(self, ops: list[LinearOperator], coeffs: list[float]):
        flat_ops, flat_coeffs = [], []
        for op, c in zip(ops, coeffs):
            if isinstance(op, SumOperator):  # keep sums flat
                flat_ops += op.ops
                flat_coeffs += [c * ci for ci in op.coeffs]
            else:
                flat_ops.append(op)
                flat_coeffs.append(c)
        first = next((op for op in flat_ops if not isinstance(op, IdentityOperator)), flat_ops[0])
        for op in flat_ops:
            if op.shape != first.shape:
                raise ValueError(f"cannot add operators of shapes {first.shape} and {op.shape}")
        flat_ops = [_adapted(op, first) for op in flat_ops]
        self.ops, self.coeffs = flat_ops, flat_coeffs
        self.shape, self.dtype, self.device = first.shape, first.dtype, first.device
        self.in_like = next((op.in_like for op in flat_ops if op.in_like is not None), None)
        self.out_like = next((op.out_like for op in flat_ops if op.out_like is not None), None)
        self.symmetric = all(op.symmetric for op in flat_ops)
        self.chunk_size = first.chunk_size

    def _matvec(self, v: Tensor) -> Tensor:
        return sum(c * op._matvec(v) for op, c in zip(self.ops, self.coeffs))

    def _matmat(self, V: Tensor) -> Tensor:
        return sum(c * op._matmat(V) for op, c in zip(self.ops, self.coeffs))

    def _rmatvec(self, v: Tensor) -> Tensor:
        return sum(c * op._rmatvec(v) for op, c in zip(self.ops, self.coeffs))


class ProductOperator(LinearOperator):
    """A B, applied right to left."""

    def __init__(self, a: LinearOperator, b: LinearOperator):
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"cannot compose operators of shapes {a.shape} and {b.shape}")
        a, b = _adapted(a, b), _adapted(b, a)
        self.a, self.b = a, b
        self.shape, self.dtype, self.device = (a.shape[0], b.shape[1]), a.dtype, a.device
        self.in_like, self.out_like = b.in_like, a.out_like
        self.chunk_size = b.chunk_size

    def _matvec(self, v: Tensor) -> Tensor:
        return self.a._matvec(self.b._matvec(v))

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a._matmat(self.b._matmat(V))

    def _rmatvec(self, v: Tensor) -> Tensor:
        return self.b._rmatvec(self.a._rmatvec(v))


class TransposedOperator(LinearOperator):
    """Aᵀ of an operator that implements ``_rmatvec``."""

    def __init__(self, op: LinearOperator):
        self.op = op
        self.shape, self.dtype, self.device = (op.shape[1], op.shape[0]), op.dtype, op.device
        self.in_like, self.out_like = op.out_like, op.in_like
        self.chunk_size = op.chunk_size
        op._rmatvec(torch.zeros(op.shape[0], dtype=op.dtype, device=op.device))  # fail early

    def _matvec(self, v: Tensor) -> Tensor:
        return self.op._rmatvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._rmatmat(V)

    def _rmatvec(self, v: Tensor) -> Tensor:
        return self.op._matvec(v)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.op._matmat(V)

    @property
    def T(self) -> LinearOperator:
        """The original operator."""
        return self.op


class IdentityOperator(LinearOperator):
    """The identity I [N, N]."""

    symmetric = True

    def __init__(self, n: int, dtype: torch.dtype | None = None, device=None):
        n = check_count(n, "n")
        self.shape = (n, n)
        self.dtype, self.device = _dtype_device(dtype, device)

    def _matvec(self, v: Tensor) -> Tensor:
        return v

    def _matmat(self, V: Tensor) -> Tensor:
        return V


def identity(n: int, dtype: torch.dtype | None = None, device=None) -> IdentityOperator:
    """The identity operator I [n, n]; its dtype and device adapt when added to an operator.

    Raises:
        TypeError: If ``n`` is not an int (a bool is not), or ``dtype`` is not a
            ``torch.dtype`` (or None).
        ValueError: If ``n`` < 1, or ``device`` is not a valid device.
    """
    return IdentityOperator(n, dtype, device)


class DenseOperator(LinearOperator):
    """A dense matrix [M, N] seen as a ``LinearOperator``."""

    def __init__(self, matrix: Tensor, symmetric: bool | None = None):
        """``symmetric``: a bool, or None to test ``matrix == matrix.T`` (a TypeError otherwise)."""
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            raise ValueError(f"matrix: expected a 2-D tensor, got {describe(matrix)}")
        if symmetric is not None:
            check_flag(symmetric, "symmetric")
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype, self.device = matrix.dtype, matrix.device
        self.symmetric = (
            symmetric
            if symmetric is not None
            else bool(matrix.shape[0] == matrix.shape[1] and torch.equal(matrix, matrix.T))
        )

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def _rmatvec(self, v: Tensor) -> Tensor:
        return self.matrix.T @ v


class FunctionOperator(LinearOperator):
    """A square operator from a callable ``matvec(v [N]) -> [N]`` (assumed symmetric if told).

    Raises:
        TypeError: If ``matvec`` is not callable, ``size`` not an int, ``dtype`` not a
            ``torch.dtype`` (or None) or ``symmetric`` not a bool.
        ValueError: If ``size`` < 1 or ``device`` is not a valid device; when a product is
            applied, if ``matvec`` returns anything but a finite tensor [N] of ``dtype`` on
            ``device``.
    """

    _product_name = "its matvec callable"

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        size: int,
        *,
        dtype: torch.dtype | None = None,
        device=None,
        symmetric: bool = True,
    ):
        if not callable(matvec):
            raise TypeError(f"matvec: expected a callable, got {type(matvec).__name__}")
        size = check_count(size, "size")
        self.fn, self.shape = matvec, (size, size)
        self.dtype, self.device = _dtype_device(dtype, device)
        self.symmetric = check_flag(symmetric, "symmetric")

    def _matvec(self, v: Tensor) -> Tensor:
        return self.fn(v)

    def _matmat(self, V: Tensor) -> Tensor:
        columns = [self.fn(V[:, k]) for k in range(V.shape[1])]
        for column in columns:  # the caller checks the stacked result's shape and dtype
            if not isinstance(column, Tensor):  # torch.stack's error would not name matvec
                self._check_result(column, (self.shape[0],))
        return torch.stack(columns, dim=1)


def as_operator(
    A: LinearOperator | Tensor | Callable[[Tensor], Tensor], size: int | None = None
) -> LinearOperator:
    """Normalize an estimator input: an operator, a dense square tensor, or ``matvec`` + ``size``."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    if callable(A):
        if size is None:
            raise ValueError("size: required when the operator is given as a matvec callable")
        return FunctionOperator(A, size)
    raise TypeError(
        f"A: expected a LinearOperator, a dense tensor or a matvec callable, got {type(A).__name__}"
    )


def apply_columns(matvec: Callable[[Tensor], Tensor], V: Tensor, chunk_size: int | None, name: str) -> Tensor:
    """``[matvec(V[:, 0]), ...]`` as columns.

    Vmapped (random operations draw the same values for every column), or a loop with a
    warning when ``matvec`` cannot be vmapped.
    """
    if V.shape[1] == 1:  # one column: a plain product (vmap would only add overhead)
        return matvec(V[:, 0]).unsqueeze(1)
    try:
        return vmap(matvec, in_dims=1, out_dims=1, chunk_size=chunk_size, randomness="same")(V)
    except RuntimeError as err:
        warnings.warn(
            f"{name}: the product could not be vmapped over columns "
            f"({str(err).splitlines()[0][:200]}); using a loop over columns",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.stack([matvec(V[:, k]) for k in range(V.shape[1])], dim=1)


def _dtype_device(dtype: Any, device: Any) -> tuple[torch.dtype, torch.device]:
    """``dtype`` (default: torch's default dtype) and ``device`` (default: cpu), validated."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float64, got {describe_value(dtype)}")
    if isinstance(device, bool) or not isinstance(device, str | int | torch.device | None):
        raise TypeError(f"device: expected a torch.device, a str or an int, got {describe_value(device)}")
    try:
        device = torch.device("cpu" if device is None else device)
    except RuntimeError:
        raise ValueError(
            f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from None
    return dtype or torch.get_default_dtype(), device


def _as_operator(other: Any, partner: LinearOperator) -> LinearOperator:
    """``other`` if it is an operator; else a ``TypeError`` (for a number: how to add damping)."""
    if isinstance(other, LinearOperator):
        return other
    hint = ""
    if isinstance(other, numbers.Real | Tensor) and not isinstance(other, bool):
        c = other if not isinstance(other, Tensor) else "c"
        hint = (
            f"; to add a multiple c of the identity (damping), add {c} * curvfx.identity({partner.shape[0]})"
        )
    raise TypeError(
        f"other: + and - combine operators, expected a LinearOperator, got {describe_value(other)}{hint}"
    )


def _adapted(op: LinearOperator, partner: LinearOperator) -> LinearOperator:
    """``op``, a multiple of the identity re-made in ``partner``'s dtype/device; else checks they agree."""
    if isinstance(op, IdentityOperator):
        return IdentityOperator(op.shape[0], partner.dtype, partner.device)
    if _identity_multiple(op):  # c·I: a sum whose terms are identities
        return SumOperator([_adapted(o, partner) for o in op.ops], op.coeffs)
    if isinstance(partner, IdentityOperator) or _identity_multiple(partner):
        return op
    if op.dtype != partner.dtype or op.device != partner.device:
        raise ValueError(
            f"operators differ in dtype/device: {op.dtype}/{op.device} vs {partner.dtype}/{partner.device}"
        )
    return op


def _identity_multiple(op: LinearOperator) -> bool:
    """Whether ``op`` is a sum of identities (a scaled identity)."""
    return isinstance(op, SumOperator) and all(isinstance(o, IdentityOperator) for o in op.ops)
