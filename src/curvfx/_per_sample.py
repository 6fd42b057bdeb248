"""Per-sample transforms: per_sample_grad, per_sample_grad_norms, per_sample_jacobian.

Each evaluates sample n as a batch of one (its own loss reduction) and vmaps over samples
with ``randomness="different"`` (every sample draws its own dropout mask, as in a batched
forward pass). Re-exported by :mod:`curvfx.func`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

from curvfx._engines import kept_rng
from curvfx._errors import check_batch, check_targets, describe, sample_row
from curvfx._memory import check_fits
from curvfx._pytree import (
    batch_size,
    batch_tree,
    leaves,
    num_params,
    sample_of,
    sample_split,
    tree_map,
    unsqueeze_leaves,
)
from curvfx._structured import check_backend, sample_grads_route, sample_squares, structured_sample_grads
from curvfx.functional import as_function, check_independent_samples, check_reads
from curvfx.losses import get_loss
from curvfx.losses._autograd import one_sample_gradient

__all__ = ["per_sample_grad", "per_sample_grad_norms", "per_sample_jacobian"]

PyTree = Any


def per_sample_grad(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    loss_fn: Any,
    params: PyTree,
    x: Any,
    y: Tensor,
    chunk_size: int | None = None,
    *,
    backend: str = "auto",
) -> PyTree:
    """Gradient of each sample's own loss term, ``g_n = ∇_θ loss_fn(fn(θ, x_n), y_n)``.

    ``x_n``, ``y_n`` are sample n as a batch of one, so ``g_n`` is the gradient of the loss
    applied to that sample alone, with its own reduction: for ``reduction="mean"`` the
    batch gradient is ``(1/N) Σ_n g_n`` (when every sample counts equally: same number of
    entries, no ignored positions), for ``"sum"`` it is ``Σ_n g_n``. No ``1/N`` is folded
    into ``g_n``.

    ``backend``: ``"auto"`` / ``"generic"`` compute ``vmap(grad)`` over samples,
    ``chunk_size`` samples at a time (all at once if None); dropout draws a separate mask
    per sample. ``"structured"`` (modules only, eager only) computes the parameters of
    ``nn.Linear``, ``nn.Conv1d/2d/3d`` and normalization layers from one forward pass over
    the batch and one backward pass of the residuals ``r_n = ∇_{f_n} loss_fn(f_n, y_n)``
    to the layer outputs, ``g_n = Σ_t δ_nt a_ntᵀ`` (layer input a, output gradient δ,
    positions t), and every other parameter by ``vmap(grad)`` (also the layers it cannot
    read per sample: see :mod:`curvfx._structured`). It returns tensors without an
    autograd graph, and under dropout gives the two groups of parameters different
    masks. Measured against ``vmap(grad)``: 0.83–0.90 of the time on the benchmark MLP
    784-256-256-10 (N = 128), 1.06–1.14 on the benchmark CNN; both are mostly the cost of
    writing N·P numbers.

    Returns:
        A pytree like ``params``, each leaf [N, *leaf.shape].

    Raises:
        ValueError: If the batch is empty, ``x`` and ``y`` disagree on N, the model
            couples samples (BatchNorm in train mode has no per-sample gradient; call
            ``model.eval()``), a sample's outputs are not its rows of the batch's (an input
            entry not split per sample, such as a list of N numbers; checked, for inputs
            with entries other than tensors, by forward passes without a graph on the first
            sample and on the first two before the vmapped route), the targets fail the
            loss's checks (all N of them, before any sample's loss), or ``backend`` is
            unknown ("structured" with a pure function or inside a ``torch.func`` transform).
        MemoryBudgetError: If the result, N·P numbers, exceeds the memory budget
            (:mod:`curvfx._memory`).
    """
    fn, params = as_function(fn, params)
    loss = get_loss(loss_fn)
    check_batch(x, check_targets(y))
    _check_independent_samples(fn, "per_sample_grad")
    structured = sample_grads_route(fn, params, (x, y), backend)  # before any work
    n, p = batch_size(x), num_params(params)
    check_fits(f"per_sample_grad: the result [N={n}, P={p}]", n * p, leaves(params)[0].dtype, _FEWER)
    grads = structured_sample_grads(fn, params, x, _sample_residuals(loss, y)) if structured else {}
    rest = {k: v for k, v in params.items() if k not in grads} if grads else params
    if not leaves(rest):
        return {k: grads[k] for k in params}

    if not all(isinstance(t, Tensor) for t in leaves(batch_tree(x))):
        _check_rows_per_sample(fn, params, x, n)
    check_reads(fn, params, _leading(x, 1))  # the vmapped route never can

    targets_checked = []  # once per call, not per vmapped chunk or looped sample

    def sample_loss(sub, xn, yn):
        outputs = fn({**params, **sub} if grads else sub, unsqueeze_leaves(xn))
        if not targets_checked:
            _check_all_targets(loss, outputs, y, n)
            targets_checked.append(True)
        return loss.checked_call(outputs, yn.unsqueeze(0))

    generic = _over_samples(grad(sample_loss), grad(sample_loss), rest, (x, y), chunk_size, "per_sample_grad")
    return {k: grads[k] if k in grads else generic[k] for k in params} if grads else generic


def per_sample_grad_norms(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    loss_fn: Any,
    params: PyTree,
    x: Any,
    y: Tensor,
    chunk_size: int | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Norms ``‖g_n‖`` [N] of the per-sample gradients of :func:`per_sample_grad`, never forming g_n.

    ``g_n = J_nᵀ r_n`` with ``r_n = ∇_{f_n} loss_fn(f_n, y_n)`` (the loss on sample n alone).
    For ``nn.Linear`` / ``nn.Conv1d/2d`` layers of a module (``backend="auto"`` or
    ``"structured"``) the squared norm is contracted from the layer's input and output
    gradient, ``‖Σ_t g_t a_tᵀ‖²`` (for one position ``‖g‖²‖a‖²``), at the cost of about one
    gradient; other parameters (or ``backend="generic"``) take a per-sample vmap,
    ``chunk_size`` samples at a time.

    Raises:
        ValueError: As :func:`per_sample_grad`, or for an unknown ``backend``.
    """
    fn, params = as_function(fn, params)
    loss = get_loss(loss_fn)
    check_batch(x, check_targets(y))
    _check_independent_samples(fn, "per_sample_grad_norms")
    check_backend(backend)  # before any work
    squares = sample_squares(
        fn, params, x, _sample_residuals(loss, y), chunk_size, per_sample=True, backend=backend, y=y
    )
    return sum(leaves(squares)).sqrt()


