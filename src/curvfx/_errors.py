"""Small shared helpers for argument checking and error messages."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvfx._pytree import leaves

__all__ = ["UnsupportedInputError", "all_finite", "check_batch", "describe", "inside_transform"]


class UnsupportedInputError(ValueError, NotImplementedError):
    """An argument value the function does not support.

    A ``ValueError`` (curvfx's rule for bad input) that is also a ``NotImplementedError``,
    for the seed APIs whose originals raise that for the same input.
    """


def describe(obj: Any) -> str:
    """A short description of ``obj`` for error messages (shape for tensors, else the type)."""
    if isinstance(obj, Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    return type(obj).__name__


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (no inf/nan).

    One sum first (a reduction without a temporary; any inf/nan makes it non-finite), the
    entrywise check only when the sum is not finite (an overflow of finite entries).
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def inside_transform() -> bool:
    """Whether we run under a ``torch.func`` transform (where ``torch.autograd`` cannot be used)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def check_batch(x: Any, y: Tensor | None) -> None:
    """Raise ``ValueError`` unless the tensors of ``x`` (and ``y``, if given) share a leading N > 0."""
    x_leaves = leaves(x)
    if not x_leaves:
        raise ValueError("x: expected a tensor or a tuple/mapping of tensors, got no tensors")
    n = x_leaves[0].shape[0] if x_leaves[0].dim() > 0 else None
    if n is None or any(t.dim() == 0 or t.shape[0] != n for t in x_leaves):
        raise ValueError("x: every input tensor needs the same leading batch dimension N")
    if n == 0:
        raise ValueError("x: the batch is empty (N = 0)")
    if y is not None and (not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n):
        raise ValueError(f"y: expected targets with leading dimension N = {n}, got {describe(y)}")
