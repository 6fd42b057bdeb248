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

from curvfx.losses._autograd import AutogradLoss
from curvfx.losses._base import Loss
from curvfx.losses._classes import CrossEntropyLoss, NLLLoss
from curvfx.losses._elementwise import BCEWithLogitsLoss, MSELoss
from curvfx.losses._lookup import get_loss

__all__ = [
    "AutogradLoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "Loss",
    "MSELoss",
    "NLLLoss",
    "get_loss",
]
