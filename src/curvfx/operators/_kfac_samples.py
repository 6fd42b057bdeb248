"""Which rows of a Kronecker layer's calls are the samples, and the inputs KFAC refuses.

"expand" counts every row of a layer's input alike; "reduce" and EKFAC's corrections read
the calls per sample, and "type-2" must not pair its factor columns across samples. Here:
the sample axis of each call (batch-first, or sequence-first ``[T, N, ...]``, decided by
one backward pass when T = N), and the refusals (``ValueError`` naming the layer) for
inputs without a sample axis, inputs not computed from the batch, coupled samples, and
parameters used outside their layer's calls.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from curvfx._capture import parameter_uses
from curvfx._layers import reads_per_sample
from curvfx._structured import features_last_square, not_from_batch, sequence_first
from curvfx.functional import FunctionalModel, check_independent_samples

__all__ = [
    "PER_SAMPLE",
    "batch_first",
    "check_called_with_gradient",
    "check_from_batch",
    "check_pairing",
    "check_used_in_calls",
    "sample_axes",
]

PER_SAMPLE = {  # who reads layer inputs per sample -> (what needs it, what to do instead)
    "reduce": (
        "kfac_approx='reduce'",
        "use kfac_approx='expand' (KFAC only: EKFAC needs per-sample gradients)",
    ),
    "ekfac": (
        "EKFAC's eigenvalue corrections (per-sample layer gradients)",
        "use kfac(..., kfac_approx='expand'), or give the layer a [N, T, ...] input",
    ),
    "type-2": (  # an output shared by the samples gets the Hessian factor's columns of all of them
        "fisher_type='type-2' (its B would pair the loss Hessian's factor columns across samples)",
        "use fisher_type='mc' or 'empirical'",
    ),
}


def check_called_with_gradient(
    records: dict[nn.Module, list[tuple[Tensor, Tensor]]], names: dict[nn.Module, str]
) -> None:
    """Raise ``ValueError`` naming a Kronecker layer called without gradient (under ``torch.no_grad``).

    Its output has no gradient to give B (and its parameters none at all).
    """
    for module, calls in records.items():
        if any(not z.requires_grad for _, z in calls):
            raise ValueError(
                f"layer {names[module]!r} is called without gradient (torch.no_grad or a detached "
                "input and weight inside forward), so it has no Kronecker factor B; leave its "
                "parameters out of params="
            )


def check_used_in_calls(
    outputs: Tensor,
    p: dict[str, Tensor],
    layers: dict[nn.Module, dict[str, str]],
    records: dict[nn.Module, list[tuple[Tensor, Tensor]]],
    names: dict[nn.Module, str],
) -> None:
    """Raise ``ValueError`` if a Kronecker layer's parameter is also used outside the layer's calls.

    Its block, built from the calls' inputs and output gradients, would leave that use out.
    """
    if not outputs.requires_grad:
        return
    pairs = [(m, name) for m in layers for name in layers[m].values()]
    for (module, name), uses in zip(pairs, parameter_uses(outputs, [p[name] for _, name in pairs])):
        if uses > len(records[module]):
            raise ValueError(
                f"params: {name!r} is used outside the calls of layer {names[module]!r}, so its "
                "Kronecker block would leave that use out; leave it out of params= or untie it"
            )


def check_pairing(model_fn: FunctionalModel, fisher_type: str) -> None:
    """Raise ``ValueError`` for "type-2" on a model that couples the samples (BatchNorm in train mode).

    Its B would hold the cross-sample products ``Σ_k s_kn s_kn'ᵀ`` of the loss Hessian's
    factor, which depend on how its per-sample columns are paired (module docstring).
    """
    if fisher_type == "type-2":
        check_independent_samples(
            model_fn,
            "fisher_type: 'type-2'",
            "the factor B would depend on how the loss Hessian's per-sample factor columns are "
            "paired across samples; call model.eval(), or use fisher_type='mc' (unbiased: the "
            "sampled gradients have mean zero and are independent across samples) or "
            "'empirical' (the batch loss's gradient, coupling included)",
        )


def sample_axes(
    outputs: Tensor,
    records: dict[nn.Module, list[tuple[Tensor, Tensor]]],
    n: int,
    names: dict[nn.Module, str],
    reader: str,
) -> dict[nn.Module, list[int]]:
    """Per layer and call, the axis of the input holding the N samples: 0, or 1 (sequence-first).

    By shape (:func:`_sample_axis`); a linear layer's input ``[N, N, ...]`` (T = N) by
    backward passes of the first and the last sample's outputs over all such calls
    (:func:`curvfx._structured.sequence_first`: a batch-first call's output gradient for
    sample k lies in row k), and more per call only for a layer with several such calls
    of which some are not batch-first.
    """
    axes = {m: [_sample_axis(m, a, z, n, names[m], reader) for a, z in calls] for m, calls in records.items()}
    square = {m: [c for c, ax in zip(calls, axes[m]) if ax is None] for m, calls in records.items()}
    square = {m: calls for m, calls in square.items() if calls}
    if not square:
        return axes
    flagged = sequence_first(outputs, square, n)
    for m, calls in square.items():
        if m not in flagged:
            decided = [0] * len(calls)
        elif len(calls) == 1:
            decided = [1]
        else:  # which of the calls is sequence-first
            decided = [1 if sequence_first(outputs, {m: [call]}, n) else 0 for call in calls]
        found = iter(decided)
        axes[m] = [next(found) if ax is None else ax for ax in axes[m]]
    return axes


def _sample_axis(module: nn.Module, a: Tensor, z: Tensor, n: int, name: str, reader: str) -> int | None:
    """0 (batch-first), 1 (sequence-first ``[T, N, ..., in]``), or None (``[N, N, ..., in]``: ambiguous).

    Raises:
        ValueError: Naming the layer, when neither axis holds the N samples (or the call
            has no gradient).
    """
    square = features_last_square(module, a, n)  # a linear layer's input [·, N, ..., in]
    if reads_per_sample(module, [(a, z)], n):
        return None if square else 0
    if square and reads_per_sample(module, [(a.transpose(0, 1), z)], n):
        return 1
    needs, instead = PER_SAMPLE[reader]
    if not z.requires_grad:
        problem = "is called without gradient"
    else:
        problem = (
            f"has an input of shape {tuple(a.shape)} without the N = {n} samples on dim 0 (or, "
            "sequence-first [T, N, ..., in], on dim 1): e.g. the rows [N·T, in] of a flattened batch"
        )
    raise ValueError(f"layer {name!r} {problem}, but {needs} reads it per sample; {instead}")


def check_from_batch(
    batch: list[Tensor],
    records: dict[nn.Module, list[tuple[Tensor, Tensor]]],
    raw: dict[int, Any],
    names: dict[nn.Module, str],
    reader: str,
) -> None:
    """Raise ``ValueError`` naming a layer whose input has N rows but is not computed from the batch.

    E.g. ``txt(class_embeddings)`` with a learned table of as many classes as samples
    (:func:`curvfx._structured.not_from_batch`): its rows are not the samples.
    """
    for module in not_from_batch(batch, records, raw):
        needs, instead = PER_SAMPLE[reader]
        raise ValueError(
            f"layer {names[module]!r} has an input that is not computed from the batch (e.g. a "
            f"learned table with as many rows as samples), but {needs} reads it per sample; {instead}"
        )


def batch_first(a: Tensor, blocks: list[Tensor], axis: int) -> tuple[Tensor, list[Tensor]]:
    """A call with the samples on ``axis`` of its input as ``(a [N, T, ...], [g [k_b, N, T, ...]])``.

    Views: a sequence-first call's rows are copied later (by :func:`curvfx._capture.positions`).
    """
    if axis == 0:
        return a, blocks
    return a.transpose(0, 1), [g.transpose(1, 2) for g in blocks]
