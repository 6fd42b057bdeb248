"""Which :class:`Loss` a torch loss module, loss function or other callable is."""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn

from curvfx.losses._autograd import AutogradLoss
from curvfx.losses._base import Loss, check_reduction
from curvfx.losses._classes import CrossEntropyLoss, NLLLoss
from curvfx.losses._elementwise import BCEWithLogitsLoss, MSELoss


def get_loss(loss_fn) -> Loss:
    """The :class:`Loss` for a torch loss module, loss function or any callable.

    Known exactly: ``nn.MSELoss``/``F.mse_loss``, ``nn.CrossEntropyLoss``/``F.cross_entropy``,
    ``nn.BCEWithLogitsLoss``/``F.binary_cross_entropy_with_logits``, ``nn.NLLLoss``/
    ``F.nll_loss``, also as ``functools.partial(F.cross_entropy, reduction="sum")``. Other
    callables get :class:`AutogradLoss`.

    Raises:
        TypeError: If ``loss_fn`` is not callable, or is a class (not an instance).
        ValueError: On an option that would change the loss in a way curvfx does not
            model (``reduction="none"``, deprecated ``size_average``/``reduce``, unknown
            keywords).
    """
    if isinstance(loss_fn, Loss):
        return loss_fn
    if isinstance(loss_fn, type):  # nn.MSELoss instead of nn.MSELoss()
        name = loss_fn.__name__
        raise TypeError(f"loss_fn: got the class {name}; pass an instance, e.g. {name}()")
    if isinstance(loss_fn, nn.Module) and _overrides_forward(loss_fn):  # its own formula: by autograd
        return AutogradLoss(
            loss_fn, check_reduction(getattr(loss_fn, "reduction", "mean"), type(loss_fn).__name__)
        )
    if isinstance(loss_fn, nn.MSELoss):
        return MSELoss(loss_fn.reduction)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return CrossEntropyLoss(
            loss_fn.reduction, loss_fn.weight, loss_fn.ignore_index, loss_fn.label_smoothing
        )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return BCEWithLogitsLoss(loss_fn.reduction, loss_fn.weight, loss_fn.pos_weight)
    if isinstance(loss_fn, nn.NLLLoss):
        return NLLLoss(loss_fn.reduction, loss_fn.weight, loss_fn.ignore_index)
    func, keywords = loss_fn, {}
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        func, keywords = loss_fn.func, dict(loss_fn.keywords)
    if func in _FUNCTIONAL:
        cls, allowed = _FUNCTIONAL[func]
        unknown = set(keywords) - allowed
        if unknown:
            raise ValueError(
                f"loss_fn: {func.__name__} keywords {sorted(unknown)} are not supported "
                f"(supported: {sorted(allowed)})"
            )
        return cls(**keywords)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a loss module or callable, got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None:  # torch's functional losses reduce as their modules: mean over entries
        torch_functional = getattr(func, "__module__", None) == F.__name__
        reduction = keywords.get("reduction", "mean") if torch_functional else "batchmean"
    if reduction not in ("mean", "batchmean", "sum"):
        raise ValueError(f"loss_fn: reduction={reduction!r} does not give a scalar loss; use 'mean' or 'sum'")
    return AutogradLoss(loss_fn, reduction)


def _overrides_forward(module: nn.Module) -> bool:
    """Whether a subclass of a known torch loss computes something else (its own ``forward``)."""
    known = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.NLLLoss)
    base = next((k for k in known if isinstance(module, k)), None)
    return base is not None and type(module).forward is not base.forward


_FUNCTIONAL = {
    F.mse_loss: (MSELoss, {"reduction"}),
    F.cross_entropy: (CrossEntropyLoss, {"reduction", "weight", "ignore_index", "label_smoothing"}),
    F.binary_cross_entropy_with_logits: (BCEWithLogitsLoss, {"reduction", "weight", "pos_weight"}),
    F.nll_loss: (NLLLoss, {"reduction", "weight", "ignore_index"}),
}
