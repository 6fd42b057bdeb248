"""Diagonal natural gradient: the gradient preconditioned by a damped Fisher diagonal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._pytree import unravel
from curvfx.estimators import diagonal
from curvfx.functional import check_independent_samples
from curvfx.optim.curvature_optimizer import (
    CurvatureOptimizer,
    check_options,
    check_samples_used,
    shared_options,
)

__all__ = ["FISHER_TYPES", "DiagonalNaturalGradient"]

FISHER_TYPES = ("empirical", "mc", "exact")
_RULES = {
    "lr": ("float", 0.0, None),
    "damping": ("float>", 0.0, None),
    "momentum": ("float", 0.0, 1.0),
    "fisher_decay": ("float", 0.0, 1.0),
    "weight_decay": ("float", 0.0, None),
    "fisher_type": ("choice", FISHER_TYPES),
    "num_samples": ("int", 1),
    "update_each": ("int", 1),
}
_SHARED = ("fisher_type", "num_samples", "update_each")  # one diagonal per step


class DiagonalNaturalGradient(CurvatureOptimizer):
    """Natural gradient with a diagonal Fisher: θ ← θ - lr · (F̂ + λ)⁻¹ g, with momentum.

    Each :meth:`step` on a batch ``(X, y)``, for each trainable parameter tensor θ with
    gradient g of L = ``loss_fn(model(X), y)``:

    1. every ``update_each`` steps (starting with the first): F = the exact diagonal of
       the Fisher of kind ``fisher_type`` on the batch (:func:`curvfx.diagonal` of
       :func:`curvfx.fisher`, ``method="exact"``, from the loss's factors): ``"empirical"``
       the mean of squared per-sample gradients (scaled as the loss), ``"mc"``
       ``num_samples`` targets per sample drawn from the model's predictive distribution
       (from ``generator``), ``"exact"`` the expectation over it (= diag of the GGN for
       MSE, cross-entropy, BCE). Running average F̄ ← ρ F̄ + (1 - ρ) F over updates,
       ρ = ``fisher_decay`` (0: the latest F only), bias-corrected: F̂ = F̄ / (1 - ρⁿ)
       after n updates;
    2. u = (g + weight_decay · θ) / (F̂ + λ),   λ = ``damping``;
    3. b ← μ b + u (μ = ``momentum``; b = u on the first step),   θ ← θ - lr · b.

    Options ``lr``, ``damping``, ``momentum``, ``fisher_decay`` and ``weight_decay`` may
    differ between param groups; the others are shared (one diagonal per step). F is on
    the scale of the loss as written (a mean loss gives a mean-scaled F), and so is λ.

    Cost per step: one gradient, plus on update steps the exact Fisher diagonal (one
    forward pass and a batched backward pass over K output-factor columns: K = 1 for
    ``"empirical"`` and for ``"mc"`` with one sample, C classes for ``"exact"``; layer-aware
    for Linear and Conv layers, see :func:`curvfx.diagonal`).

    Differs from a plain "Adam without square root" in: the diagonal is a Fisher diagonal
    built from per-sample quantities, never the squared batch gradient; and there is no
    square root, so the step is a (diagonal) natural-gradient step, scale-free in g.

    Protocol: see :class:`CurvatureOptimizer` (``step(batch)``, no closure).

    Args:
        params: Parameters (or param groups) of ``model``.
        model: The ``nn.Module`` that owns ``params``.
        loss_fn: The loss (see :class:`CurvatureOptimizer`).
        lr: Learning rate.
        damping: λ > 0 added to the Fisher diagonal.
        momentum: μ in [0, 1).
        fisher_decay: ρ in [0, 1) of the running average of F.
        weight_decay: L2 coefficient added to the gradient (and so preconditioned).
        fisher_type: ``"empirical"`` (default), ``"mc"`` or ``"exact"``.
        num_samples: MC targets per sample for ``"mc"``.
        update_each: Steps between Fisher updates.
        generator: Source of the MC targets; saved by ``state_dict``.

    Each parameter's state holds ``fisher_diag`` (F̄), ``fisher_updates`` (n) and
    ``momentum_buffer`` (b); the first parameter's also ``step``.

    Raises:
        ValueError: For an invalid option, or shared options that differ between groups.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> opt = DiagonalNaturalGradient(model.parameters(), model=model, loss_fn=loss_fn)
        >>> losses = [float(opt.step((X, y))) for _ in range(30)]
        >>> losses[-1] < losses[0]
        True

    References:
        Amari (1998), Natural gradient works efficiently in learning. Martens (2020),
        New insights and perspectives on the natural gradient method (§11, the empirical
        Fisher and its pitfalls).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.9,
        fisher_decay: float = 0.95,
        weight_decay: float = 0.0,
        fisher_type: str = "empirical",
        num_samples: int = 1,
        update_each: int = 1,
        generator: torch.Generator | None = None,
    ):
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            fisher_decay=fisher_decay,
            weight_decay=weight_decay,
            fisher_type=fisher_type,
            num_samples=num_samples,
            update_each=update_each,
        )
        check_options(defaults, _RULES)
        super().__init__(params, defaults, model=model, loss_fn=loss_fn, generator=generator)
        self._options()

    def _options(self) -> dict[str, Any]:
        options = shared_options(
            self.param_groups, _SHARED, "DiagonalNaturalGradient", lambda g: check_options(g, _RULES)
        )
        check_samples_used(options["num_samples"], options["fisher_type"] == "mc", "fisher_type='mc'")
        return options

    @torch.no_grad()
    def step(self, batch: tuple[Any, Tensor]) -> Tensor:  # type: ignore[override]
        """One step on ``batch = (X, y)``; returns L(θ) before the step (0-d tensor).

        Raises:
            TypeError: If ``batch`` is a closure.
            ValueError: If ``batch`` is not an ``(X, y)`` pair, the loss is not a finite
                scalar, an option is invalid, or the loss has no Fisher factor (a generic
                callable loss, see :func:`curvfx.losses.get_loss`).
        """
        options = self._options()
        glob = self.global_state()
        count = glob.get("step", 0)
        params = self.trainable()
        stale = any("fisher_diag" not in self.state[p] for p in params)
        if count % options["update_each"] == 0 or stale:
            check_independent_samples(  # before a forward pass moves BatchNorm's statistics
                self.model_fn, "DiagonalNaturalGradient: the exact Fisher diagonal", "call model.eval()"
            )
            kind = f"{options['fisher_type']}_fisher"
            c = self.curvature(batch, kind, num_samples=options["num_samples"])
            F = diagonal(c.operator, "exact")
            decay = {id(p): group["fisher_decay"] for group in self.param_groups for p in group["params"]}
            for p, f in zip(params, c.split(F)):
                state = self.state[p]
                rho = decay[id(p)]
                if "fisher_diag" in state:
                    state["fisher_diag"].mul_(rho).add_(f, alpha=1 - rho)  # F̄ ← ρ F̄ + (1 - ρ) F
                    state["fisher_updates"] += 1
                else:
                    state["fisher_diag"], state["fisher_updates"] = (1 - rho) * f, 1
            loss, g = c.loss, c.gradient
        else:
            loss, g = self.gradient(batch)
        grads = {id(p): gp for p, gp in zip(params, unravel(g, params))}
        glob["step"] = count + 1
        for group in self.param_groups:
            rho, mu = group["fisher_decay"], group["momentum"]
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                state = self.state[p]
                F_hat = state["fisher_diag"] / (1 - rho ** state["fisher_updates"])  # bias-corrected
                u = (grads[id(p)] + group["weight_decay"] * p) / (F_hat + group["damping"])
                buf = state.get("momentum_buffer")
                buf = u.clone() if buf is None else buf.mul_(mu).add_(u)  # b ← μ b + u
                state["momentum_buffer"] = buf
                p.add_(buf, alpha=-group["lr"])
        return loss
