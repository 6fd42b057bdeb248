"""The :class:`Loss` interface, and the checks and factor helpers its implementations share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvfx._errors import check_output
from curvfx._memory import check_fits


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
        check_batch(outputs)

    def checked_call(self, outputs: Any, targets: Tensor) -> Tensor:
        """The value after :meth:`check` (outputs must be one tensor the targets fit)."""
        self.check(check_output(outputs), targets)
        return self(outputs, targets)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """``∇_f L`` shaped like ``outputs`` in closed form, or None where there is none.

        Differentiable in ``outputs``. None: the loss has no closed form for its options
        (autograd gives the gradient then).
        """
        return None

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
        stay ignored in the draw for :meth:`likelihood_loss` (which takes the draws): marked
        with ``ignore_index``, or with -1 where ``ignore_index`` is a class a draw could hit.
        """
        check_batch(outputs)
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


def check_reduction(reduction: str, loss: str) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: {loss} must reduce to a scalar with 'mean' or 'sum', got {reduction!r}")
    return reduction


def check_batch(outputs: Tensor) -> None:
    if outputs.dim() == 0:
        raise ValueError("outputs: expected a batch [N, ...], got a scalar")
    if outputs.shape[0] == 0:
        raise ValueError("outputs: the batch is empty (N = 0)")


def check_same_shape(outputs: Tensor, targets: Tensor, loss: str) -> None:
    if targets.shape != outputs.shape:
        raise ValueError(
            f"targets: {loss} needs targets shaped like the outputs {list(outputs.shape)}, "
            f"got {list(targets.shape)}"
        )
    if not targets.is_floating_point():  # a float dtype other than the outputs' is promoted, as by torch
        raise ValueError(f"targets: {loss} needs floating-point targets, got {targets.dtype}")


def diagonal_factor(curvature: Tensor) -> Tensor:
    """Per-sample factor of ``diag(c[n])``, ``S[k, n] = √c[n, k] e_k`` [D, N, ...]."""
    n = curvature.shape[0]
    d = curvature[0].numel()
    eye = torch.eye(d, dtype=curvature.dtype, device=curvature.device)
    s = eye.unsqueeze(1) * curvature.reshape(1, n, d).sqrt()
    return s.reshape(d, *curvature.shape)


def per_normalizer(a: Tensor, z: Tensor | float) -> Tensor:
    """``a / Z``, and 0 where nothing is counted (Z = 0: every position of the batch ignored).

    Such a batch contributes nothing to a curvature summed over batches; the operators
    refuse data in which every position is ignored. Z may be negative (negative class
    weights), as in torch's weighted mean.
    """
    if isinstance(z, Tensor):
        return a / torch.where(z != 0, z, torch.ones_like(z))
    return a / z


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
