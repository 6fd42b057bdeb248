"""The Jacobian of the model outputs on one input batch as a linear operator [N·C, P]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._arguments import check_chunk_size
from curvfx._engines import func_jvp
from curvfx._pytree import num_params, ravel, unravel
from curvfx.func import model_jvp, model_vjp
from curvfx.functional import as_function
from curvfx.operators._base import PARAMS_DEVICE, PARAMS_DTYPE, LinearOperator, apply_columns, fixed_params
from curvfx.operators._compile import CompiledProduct, compile_options
from curvfx.operators._distributed import unwrap_ddp
from curvfx.operators._randomness import batch_randomness, check_randomness, fixed_seed, replay_batch_seed

__all__ = ["JacobianOperator", "jacobian"]

PyTree = Any


class JacobianOperator(LinearOperator):
    """Jacobian ``J = ∂ vec(f(X; θ)) / ∂θ`` [N·C, P] of the model outputs on one input batch.

    ``J @ v`` (v flat [P] or params-shaped) gives ``vec(J v)`` [N·C] by forward-mode AD;
    ``J.T @ u`` (u [N·C]) gives ``Jᵀ u`` (flat [P])
    by one backward pass. The output shape is read by one forward pass without gradients
    the first time ``shape`` is needed.

    With ``compile`` (see :mod:`curvfx.operators._compile`), J v and Jᵀ u, and their
    matmats (vmapped over columns, one graph each), are compiled on first use by tracing
    ``torch.func.jvp`` and ``torch.func.vjp`` (strategy ``"func"``), each checked once
    against the same product run eagerly.

    ``randomness`` as for the curvature operators (:mod:`curvfx.operators._randomness`):
    with "fixed" (default) every product, J v and Jᵀ u alike, sees the same dropout masks,
    so ``J.T`` is the transpose of ``J``.

    Raises:
        ValueError: If ``chunk_size`` is neither None nor an int ≥ 1 (a bool is not).
    """

    compiled_strategy = "func"  # torch.func.jvp / torch.func.vjp: traced without graph breaks

    def __init__(self, model_fn, params, x, *, chunk_size=None, compile=False, randomness="fixed"):
        self.model_fn, self.params, self.x = model_fn, fixed_params(params), x
        self.chunk_size = check_chunk_size(chunk_size)
        self.compile_options = compile_options(compile, model_fn)
        self.randomness = check_randomness(randomness, model_fn)
        self.model_seed = fixed_seed(randomness, None, self.device)
        self._output_shape, self._output_dtype = None, None
        self._compiled: dict[str, CompiledProduct] = {}

    @property
    def output_shape(self) -> torch.Size:
        """Shape of the model outputs f(X; θ) [N, ...]."""
        if self._output_shape is None:
            with (
                torch.no_grad(),
                batch_randomness(self.randomness, self.model_seed, 0, self.model_fn, self.device),
            ):
                outputs = self.model_fn(self.params, self.x)
                self._output_shape, self._output_dtype = outputs.shape, outputs.dtype
        return self._output_shape

    @property
    def shape(self) -> tuple[int, int]:
        """(N·C, P)."""
        return (self.output_shape.numel(), num_params(self.params))

    dtype, device = PARAMS_DTYPE, PARAMS_DEVICE

    @property
    def in_like(self) -> PyTree:
        """The parameters (inputs may be params-shaped)."""
        return self.params

    def _jv(self, x: Any, v: Tensor, strategy: str = "auto") -> Tensor:
        """``vec(J v)`` [N·C] for a flat ``v`` [P]: forward mode ("func": ``torch.func.jvp``).

        J has the parameters' dtype: outputs computed in another (a model that upcasts its
        logits) are cast to it, and ``u`` is cast to the outputs' dtype in ``Jᵀ u``.
        """
        tree = unravel(v, self.params)
        if strategy == "func":
            jv = func_jvp(lambda p: self.model_fn(p, x), self.params, tree)[1]
        else:
            jv = model_jvp(self.model_fn, self.params, x, tree)
        return jv.reshape(-1).to(self.dtype)  # outputs of another dtype (float32 logits) take J's

    def _jtu(self, x: Any, u: Tensor, strategy: str = "auto") -> Tensor:
        """``Jᵀ u`` [P] for a flat ``u`` [N·C]: one backward pass ("func": ``torch.func.vjp``)."""
        u = u.reshape(self.output_shape).to(self._output_dtype)
        if strategy == "func":
            return ravel(torch.func.vjp(lambda p: self.model_fn(p, x), self.params)[1](u)[0])
        return ravel(model_vjp(self.model_fn, self.params, x, u))

    def _compiled_product(self, kind: str) -> CompiledProduct | None:
        """The compiled ``J v`` (kind "J") or ``Jᵀ u`` ("Jᵀ"), made on first use; None when eager."""
        if self.compile_options is None:
            return None
        if kind not in self._compiled:
            self.output_shape  # noqa: B018  (one eager forward pass, outside the traced product)
            product = self._jv if kind == "J" else self._jtu

            def replayed(x: Any, y: None, v: Tensor) -> Tensor:
                if self.randomness == "fixed" and not torch.compiler.is_compiling():
                    replay_batch_seed(self.device)  # the eager check sees the compiled call's draws
                return product(x, v, self.compiled_strategy)

            self._compiled[kind] = CompiledProduct(
                replayed,
                "JacobianOperator" if kind == "J" else "JacobianOperator.T",
                self.compile_options,
            )
        return self._compiled[kind]

    def _matvec(self, v: Tensor) -> Tensor:
        return self._apply("J", "matvec", v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply("J", "matmat", V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self._apply("Jᵀ", "matvec", u)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._apply("Jᵀ", "matmat", U)

    def _apply(self, kind: str, form: str, w: Tensor) -> Tensor:
        """J or Jᵀ (``kind``) times a vector or matrix (``form``), under the operator's randomness."""
        compiled = self._compiled_product(kind)
        product = self._jv if kind == "J" else self._jtu
        with batch_randomness(self.randomness, self.model_seed, 0, self.model_fn, self.device):
            if compiled is not None:
                return compiled(form, self.x, None, w)
            if form == "matvec":
                return product(self.x, w)
            name = "JacobianOperator" if kind == "J" else "JacobianOperator.T"
            return apply_columns(lambda c: product(self.x, c), w, self.chunk_size, name)


def jacobian(
    model: nn.Module | Callable,
    x: Any,
    *,
    params: PyTree | None = None,
    chunk_size: int | None = None,
    compile: bool | dict = False,
    randomness: str = "fixed",
) -> JacobianOperator:
    """Jacobian operator ``∂ vec(f(x; θ))/∂θ`` [N·C, P] on the input batch ``x``; ``.T`` transposes.

    ``compile``: ``True`` or a dict of ``torch.compile`` options (plus ``"check": False``):
    J v and Jᵀ u, and their matmats, are compiled once and checked against eager on first
    use (see :class:`JacobianOperator`); ``randomness``: "fixed" (default: the same dropout
    masks in every product), "off" or "sample" (:mod:`curvfx.operators._randomness`);
    other arguments as :func:`curvfx.hessian`.

    Raises:
        ValueError: If ``chunk_size`` is neither None nor an int ≥ 1 (a bool is not).
    """
    model_fn, params = as_function(unwrap_ddp(model), params)
    return JacobianOperator(
        model_fn, params, x, chunk_size=chunk_size, compile=compile, randomness=randomness
    )
