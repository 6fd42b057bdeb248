"""Constructors of the curvature operators: a model, a loss and data in, a ``LinearOperator`` out.

Conventions (batch weighting, ``factor``, data parallelism, randomness, ``restrict``) are
those of :mod:`curvfx.operators.curvature`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvfx.functional import as_function
from curvfx.operators._data import BatchSizeFn
from curvfx.operators._distributed import ProcessGroupArg, unwrap_ddp
from curvfx.operators.curvature import FisherOperator, GGNOperator, HessianOperator

__all__ = ["empirical_fisher", "fisher", "ggn", "hessian"]

PyTree = Any


def hessian(
    model: nn.Module | Callable,
    loss_fn: Any,
    data: Any,
    *,
    params: PyTree | None = None,
    factor: float = 1.0,
    chunk_size: int | None = None,
    compile: bool | dict = False,
    process_group: ProcessGroupArg = None,
    randomness: str = "fixed",
    batch_size_fn: BatchSizeFn | None = None,
) -> HessianOperator:
    """Hessian operator ``∇²_θ L`` of ``loss_fn(model(X), y)`` over ``data`` (see :class:`HessianOperator`).

    Args:
        model: An ``nn.Module`` or a pure ``fn(params, x)`` (then ``params`` is required).
        loss_fn: A torch loss (module or function), a :class:`curvfx.losses.Loss`, or any
            ``loss_fn(outputs, targets) -> scalar``.
        data: One ``(X, y)`` batch or a re-iterable of batches (list, DataLoader).
        params: Parameter pytree (default: the module's trainable parameters).
        factor: Scale of the whole operator: a finite real number (int, float, or a 0-dim
            tensor, read with ``float``; a bool or a string is refused).
        chunk_size: Columns per vmap call in ``matmat``: None (all) or a positive int.
        compile: ``True`` or a dict of ``torch.compile`` options (plus ``"check": False`` to
            skip the self-check): products are compiled once and checked against eager on
            first use (see :mod:`curvfx.operators._compile`); ``False``: eager.
        process_group: Data parallelism (see ``docs/distributed.md``): None (single process,
            the default, even when ``torch.distributed`` is initialized), True (the default
            group) or a ``ProcessGroup``. Each rank passes its own shard as ``data``; every
            product is all-reduced, equal on all ranks to the single-process result on the
            concatenated data. A ``DistributedDataParallel`` model is used through its
            ``.module``.
        randomness: Random operations in the model (dropout): ``"fixed"`` (the same masks
            in every product, one fixed matrix; the global RNG is left as it was), ``"off"``
            (dropout modules in eval during products; needs an ``nn.Module``) or
            ``"sample"`` (a fresh draw per product); see
            :mod:`curvfx.operators._randomness`.
        batch_size_fn: Optional ``(X, y) -> N``: each batch read is checked to hold N
            samples along dim 0 of every input leaf and of ``y`` (a ``ValueError`` naming
            the leaf otherwise; see :mod:`curvfx.operators._data`).

    Raises:
        TypeError: If ``factor`` is not a real number; the message names the argument.
        ValueError: If ``factor`` is not finite or ``chunk_size`` is neither None nor an
            int ≥ 1 (the message names it); in a product, if a batch's ``x`` is empty or a
            loss curvfx knows does not accept the targets for the outputs (the Hessian
            takes ``y`` as the loss does: it need not share ``x``'s N; the GGN and Fisher
            operators need it to, as :func:`curvfx.ggn_vp`).
    """
    model_fn, params = as_function(unwrap_ddp(model), params)
    return HessianOperator(
        model_fn,
        loss_fn,
        params,
        data,
        factor=factor,
        chunk_size=chunk_size,
        compile=compile,
        process_group=process_group,
        randomness=randomness,
        batch_size_fn=batch_size_fn,
    )


def ggn(
    model: nn.Module | Callable,
    loss_fn: Any,
    data: Any,
    *,
    params: PyTree | None = None,
    factor: float = 1.0,
    chunk_size: int | None = None,
    compile: bool | dict = False,
    process_group: ProcessGroupArg = None,
    randomness: str = "fixed",
    batch_size_fn: BatchSizeFn | None = None,
) -> GGNOperator:
    """GGN operator ``Jᵀ (∇²_f L) J`` over ``data`` (:class:`GGNOperator`; arguments as :func:`hessian`)."""
    model_fn, params = as_function(unwrap_ddp(model), params)
    return GGNOperator(
        model_fn,
        loss_fn,
        params,
        data,
        factor=factor,
        chunk_size=chunk_size,
        compile=compile,
        process_group=process_group,
        randomness=randomness,
        batch_size_fn=batch_size_fn,
    )


def fisher(
    model: nn.Module | Callable,
    loss_fn: Any,
    data: Any,
    *,
    kind: str = "mc",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    params: PyTree | None = None,
    factor: float = 1.0,
    chunk_size: int | None = None,
    compile: bool | dict = False,
    process_group: ProcessGroupArg = None,
    randomness: str = "fixed",
    batch_size_fn: BatchSizeFn | None = None,
) -> FisherOperator:
    """Fisher operator of ``kind`` "mc", "exact" or "empirical" (see :class:`FisherOperator`).

    ``num_samples`` and ``generator`` apply to "mc" (the draws of the targets, separate from
    ``randomness``, which governs the model's dropout); other arguments as :func:`hessian`.
    """
    model_fn, params = as_function(unwrap_ddp(model), params)
    return FisherOperator(
        model_fn,
        loss_fn,
        params,
        data,
        kind=kind,
        num_samples=num_samples,
        generator=generator,
        factor=factor,
        chunk_size=chunk_size,
        compile=compile,
        process_group=process_group,
        randomness=randomness,
        batch_size_fn=batch_size_fn,
    )


def empirical_fisher(
    model: nn.Module | Callable,
    loss_fn: Any,
    data: Any,
    *,
    params: PyTree | None = None,
    factor: float = 1.0,
    chunk_size: int | None = None,
    compile: bool | dict = False,
    process_group: ProcessGroupArg = None,
    randomness: str = "fixed",
    batch_size_fn: BatchSizeFn | None = None,
) -> FisherOperator:
    """Empirical Fisher ``Z Σ_n ∇_θ L_n ∇_θ L_nᵀ``: :func:`fisher` with ``kind="empirical"``."""
    return fisher(
        model,
        loss_fn,
        data,
        kind="empirical",
        params=params,
        factor=factor,
        chunk_size=chunk_size,
        compile=compile,
        process_group=process_group,
        randomness=randomness,
        batch_size_fn=batch_size_fn,
    )
