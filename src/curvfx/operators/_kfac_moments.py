"""Second moments of KFAC's factors: ``A = Σ ã ãᵀ`` and ``B = Σ g gᵀ``, summed in place.

Used by :mod:`curvfx.operators._kfac_factors`. Each update is ``total ← keep · total +
scale · Σ t tᵀ`` with ``keep = 0`` overwriting an uninitialized ``total``: the caller keeps
running means (``keep = n / n'``, ``scale = 1 / n'``), so no pass divides the factors at
the end. The products avoid copying the captured layer inputs and output gradients (see
:func:`add_second_moment`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["add_input_moment", "add_second_moment"]


def add_input_moment(A: Tensor, a: Tensor | None, rows: int, keep: float, scale: float) -> None:
    """``A ← keep · A + scale · Σ ã ãᵀ`` over the ``rows`` rows of ``a`` [..., in], in place.

    ``ã = [a; 1]`` when A has a bias row and column (its border is ``Σ a`` and the row
    count: a is not copied); ``a`` None: a bias alone, ``ã = 1``. ``keep = 0`` ignores
    A's entries (uninitialized memory).
    """
    if a is None:
        _update(A, float(rows), keep, scale)
        return
    size_in = a.shape[-1]
    add_second_moment(A[:size_in, :size_in], a, keep, scale)
    if A.shape[0] > size_in:
        border = A[size_in]  # the bias row; the column gets the same numbers
        _update(border[:size_in], a.sum(tuple(range(a.dim() - 1))), keep, scale)
        _update(border[size_in:], float(rows), keep, scale)
        A[:size_in, size_in].copy_(border[:size_in])


def add_second_moment(total: Tensor, t: Tensor, keep: float, scale: float) -> None:
    """``total ← keep · total + scale · Σ t tᵀ`` over the rows of ``t`` [..., d], in place.

    ``keep = 0``: ``total`` is uninitialized and gets overwritten. ``t`` is not copied. Rows
    stored one after the other (linear layers) go to :func:`_add_gram` as they are. A
    convolution's ``t`` [..., T, d] is the transpose of its contiguous [..., d, T]
    (channels before positions): with T ≥ d, one batched product over the leading
    entries, summed — on a 2-conv CNN's type-2 factors 6× faster than copying the rows
    into place first; with T < d (late layers of deep CNNs) the per-entry [d, d] products
    would outgrow the rows, which are then copied.
    """
    t = t.to(total.dtype)  # 16-bit inputs (or autocast's) summed in float32
    d, positions = t.shape[-1], t.shape[-2]
    if t.stride(-1) == 1 or positions < d:  # rows (copied if need be: [N·T, d] < [N, d, d])
        _add_gram(total, t.reshape(-1, d), scale, keep)
        return
    blocks = t.transpose(-1, -2).reshape(-1, d, positions)  # a view of the contiguous layout
    _update(total, torch.bmm(blocks, blocks.mT).sum(0), keep, scale)


def _update(total: Tensor, term: Tensor | float, keep: float, scale: float) -> None:
    """``total ← keep · total + scale · term`` (``keep = 0`` ignores total's entries)."""
    if keep == 0 and isinstance(term, Tensor):
        torch.mul(term, scale, out=total)
    elif keep == 0:
        total.fill_(scale * term)
    else:
        total.mul_(keep).add_(term, alpha=scale)


def _add_gram(total: Tensor, rows: Tensor, weight: float, beta: float) -> None:
    """``total = beta · total + weight · rowsᵀ rows`` for ``rows`` [R, d] (beta = 0 ignores total).

    For d ≥ 512 and R ≥ d/2 (CPU), the diagonal blocks of the halves (recursively) and
    their upper off-diagonal block only, the lower block copied from the upper: 3/4 of the
    multiply-adds per level. Measured on 2 CPU threads against one product: [384, 785]
    1.03 against 1.19 ms, [512, 1024] 2.5 against 2.9, [2048, 2048] 30 against 40. With
    fewer rows writing the result outweighs the products, and the blocks and the copy
    lose: [128, 785] 0.40 against 0.38 ms, [64, 2048] 5.5 against 1.4 (the CNN's
    2049-input linear layer). Other devices take one product (not measured there).
    """
    d = rows.shape[1]
    if d < 512 or 2 * rows.shape[0] < d or total.device.type != "cpu":
        total.addmm_(rows.T, rows, beta=beta, alpha=weight)
        return
    h = d // 2
    left, right = rows[:, :h], rows[:, h:]
    _add_gram(total[:h, :h], left, weight, beta)
    _add_gram(total[h:, h:], right, weight, beta)
    total[:h, h:].addmm_(left.T, right, beta=beta, alpha=weight)
    total[h:, :h].copy_(total[:h, h:].T)
