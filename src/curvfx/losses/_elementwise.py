"""Losses comparing outputs entry by entry with targets of their shape: MSE and BCE with logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from curvfx.losses._base import Loss, check_batch, check_reduction, check_same_shape, diagonal_factor


class MSELoss(Loss):
    """Mean squared error ``L = c Σ_{n,j} (f_nj - y_nj)²``.

    ``c = 1/(N·D)`` for ``reduction="mean"`` (D entries per sample), ``c = 1`` for
    ``"sum"``. Output Hessian ``H_n = 2c I``; factor ``S[k, n] = √(2c) e_k`` (K = D).
    Predictive ``N(f, I/2)``, so the Fisher equals the GGN.
    """

    def __init__(self, reduction: str = "mean"):
        self.reduction = check_reduction(reduction, "MSELoss")
        self.name = f"MSELoss(reduction={reduction!r})"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Value, equal to ``F.mse_loss``."""
        return F.mse_loss(outputs, targets, reduction=self.reduction)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Targets must have the shape and dtype of the outputs."""
        check_batch(outputs)
        check_same_shape(outputs, targets, self.name)

    def normalizer(self, targets: Tensor) -> float:
        """``N·D`` (number of entries) for the mean, 1 for the sum."""
        return float(targets.numel()) if self.reduction == "mean" else 1.0

    def _scale(self, outputs: Tensor) -> float:
        return 2.0 / self.normalizer(outputs)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``2c (f - y)``, in the outputs' dtype."""
        return (self._scale(outputs) * (outputs - targets)).to(outputs.dtype)

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``2c · v``."""
        return self._scale(outputs) * v

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``√(2c) I`` per sample, as [D, *outputs.shape]."""
        return diagonal_factor(torch.full_like(outputs, self._scale(outputs)))

    _fisher_factor = _hessian_factor

    def _sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, *, observed=None
    ) -> Tensor:
        """``ỹ = f + ε / √2``, ``ε ~ N(0, I)``."""
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device)
        return outputs.detach() + noise / math.sqrt(2.0)


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on logits ``f`` (any shape [N, ...]), targets in [0, 1].

    ``ℓ_j = -w_j (π_j y_j log σ(f_j) + (1 - y_j) log(1 - σ(f_j)))`` with ``weight`` w and
    ``pos_weight`` π (broadcast over the last dim), ``L = c Σ_j ℓ_j``, ``c = 1/numel`` for
    ``"mean"``. The output Hessian is diagonal: ``c w_j (π_j y_j + 1 - y_j) σ_j (1 - σ_j)``.
    The predictive is Bernoulli(σ(f)); the Fisher ``c w_j σ_j (1 - σ_j)`` (``pos_weight`` is
    rejected there).
    """

    def __init__(
        self,
        reduction: str = "mean",
        weight: Tensor | None = None,
        pos_weight: Tensor | None = None,
    ):
        self.reduction = check_reduction(reduction, "BCEWithLogitsLoss")
        self.weight, self.pos_weight = weight, pos_weight
        self.name = f"BCEWithLogitsLoss(reduction={reduction!r})"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Value, equal to ``F.binary_cross_entropy_with_logits``."""
        self._check_weights(outputs)
        return F.binary_cross_entropy_with_logits(
            outputs,
            targets.to(outputs.dtype),  # as torch promotes; torch.func.grad would round to the targets'
            weight=self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
        )

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Targets must have the shape and dtype of the logits."""
        check_batch(outputs)
        check_same_shape(outputs, targets, self.name)
        self._check_weights(outputs)

    def normalizer(self, targets: Tensor) -> float:
        """Number of entries for the mean, 1 for the sum."""
        return float(targets.numel()) if self.reduction == "mean" else 1.0

    def _check_weights(self, outputs: Tensor) -> None:
        """``weight`` and ``pos_weight`` must broadcast to the outputs without growing them."""
        for option in ("weight", "pos_weight"):
            w = getattr(self, option)
            if w is None:
                continue
            try:
                fits = torch.broadcast_shapes(w.shape, outputs.shape) == outputs.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"{option}: shape {list(w.shape)} does not broadcast to the outputs "
                    f"{list(outputs.shape)} of {self.name} (a {option} with a batch dimension gives "
                    "one sample alone no loss, so per-sample quantities are not defined for it)"
                )

    def _curvature(self, outputs: Tensor, targets: Tensor | None) -> Tensor:
        s = torch.sigmoid(outputs)
        h = s * (1 - s)
        if targets is not None and self.pos_weight is not None:
            h = h * (self.pos_weight * targets + 1 - targets)
        if self.weight is not None:
            h = h * self.weight
        return h.expand_as(outputs) / self.normalizer(outputs)

    def likelihood_loss(self) -> BCEWithLogitsLoss:
        """The loss whose gradients at drawn targets estimate the Fisher ``c w σ (1 - σ)``.

        The entries' weights w enter the Fisher once (as in the GGN), so the gradients are
        taken with weights √w: ``E[(√w (σ - ỹ))²] = w σ (1 - σ)`` for ỹ ~ Bernoulli(σ).
        """
        if self.weight is None:
            return self
        return BCEWithLogitsLoss(self.reduction, self.weight.sqrt(), self.pos_weight)

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """Entrywise ``c w (π y + 1 - y) σ (1 - σ) · v``."""
        return self._curvature(outputs, targets) * v

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Diagonal factor, as [D, *outputs.shape] (D entries per sample)."""
        return diagonal_factor(self._curvature(outputs, targets))

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Diagonal factor of ``c w σ (1 - σ)``."""
        if self.pos_weight is not None:
            raise ValueError(f"{self.name}: the Fisher with pos_weight= is not defined")
        return diagonal_factor(self._curvature(outputs, None))

    def _sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, *, observed=None
    ) -> Tensor:
        """Targets drawn from ``Bernoulli(σ(f))``, as floats shaped like ``outputs``."""
        if self.pos_weight is not None:
            raise ValueError(f"{self.name}: sampling targets with pos_weight= is not defined")
        return torch.bernoulli(torch.sigmoid(outputs.detach()), generator=generator)