def _sample_residuals(loss: Any, y: Tensor) -> Callable[[Tensor], Tensor]:
    """``outputs ↦ r`` [1, N, ...], ``r_n = ∇_{f_n} loss(f_n, y_n)`` with sample n as a batch of one."""

    def residuals(outputs: Tensor) -> Tensor:
        if not (isinstance(outputs, Tensor) and outputs.dim() > 0 and outputs.shape[0] == y.shape[0]):
            raise ValueError(
                f"fn: per-sample gradient norms and backend='structured' read sample n's outputs as "
                f"row n of the batch's, which needs outputs [N = {y.shape[0]}, ...]; got {describe(outputs)} "
                "(per_sample_grad with backend='generic' evaluates each sample alone and takes other outputs)"
            )
        loss.check(outputs, y)
        return vmap(one_sample_gradient(loss))(outputs, y).unsqueeze(0)

    return residuals


def per_sample_jacobian(
    fn: Callable[[PyTree, Any], Tensor] | torch.nn.Module,
    params: PyTree,
    x: Any,
    chunk_size: int | None = None,
) -> PyTree:
    """Jacobian of each sample's outputs, ``J_n = ∂ fn(θ, x_n) / ∂θ``.

    Computed as ``vmap(jacrev)`` over samples, each sample evaluated as a batch of one,
    ``chunk_size`` samples at a time (all at once if None) to bound memory: the result
    holds N·C·P numbers.

    Returns:
        A pytree like ``params``, each leaf [N, *output_shape, *leaf.shape] where
        ``output_shape`` is one sample's output shape (``fn(θ, x).shape[1:]``).

    Raises:
        ValueError: If the batch is empty or the model couples samples (BatchNorm in train
            mode).
        MemoryBudgetError: If the result, N·C·P numbers (C outputs per sample, read by one
            forward pass on the first sample), exceeds the memory budget
            (:mod:`curvfx._memory`).
    """
    fn, params = as_function(fn, params)
    check_batch(x, None)
    _check_independent_samples(fn, "per_sample_jacobian")
    check_reads(fn, params, _leading(x, 1))  # the vmapped route never can
    n, c, p = batch_size(x), _sample_output_numel(fn, params, x), num_params(params)
    check_fits(
        f"per_sample_jacobian: the result [N={n}, C={c}, P={p}]", n * c * p, leaves(params)[0].dtype, _FEWER
    )

    def sample_outputs(p, xn):
        return sample_row(fn(p, unsqueeze_leaves(xn)))

    # the loop's jacrev takes one output row at a time (chunk_size=1: no vmap inside either)
    looped = jacrev(sample_outputs, chunk_size=1)
    return _over_samples(jacrev(sample_outputs), looped, params, (x,), chunk_size, "per_sample_jacobian")


