"""Losses that know their curvature with respect to the model outputs.

A loss ``L(f, y)`` maps a batch of outputs ``f`` [N, ...] and targets ``y`` to a scalar,
reduction included ("the loss as written"). Every supported loss is a sum of independent
per-sample terms, so its output Hessian is block diagonal over samples:

    ∇²_f L = blockdiag_n(H_n),   L = Σ_n c_n ℓ(f_n, y_n),

with ``c_n = 1`` for ``reduction="sum"`` and ``1/N``-style weights for ``"mean"`` (the
exact weights of each loss are in its docstring). A :class:`Loss` gives

* ``loss(f, y)``: the value, equal to torch's;
* ``loss.hessian_vp(f, y, v)``: ``∇²_f L · v`` [same shape as f];
* ``loss.hessian_factor(f, y)``: ``S`` [K, *f.shape] with ``Σ_k vec(S[k, n]) vec(S[k, n])ᵀ = H_n``
  for every sample n (per-sample symmetric factor, used for exact diagonals);
* ``loss.fisher_factor(f, y)``: the same for the Fisher of the predictive distribution,
  ``Σ_n c_n E_{ỹ ~ p(·|f_n)}[∇_f ℓ(f_n, ỹ) ∇_f ℓ(f_n, ỹ)ᵀ]``; equal to the Hessian factor
  for MSE, cross-entropy and BCE with logits (canonical links);
* ``loss.sample_targets(f, generator)``: targets drawn from the predictive p(·|f).

The predictive distribution is the one whose negative log-likelihood is the per-sample
loss term summed over its entries: a categorical over dim 1 for cross-entropy (softmax of
the logits) and NLL (the outputs are log-probabilities), a Bernoulli per entry for BCE with
logits, and ``N(f, I/2)`` for MSE (so that ``-log p = Σ (f - y)²`` up to a constant; the
Fisher then equals the GGN, as in curvlinops).

:func:`get_loss` maps torch losses (modules, functions, ``functools.partial`` of functions)
to these. Any other callable ``loss(outputs, targets) -> scalar`` gets :class:`AutogradLoss`,
whose output-Hessian product is computed by autograd and which has no factor or sampling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from curvfx._errors import inside_transform
from curvfx._memory import check_fits

__all__ = [
    "AutogradLoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "Loss",
    "MSELoss",
    "NLLLoss",
    "get_loss",
]


class Loss:
    """Interface of a loss with known output curvature (see the module docstring).

    The public methods validate their arguments and call the private ones a concrete
    loss implements (``_hessian_vp``, and where known ``_hessian_factor``,
    ``_fisher_factor``, ``_sample_targets``).
    """

    name = "loss"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Value of the loss as written (a scalar)."""
        raise NotImplementedError(f"{type(self).__name__} is abstract")

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise ``ValueError`` if ``targets`` cannot be the targets of ``outputs``."""
        _check_batch(outputs)

    def normalizer(self, targets: Tensor) -> Tensor | float:
        """Z, the denominator of ``reduction="mean"`` (1 for ``"sum"``): ``L = (1/Z) Σ_i ℓ_i``.

        Batches combine exactly with it: the loss of a concatenation of batches b is
        ``Σ_b Z_b L_b / Σ_b Z_b`` for the mean.
        """
        raise NotImplementedError(f"{type(self).__name__} is abstract")

    def hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``∇²_f L · v`` for ``v`` shaped like ``outputs``."""
        self.check(outputs, targets)
        if not isinstance(v, Tensor) or v.shape != outputs.shape:
            raise ValueError(
                f"v: expected a tensor shaped like the outputs {list(outputs.shape)}, "
                f"got {getattr(v, 'shape', type(v).__name__)}"
            )
        return self._hessian_vp(outputs, targets, v)

    def hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample factor ``S`` [K, *outputs.shape] of the output Hessian.

        Raises:
            MemoryBudgetError: If S may exceed the memory budget (:mod:`curvfx._memory`):
                K is at most one sample's number of outputs D (C·T for cross-entropy on
                [N, C, T] logits), so S holds at most D·N·D numbers.
        """
        self.check(outputs, targets)
        _check_factor_fits(outputs, "the output Hessian's factor")
        return self._hessian_factor(outputs, targets)

    def fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample factor ``S`` [K, *outputs.shape] of the output-space Fisher.

        Raises:
            MemoryBudgetError: As :meth:`hessian_factor`.
        """
        self.check(outputs, targets)
        _check_factor_fits(outputs, "the output Fisher's factor")
        return self._fisher_factor(outputs, targets)

    def sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, *, observed=None
    ) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs``.

        ``observed`` (optional): the data's targets; positions they ignore (``ignore_index``)
        stay ignored in the draw.
        """
        _check_batch(outputs)
        if observed is not None:
            self.check(outputs, observed)
        return self._sample_targets(outputs, generator, observed=observed)

    def likelihood_loss(self) -> Loss:
        """The loss whose gradients at targets drawn by :meth:`sample_targets` estimate the Fisher.

        ``Z E_ỹ[∇_f L(f, ỹ) ∇_f L(f, ỹ)ᵀ]`` with it equals the factor product of
        :meth:`fisher_factor` (what a Monte-Carlo Fisher relies on): the loss itself, unless
        an option (label smoothing, entry weights) makes it differ from the negative
        log-likelihood of the predictive.
        """
        return self

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} is abstract")

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise ValueError(f"{self.name}: no symmetric factor of the output Hessian is known")

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise ValueError(f"{self.name}: no factor of the Fisher is known")

    def _sample_targets(self, outputs: Tensor, generator, *, observed) -> Tensor:
        raise ValueError(f"{self.name}: sampling targets from its predictive is not supported")


class MSELoss(Loss):
    """Mean squared error ``L = c Σ_{n,j} (f_nj - y_nj)²``.

    ``c = 1/(N·D)`` for ``reduction="mean"`` (D entries per sample), ``c = 1`` for
    ``"sum"``. Output Hessian ``H_n = 2c I``; factor ``S[k, n] = √(2c) e_k`` (K = D).
    Predictive ``N(f, I/2)``, so the Fisher equals the GGN.
    """

    def __init__(self, reduction: str = "mean"):
        self.reduction = _check_reduction(reduction, "MSELoss")
        self.name = f"MSELoss(reduction={reduction!r})"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Value, equal to ``F.mse_loss``."""
        return F.mse_loss(outputs, targets, reduction=self.reduction)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Targets must have the shape and dtype of the outputs."""
        _check_batch(outputs)
        _check_same_shape(outputs, targets, self.name)

    def normalizer(self, targets: Tensor) -> float:
        """``N·D`` (number of entries) for the mean, 1 for the sum."""
        return float(targets.numel()) if self.reduction == "mean" else 1.0

    def _scale(self, outputs: Tensor) -> float:
        return 2.0 / self.normalizer(outputs)

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``2c · v``."""
        return self._scale(outputs) * v

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``√(2c) I`` per sample, as [D, *outputs.shape]."""
        return _diagonal_factor(torch.full_like(outputs, self._scale(outputs)))

    _fisher_factor = _hessian_factor

    def _sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, *, observed=None
    ) -> Tensor:
        """``ỹ = f + ε / √2``, ``ε ~ N(0, I)``."""
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device)
        return outputs.detach() + noise / math.sqrt(2.0)


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
        self.reduction = _check_reduction(reduction, "CrossEntropyLoss")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
        self.weight, self.ignore_index = weight, ignore_index
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

    def normalizer(self, targets: Tensor) -> Tensor | float:
        """Z: counted positions weighted by ``w_{y_i}`` (class indices) or all positions."""
        if self.reduction == "sum":
            return 1.0
        if targets.is_floating_point():
            return float(targets[:, 0].numel())
        return _counted_weight(targets, self.weight, self.ignore_index)

    def _coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``a_i / Z`` per position, shape [N, d1, ...]."""
        num_classes = outputs.shape[1]
        eps = self.label_smoothing
        if self.weight is None and eps == 0 and not targets.is_floating_point():  # a_i = [y_i counted]
            a = (targets != self.ignore_index).to(outputs.dtype)
            return a / (a.sum().clamp(min=1) if self.reduction == "mean" else 1.0)
        w = self.weight if self.weight is not None else outputs.new_ones(num_classes)
        if targets.is_floating_point():
            smoothed = (1 - eps) * targets + eps / num_classes
            a = torch.einsum("nc...,c->n...", smoothed, w.to(outputs.dtype))
        else:
            counted = targets != self.ignore_index
            a = ((1 - eps) * w[torch.where(counted, targets, 0)] + eps * w.mean()) * counted
        return _per_normalizer(a, self.normalizer(targets))

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
        this loss at drawn targets estimate.
        """
        if not self.label_smoothing:
            return self
        return CrossEntropyLoss(self.reduction, self.weight, self.ignore_index)

    def _fisher_coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:
        counted = (
            torch.ones_like(outputs[:, 0])
            if targets.is_floating_point()
            else (targets != self.ignore_index).to(outputs.dtype)
        )
        return _per_normalizer(counted, self.normalizer(targets))

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
        self.reduction = _check_reduction(reduction, "NLLLoss")
        self.weight, self.ignore_index = weight, ignore_index
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
        scale = _per_normalizer(counted, self.normalizer(targets))
        return _diagonal_factor(outputs.softmax(dim=1) * scale.unsqueeze(1))

    def normalizer(self, targets: Tensor) -> Tensor | float:
        """Z: counted positions weighted by ``w_{y_i}``; 1 for the sum."""
        if self.reduction == "sum":
            return 1.0
        return _counted_weight(targets, self.weight, self.ignore_index)

    def _sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, *, observed=None
    ) -> Tensor:
        """Class indices drawn from ``Categorical(softmax(f))``."""
        if self.weight is not None:
            raise ValueError(f"{self.name}: sampling targets with a class weight= is not defined")
        draws = _sample_categorical(outputs.detach().softmax(dim=1), generator)
        return _keep_ignored(draws, observed, self.ignore_index)


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
        self.reduction = _check_reduction(reduction, "BCEWithLogitsLoss")
        self.weight, self.pos_weight = weight, pos_weight
        self.name = f"BCEWithLogitsLoss(reduction={reduction!r})"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Value, equal to ``F.binary_cross_entropy_with_logits``."""
        for option in ("weight", "pos_weight"):
            w = getattr(self, option)
            if w is not None and torch.broadcast_shapes(w.shape, outputs.shape) != outputs.shape:
                raise ValueError(
                    f"{self.name}: {option} of shape {list(w.shape)} does not broadcast to the "
                    f"outputs {list(outputs.shape)} (a {option} with a batch dimension gives one "
                    "sample alone no loss, so per-sample quantities are not defined for it)"
                )
        return F.binary_cross_entropy_with_logits(
            outputs,
            targets,
            weight=self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
        )

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Targets must have the shape and dtype of the logits."""
        _check_batch(outputs)
        _check_same_shape(outputs, targets, self.name)

    def normalizer(self, targets: Tensor) -> float:
        """Number of entries for the mean, 1 for the sum."""
        return float(targets.numel()) if self.reduction == "mean" else 1.0

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
        return _diagonal_factor(self._curvature(outputs, targets))

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Diagonal factor of ``c w σ (1 - σ)``."""
        if self.pos_weight is not None:
            raise ValueError(f"{self.name}: the Fisher with pos_weight= is not defined")
        return _diagonal_factor(self._curvature(outputs, None))

    def _sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, *, observed=None
    ) -> Tensor:
        """Targets drawn from ``Bernoulli(σ(f))``, as floats shaped like ``outputs``."""
        if self.pos_weight is not None:
            raise ValueError(f"{self.name}: sampling targets with pos_weight= is not defined")
        return torch.bernoulli(torch.sigmoid(outputs.detach()), generator=generator)


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
        if reduction not in ("mean", "batchmean", "sum"):
            raise ValueError(
                f"reduction: expected 'mean', 'batchmean' or 'sum' (a scalar loss), got {reduction!r}"
            )
        self.loss_fn, self.reduction = loss_fn, reduction
        self.name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``loss_fn(outputs, targets)``."""
        return self.loss_fn(outputs, targets)

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
        ratio = self.normalizer(targets[:1]) / self.normalizer(targets)
        if (gradient - ratio * alone).norm() > 1e-4 * gradient.norm():
            raise ValueError(
                f"loss_fn: {self.name} is not a {self.reduction!r} reduction of per-sample terms: "
                "its gradient differs from that of the loss applied to each sample alone "
                f"(scaled by {ratio:g}); declare how it reduces with curvfx.losses.AutogradLoss("
                "loss_fn, reduction='sum' | 'batchmean' | 'mean')"
            )

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``∇²_f L · v`` as the vjp of ``∇_f L`` (the Hessian is symmetric)."""
        _, vjp_fn = vjp(grad(lambda f: self.loss_fn(f, targets)), outputs)
        return vjp_fn(v)[0]


