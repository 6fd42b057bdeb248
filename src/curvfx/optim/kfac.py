"""K-FAC: gradients preconditioned by the damped inverse of running averages of ``curvfx.kfac``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._arguments import check_number
from curvfx.operators._kfac_factors import (
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    KroneckerBlock,
    KroneckerFactors,
    layout,
    moving_average,
)
from curvfx.operators._kfac_samples import check_pairing
from curvfx.operators._kronecker import (
    INVERSE_METHODS,
    KroneckerEigenOperator,
    KroneckerOperator,
    KroneckerSpectrum,
    kfac_inverse,
)
from curvfx.operators.kfac import kfac
from curvfx.optim.curvature_optimizer import (
    CurvatureOptimizer,
    check_batch,
    check_options,
    check_samples_used,
    shared_options,
)

__all__ = ["KFAC"]

_RULES = {
    "lr": ("float", 0.0, None),
    "momentum": ("float", 0.0, 1.0),
    "weight_decay": ("float", 0.0, None),
    "damping": ("float", 0.0, None),
    "factor_decay": ("float", 0.0, 1.0),
    "factor_update_steps": ("int", 1),
    "inverse_update_steps": ("int", 1),
    "fisher_type": ("choice", FISHER_TYPES),
    "kfac_approx": ("choice", KFAC_APPROXIMATIONS),
    "num_samples": ("int", 1),
    "damping_method": ("choice", INVERSE_METHODS),
}
_SHARED = (*(k for k in _RULES if k not in ("lr", "momentum", "weight_decay")), "kl_clip")


class KFAC(CurvatureOptimizer):
    """K-FAC (Martens & Grosse, 2015): steps preconditioned by a damped KFAC of the loss.

    Each :meth:`step` on a batch ``(X, y)``, with ``L(θ) = loss_fn(model(X), y)``:

    1. ``g = ∇_θ L + weight_decay · θ`` (one forward and backward pass of the module);
    2. every ``factor_update_steps`` steps (starting with the first): the factors of
       ``curvfx.kfac(model, loss_fn, (X, y), fisher_type=..., kfac_approx=...)`` over the
       trainable parameters enter running averages ``Ā ← ρ Ā + (1 - ρ) A``,
       ``B̄ ← ρ B̄ + (1 - ρ) B`` (and the diagonal blocks alike), ρ = ``factor_decay``; the
       first update sets them;
    3. every ``inverse_update_steps`` steps (starting with the first): the damped inverse
       of the averaged factors, ``damping_method`` "heuristic" (π-damping: per block
       ``(B̄ + (√λ/π) I)⁻¹ ⊗ (Ā + π√λ I)⁻¹``, by Cholesky) or "exact" ``(K̄ + λ I)⁻¹`` (by
       eigendecompositions), see :func:`curvfx.operators._kronecker.kfac_inverse`;
    4. ``Δ = (K̄ + λ I)⁻¹ g``, scaled by ``ν = min(1, √(κ / Σ_groups lr² Δᵀg))`` when
       ``kl_clip`` κ is set (Ba et al., 2017); momentum ``m ← μ m + ν Δ``;
       ``θ ← θ - lr · m``.

    Curvature and gradient are those of the loss as written (a mean loss gives mean-scaled
    factors), so λ is on the scale of the loss's curvature. Protocol, parameters and
    ``state_dict`` as for every :class:`curvfx.optim.CurvatureOptimizer`: ``step(batch)``,
    no closure, ``.grad`` never touched. ``lr``, ``momentum`` and ``weight_decay`` may
    differ between param groups; the other options are shared (one curvature per step).

    Cost per step: one gradient; on factor steps one KFAC pass (a forward and a batched
    backward of K output-factor columns: K = 1 for "mc" with one sample and "empirical",
    C classes for "type-2"); on inversion steps a Cholesky ("heuristic") or ``eigh``
    ("exact") per factor; applying the inverse costs two ("heuristic") or four matrix
    products per layer.

    Args:
        params: Parameters or param groups of ``model``, as for any optimizer.
        model: The ``nn.Module`` that owns them (its layers give the Kronecker structure).
        loss_fn: The loss (as for :func:`curvfx.kfac`).
        lr: Learning rate.
        damping: λ ≥ 0 (see above).
        momentum: μ in [0, 1).
        weight_decay: L2 coefficient added to the gradient (and so preconditioned).
        factor_decay: ρ in [0, 1) of the running averages.
        factor_update_steps: Steps between factor updates.
        inverse_update_steps: Steps between inversions.
        fisher_type: ``"mc"``, ``"type-2"`` or ``"empirical"`` (:func:`curvfx.kfac`). With
            BatchNorm in train mode (coupled samples) "type-2" raises ``ValueError`` at the
            step while the default "mc" stays unbiased (leave BatchNorm's own parameters
            out of ``params``: their exact diagonal needs independent samples).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        num_samples: MC draws per sample for ``"mc"``.
        damping_method: ``"heuristic"`` or ``"exact"``.
        kl_clip: κ > 0, or None for no clipping.
        generator: Seeds the MC targets (its state is saved by ``state_dict``).

    State: :meth:`global_state` holds ``step``; the state of each layer's weight (or bias)
    holds its averaged factors ``kfac_A``, ``kfac_B`` and its part of the current inverse
    ``kfac_inverse``; parameters with a diagonal block hold ``kfac_diagonal`` and
    ``kfac_inverse_diagonal``; every parameter holds ``momentum_buffer``. A loaded
    optimizer takes the same next step.

    Raises:
        ValueError: For an invalid option, or shared options that differ between groups.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> opt = KFAC(model.parameters(), model=model, loss_fn=torch.nn.MSELoss(), lr=0.1, damping=1e-2)
        >>> losses = [float(opt.step((X, y))) for _ in range(20)]
        >>> losses[-1] < losses[0]
        True

    References:
        Martens & Grosse (2015), Optimizing neural networks with Kronecker-factored
        approximate curvature. Ba, Grosse & Martens (2017), Distributed second-order
        optimization using Kronecker-factored approximations.
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
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_update_steps: int = 1,
        inverse_update_steps: int = 10,
        fisher_type: str = "mc",
        kfac_approx: str = "expand",
        num_samples: int = 1,
        damping_method: str = "heuristic",
        kl_clip: float | None = 1e-3,
        generator: torch.Generator | None = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            damping=damping,
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inverse_update_steps=inverse_update_steps,
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            num_samples=num_samples,
            damping_method=damping_method,
            kl_clip=kl_clip,
        )
        _check(defaults)
        super().__init__(params, defaults, model=model, loss_fn=loss_fn, generator=generator)
        self._options()
        self._layouts: dict[tuple[str, ...], KroneckerFactors] = {}
        self._position = {id(p): i for i, p in enumerate(model.parameters())}

    def _options(self) -> dict[str, Any]:
        return shared_options(self.param_groups, _SHARED, "KFAC", _check)

    @torch.no_grad()
    def step(self, batch: tuple[Any, Tensor]) -> Tensor:  # type: ignore[override]
        """One K-FAC step on ``batch = (X, y)``; returns L(θ) before the step (0-d tensor).

        Raises:
            TypeError, ValueError: For a bad batch (see :meth:`gradient`), an invalid
                option, or a singular damped curvature (λ = 0).
        """
        options = self._options()
        x, y = check_batch(batch, "KFAC")
        check_pairing(
            self.model_fn, options["fisher_type"]
        )  # before a forward pass moves BatchNorm's statistics
        loss, g = self.gradient((x, y))
        params = self.trainable()
        groups = [next(gr for gr in self.param_groups if any(p is q for q in gr["params"])) for p in params]
        decay = [gr["weight_decay"] * p.reshape(-1) for gr, p in zip(groups, params)]
        if any(gr["weight_decay"] for gr in groups):
            g = g + torch.cat(decay)
        state = self.global_state()
        count = state.get("step", 0)
        positions = [self._position[id(p)] for p in params]  # ints: state_dict keeps them as they are
        fresh = state.get("kfac_params") != positions  # first step, or the trainable set changed
        if fresh:
            state.update(kfac_params=positions, kfac_averaged=False)
        if fresh or count % options["factor_update_steps"] == 0:
            self._update_factors(options, (x, y), params)
        if fresh or count % options["inverse_update_steps"] == 0:
            inverse = kfac_inverse(self._factors(params), options["damping"], options["damping_method"])
            self._store_inverse(inverse, params)
        d = self._inverse(params) @ g  # Δ = (K̄ + λI)⁻¹ g
        steps = d.split([p.numel() for p in params])
        nu = 1.0
        if options["kl_clip"] is not None:
            grads = g.split([p.numel() for p in params])
            quadratic = sum(
                gr["lr"] ** 2 * float(s @ gp) for gr, s, gp in zip(groups, steps, grads)
            )  # Σ lr² Δᵀg
            nu = min(1.0, math.sqrt(options["kl_clip"] / quadratic)) if quadratic > 0 else 1.0
        for p, gr, s in zip(params, groups, steps):
            s = nu * s.view_as(p)
            buf = self.state[p].get("momentum_buffer")
            buf = s.clone() if buf is None else buf.mul_(gr["momentum"]).add_(s)
            self.state[p]["momentum_buffer"] = buf
            p.add_(buf, alpha=-gr["lr"])
        state["step"] = count + 1
        return loss

    # -- factors and inverse, kept in the state of the parameters (state_dict maps and casts them)
    def _layout(self, params: list[Tensor]) -> KroneckerFactors:
        names = tuple(self._names[id(p)] for p in params)
        if names not in self._layouts:
            self._layouts[names] = layout(self.model_fn, {n: p.detach() for n, p in zip(names, params)})
        return self._layouts[names]

    def _update_factors(
        self, options: dict[str, Any], batch: tuple[Any, Tensor], params: list[Tensor]
    ) -> None:
        values = {self._names[id(p)]: p.detach() for p in params}
        new = kfac(
            self.model,
            self.loss,
            batch,
            fisher_type=options["fisher_type"],
            kfac_approx=options["kfac_approx"],
            num_samples=options["num_samples"],
            generator=self.generator,
            params=values,
        ).factors
        state = self.global_state()
        if state.get("kfac_averaged"):
            new = moving_average(self._factors(params), new, options["factor_decay"])
        for blk in new.blocks:
            self._owner_state(blk, params).update(kfac_A=blk.A, kfac_B=blk.B)
        self._store_diagonal("kfac_diagonal", new.diagonal, params)
        state["kfac_averaged"] = True

    def _factors(self, params: list[Tensor]) -> KroneckerFactors:
        """The averaged factors, from the state."""
        s = self._layout(params)
        blocks = []
        for blk in s.blocks:
            state = self._owner_state(blk, params)
            blocks.append(blk.with_factors(state["kfac_A"], state["kfac_B"]))
        return s.with_values(blocks, self._load_diagonal("kfac_diagonal", params))

    def _store_inverse(
        self, inverse: KroneckerOperator | KroneckerEigenOperator, params: list[Tensor]
    ) -> None:
        """Per block (A⁻¹, B⁻¹) of a π-damped inverse, or (Q_B, Q_A, 1/(Λ + λ)) of an exact one."""
        if isinstance(inverse, KroneckerOperator):
            for blk in inverse.factors.blocks:
                self._owner_state(blk, params)["kfac_inverse"] = (blk.A, blk.B)
            diagonal = inverse.factors.diagonal
        else:
            for blk, (_, QB, QA, values) in zip(self._layout(params).blocks, inverse.spectrum.blocks):
                self._owner_state(blk, params)["kfac_inverse"] = (QB, QA, values)
            diagonal = inverse.spectrum.diagonal
        self._store_diagonal("kfac_inverse_diagonal", diagonal, params)

    def _inverse(self, params: list[Tensor]) -> KroneckerOperator | KroneckerEigenOperator:
        """The current inverse, from the state."""
        s = self._layout(params)
        diagonal = self._load_diagonal("kfac_inverse_diagonal", params)
        parts = [self._owner_state(blk, params)["kfac_inverse"] for blk in s.blocks]
        if all(len(part) == 2 for part in parts):  # π-damped: Kronecker factors
            blocks = [b.with_factors(*part) for b, part in zip(s.blocks, parts)]
            return KroneckerOperator(s.with_values(blocks, diagonal))
        blocks = [(b.index, *part) for b, part in zip(s.blocks, parts)]
        return KroneckerEigenOperator(KroneckerSpectrum(blocks, s.diagonal_index, diagonal, s.size))

    def _owner_state(self, blk: KroneckerBlock, params: list[Tensor]) -> dict[str, Any]:
        """State of the parameter holding a layer block's factors (the weight, else the bias)."""
        name = blk.params.get("weight", blk.params.get("bias"))
        return self.state[next(p for p in params if self._names[id(p)] == name)]

    def _store_diagonal(self, key: str, diagonal: Tensor, params: list[Tensor]) -> None:
        by_name = {self._names[id(p)]: p for p in params}
        start = 0
        for name in self._layout(params).diagonal_params:
            p = by_name[name]
            self.state[p][key] = diagonal[start : start + p.numel()].clone()
            start += p.numel()

    def _load_diagonal(self, key: str, params: list[Tensor]) -> Tensor:
        by_name = {self._names[id(p)]: p for p in params}
        s = self._layout(params)
        parts = [self.state[by_name[name]][key] for name in s.diagonal_params]
        return torch.cat(parts) if parts else s.diagonal


def _check(group: dict[str, Any]) -> None:
    check_options(group, _RULES)
    if group["kl_clip"] is not None:
        check_number(group["kl_clip"], "kl_clip")
    check_samples_used(group["num_samples"], group["fisher_type"] == "mc", "fisher_type='mc'")
