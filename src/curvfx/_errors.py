"""Small shared helpers for argument checking and error messages."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["UnsupportedInputError", "all_finite", "describe", "inside_transform"]


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