def get_loss(loss_fn) -> Loss:
    """The :class:`Loss` for a torch loss module, loss function or any callable.

    Known exactly: ``nn.MSELoss``/``F.mse_loss``, ``nn.CrossEntropyLoss``/``F.cross_entropy``,
    ``nn.BCEWithLogitsLoss``/``F.binary_cross_entropy_with_logits``, ``nn.NLLLoss``/
    ``F.nll_loss``, also as ``functools.partial(F.cross_entropy, reduction="sum")``. Other
    callables get :class:`AutogradLoss`.

    Raises:
        TypeError: If ``loss_fn`` is not callable.
        ValueError: On an option that would change the loss in a way curvfx does not
            model (``reduction="none"``, deprecated ``size_average``/``reduce``, unknown
            keywords).
    """
    if isinstance(loss_fn, Loss):
        return loss_fn
    if isinstance(loss_fn, nn.Module) and _overrides_forward(loss_fn):  # its own formula: by autograd
        return AutogradLoss(
            loss_fn, _check_reduction(getattr(loss_fn, "reduction", "mean"), type(loss_fn).__name__)
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


_FUNCTIONAL = {
    F.mse_loss: (MSELoss, {"reduction"}),
    F.cross_entropy: (CrossEntropyLoss, {"reduction", "weight", "ignore_index", "label_smoothing"}),
    F.binary_cross_entropy_with_logits: (BCEWithLogitsLoss, {"reduction", "weight", "pos_weight"}),
    F.nll_loss: (NLLLoss, {"reduction", "weight", "ignore_index"}),
}


def _check_reduction(reduction: str, loss: str) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: {loss} must reduce to a scalar with 'mean' or 'sum', got {reduction!r}")
    return reduction


def _check_batch(outputs: Tensor) -> None:
    if outputs.dim() == 0:
        raise ValueError("outputs: expected a batch [N, ...], got a scalar")
    if outputs.shape[0] == 0:
        raise ValueError("outputs: the batch is empty (N = 0)")


def _check_same_shape(outputs: Tensor, targets: Tensor, loss: str) -> None:
    if targets.shape != outputs.shape:
        raise ValueError(
            f"targets: {loss} needs targets shaped like the outputs {list(outputs.shape)}, "
            f"got {list(targets.shape)}"
        )
    if targets.dtype != outputs.dtype:
        raise ValueError(f"targets: dtype {targets.dtype} does not match outputs dtype {outputs.dtype}")


def _check_class_targets(
    outputs: Tensor, targets: Tensor, loss: str, allow_probabilities: bool, ignore_index: int
) -> None:
    _check_batch(outputs)
    if outputs.dim() < 2:
        raise ValueError(f"outputs: {loss} needs outputs [N, C, ...], got {list(outputs.shape)}")
    index_shape = (outputs.shape[0], *outputs.shape[2:])
    if targets.is_floating_point() and allow_probabilities:
        _check_same_shape(outputs, targets, loss)
    elif targets.dtype in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        if tuple(targets.shape) != index_shape:
            raise ValueError(
                f"targets: {loss} needs class indices of shape {list(index_shape)}, got {list(targets.shape)}"
            )
        if not inside_transform():  # the values are concrete (not batched by vmap)
            counted = targets[targets != ignore_index]
            low, high = (int(counted.min()), int(counted.max())) if counted.numel() else (0, 0)
            if not 0 <= low <= high < outputs.shape[1]:
                raise ValueError(
                    f"targets: {loss} needs class indices in [0, C = {outputs.shape[1]}) (or "
                    f"ignore_index = {ignore_index}), got values in [{low}, {high}]"
                )
    else:
        kinds = "class indices (int64) or probabilities" if allow_probabilities else "class indices (int64)"
        raise ValueError(f"targets: {loss} needs {kinds}, got dtype {targets.dtype}")


def _diagonal_factor(curvature: Tensor) -> Tensor:
    """Per-sample factor of ``diag(c[n])``, ``S[k, n] = √c[n, k] e_k`` [D, N, ...]."""
    n = curvature.shape[0]
    d = curvature[0].numel()
    eye = torch.eye(d, dtype=curvature.dtype, device=curvature.device)
    s = eye.unsqueeze(1) * curvature.reshape(1, n, d).sqrt()
    return s.reshape(d, *curvature.shape)


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


def _per_normalizer(a: Tensor, z: Tensor | float) -> Tensor:
    """``a / Z``, and 0 where nothing is counted (Z = 0: every position of the batch ignored).

    Such a batch contributes nothing to a curvature summed over batches; the operators
    refuse data in which every position is ignored.
    """
    if isinstance(z, Tensor):
        return a / torch.where(z > 0, z, torch.ones_like(z))
    return a / z


def _counted_weight(targets: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """``Σ_i [y_i ≠ ignore_index] w_{y_i}`` (the count of positions when ``weight`` is None)."""
    counted = targets != ignore_index
    if weight is None:
        return counted.sum()
    return (weight[torch.where(counted, targets, 0)] * counted).sum()


def _keep_ignored(draws: Tensor, observed: Tensor | None, ignore_index: int) -> Tensor:
    if observed is None or observed.is_floating_point():
        return draws
    return torch.where(observed == ignore_index, observed, draws)


def _sample_categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Class indices [N, d1, ...] drawn from ``probs`` [N, C, d1, ...] over dim 1."""
    c = probs.shape[1]
    flat = probs.movedim(1, -1).reshape(-1, c)
    draws = torch.multinomial(flat, 1, replacement=True, generator=generator)
    return draws.reshape(probs.shape[0], *probs.shape[2:])


def _check_factor_fits(outputs: Tensor, what: str) -> None:
    """Budget check before forming a factor [K, *outputs.shape] with K ≤ D = outputs per sample."""
    if torch.compiler.is_compiling():  # checked by the eager self-check's call
        return
    per_sample = outputs[0].numel() if outputs.dim() else 1
    check_fits(
        f"{what} S [K ≤ {per_sample}, *{list(outputs.shape)}]",
        per_sample * outputs.numel(),
        outputs.dtype,
        "use a stochastic estimate (method='hutchinson', or the Monte-Carlo Fisher: K = num_samples)",
    )
