"""Any scalar loss callable, with its output-Hessian product by autograd."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from curvfx.losses._base import Loss


class AutogradLoss(Loss):
    """Any scalar ``loss_fn(outputs, targets)``; ``∇²_f L · v`` by reverse-over-reverse autograd.

    It knows no factor and no predictive distribution: :meth:`hessian_factor`,
    :meth:`fisher_factor` and :meth:`sample_targets` raise ``ValueError``. ``reduction``
    says how it combines its terms, which weights batches against each other and scales the
    empirical Fisher: ``"mean"`` over all target entries (Z = ``targets.numel()``, as
    torch's elementwise losses), ``"batchmean"`` over samples (Z = N), or ``"sum"`` (Z = 1).
    :func:`get_loss` reads it from a loss module's ``reduction`` attribute (a function of
    ``torch.nn.functional``: its ``reduction`` keyword, default ``"mean"``, as its module)
    and takes any other callable as ``"batchmean"``; :meth:`check_reduction` catches a
    wrong guess of sum against mean.
    """

    def __init__(self, loss_fn, reduction: str = "mean"):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        _check_two_inputs(loss_fn)
        if reduction not in ("mean", "batchmean", "sum"):
            raise ValueError(
                f"reduction: expected 'mean', 'batchmean' or 'sum' (a scalar loss), got {reduction!r}"
            )
        self.loss_fn, self.reduction = loss_fn, reduction
        self.name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``loss_fn(outputs, targets)``, checked to be a scalar tensor."""
        value = self.loss_fn(outputs, targets)
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loss_fn: {self.name} must return a scalar tensor, got {shape}")
        return value

    def checked_call(self, outputs: Any, targets: Tensor) -> Tensor:
        """The value as written: a callable loss may take any outputs (a tuple with an auxiliary term)."""
        return self(outputs, targets)

    def normalizer(self, targets: Tensor) -> float:
        """Entries of ``targets`` ("mean"), samples N ("batchmean"), or 1 ("sum")."""
        if self.reduction == "sum":
            return 1.0
        return float(targets.numel() if self.reduction == "mean" else targets.shape[0])

    def check_reduction(self, outputs: Tensor, targets: Tensor, gradient: Tensor) -> None:
        """Raise ``ValueError`` unless ``gradient = ∇_f L`` [N, ...] fits the declared reduction.

        For a loss with per-sample terms and that reduction, sample n's row is
        ``(Z_1 / Z) ∇_{f_n} loss_fn(f_n, y_n)`` with the callable applied to sample n alone
        (a batch of one, normalizer Z_1): 1/N of it for the means, all of it for the sum. A
        summing callable taken for a mean (or the reverse) is off by N, and a loss that
        couples samples has no per-sample terms at all.
        """
        n = outputs.shape[0]
        if n < 2 or not gradient.any():
            return
        alone = _one_sample_gradients(self.loss_fn, outputs.detach(), targets)
        alone = torch.nan_to_num(alone, nan=0.0)  # a sample alone with every position ignored: 0/0
        ratio = self.normalizer(targets[:1]) / self.normalizer(targets)
        if (gradient - ratio * alone).norm() > 1e-4 * gradient.norm():
            raise ValueError(
                f"loss_fn: {self.name} is not a {self.reduction!r} reduction of per-sample terms: "
                "its gradient differs from that of the loss applied to each sample alone "
                f"(scaled by {ratio:g}); declare how it reduces with curvfx.losses.AutogradLoss("
                "loss_fn, reduction='sum' | 'batchmean' | 'mean'), or, for a mean over the targets "
                "it counts or weighs (ignore_index, class weights), pass the torch loss module "
                "(e.g. nn.CrossEntropyLoss(ignore_index=...)), whose normalizer curvfx knows"
            )

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``∇²_f L · v`` as the vjp of ``∇_f L`` (the Hessian is symmetric)."""
        _, vjp_fn = vjp(grad(lambda f: self(f, targets)), outputs)
        return vjp_fn(v)[0]


def _check_two_inputs(loss_fn) -> None:
    """Raise ``ValueError`` if ``loss_fn`` cannot be called as ``loss_fn(outputs, targets)``.

    E.g. ``nn.GaussianNLLLoss`` (input, target, var). Callables without an inspectable
    signature (some builtins) pass.
    """
    module_call = isinstance(loss_fn, nn.Module) and type(loss_fn).__call__ is nn.Module.__call__
    try:
        signature = inspect.signature(loss_fn.forward if module_call else loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError:
        name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
        raise ValueError(
            f"loss_fn: curvfx calls loss_fn(outputs, targets), but {name}{signature} does not take "
            "two arguments; wrap it, e.g. lambda outputs, targets: loss(outputs, targets, var)"
        ) from None


def one_sample_gradient(loss_fn) -> Callable[[Tensor, Tensor], Tensor]:
    """``(f_n, y_n) ↦ ∇_{f_n} loss_fn(f_n, y_n)`` with sample n as a batch of one (to vmap over n)."""
    return grad(lambda f, t: loss_fn(f.unsqueeze(0), t.unsqueeze(0)))


def _one_sample_gradients(loss_fn, outputs: Tensor, targets: Tensor) -> Tensor:
    """:func:`one_sample_gradient` of every sample [N, ...]: vmapped, or a loop where vmap cannot."""
    gradient = one_sample_gradient(loss_fn)
    try:
        return vmap(gradient)(outputs, targets)
    except RuntimeError:  # a callable vmap cannot batch (data-dependent control flow, .item())
        return torch.stack([gradient(f, t) for f, t in zip(outputs, targets)])
