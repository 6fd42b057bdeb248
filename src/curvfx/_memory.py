"""The memory budget for large intermediates: chunk sizes that fit it, or a clear error.

curvfx materializes a few large tensors on request: per-sample Jacobians (N·C·P numbers),
per-sample gradients (N·P), per-sample gradients of the K factor columns in the generic
exact diagonal (chunk·K·P), dense matrices (``to_dense``, M·N). Before it does, it asks
:func:`fitting_chunk` or :func:`check_fits` whether the tensor fits the budget:

* where the work can be split into chunks (samples per ``vmap`` call) and no
  ``chunk_size`` was given, curvfx picks the largest chunk that fits;
* where even one chunk does not fit, or the tensor is the result itself, it raises
  :class:`MemoryBudgetError` stating the estimated size and what to change.

The budget defaults to :data:`DEFAULT_BUDGET` (2 GiB) per intermediate. Change it for the
process with :func:`set_memory_budget`, or for a block with :func:`memory_budget`. The
estimate counts only the named tensor (not activations), so leave headroom.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from curvfx._arguments import check_count

__all__ = [
    "DEFAULT_BUDGET",
    "MemoryBudgetError",
    "check_fits",
    "current_budget",
    "fitting_chunk",
    "memory_budget",
    "set_memory_budget",
]

DEFAULT_BUDGET = 2 * 2**30  # bytes: 2 GiB
_BUDGET: ContextVar[int] = ContextVar("curvfx_memory_budget", default=DEFAULT_BUDGET)


class MemoryBudgetError(ValueError):
    """A tensor curvfx was asked to form would exceed the memory budget (see :mod:`curvfx._memory`)."""


def set_memory_budget(nbytes: int | None) -> int:
    """Set the budget for one intermediate tensor to ``nbytes`` (None: the 2 GiB default).

    Returns:
        The previous budget in bytes.

    Example:
        >>> previous = set_memory_budget(2**20)
        >>> current_budget()
        1048576
        >>> _ = set_memory_budget(previous)
    """
    previous = _BUDGET.get()
    _BUDGET.set(DEFAULT_BUDGET if nbytes is None else _checked_budget(nbytes))
    return previous


@contextlib.contextmanager
def memory_budget(nbytes: int) -> Iterator[None]:
    """Context manager: the budget is ``nbytes`` inside the block, the previous one after it."""
    token = _BUDGET.set(_checked_budget(nbytes))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def current_budget() -> int:
    """The budget for one intermediate tensor, in bytes."""
    return _BUDGET.get()


def fitting_chunk(what: str, per_item: int, num_items: int, dtype: torch.dtype, advice: str) -> int:
    """Items per chunk (1 ≤ chunk ≤ ``num_items``) so that ``chunk · per_item`` numbers fit the budget.

    Raises:
        MemoryBudgetError: If one item (``per_item`` numbers of ``dtype``) does not fit
            (as :func:`check_fits`).
    """
    check_fits(what, per_item, dtype, advice)
    return max(1, min(num_items, current_budget() // (max(1, per_item) * dtype.itemsize)))


def check_fits(what: str, numel: int, dtype: torch.dtype, advice: str) -> None:
    """Raise :class:`MemoryBudgetError` if ``numel`` numbers of ``dtype`` exceed the budget.

    The message names ``what``, the estimated size and ``advice`` (what to change).
    """
    size, budget = numel * dtype.itemsize, current_budget()
    if size > budget:
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(size)} ({numel} numbers of {dtype}), above the memory "
            f"budget of {format_bytes(budget)}; {advice}, or raise the budget with "
            "curvfx.set_memory_budget(nbytes)"
        )


def format_bytes(n: int) -> str:
    """``n`` bytes as a short string in KB, MB, GB or TB (powers of 1024)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _checked_budget(nbytes: int) -> int:
    return check_count(nbytes, "nbytes")
