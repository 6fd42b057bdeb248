"""Sizes of ``vmap`` calls over columns and over samples.

:data:`COLUMN_NUMBERS` bounds the batched intermediates of one ``vmap`` call over K columns
(layer output gradients for K factor columns, :func:`curvfx._capture.output_grads`).
Batching K columns with ``vmap`` multiplies every activation by K: where activations are
large (convolutions on images) the K-fold intermediates fall out of the CPU caches and
memory-bound operations slow down more than batching saves. Curvature operators' matmats
do not vmap over columns at all (without an explicit ``chunk_size``): one forward pass
shared by all columns, then a loop, measured faster on every benchmark model
(:meth:`curvfx.operators.CurvatureOperator.matmat`).

:data:`SAMPLE_NUMBERS` bounds the per-sample gradients of one ``vmap`` call over samples.
"""

from __future__ import annotations

__all__ = ["COLUMN_NUMBERS", "SAMPLE_NUMBERS"]

COLUMN_NUMBERS = 2**22  # numbers of the batched intermediates one vmap call may hold
# Per-sample routes (exact diagonals): numbers of per-sample gradients per vmap call. Larger
# calls are slower, not faster (fresh multi-GB buffers page-fault: a GPT's exact diagonal took
# 1.9× the time in chunks sized by the 2 GiB memory budget); the budget still caps it.
SAMPLE_NUMBERS = 2**24
