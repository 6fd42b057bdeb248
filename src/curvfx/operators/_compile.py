"""Compiled per-batch products for operators, trusted only after a check against eager.

An operator built with ``compile=True`` (or a dict of ``torch.compile`` options) routes its
per-batch product ``product(x, y, v) -> flat [P]`` through :class:`CompiledProduct`:

* the matvec ``v [P] -> [P]`` and the matmat ``V [P, K] -> [P, K]`` (the matvec vmapped
  over columns, compiled as one graph) are each compiled once per operator and reused
  (build the operator once and apply it many times; a new operator compiles anew);
* batch shapes: ``dynamic=False`` unless the options say otherwise — one static graph per
  batch shape (a loader whose last batch is smaller compiles two), a small cache bounded by
  ``torch._dynamo.config.cache_size_limit`` (8 by default; beyond it torch runs eagerly).
  Dynamic shapes are avoided because automatic dynamic shapes also symbolize parameter
  sizes, which double-backward traces of convolutions do not survive in torch 2.13;
* self-check: the first compiled result of each kind (matvec, matmat) is compared with the
  eager product on the same input (a product that is zero both ways, e.g. of a zero
  vector, is not counted: the next one is checked); beyond a relative tolerance for the dtype (1e-8 for
  float64, 1e-3 for float32/bfloat16/float16 as relative Frobenius error) curvfx warns once,
  naming the operator, and uses the eager product from then on. ``compile={"check": False}``
  skips the check.

Inductor has shipped silent wrong higher-order derivatives (pytorch issues 187284, 190855):
hence the check. Compiling costs seconds to minutes; it pays for operators applied many
times (Lanczos, CG, many probes, optimizer steps).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

__all__ = ["CompiledProduct", "compile_options"]

Product = Callable[[Any, Tensor, Tensor], Tensor]  # (x, y, v or V) -> result


def compile_options(compile: bool | dict, model_fn: Any = None) -> dict | None:
    """``torch.compile`` keyword arguments from an operator's ``compile=`` (None: eager).

    A model whose PReLU, EmbeddingBag or weight normalization runs composed
    (:class:`curvfx._kernels.ComposedOps`, a function mode that dynamo does not trace)
    runs eagerly, with a warning: compiled, torch's wrong derivatives would be back.
    """
    if compile is False or compile is None:
        return None
    if getattr(model_fn, "composed", False):
        warnings.warn(
            "compile: the model has a PReLU, an EmbeddingBag or a weight normalization, which "
            "curvfx runs as compositions that torch.compile does not trace; products run eagerly",
            RuntimeWarning,
            stacklevel=4,  # the user's call of the constructor
        )
        return None
    if compile is True:
        return {"dynamic": False}
    if isinstance(compile, dict):
        return {"dynamic": False, **compile}
    raise TypeError(f"compile: expected False, True or a dict of torch.compile options, got {compile!r}")


class CompiledProduct:
    """Compiled matvec and matmat of one per-batch product, with the eager fallback.

    Args:
        product: Eager ``product(x, y, v)`` for one flat vector ``v`` [P] (torch.func only,
            so that it traces and vmaps).
        name: Operator name for the warning.
        options: ``torch.compile`` options; the extra key ``"check"`` (default True) turns
            the self-check on or off.
    """

    def __init__(self, product: Product, name: str, options: dict):
        options = dict(options)
        self.check = bool(options.pop("check", True))
        self.name, self.product = name, product
        self.matvec = torch.compile(_own_code(lambda x, y, v: product(x, y, v)), **options)
        self.matmat = torch.compile(_own_code(lambda x, y, V: self._columns(x, y, V)), **options)
        self.trusted = {"matvec": not self.check, "matmat": not self.check}
        self.fallback = False

    def _columns(self, x: Any, y: Tensor, V: Tensor) -> Tensor:
        return vmap(lambda v: self.product(x, y, v), in_dims=1, out_dims=1, randomness="same")(V)

    def __call__(self, kind: str, x: Any, y: Tensor, v: Tensor) -> Tensor:
        """``kind`` "matvec" (v [P]) or "matmat" (v [P, K])."""
        eager = self.product if kind == "matvec" else self._columns
        if self.fallback:
            return eager(x, y, v)
        out = (self.matvec if kind == "matvec" else self.matmat)(x, y, v)
        if not self.trusted[kind]:
            expected = eager(x, y, v)
            scale = float(expected.norm())
            if scale == 0.0 and not bool(out.any()):  # zero in, zero out: proves nothing yet
                return out
            error = float((out - expected).norm()) / max(scale, torch.finfo(out.dtype).tiny)
            if not error <= _tolerance(out.dtype):
                warnings.warn(
                    f"{self.name}: the compiled {kind} differs from the eager one (relative error "
                    f"{error:.1e}); using the eager product for this operator",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.fallback = True
                return expected
            self.trusted[kind] = True
        return out


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own.

    Dynamo caches graphs per code object, so each operator gets its own cache instead of
    sharing (and exhausting) one across operators.
    """
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-3
