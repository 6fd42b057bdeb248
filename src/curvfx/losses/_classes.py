"""Losses over class scores on dim 1: softmax cross-entropy, and NLL of log-probabilities."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from curvfx._errors import describe, holds_values
from curvfx.losses._base import (
    Loss,
    check_batch,
    check_reduction,
    check_same_shape,
    diagonal_factor,
    per_normalizer,
)


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy over dim 1 of logits ``f`` [N, C] or [N, C, d1, ...].

    With positions i = (n, d) and ``p_i = softmax(f_i)``, the output Hessian of position i
    is ``(a_i / Z) (diag p_i - p_i p_iᵀ)`` and positions are independent, where

    * class-index targets: ``a_i = [y_i ≠ ignore_index] ((1-ε) w_{y_i} + ε Σ_c w_c / C)``
      and, for ``"mean"``, ``Z = Σ_i [y_i ≠ ignore_index] w_{y_i}`` (torch's weighted mean);
    * class-probability targets [N, C, ...]: ``a_i = Σ_c w_c t'_ic`` with
      ``t' = (1-ε) t + ε/C`` and, for ``"mean"``, ``Z = N·d1·…`` (number of positions);

    ``w`` is ``weight`` (ones if None), ε is ``label_smoothing``, ``Z = 1`` for ``"sum"``.
    Factor: columns ``√(a_i/Z) √p_ik (e_k - p_i)``, one per class k and position
    (K = C·d1·…; zero outside its position). The Fisher uses the predictive
    Categorical(p_i) at the positions not ignored, with ``a_i = 1`` (``weight`` is rejected
    there: the weight would depend on the sampled class).
    """

    def __init__(
        self,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ):
        self.reduction = check_reduction(reduction, "CrossEntropyLoss")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
        self.weight, self.ignore_index = _class_weight(weight), ignore_index
        self.label_smoothing = float(label_smoothing)
        self.name = f"CrossEntropyLoss(reduction={reduction!r})"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Value, equal to ``F.cross_entropy``."""
        return F.cross_entropy(
            outputs,
            targets,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Logits [N, C, ...]; targets class indices [N, ...] in [0, C) or probabilities [N, C, ...]."""
        _check_class_targets(
            outputs, targets, self.name, allow_probabilities=True, ignore_index=self.ignore_index
        )
        _check_weight(self.weight, outputs, targets)

    def normalizer(self, targets: Tensor) -> Tensor | float:
        """Z: counted positions weighted by ``w_{y_i}`` (class indices) or all positions."""
        if self.reduction == "sum":
            return 1.0
        if targets.is_floating_point():
            if targets.dim() < 2:
                raise ValueError(
                    f"targets: {self.name} needs class indices (int64) or probabilities [N, C, ...], "
                    f"got {targets.dtype} targets of shape {list(targets.shape)}"
                )
            return float(targets[:, 0].numel())
        return _counted_weight(targets, self.weight, self.ignore_index)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """``(a_i / Z)(p_i - e_{y_i})`` per position (zero where ignored), or None.

        For class indices without weight or smoothing; None for the other options.
        """
        if self.weight is not None or self.label_smoothing or targets.is_floating_point():
            return None
        counted = torch.where(targets == self.ignore_index, 0, targets).long().unsqueeze(1)  # uint8 too
        hit = torch.zeros_like(outputs).scatter_(1, counted, 1.0)
        return self._coefficients(outputs, targets).unsqueeze(1) * (outputs.softmax(dim=1) - hit)

    def _coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``a_i / Z`` per position, shape [N, d1, ...]."""
        num_classes = outputs.shape[1]
        eps = self.label_smoothing
        if self.weight is None and eps == 0 and not targets.is_floating_point():  # a_i = [y_i counted]
            a = (targets != self.ignore_index).to(outputs.dtype)
            return a / (a.sum().clamp(min=1) if self.reduction == "mean" else 1.0)
        w = self.weight if self.weight is not None else outputs.new_ones(num_classes)
        if targets.is_floating_point():
            smoothed = ((1 - eps) * targets + eps / num_classes).to(outputs.dtype)
            a = torch.einsum("nc...,c->n...", smoothed, w.to(outputs.dtype))
        else:
            counted = targets != self.ignore_index
            a = ((1 - eps) * w[torch.where(counted, targets, 0).long()] + eps * w.mean()) * counted
        return per_normalizer(a, self.normalizer(targets))

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``(a_i/Z)(p_i ⊙ v_i - p_i (p_iᵀ v_i))`` at every position i."""
        p = outputs.softmax(dim=1)
        s = self._coefficients(outputs, targets).unsqueeze(1)
        return s * (p * v - p * (p * v).sum(dim=1, keepdim=True))

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Columns ``√(a_i/Z) √p_ik (e_k - p_i)``, as [C·d1·…, *outputs.shape]."""
        return _softmax_factor(outputs, self._coefficients(outputs, targets))

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Factor of ``Σ_i [i counted] / Z · (diag p_i - p_i p_iᵀ)``."""
        if self.weight is not None:
            raise ValueError(f"{self.name}: the Fisher with a class weight= is not defined")
        return _softmax_factor(outputs, self._fisher_coefficients(outputs, targets))

    def likelihood_loss(self) -> CrossEntropyLoss:
        """The loss without label smoothing: the negative log-likelihood of Categorical(softmax(f)).

        Smoothing changes the targets the loss compares with, not the model's predictive,
        whose Fisher (``diag p - p pᵀ`` per position, the exact Fisher) the gradients of
        this loss at drawn targets estimate. An ``ignore_index`` that is a class (≥ 0), which
        a draw may hit, becomes the negative index :meth:`sample_targets` marks ignored
        positions with.
        """
        ignore = _drawn_ignore_index(self.ignore_index)
        if not self.label_smoothing and ignore == self.ignore_index:
            return self
        return CrossEntropyLoss(self.reduction, self.weight, ignore)

    def _fisher_coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:
        counted = (
            torch.ones_like(outputs[:, 0])
            if targets.is_floating_point()
            else (targets != self.ignore_index).to(outputs.dtype)
        )
        return per_normalizer(counted, self.normalizer(targets))

    def _sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, *, observed=None
    ) -> Tensor:
        """Class indices [N, d1, ...] drawn from ``Categorical(softmax(f))`` at every position."""
        if self.weight is not None:
            raise ValueError(f"{self.name}: sampling targets with a class weight= is not defined")
        draws = _sample_categorical(outputs.detach().softmax(dim=1), generator)
        return _keep_ignored(draws, observed, self.ignore_index)


