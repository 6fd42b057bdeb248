"""Data for curvature operators: one ``(X, y)`` batch or a re-iterable collection of batches.

The number of samples N of a batch is the leading dimension of its targets ``y``, or what
``batch_size_fn(X, y)`` returns when an operator is given one. ``X`` may be a tensor, a
tuple/list or a mapping of tensors (Hugging Face style ``{"input_ids": ...,
"attention_mask": ...}``); every tensor leaf of ``X`` is one input per sample, split along
dim 0 by the per-sample routes (exact diagonals, per-sample gradients), so each leaf's
leading dimension must be N. With ``batch_size_fn`` each batch is checked for that when it
is read, and a batch that disagrees raises a ``ValueError`` naming the leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import optree
from torch import Tensor

from curvfx._arguments import check_count
from curvfx._errors import describe

__all__ = ["Batches"]

BatchSizeFn = Callable[[Any, Tensor], int]


class Batches:
    """Re-iterable view of ``data`` yielding ``(X, y)`` pairs.

    ``data`` is one batch — a pair ``(X, y)`` whose second item is a tensor; ``X`` may be
    a tensor, a tuple or a mapping of tensors — or any re-iterable of such pairs (a list,
    a ``torch.utils.data.DataLoader``). One-shot iterators (generators) are rejected: an
    operator reads its data on every product. ``batch_size_fn(X, y) -> N`` (optional):
    each batch read is checked to have N samples in every leaf of ``X`` and in ``y``.
    """

    def __init__(self, data: Any, batch_size_fn: BatchSizeFn | None = None):
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(
                f"batch_size_fn: expected a callable (x, y) -> int, got {type(batch_size_fn).__name__}"
            )
        self.batch_size_fn = batch_size_fn
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
            if self.batch_size_fn is not None:
                self._check_size(i, batch[0], batch[1])
            yield batch[0], batch[1]
        if empty:
            raise ValueError("data: no batches (the data is empty)")

    def _check_size(self, i: int, x: Any, y: Tensor) -> None:
        n = check_count(self.batch_size_fn(x, y), f"batch_size_fn (batch {i})")
        paths, xs, _ = optree.tree_flatten_with_path(x, none_is_leaf=False)
        named = [("y", y)] + [("X" + "".join(f"[{p!r}]" for p in path), t) for path, t in zip(paths, xs)]
        for name, t in named:
            if isinstance(t, Tensor) and (t.dim() == 0 or t.shape[0] != n):
                raise ValueError(
                    f"data: batch {i}: {name} is {describe(t)}, but batch_size_fn gives N = {n} "
                    "samples (every input leaf and the targets need leading dimension N)"
                )


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, tuple | list) and len(obj) == 2 and isinstance(obj[1], Tensor)
