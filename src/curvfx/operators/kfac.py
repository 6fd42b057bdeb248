"""Kronecker-factored curvature: the KFAC and EKFAC operators and their damped inverses.

Conventions (formulas of the factors in :mod:`curvfx.operators._kfac_factors`):

* **Blocks.** The operator is block diagonal over layers. A supported layer
  (``nn.Linear`` with any leading dimensions, ``nn.Conv1d/2d`` with one group and zero
  padding, through the KFC unfolding) owns one block over its weight *and* bias jointly:
  the bias is an extra input column of ones, ``θ_l = vec_r([W | b])`` with ``W`` flattened
  row-major to [out, in] (for a convolution in = C_in·k_h·k_w, the ``unfold`` order). Its
  block is

      K_l = B_l ⊗ A_l   on vec_r([W | b])   (= A_l ⊗ B_l on the column-stacked vec([W | b]),
                                              the notation of Martens & Grosse and curvlinops)

  i.e. ``(K_l θ)[o, i] = Σ_{o', i'} B[o, o'] A[i, i'] θ[o', i']`` and ``K_l V = B V A`` for
  V [out, in']: A [in', in'] (input second moment) acts on the input index, B [out, out]
  (output-gradient second moment) on the output index.
* **Scaling.** ``A = mean over samples (and positions) of ã ãᵀ`` carries no loss scaling;
  ``B = Σ_n Σ_k g g ᵀ`` carries all of it, through the output factor ``S`` with
  ``Σ_k s_kn s_knᵀ = ∇²_{f_n} L`` of the loss as written (``MSELoss()``:
  ``s_kn = √(2/(N·C)) e_k``) and the batch weights ``w_b = Z_b/Σ Z`` of the other
  operators. So ``K_l = (1/N) Σ_n ã_n ã_nᵀ ⊗ Σ_n G_n`` for one position per sample, with
  ``G_n = Σ_k g_kn g_knᵀ``: it equals the exact GGN block ``Σ_n ã_n ã_nᵀ ⊗ G_n`` when
  N = 1, and when G_n does not depend on n (a deep linear network with MSE).
  "expand" averages A over the N·T positions and sums B over them; "reduce" averages the
  inputs and sums the output gradients over the T positions of each sample first, so it
  (like EKFAC's per-sample gradients) needs each layer input's sample axis: dim 0, or
  dim 1 of a linear layer's sequence-first input ``[T, N, ..., in]`` (read swapped);
  other layouts (flattened rows ``[N·T, in]``) raise ``ValueError`` naming the layer.
* **Coupled samples.** ``fisher_type="type-2"`` raises ``ValueError`` for a model with
  BatchNorm in train mode: B would depend on how the loss Hessian's per-sample factor
  columns pair up across samples. "mc" (cross-sample terms zero in expectation) and
  "empirical" (the batch gradient back-propagated) stay defined.
* **Other parameters** (of layers without Kronecker structure, tied weights, layers
  carrying forward hooks, ...) get their exact curvature diagonal (from the same output
  factor): ``op.representation`` names which is which.
* **Lazy and cached.** The factors are computed on the first product or query and kept:
  the operator is the curvature at the parameter values of that moment (build a new one
  after a training step). Eigendecompositions are cached as well.

Differs from curvlinops' ``KFACLinearOperator`` in: 1. type-2 is the default Fisher
type. 2. Weight and bias form one block (curvlinops' ``separate_weight_and_bias=False``).
3. Parameters outside supported layers get an exact diagonal instead of an error.
4. A layer called several times has its calls concatenated as positions (curvlinops adds
one expand-factor per call). 5. For "type-2" with outputs of more than 2 dims ([N, T, C],
cross-entropy's [N, C, d]) the loss Hessian's factor has one column per output entry;
curvlinops back-propagates column c of all output positions together, which adds
cross-position terms to B ("reduce"; "expand" when the layer's output at one position
reaches outputs at several). 6. "type-2" raises for BatchNorm in train mode. With 2. and
the same Fisher type, the numbers agree otherwise, EKFAC's for "expand" and for "reduce"
with nonsingular factors (with singular ones, "reduce"'s per-sample gradients reach the
null spaces, where the eigenbasis, and so EKFAC, is a free choice of ``eigh``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvfx._arguments import check_count
from curvfx._engines import draw_seed
from curvfx._errors import check_generator
from curvfx._pytree import num_params
from curvfx.functional import FunctionalModel, as_function
from curvfx.losses import AutogradLoss, get_loss
from curvfx.operators._base import PARAMS_DEVICE, PARAMS_DTYPE, LinearOperator, fixed_params
from curvfx.operators._data import Batches
from curvfx.operators._kfac_factors import (
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    KroneckerFactors,
    eigenvalue_corrections,
    kronecker_factors,
    layout,
)
from curvfx.operators._kronecker import (
    KroneckerEigenOperator,
    KroneckerOperator,
    KroneckerSpectrum,
    check_damping,
    eigh_pair,
    kfac_inverse,
    spectrum_inverse,
)

__all__ = ["EKFACOperator", "KFACOperator", "ekfac", "kfac"]


class KFACOperator(LinearOperator):
    """KFAC approximation of the GGN / Fisher of the loss as written (module docstring).

    ``K = ⊕_l B_l ⊗ A_l ⊕ diag(d)``: a lazily computed
    :class:`~curvfx.operators._kronecker.KroneckerOperator` over :attr:`factors`. Product
    cost per layer: two matrix products (out²·in' + out·in'² per column). ``inverse``,
    ``logdet``, ``det``, the exact trace and diagonal (``curvfx.trace(K, "exact")``,
    ``curvfx.diagonal(K, "exact")``) and ``to_dense`` come from the factors, never from
    P × P products.
    """

    symmetric = True

    def __init__(self, model_fn, loss_fn, params, data, *, fisher_type, kfac_approx, num_samples, generator):
        _check_options(model_fn, params, fisher_type, kfac_approx, num_samples)
        self.model_fn, self.params = model_fn, fixed_params(params)
        self.loss, self.data = get_loss(loss_fn), Batches(data)
        if isinstance(self.loss, AutogradLoss) and fisher_type != "empirical":
            raise ValueError(
                f"loss_fn: {self.loss.name} has no known output-Hessian factor or predictive "
                f"distribution, which fisher_type={fisher_type!r} needs; use fisher_type='empirical' "
                "or a torch loss curvfx knows (MSE, cross-entropy, BCE with logits, NLL)"
            )
        self.fisher_type, self.kfac_approx, self.num_samples = fisher_type, kfac_approx, num_samples
        check_generator(generator)  # used by "mc" only
        self.seed = draw_seed(generator) if fisher_type == "mc" else 0
        self._factors: KroneckerFactors | None = None
        self._eigen: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None

    shape = property(lambda self: (num_params(self.params),) * 2, doc="(P, P).")
    dtype, device = PARAMS_DTYPE, PARAMS_DEVICE
    in_like = property(lambda self: self.params, doc="The parameters (pytree inputs/outputs).")
    out_like = in_like

    @property
    def representation(self) -> dict[str, str]:
        """Parameter name -> ``"kronecker"`` (in a layer block) or ``"diagonal"``."""
        return _representation(self.model_fn, self.params)

    @property
    def factors(self) -> KroneckerFactors:
        """The Kronecker factors (computed from the data on first access, then cached)."""
        if self._factors is None:
            self._factors = kronecker_factors(
                self.model_fn,
                self.loss,
                self.params,
                self.data,
                fisher_type=self.fisher_type,
                kfac_approx=self.kfac_approx,
                num_samples=self.num_samples,
                seed=self.seed,
            )
        return self._factors

    def _matvec(self, v: Tensor) -> Tensor:
        return self._kronecker()._matvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._kronecker()._matmat(V)

    def to_dense(self) -> Tensor:
        """K [P, P], assembled from ``kron(B, A)`` per block (P² memory)."""
        return self._kronecker().to_dense()

    def _exact_diagonal(self) -> Tensor:
        return self._kronecker()._exact_diagonal()

    def _exact_trace(self) -> Tensor:
        return self._kronecker()._exact_trace()

    @property
    def spectrum(self) -> KroneckerSpectrum:
        """Eigendecomposition: ``Λ = λ_B λ_Aᵀ`` in the basis ``Q_B ⊗ Q_A`` (``eigh`` cached)."""
        f = self.factors
        blocks = [
            (blk.index, QB, QA, torch.outer(lB, lA)) for blk, (QB, lB, QA, lA) in zip(f.blocks, self._eigh())
        ]
        return KroneckerSpectrum(blocks, f.diagonal_index, f.diagonal, f.size)

    def inverse(self, damping: float, method: str = "exact") -> KroneckerEigenOperator | KroneckerOperator:
        """The damped inverse as an operator: ``(K + λ I)⁻¹`` ("exact") or π-damped ("heuristic").

        See :func:`curvfx.operators._kronecker.kfac_inverse` for the formulas; the
        eigendecompositions of "exact" are cached on the operator.
        """
        eigen = self._eigh() if method == "exact" else None
        return kfac_inverse(self.factors, damping, method, params=self.params, eigen=eigen)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(K + λ I) = Σ_l Σ_{o,i} log(λ_B[o] λ_A[i] + λ) + Σ log(d + λ)`` (-inf if singular)."""
        return KroneckerEigenOperator(self.spectrum).logdet(damping)

    def det(self, damping: float = 0.0) -> Tensor:
        """``det(K + λ I) = exp(logdet)`` (overflows easily: prefer :meth:`logdet`)."""
        return self.logdet(damping).exp()

    def _kronecker(self) -> KroneckerOperator:
        return KroneckerOperator(self.factors, self.params)

    def _eigh(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(Q_B, λ_B, Q_A, λ_A)`` per block (cached)."""
        if self._eigen is None:
            self._eigen = [eigh_pair(blk.B, blk.A) for blk in self.factors.blocks]
        return self._eigen


class EKFACOperator(LinearOperator):
    """Eigenvalue-corrected KFAC (George et al., 2018): KFAC's eigenbasis, exact eigenvalues.

    ``E = ⊕_l (Q_B ⊗ Q_A) diag(vec_r E_l) (Q_B ⊗ Q_A)ᵀ ⊕ diag(d)`` with ``Q_A, Q_B`` the
    eigenvectors of KFAC's factors (same ``fisher_type``, ``kfac_approx``) and
    ``E_l = Σ_n Σ_k (Q_Bᵀ G_kn Q_A)²`` the diagonal of the exact layer block of the same
    curvature in that basis (per-sample layer gradients ``G_kn``, scaled as B; module
    docstring of :mod:`curvfx.operators._kfac_factors`): a lazily computed
    :class:`~curvfx.operators._kronecker.KroneckerEigenOperator`. Costs a second pass over
    the data. Products: four matrix products per layer; ``inverse`` only with exact damping.
    """

    symmetric = True

    def __init__(self, kfac_op: KFACOperator):
        self.kfac = kfac_op
        self._spectrum: KroneckerSpectrum | None = None

    shape = property(lambda self: self.kfac.shape, doc="(P, P).")
    dtype = property(lambda self: self.kfac.dtype, doc="The parameters' dtype.")
    device = property(lambda self: self.kfac.device, doc="The parameters' device.")
    in_like = property(lambda self: self.kfac.params, doc="The parameters (pytree inputs/outputs).")
    out_like = in_like
    representation = property(lambda self: self.kfac.representation, doc=KFACOperator.representation.__doc__)

    @property
    def spectrum(self) -> KroneckerSpectrum:
        """KFAC's eigenbasis with the corrected eigenvalues (computed on first access, cached)."""
        if self._spectrum is None:
            k = self.kfac
            f, eigen = k.factors, k._eigh()
            bases = {blk.module: (QB, QA) for blk, (QB, _, QA, _) in zip(f.blocks, eigen)}
            E = eigenvalue_corrections(
                k.model_fn,
                k.loss,
                k.params,
                k.data,
                bases,
                fisher_type=k.fisher_type,
                num_samples=k.num_samples,
                seed=k.seed,
            )
            blocks = [(blk.index, QB, QA, E[blk.module]) for blk, (QB, _, QA, _) in zip(f.blocks, eigen)]
            self._spectrum = KroneckerSpectrum(blocks, f.diagonal_index, f.diagonal, f.size)
        return self._spectrum

    def _matvec(self, v: Tensor) -> Tensor:
        return self._eigen()._matvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._eigen()._matmat(V)

    def to_dense(self) -> Tensor:
        """The matrix [P, P] from its eigendecomposition (P² memory)."""
        return self._eigen().to_dense()

    def _exact_diagonal(self) -> Tensor:
        return self._eigen()._exact_diagonal()

    def _exact_trace(self) -> Tensor:
        return self._eigen()._exact_trace()

    def inverse(self, damping: float, method: str = "exact") -> KroneckerEigenOperator:
        """``(E + λ I)⁻¹``: eigenvalues ``1/(E_l + λ)``, ``1/(d + λ)`` (only ``method="exact"``)."""
        check_damping(damping)
        if method != "exact":
            raise ValueError(f"method: EKFAC's inverse supports only 'exact' damping, got {method!r}")
        return spectrum_inverse(self.spectrum, damping, self.kfac.params)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(E + λ I)`` from the corrected eigenvalues (-inf if singular)."""
        return self._eigen().logdet(damping)

    def det(self, damping: float = 0.0) -> Tensor:
        """``det(E + λ I)`` (prefer :meth:`logdet`)."""
        return self.logdet(damping).exp()

    def _eigen(self) -> KroneckerEigenOperator:
        return KroneckerEigenOperator(self.spectrum, self.kfac.params)


def kfac(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    params: dict[str, Tensor] | None = None,
) -> KFACOperator:
    """KFAC operator of the loss as written, ``L = loss_fn(model(X), y)`` over ``data``.

    ::

        K = ⊕_l B_l ⊗ A_l ⊕ diag(d)     block l on θ_l = vec_r([W | b]) (row-major [out, in+1],
                                        the bias an input column of ones: ã = [a; 1])
        A_l = Σ_n Σ_t ã_nt ã_ntᵀ / Σ_n T_n                   ("reduce": ã averaged over t, / N)
        B_l = Σ_b w_b Σ_{n∈b} Σ_k Σ_t g_knt g_kntᵀ           ("reduce": g summed over t first)
        g_knt = ∂⟨f(X_b), s_k⟩ / ∂z_nt,   w_b = Z_b / Σ_b' Z_b' (mean) or 1 (sum)

    with t the T_n positions of sample n (sequence steps, output pixels; 1 for a plain
    ``Linear``), ``s_k`` the output factor of ``fisher_type`` (type-2:
    ``Σ_k s_kn s_knᵀ = ∇²_{f_n} L_b``, e.g. ``2/(N·C) I`` for ``MSELoss()``) and d the exact
    diagonal of the other parameters. See the module docstring and :class:`KFACOperator`.

    Args:
        model: An ``nn.Module`` (its layers give the Kronecker structure).
        loss_fn: A torch loss or :class:`curvfx.losses.Loss` (type-2 and "mc" need a loss
            with a known factor / predictive: MSE, cross-entropy, BCE with logits, NLL).
        data: One ``(X, y)`` batch or a re-iterable of batches.
        fisher_type: ``"type-2"`` (the loss's Hessian factor: KFAC of the GGN), ``"mc"``
            (``num_samples`` targets drawn from the predictive per sample) or
            ``"empirical"`` (observed targets). With BatchNorm in train mode (coupled
            samples) "type-2" raises; "mc" is unbiased there (the sampled gradients are
            zero-mean and independent across samples) and "empirical" back-propagates the
            batch loss's gradient through the coupling.
        kfac_approx: ``"expand"`` or ``"reduce"`` (Eschenhagen et al., 2023), for layers
            with several positions per sample; the same for one position. "reduce" reads
            each layer input per sample: batch-first, or a linear layer's sequence-first
            ``[T, N, ..., in]`` (T = N is settled by one backward pass).
        num_samples: MC draws per sample ("mc" only).
        generator: Seeds the MC draws (one draw at construction; else torch's global RNG).
        params: A dict of some of the model's trainable parameters (default: all).

    Raises:
        ValueError: At construction for an invalid option; when the factors are computed
            (first product or query) for "type-2" on a model with BatchNorm in train mode,
            for "reduce" (and EKFAC) when a layer's input does not hold the samples on
            dim 0 or (sequence-first) dim 1, naming the layer, and for a layer parameter
            also used outside the layer.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layers = torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
        >>> model = torch.nn.Sequential(*layers).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> K = kfac(model, torch.nn.MSELoss(), (x, y))
        >>> K.shape, K.representation["0.weight"]
        ((26, 26), 'kronecker')
        >>> v = torch.randn(26, dtype=torch.float64)
        >>> torch.allclose(K.inverse(damping=1e-3) @ (K @ v + 1e-3 * v), v, atol=1e-8)
        True

    References:
        Martens & Grosse (2015), Optimizing neural networks with Kronecker-factored
        approximate curvature. Grosse & Martens (2016), A Kronecker-factored approximate
        Fisher matrix for convolution layers. Eschenhagen et al. (2023), Kronecker-factored
        approximate curvature for modern neural network architectures.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: KFAC needs an nn.Module (layers give its structure), got {type(model).__name__}"
        )
    model_fn, params = as_function(model, params)
    return KFACOperator(
        model_fn,
        loss_fn,
        params,
        data,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        num_samples=num_samples,
        generator=generator,
    )


def ekfac(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    params: dict[str, Tensor] | None = None,
) -> EKFACOperator:
    """EKFAC operator (:class:`EKFACOperator`); arguments as :func:`kfac`.

    The eigenvalue corrections use per-sample layer gradients, so every Kronecker layer's
    input must hold the samples on dim 0 or (a linear layer's sequence-first input) dim 1,
    for both ``kfac_approx``; otherwise computing them raises ``ValueError`` naming the layer.

    References:
        George et al. (2018), Fast approximate natural gradient descent in a Kronecker
        factored eigenbasis.
    """
    return EKFACOperator(
        kfac(
            model,
            loss_fn,
            data,
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            num_samples=num_samples,
            generator=generator,
            params=params,
        )
    )


def _representation(model_fn: FunctionalModel, params: dict[str, Tensor]) -> dict[str, str]:
    structure = layout(model_fn, params)
    kron = {name for blk in structure.blocks for name in blk.params.values()}
    return {name: "kronecker" if name in kron else "diagonal" for name in params}


def _check_options(model_fn, params, fisher_type, kfac_approx, num_samples) -> None:
    if not isinstance(model_fn, FunctionalModel):
        raise TypeError("model: KFAC needs an nn.Module (its layers give the Kronecker structure)")
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type: expected one of {FISHER_TYPES}, got {fisher_type!r}")
    if kfac_approx not in KFAC_APPROXIMATIONS:
        raise ValueError(f"kfac_approx: expected one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}")
    check_count(num_samples, "num_samples")
    if fisher_type != "mc" and num_samples != 1:
        raise ValueError(
            f"num_samples: only fisher_type='mc' draws samples; got {num_samples} for {fisher_type!r}"
        )