class NLLLoss(Loss):
    """Negative log-likelihood of log-probabilities ``f`` [N, C, ...] (after ``log_softmax``).

    ``L = Σ_i -(w_{y_i}/Z) f_{i, y_i}`` over positions not ignored, ``Z = Σ_i w_{y_i}`` for
    ``"mean"``, 1 for ``"sum"``. L is linear in f, so the output Hessian is zero and the GGN
    of a model ending in ``log_softmax`` + NLL is zero (the loss as written; use
    :class:`CrossEntropyLoss` on logits for the usual GGN). The Fisher is not zero: with
    ``p = softmax(f)`` (= exp f for normalized log-probabilities) it is
    ``Σ_i [i counted]/Z · diag(p_i)``, and ``sample_targets`` draws from Categorical(p).
    """

    def __init__(self, reduction: str = "mean", weight: Tensor | None = None, ignore_index: int = -100):
        self.reduction = check_reduction(reduction, "NLLLoss")
        self.weight, self.ignore_index = _class_weight(weight), ignore_index
        self.name = f"NLLLoss(reduction={reduction!r})"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Value, equal to ``F.nll_loss``."""
        return F.nll_loss(
            outputs,
            targets,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Log-probabilities [N, C, ...]; targets class indices [N, ...] in [0, C)."""
        _check_class_targets(
            outputs, targets, self.name, allow_probabilities=False, ignore_index=self.ignore_index
        )
        _check_weight(self.weight, outputs, targets)

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """Zero: the loss is linear in the outputs."""
        return torch.zeros_like(v)

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """An empty factor [0, *outputs.shape]."""
        return outputs.new_zeros((0, *outputs.shape))

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Factor of ``Σ_i [i counted]/Z · diag(p_i)``: entries ``√(p_ik [i counted]/Z)``."""
        if self.weight is not None:
            raise ValueError(f"{self.name}: the Fisher with a class weight= is not defined")
        counted = (targets != self.ignore_index).to(outputs.dtype)
        scale = per_normalizer(counted, self.normalizer(targets))
        return diagonal_factor(outputs.softmax(dim=1) * scale.unsqueeze(1))

    def normalizer(self, targets: Tensor) -> Tensor | float:
        """Z: counted positions weighted by ``w_{y_i}``; 1 for the sum."""
        if self.reduction == "sum":
            return 1.0
        return _counted_weight(targets, self.weight, self.ignore_index)

    _sample_targets = CrossEntropyLoss._sample_targets  # the same predictive, Categorical(softmax(f))

    def likelihood_loss(self) -> NLLLoss:
        """The loss whose gradients at drawn targets estimate the Fisher.

        Itself, unless ``ignore_index`` is a class (≥ 0) a draw may hit: then the same loss
        ignoring the negative index :meth:`sample_targets` marks ignored positions with.
        """
        ignore = _drawn_ignore_index(self.ignore_index)
        return self if ignore == self.ignore_index else NLLLoss(self.reduction, self.weight, ignore)


def _check_class_targets(
    outputs: Tensor, targets: Tensor, loss: str, allow_probabilities: bool, ignore_index: int
) -> None:
    check_batch(outputs)
    if outputs.dim() < 2:
        raise ValueError(f"outputs: {loss} needs outputs [N, C, ...], got {list(outputs.shape)}")
    index_shape = (outputs.shape[0], *outputs.shape[2:])
    if targets.is_floating_point() and allow_probabilities:
        check_same_shape(outputs, targets, loss)
    elif targets.dtype in (torch.int64, torch.uint8):  # the index dtypes torch's losses take
        if targets.dtype == torch.uint8 and outputs.dim() > 2:
            raise ValueError(
                f"targets: {loss} takes uint8 class indices for outputs [N, C] only (torch refuses "
                f"them for {list(outputs.shape)}); pass int64 indices"
            )
        wrapped = ignore_index % 256  # uint8 == ignore_index compares the wrapped byte
        uint8_wraps = targets.dtype == torch.uint8 and not 0 <= ignore_index < 256
        if uint8_wraps and holds_values(targets) and bool((targets == wrapped).any()):
            raise ValueError(
                f"targets: uint8 class {wrapped} would read as ignore_index = {ignore_index} "
                "(torch counts it); pass int64 class indices"
            )
        if tuple(targets.shape) != index_shape:
            raise ValueError(
                f"targets: {loss} needs class indices of shape {list(index_shape)}, got {list(targets.shape)}"
            )
        if holds_values(targets) and targets.numel():  # not batched by vmap
            ignored = targets == ignore_index
            low, high = torch.stack(torch.aminmax(targets.masked_fill(ignored, 0))).tolist()
            if not 0 <= low <= high < outputs.shape[1]:
                low, high = (int(v) for v in torch.aminmax(targets[~ignored]))  # the counted values
                raise ValueError(
                    f"targets: {loss} needs class indices in [0, C = {outputs.shape[1]}) (or "
                    f"ignore_index = {ignore_index}), got values in [{low}, {high}]"
                )
    else:
        kinds = "class indices (int64 or uint8)" + (" or probabilities" if allow_probabilities else "")
        raise ValueError(f"targets: {loss} needs {kinds}, got dtype {targets.dtype}")


def _check_weight(weight: Tensor | None, outputs: Tensor, targets: Tensor) -> None:
    """Raise ``ValueError`` unless ``weight`` is None or class weights [C] torch takes with these inputs.

    Floating point, on the outputs' device, and for class indices of the outputs' dtype
    (torch refuses other dtypes there).
    """
    if weight is None:
        return
    c = outputs.shape[1]
    if not isinstance(weight, Tensor) or weight.shape != (c,) or not weight.is_floating_point():
        got = (
            f"shape {list(weight.shape)}, {weight.dtype}"
            if isinstance(weight, Tensor)
            else type(weight).__name__
        )
        raise ValueError(f"weight: expected floating-point class weights [C] = [{c}], got {got}")
    if weight.device != outputs.device:
        raise ValueError(f"weight: on {weight.device}, the outputs on {outputs.device}")
    autocast = torch.is_autocast_enabled(outputs.device.type)  # the loss then runs in float32
    if weight.dtype != outputs.dtype and not targets.is_floating_point() and not autocast:
        raise ValueError(
            f"weight: {weight.dtype} class weights with {outputs.dtype} outputs (torch refuses them "
            "with class indices); convert the loss's weight to the outputs' dtype"
        )


def _class_weight(weight: Any) -> Tensor | None:
    """``weight`` if it is None or finite floating-point class weights [C] (checked once, when built)."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or weight.dim() != 1 or not weight.is_floating_point():
        raise ValueError(f"weight: expected floating-point class weights [C], got {describe(weight)}")
    if holds_values(weight) and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight: class weights must be finite")
    return weight