def _over_samples(
    per_sample, looped, params: PyTree, data: tuple, chunk_size: int | None, who: str
) -> PyTree:
    """``per_sample(params, *sample_n)`` for every sample, stacked: vmapped, else a loop.

    Layers without a vmap batching rule (the native LSTM/GRU kernels) make the vmap fail;
    then ``looped`` (the same function, free of vmap) runs once per sample, with a warning.
    """
    data, dims = zip(*(sample_split(d) for d in data))
    in_dims = (None, *dims)
    try:
        return vmap(per_sample, in_dims=in_dims, chunk_size=chunk_size, randomness="different")(params, *data)
    except RuntimeError as err:
        warnings.warn(
            f"{who}: could not vmap this model over samples ({str(err).splitlines()[0][:120]}); "
            "looping over samples instead",
            RuntimeWarning,
            stacklevel=3,
        )
    rows = [looped(params, *(sample_of(d, i) for d in data)) for i in range(batch_size(data[0]))]
    return tree_map(lambda *ls: torch.stack(ls), *rows)


_FEWER = "pass fewer samples per call or a subset of the parameters"


def _sample_output_numel(fn, params: PyTree, x: Any) -> int:
    """C, the number of outputs of one sample."""
    return sample_row(_forward(fn, params, _leading(x, 1))).numel()


def _check_rows_per_sample(fn, params: PyTree, x: Any, n: int) -> None:
    """Raise ``ValueError`` unless k samples of ``x`` give the model k times one sample's rows.

    For inputs with entries that reach every sample whole (a number, a list of N numbers):
    such an entry can broadcast against the samples' tensors, and then a batch of one gets
    as many rows as the batch, and every sample the whole batch's values. Forward passes
    without a graph on the first sample and on the first two (k = 2), or on the whole batch
    (k = N) where the two fail.
    """
    first = _forward(fn, params, _leading(x, 1))
    if not (isinstance(first, Tensor) and first.dim() > 0):
        return
    k = min(n, 2)
    try:
        some = _forward(fn, params, _leading(x, k)) if k > 1 else first
    except Exception:  # the batch's own forward below raises a genuine error again
        k, some = n, _forward(fn, params, x)
    if not isinstance(some, Tensor) or some.shape != (k * first.shape[0], *first.shape[1:]):
        raise ValueError(
            f"x: the model's outputs are {list(getattr(some, 'shape', []))} for {k} samples (of N = {n}) "
            f"but {list(first.shape)} for one sample: per-sample gradients need each sample's outputs "
            "to be its rows of the batch's (pass per-sample values as tensors [N, ...])"
        )


def _check_all_targets(loss, outputs: Any, y: Tensor, n: int) -> None:
    """The loss's checks of all N targets ``y`` against one sample's ``outputs`` [1, ...].

    Run on outputs of the batch's shape (a zero expanded to [N, ...]: the checks read
    shapes) and the batch's targets, which ``vmap`` does not wrap, so that their values
    (a class index out of range) are read before any sample's loss; the per-sample call
    inside ``vmap`` sees only wrapped targets.
    """
    if isinstance(outputs, Tensor) and outputs.dim() > 0 and outputs.shape[0] == 1:
        zero = torch.zeros((), dtype=outputs.dtype, device=outputs.device)
        loss.check(zero.expand(n, *outputs.shape[1:]), y)


def _leading(x: Any, k: int) -> Any:
    """The first k samples of a batch input ``x``, as a batch (other leaves as they are)."""
    return tree_map(lambda t: t[:k] if isinstance(t, Tensor) else t, sample_split(x)[0])


def _forward(fn, params: PyTree, x: Any) -> Any:
    """``fn(params, x)`` without a graph, the random number state kept."""
    with torch.no_grad(), kept_rng(leaves(params)[0].device):
        return fn(params, x)


def _check_independent_samples(fn, transform: str) -> None:
    check_independent_samples(fn, f"fn: {transform}", "call model.eval() with running statistics")
