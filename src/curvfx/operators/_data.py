"""Data for curvature operators: one ``(X, y)`` batch or a re-iterable collection of batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

__all__ = ["Batches"]


class Batches:
    """Re-iterable view of ``data`` yielding ``(X, y)`` pairs.

    ``data`` is one batch — a pair ``(X, y)`` whose second item is a tensor; ``X`` may be
    a tensor, a tuple or a mapping of tensors — or any re-iterable of such pairs (a list,
    a ``torch.utils.data.DataLoader``). One-shot iterators (generators) are rejected: an
    operator reads its data on every product.
    """

    def __init__(self, data: Any):
        if _is_batch(data):
            self.batches: Iterable = (tuple(data),)
        elif isinstance(data, Iterator):
            raise ValueError(
                "data: a one-shot iterator is read on every product; pass a list of (X, y) "
                "batches or a DataLoader"
            )
        elif isinstance(data, Iterable) and not isinstance(data, Tensor | str | bytes):
            self.batches = data
        else:
            raise TypeError(
                f"data: expected an (X, y) batch or an iterable of batches, got {type(data).__name__}"
            )

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        empty = True
        for i, batch in enumerate(self.batches):
            if not _is_batch(batch):
                raise ValueError(
                    f"data: batch {i} is not an (X, y) pair with tensor targets y, got {type(batch).__name__}"
                )
            empty = False
            yield batch[0], batch[1]
        if empty:
            raise ValueError("data: no batches (the data is empty)")


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, tuple | list) and len(obj) == 2 and isinstance(obj[1], Tensor)