def _softmax_factor(logits: Tensor, coefficients: Tensor) -> Tensor:
    """Factor of ``coefficients_i (diag p_i - p_i p_iᵀ)`` at each position i, [C·T, N, C, ...].

    ``logits`` [N, C, d1, ...], ``coefficients`` [N, d1, ...], T = d1·…. Column (k, t) is
    ``√coefficients_i √p_ik (e_k - p_i)`` at position t of every sample, zero elsewhere.
    """
    n, c = logits.shape[:2]
    p = logits.softmax(dim=1).reshape(n, c, -1)  # [N, C, T]
    t = p.shape[-1]
    scale = coefficients.reshape(n, 1, t).sqrt() * p.sqrt()  # [N, C(k), T]
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    # B[k, n, :, t] = scale[n, k, t] (e_k - p[n, :, t])
    b = scale.permute(1, 0, 2).unsqueeze(2) * (eye.reshape(c, 1, c, 1) - p.unsqueeze(0))
    if t > 1:  # one column per (class, position), supported on its position only
        positions = torch.eye(t, dtype=p.dtype, device=p.device).reshape(1, t, 1, 1, t)
        b = (b.unsqueeze(1) * positions).reshape(c * t, n, c, t)
    return b.reshape(b.shape[0], *logits.shape)


