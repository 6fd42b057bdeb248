"""How a curvature operator's ``matmat`` batches its K columns: one ``vmap`` call, or a loop.

Batching K columns with ``vmap`` multiplies every activation of the product by K. Where
activations are small (MLPs, even with 1024-wide layers) one call over all columns is
fastest (matrix products batch well); where they are large (convolutions on images), the
K-fold intermediates fall out of the CPU caches and memory-bound operations (ReLU and
pooling backward, copies) slow down more than batching saves. Measured on a 2-conv CNN
(batch 64, 32×32 images, 16 GGN columns): vmap 1.9×, a loop over columns sharing one
forward pass 0.86× the time of 16 separate products; on a 784-256-256-10 MLP (batch 128)
vmap 0.5×, the loop 0.8×.

:func:`columns_per_call` measures the per-column size once; the operator vmaps when all
columns fit under :data:`COLUMN_NUMBERS` numbers and otherwise loops over the columns of
one shared forward pass (the transforms' matrix form, e.g. :func:`curvfx.hvp` with V [P, K]).
An explicit ``chunk_size`` always means vmap in chunks of that many columns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from curvfx._engines import kept_rng
from curvfx._pytree import leaves, tree_map

__all__ = ["COLUMN_NUMBERS", "SAMPLE_NUMBERS", "columns_per_call"]

COLUMN_NUMBERS = 2**22  # numbers of the batched intermediates one vmap call may hold
# Per-sample routes (exact diagonals): numbers of per-sample gradients per vmap call. Larger
# calls are slower, not faster (fresh multi-GB buffers page-fault: a GPT's exact diagonal took
# 1.9× the time in chunks sized by the 2 GiB memory budget); the budget still caps it.
SAMPLE_NUMBERS = 2**24


def columns_per_call(model_fn: Callable, params: Any, x: Any) -> int:
    """How many columns one ``vmap`` call over products through ``model_fn(params, x)`` may batch.

    ``max(1, COLUMN_NUMBERS // a)`` with ``a`` the number of entries of the largest tensor
    one forward pass saves for backward, parameters excluded (the activations that vmap
    batches over columns). Costs one forward pass; the random number state is left as it was.
    """
    param_leaves = leaves(params)
    params_storage = {leaf.untyped_storage().data_ptr() for leaf in param_leaves}
    largest = 0

    def pack(t: torch.Tensor) -> None:  # keeps nothing: a tensor kept here would never be freed
        nonlocal largest
        if t.untyped_storage().data_ptr() not in params_storage:
            largest = max(largest, t.numel())

    with kept_rng(param_leaves[0].device), torch.enable_grad(), saved_tensors_hooks(pack, _never_unpacked):
        model_fn(tree_map(lambda leaf: leaf.detach().requires_grad_(), params), x)
    return max(1, COLUMN_NUMBERS // max(largest, 1))


def _never_unpacked(_: None) -> torch.Tensor:
    raise RuntimeError("columns_per_call's forward pass is never differentiated")
