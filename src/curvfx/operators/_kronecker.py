"""Operators given by Kronecker factors or by their eigendecompositions; damped KFAC inverses.

Both forms act on the flat parameter vector, block by block (blocks on ``vec_r([W | b])``,
see :mod:`curvfx.operators.kfac`), with a diagonal for the other entries:

* :class:`KroneckerOperator`: ``⊕_l B_l ⊗ A_l ⊕ diag(d)`` (KFAC, or its π-damped inverse),
  a product is ``B X A`` per block (two matrix products);
* :class:`KroneckerEigenOperator`: ``⊕_l (Q_B ⊗ Q_A) diag(vec_r Λ_l) (Q_B ⊗ Q_A)ᵀ ⊕ diag(d)``
  (EKFAC, exactly damped inverses), a product is ``Q_B (Λ ⊙ Q_Bᵀ X Q_A) Q_Aᵀ`` (four).

Dense form, diagonal, trace and log-determinant are computed per block, never from P × P
products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvfx._arguments import check_number
from curvfx.operators._base import LinearOperator
from curvfx.operators._kfac_factors import KroneckerFactors

__all__ = [
    "INVERSE_METHODS",
    "KroneckerEigenOperator",
    "KroneckerOperator",
    "KroneckerSpectrum",
    "check_damping",
    "eigh_pair",
    "kfac_inverse",
    "spectrum_inverse",
]

INVERSE_METHODS = ("exact", "heuristic")
PyTree = Any


@dataclass
class KroneckerSpectrum:
    """``⊕_l (Q_B ⊗ Q_A) diag(vec_r Λ_l) (Q_B ⊗ Q_A)ᵀ ⊕ diag(d)`` over the flat parameters.

    Attributes:
        blocks: Per layer ``(index [out, in'], Q_B [out, out], Q_A [in', in'], Λ [out, in'])``.
        diagonal_index: [D] positions of the diagonal entries.
        diagonal: [D] their values.
        size: P.
    """

    blocks: list[tuple[Tensor, Tensor, Tensor, Tensor]]
    diagonal_index: Tensor
    diagonal: Tensor
    size: int


class KroneckerOperator(LinearOperator):
    """``⊕_l B_l ⊗ A_l ⊕ diag(d)`` from given factors (:class:`KroneckerFactors`), no data."""

    symmetric = True

    def __init__(self, factors: KroneckerFactors, params: PyTree = None):
        self.factors, self.params = factors, params

    shape = property(lambda self: (self.factors.size,) * 2, doc="(P, P).")
    dtype = property(lambda self: self.factors.diagonal.dtype, doc="The factors' dtype.")
    device = property(lambda self: self.factors.diagonal.device, doc="The factors' device.")
    in_like = property(lambda self: self.params, doc="The parameters (pytree inputs/outputs), or None.")
    out_like = in_like

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        f = self.factors
        out = torch.empty_like(V)
        for blk in f.blocks:
            out[blk.index] = torch.einsum("op,pjk,ji->oik", blk.B, V[blk.index], blk.A)  # B X A
        out[f.diagonal_index] = f.diagonal.unsqueeze(1) * V[f.diagonal_index]
        return out

    def to_dense(self) -> Tensor:
        """The matrix [P, P], assembled from ``kron(B, A)`` per block (P² memory)."""
        f = self.factors
        K = torch.zeros(f.size, f.size, dtype=self.dtype, device=self.device)
        for blk in f.blocks:
            i = blk.index.reshape(-1)
            K[i.unsqueeze(1), i] = torch.kron(blk.B, blk.A)
        K[f.diagonal_index, f.diagonal_index] = f.diagonal
        return K

    def _exact_diagonal(self) -> Tensor:
        f = self.factors
        d = torch.empty(f.size, dtype=self.dtype, device=self.device)
        for blk in f.blocks:  # diag(B ⊗ A) = diag(B) diag(A)ᵀ
            d[blk.index] = torch.outer(blk.B.diagonal(), blk.A.diagonal())
        d[f.diagonal_index] = f.diagonal
        return d

    def _exact_trace(self) -> Tensor:
        f = self.factors  # tr(B ⊗ A) = tr(B) tr(A)
        return sum((blk.B.trace() * blk.A.trace() for blk in f.blocks), f.diagonal.sum())

    def logdet(self) -> Tensor:
        """``Σ_l (in'·log det B_l + out·log det A_l) + Σ log d`` (-inf if singular, nan if indefinite)."""
        f = self.factors
        terms = [
            blk.A.shape[0] * torch.logdet(blk.B) + blk.B.shape[0] * torch.logdet(blk.A) for blk in f.blocks
        ]
        return sum(terms, torch.log(f.diagonal).sum())


class KroneckerEigenOperator(LinearOperator):
    """A symmetric operator given by a :class:`KroneckerSpectrum` (EKFAC, exactly damped inverses)."""

    symmetric = True

    def __init__(self, spectrum: KroneckerSpectrum, params: PyTree = None):
        self.spectrum, self.params = spectrum, params

    shape = property(lambda self: (self.spectrum.size,) * 2, doc="(P, P).")
    dtype = property(lambda self: self.spectrum.diagonal.dtype, doc="The spectrum's dtype.")
    device = property(lambda self: self.spectrum.diagonal.device, doc="The spectrum's device.")
    in_like = property(lambda self: self.params, doc="The parameters (pytree inputs/outputs), or None.")
    out_like = in_like

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        s = self.spectrum
        out = torch.empty_like(V)
        for index, QB, QA, values in s.blocks:
            X = torch.einsum("po,pjk,ji->oik", QB, V[index], QA)  # Q_Bᵀ X Q_A
            out[index] = torch.einsum("op,pjk,ij->oik", QB, values.unsqueeze(-1) * X, QA)  # Q_B (Λ ⊙ ·) Q_Aᵀ
        out[s.diagonal_index] = s.diagonal.unsqueeze(1) * V[s.diagonal_index]
        return out

    def to_dense(self) -> Tensor:
        """The matrix [P, P]; a block is ``Q diag(vec_r Λ) Qᵀ`` with ``Q = kron(Q_B, Q_A)``."""
        s = self.spectrum
        K = torch.zeros(s.size, s.size, dtype=self.dtype, device=self.device)
        for index, QB, QA, values in s.blocks:
            Q = torch.kron(QB, QA)
            i = index.reshape(-1)
            K[i.unsqueeze(1), i] = (Q * values.reshape(-1)) @ Q.T
        K[s.diagonal_index, s.diagonal_index] = s.diagonal
        return K

    def _exact_diagonal(self) -> Tensor:
        s = self.spectrum
        d = torch.empty(s.size, dtype=self.dtype, device=self.device)
        for index, QB, QA, values in s.blocks:  # diag[o, i] = Σ Q_B[o, o']² Λ[o', i'] Q_A[i, i']²
            d[index] = (QB**2) @ values @ (QA**2).T
        d[s.diagonal_index] = s.diagonal
        return d

    def _exact_trace(self) -> Tensor:
        s = self.spectrum
        return sum((values.sum() for *_, values in s.blocks), s.diagonal.sum())

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(· + λ I) = Σ log(Λ + λ)`` over the eigenvalues (clamped at 0: -inf if singular)."""
        damping = check_damping(damping)
        s = self.spectrum
        terms = [torch.log(values.clamp_min(0) + damping).sum() for *_, values in s.blocks]
        return sum(terms, torch.log(s.diagonal.clamp_min(0) + damping).sum())


def kfac_inverse(
    factors: KroneckerFactors,
    damping: float,
    method: str = "exact",
    *,
    params: PyTree = None,
    eigen: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
) -> KroneckerEigenOperator | KroneckerOperator:
    """Damped inverse of KFAC factors (of an operator, or running averages) as an operator.

    * ``"exact"``: ``(K + λ I)⁻¹``, per block ``(Q_B ⊗ Q_A) diag(1/(λ_B λ_Aᵀ + λ)) (Q_B ⊗ Q_A)ᵀ``
      from the eigendecompositions ``eigen`` (``(Q_B, λ_B, Q_A, λ_A)`` per block, computed
      when not given): a :class:`KroneckerEigenOperator`, four matrix products per block;
    * ``"heuristic"`` (π-damping, Martens & Grosse 2015, §6.3): per block
      ``(B + (√λ/π) I)⁻¹ ⊗ (A + π√λ I)⁻¹`` with ``π = √((tr A / in') / (tr B / out))``
      (π = 1 when either trace is 0), the factors inverted by Cholesky (no eigendecomposition):
      a :class:`KroneckerOperator`, two matrix products per block;

    the diagonal entries get ``1/(d + λ)`` in both.

    Args:
        factors: The factors (:attr:`curvfx.operators.kfac.KFACOperator.factors`).
        damping: λ ≥ 0; λ = 0 needs K to be nonsingular.
        method: ``"exact"`` or ``"heuristic"``.
        params: Parameter pytree that inputs may be shaped like (None: flat vectors only).
        eigen: Precomputed eigendecompositions of the factors (for ``"exact"``).

    Raises:
        ValueError: For λ < 0 or non-finite, an unknown ``method``, or a singular damped K.
    """
    damping = check_damping(damping)
    if method not in INVERSE_METHODS:
        raise ValueError(f"method: expected one of {INVERSE_METHODS}, got {method!r}")
    if method == "exact":
        eigen = eigen if eigen is not None else [eigh_pair(blk.B, blk.A) for blk in factors.blocks]
        blocks = [
            (blk.index, QB, QA, torch.outer(lB, lA)) for blk, (QB, lB, QA, lA) in zip(factors.blocks, eigen)
        ]
        spectrum = KroneckerSpectrum(blocks, factors.diagonal_index, factors.diagonal, factors.size)
        return spectrum_inverse(spectrum, damping, params)
    root, blocks = damping**0.5, []
    for blk in factors.blocks:
        pi = _pi(blk.A, blk.B)
        A_inv, B_inv = _damped_inverse(blk.A, root * pi), _damped_inverse(blk.B, root / pi)
        blocks.append(blk.with_factors(A_inv, B_inv))
    inverse = factors.with_values(blocks, _reciprocal(factors.diagonal + damping))
    return KroneckerOperator(inverse, params)


def spectrum_inverse(s: KroneckerSpectrum, damping: float, params: PyTree = None) -> KroneckerEigenOperator:
    """``(S + λ I)⁻¹``: the same eigenvectors, eigenvalues ``1/(Λ + λ)``."""
    damping = check_damping(damping)
    blocks = [(i, QB, QA, _reciprocal(values + damping)) for i, QB, QA, values in s.blocks]
    inverse = KroneckerSpectrum(blocks, s.diagonal_index, _reciprocal(s.diagonal + damping), s.size)
    return KroneckerEigenOperator(inverse, params)


def eigh_pair(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Q_B, λ_B, Q_A, λ_A)`` with eigenvalues clamped at 0 (the factors are PSD)."""
    lB, QB = _in_float32(torch.linalg.eigh, B)
    lA, QA = _in_float32(torch.linalg.eigh, A)
    return QB, lB.clamp_min(0), QA, lA.clamp_min(0)


def check_damping(damping: float) -> float:
    """``damping`` as a float if it is a finite number ≥ 0 (:func:`check_number`); else ``ValueError``."""
    return check_number(damping, "damping", strict=False)


def _pi(A: Tensor, B: Tensor) -> float:
    mean_a, mean_b = float(A.trace()) / A.shape[0], float(B.trace()) / B.shape[0]
    return (mean_a / mean_b) ** 0.5 if mean_a > 0 and mean_b > 0 else 1.0


def _damped_inverse(M: Tensor, shift: float) -> Tensor:
    """``(M + shift·I)⁻¹`` of a PSD matrix by Cholesky."""
    damped = M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    L, info = _in_float32(torch.linalg.cholesky_ex, damped)
    if int(info) != 0:
        raise ValueError("damping: the damped matrix is singular (a Kronecker factor); use damping > 0")
    return _in_float32(torch.cholesky_inverse, L)


def _in_float32(decomposition, M: Tensor):
    """``decomposition(M)``, computed in float32 for a 16-bit M (no 16-bit kernels), cast back."""
    if M.dtype not in (torch.float16, torch.bfloat16):
        return decomposition(M)
    out = decomposition(M.float())
    return (
        tuple(t.to(M.dtype) if t.is_floating_point() else t for t in out)
        if isinstance(out, tuple)
        else out.to(M.dtype)
    )


def _reciprocal(values: Tensor) -> Tensor:
    if values.numel() and not float(values.min()) > 0:
        raise ValueError(
            f"damping: the damped matrix is singular (smallest eigenvalue {float(values.min()):.3g}); "
            "use damping > 0"
        )
    return values.reciprocal()
