"""Checks of scalar arguments (flags, counts, real numbers) at the public boundary.

Each returns the value (converted where said) or raises an error naming the argument:
``TypeError`` for a value of the wrong kind where the distinction matters (a flag), else
``ValueError``. A bool is never taken for a number, nor a string such as ``"False"`` for a
flag (it is truthy).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from curvfx._errors import describe

__all__ = ["check_chunk_size", "check_count", "check_flag", "check_number", "describe_value", "real_number"]


def describe_value(value: Any) -> str:
    """A short description of a scalar argument: the value of a str, bool or number, else the type."""
    if isinstance(value, str | bool | numbers.Number):
        return f"{value!r} ({type(value).__name__})"
    return describe(value)


def check_flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool; ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {describe_value(value)}")
    return value


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int ≥ ``minimum`` (not a bool); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {describe_value(value)}")
    return value


def check_chunk_size(chunk_size: Any) -> int | None:
    """``chunk_size`` if it is None or an int ≥ 1 (a ``ValueError`` naming it otherwise)."""
    return None if chunk_size is None else check_count(chunk_size, "chunk_size")


def check_number(value: Any, name: str, *, strict: bool = True) -> float:
    """``value`` as a float if it is a finite real number (not a bool), > 0 (``strict``) or ≥ 0.

    Raises:
        ValueError: Naming ``name``, for anything else (a str, a bool, inf, nan, a tensor).
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise ValueError(f"{name}: expected a finite float {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


def real_number(c: Any, name: str) -> float:
    """``c`` as a float: a finite real number (int, float, or a 0-dim real tensor read with ``float``).

    Raises:
        TypeError: If ``c`` is a bool, a string, a bool or complex tensor, a tensor with
            dimensions, or anything else that is not a real number; names ``name``.
        ValueError: If ``c`` is inf or nan; names ``name``.
    """
    if isinstance(c, Tensor) and c.dim() == 0 and c.dtype != torch.bool and not c.is_complex():
        c = c.item()
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(
            f"{name}: expected a real number (int, float or 0-dim tensor), got {describe_value(c)}"
        )
    if not math.isfinite(c):
        raise ValueError(f"{name}: expected a finite number, got {c!r}")
    return float(c)
