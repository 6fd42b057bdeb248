"""AdaHessian (Yao et al., 2021): Adam with the squared gradient replaced by a curvature diagonal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._pytree import unravel
from curvfx.estimators import diagonal
from curvfx.estimators.diagonal import METHODS
from curvfx.functional import check_independent_samples
from curvfx.optim.curvature_optimizer import (
    CURVATURES,
    CurvatureOptimizer,
    check_options,
    check_samples_used,
    shared_options,
)

__all__ = ["AdaHessian"]

_RULES = {
    "lr": ("float", 0.0, None),
    "betas": ("betas",),
    "eps": ("float>", 0.0, None),
    "weight_decay": ("float", 0.0, None),
    "hessian_power": ("unit",),
    "curvature": ("choice", CURVATURES),
    "method": ("choice", METHODS),
    "num_samples": ("int", 1),
    "update_each": ("int", 1),
    "spatial_average": ("bool",),
}
_SHARED = ("curvature", "method", "num_samples", "update_each")  # one diagonal per step


class AdaHessian(CurvatureOptimizer):
    """AdaHessian: an Adam-style step preconditioned by a (Hutchinson) curvature diagonal.

    Each :meth:`step` on a batch ``(X, y)``, for each trainable parameter tensor θ with
    gradient g of L = ``loss_fn(model(X), y)``, at step t = 1, 2, …:

    1. every ``update_each`` steps (starting with the first): D = |diag(C)| of the curvature
       C of kind ``curvature`` on the batch, by :func:`curvfx.diagonal` with ``method``
       (default: Hutchinson's z ⊙ (H z), ``num_samples`` Rademacher probes z drawn from
       ``generator``); with ``spatial_average``, for a weight of dimension ≥ 3 (a conv
       kernel [out, in, *k]) D is replaced by its mean over the kernel dimensions k.
       Between updates the last D is reused;
    2. m ← β₁ m + (1 - β₁) g,   v ← β₂ v + (1 - β₂) D ⊙ D;
    3. θ ← (1 - lr·weight_decay) θ - lr · (m / (1 - β₁ᵗ)) / ((v / (1 - β₂ᵗ))^(k/2) + ε),
       k = ``hessian_power`` (decoupled weight decay, as AdamW).

    With D = |g| this would be Adam; D is the curvature instead. Options ``lr``, ``betas``,
    ``eps``, ``weight_decay``, ``hessian_power`` and ``spatial_average`` may differ between
    param groups; the others are shared (one diagonal per step).

    Cost per step: one gradient, plus on update steps the diagonal: ``num_samples``
    Hessian-vector products (about three gradients each, as one vmapped matmat) for
    Hutchinson; for ``curvature="ggn"`` (or a Fisher) with ``method="exact"`` the exact
    diagonal from the loss's factors (:func:`curvfx.diagonal`; about C backward passes for
    C outputs). ``update_each = k`` divides the curvature cost by k.

    Differs from Yao et al. (2021) and its reference code in: 1. the gradient and the
    Hessian-vector product come from separate passes (one more backward pass than the
    create-graph route). 2. The curvature may be any of :data:`CURVATURES`, its diagonal
    estimated by any :func:`curvfx.diagonal` method (``"exact"`` GGN diagonal: no probe
    noise). 3. Spatial averaging covers every weight of dimension ≥ 3 (Conv1d/2d/3d).
    4. Between updates (``update_each`` > 1) the last D enters v at every step, as in
    the ``ada-hessian`` package.

    Protocol: see :class:`CurvatureOptimizer` (``step(batch)``, no closure).

    Args:
        params: Parameters (or param groups) of ``model``.
        model: The ``nn.Module`` that owns ``params``.
        loss_fn: The loss (see :class:`CurvatureOptimizer`).
        lr: Learning rate (the paper's default 0.15).
        betas: (β₁, β₂) of the moving averages.
        eps: ε added to the denominator.
        weight_decay: Decoupled weight decay coefficient.
        hessian_power: k in [0, 1]; 0 gives momentum SGD with bias correction.
        curvature: Kind of C, one of :data:`CURVATURES` (default ``"hessian"``).
        method: :func:`curvfx.diagonal` method, ``"hutchinson"`` (default) or
            ``"exact"`` (cheap for ``"ggn"`` and the Fishers) or ``"xdiag"``.
        num_samples: Probes per diagonal estimate.
        update_each: Steps between diagonal updates.
        spatial_average: Average D over the kernel dimensions of conv weights.
        generator: Source of the probes (and MC targets); saved by ``state_dict``.

    Each parameter's state holds ``exp_avg`` (m), ``exp_hessian_diag_sq`` (v),
    ``hessian_diag`` (the last D) and ``param_step`` (its t; a parameter unfrozen later
    starts at t = 1); the first parameter's also ``step`` (the optimizer's step count,
    which schedules the updates of D).

    Raises:
        ValueError: For an invalid option, shared options that differ between groups, or
            ``num_samples`` other than 1 where nothing draws samples (``method="exact"``
            without ``curvature="mc_fisher"``).
        TypeError: For a flag (``spatial_average``) that is not a bool.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> opt = AdaHessian(
        ...     model.parameters(), model=model, loss_fn=torch.nn.CrossEntropyLoss(),
        ...     generator=torch.Generator().manual_seed(0),
        ... )
        >>> losses = [float(opt.step((X, y))) for _ in range(30)]
        >>> losses[-1] < losses[0]
        True

    References:
        Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney (2021), ADAHESSIAN: An adaptive
        second order optimizer for machine learning.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        curvature: str = "hessian",
        method: str = "hutchinson",
        num_samples: int = 1,
        update_each: int = 1,
        spatial_average: bool = True,
        generator: torch.Generator | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            curvature=curvature,
            method=method,
            num_samples=num_samples,
            update_each=update_each,
            spatial_average=spatial_average,
        )
        _check(defaults)
        super().__init__(params, defaults, model=model, loss_fn=loss_fn, generator=generator)
        self._options()

    def _options(self) -> dict[str, Any]:
        return shared_options(self.param_groups, _SHARED, "AdaHessian", _check)

    @torch.no_grad()
    def step(self, batch: tuple[Any, Tensor]) -> Tensor:  # type: ignore[override]
        """One AdaHessian step on ``batch = (X, y)``; returns L(θ) before the step (0-d tensor).

        Raises:
            TypeError: If ``batch`` is a closure.
            ValueError: If ``batch`` is not an ``(X, y)`` pair, the loss is not a finite
                scalar, or an option is invalid.
        """
        options = self._options()
        glob = self.global_state()
        count = glob.get("step", 0)
        params = self.trainable()
        stale = any("hessian_diag" not in self.state[p] for p in params)
        if count % options["update_each"] == 0 or stale:
            if options["method"] == "exact" and options["curvature"] != "hessian":  # summed per sample
                check_independent_samples(  # before a forward pass moves BatchNorm's statistics
                    self.model_fn,
                    f"AdaHessian: the exact {options['curvature']} diagonal",
                    "call model.eval()",
                )
            c = self.curvature(batch, options["curvature"], num_samples=options["num_samples"])
            D = diagonal(
                c.operator, options["method"], num_samples=options["num_samples"], generator=self.generator
            )
            average = {
                id(p): group["spatial_average"] for group in self.param_groups for p in group["params"]
            }
            for p, d in zip(params, c.split(D.abs())):
                self.state[p]["hessian_diag"] = _spatial_average(d) if average[id(p)] else d
            loss, g = c.loss, c.gradient
        else:
            loss, g = self.gradient(batch)
        grads = {id(p): gp for p, gp in zip(params, unravel(g, params))}
        glob["step"] = count + 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, k = group["lr"], group["hessian_power"]
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_hessian_diag_sq"] = torch.zeros_like(p)
                    state["param_step"] = 0
                state["param_step"] += 1
                t = state["param_step"]
                m, v, D = state["exp_avg"], state["exp_hessian_diag_sq"], state["hessian_diag"]
                m.mul_(beta1).add_(grads[id(p)], alpha=1 - beta1)  # m ← β₁ m + (1 - β₁) g
                v.mul_(beta2).addcmul_(D, D, value=1 - beta2)  # v ← β₂ v + (1 - β₂) D²
                denom = (v / (1 - beta2**t)).pow_(k / 2).add_(group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        return loss


def _check(group: dict[str, Any]) -> None:
    check_options(group, _RULES)
    draws = group["method"] != "exact" or group["curvature"] == "mc_fisher"
    check_samples_used(group["num_samples"], draws, "method='hutchinson'/'xdiag' or curvature='mc_fisher'")


def _spatial_average(d: Tensor) -> Tensor:
    """For a weight of dimension ≥ 3 ([out, in, *kernel]), d averaged over the kernel dimensions."""
    if d.dim() < 3:
        return d
    return d.mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d).clone()