def _counted_weight(targets: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """``Σ_i [y_i ≠ ignore_index] w_{y_i}`` (the count of positions when ``weight`` is None)."""
    counted = targets != ignore_index
    if weight is None:
        return counted.sum()
    c = weight.numel()  # a class outside [0, C) reads nan: the batch is then checked, not skipped as Z = 0
    index = torch.where((targets >= 0) & (targets < c), targets.long(), c)
    padded = torch.cat([weight, weight.new_full((1,), float("nan"))])
    return torch.where(counted, padded[index], 0).sum()


def _keep_ignored(draws: Tensor, observed: Tensor | None, ignore_index: int) -> Tensor:
    """``draws`` with the positions ``observed`` ignores set to :func:`_drawn_ignore_index`."""
    if observed is None or observed.is_floating_point():
        return draws
    return torch.where(observed == ignore_index, _drawn_ignore_index(ignore_index), draws)


def _drawn_ignore_index(ignore_index: int) -> int:
    """The index that marks ignored positions among drawn classes: ``ignore_index`` if negative.

    An ``ignore_index`` in [0, C) is a class a draw can hit, which the loss would then ignore
    (the Monte-Carlo Fisher was about half of the exact one for ``ignore_index=0``): -1
    marks the ignored positions instead, for :meth:`CrossEntropyLoss.likelihood_loss`.
    """
    return ignore_index if ignore_index < 0 else -1


def _sample_categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Class indices [N, d1, ...] drawn from ``probs`` [N, C, d1, ...] over dim 1.

    By the inverse of the cumulative distribution: class k where ``u Σ_c p_c`` falls in
    ``[cdf_{k-1}, cdf_k)``, ``u ~ U[0, 1)`` (a third of ``torch.multinomial``'s time for
    128 samples of 10 classes). The sums run in float64 (float32 on MPS), so that large
    vocabularies keep their small probabilities; classes of probability zero are never
    drawn. Non-finite probabilities (nan or inf logits) raise ``ValueError``.
    """
    c = probs.shape[1]
    wide = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.movedim(1, -1).reshape(-1, c).to(wide).cumsum(1)
    total = cdf[:, -1:]
    if holds_values(total) and not bool(torch.isfinite(total).all()):
        raise ValueError("outputs: the predictive probabilities are not finite (nan or inf outputs)")
    u = torch.rand(total.shape, generator=generator, dtype=wide, device=cdf.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # below the total after rounding
    return (cdf <= u).sum(1).reshape(probs.shape[0], *probs.shape[2:])
