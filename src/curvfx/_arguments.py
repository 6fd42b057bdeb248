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

from torch import Tensor

from curvfx._errors import describe

__all__ = ["check_chunk_size", "check_count", "check_flag", "check_number", "describe_value", "real_number"]


def describe_value(value: Any) -> str:
    """A short description of a scalar argument: the value of a str, bool or number, and its type."""
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    if isinstance(value, str | bool | numbers.Number):
        return f"{value!r} ({name})"
    return describe(value) if isinstance(value, Tensor) else name


def _scalar(value: Any) -> Any:
    """The Python scalar in a one-element tensor or array (numpy's, say), else ``value`` itself."""
    if isinstance(value, Tensor) or (hasattr(value, "item") and getattr(value, "size", None) == 1):
        numel = value.numel() if isinstance(value, Tensor) else 1
        return value.item() if numel == 1 else value
    return value


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: a bool, or a one-element boolean tensor or numpy bool; else ``TypeError``.

    Not an int or a string: ``"False"`` is truthy.
    """
    value = _scalar(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {describe_value(value)}")
    return value


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``: a Python, numpy or one-element tensor integer, not a bool."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {describe_value(value)}")
    return int(value)


def check_chunk_size(chunk_size: Any) -> int | None:
    """``chunk_size`` if it is None or an int ≥ 1 (a ``ValueError`` naming it otherwise)."""
    return None if chunk_size is None else check_count(chunk_size, "chunk_size")


def real_number(c: Any, name: str) -> float:
    """``c`` as a float: a finite real number (Python, numpy, or a one-element real tensor).

    Raises:
        TypeError: If ``c`` is a bool, a string, a complex number, a tensor with several
            entries, or anything else that is not a real number; names ``name``.
        ValueError: If ``c`` is inf or nan; names ``name``.
    """
    c = _scalar(c)
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        expected = "a real number (int, float or one-element tensor)"
        raise TypeError(f"{name}: expected {expected}, got {describe_value(c)}")
    if not math.isfinite(c):
        raise ValueError(f"{name}: expected a finite number, got {c!r}")
    return float(c)


def check_number(
    value: Any,
    name: str,
    *,
    strict: bool = True,
    low: float = 0.0,
    high: float = math.inf,
    strict_high: bool = True,
) -> float:
    """:func:`real_number` between ``low`` and ``high``; a ``ValueError`` naming ``name`` otherwise.

    The interval is ``(low, high)`` if ``strict`` else ``[low, high)``, with ``high``
    included if not ``strict_high``. The defaults ask for a number > 0 (``strict=False``:
    ≥ 0); ``high=1.0`` also bounds it above (``strict_high=False``: [0, 1]), and
    ``low=-math.inf`` takes any finite number. A non-number, inf or nan gets the same
    ``ValueError``, which states the interval.
    """
    try:
        number = real_number(value, name)
    except (TypeError, ValueError):
        number = math.nan  # not a finite real number: outside every interval
    above = number > low if strict else number >= low
    below = number < high if strict_high else number <= high
    if not (above and below):
        bounds = [f"{'>' if strict else '>='} {low:g}"] if low > -math.inf else []
        bounds += [f"{'<' if strict_high else '<='} {high:g}"] if high < math.inf else []
        expected = "a finite float " + " and ".join(bounds) if bounds else "a finite float"
        raise ValueError(f"{name}: expected {expected}, got {describe_value(value)}")
    return number
