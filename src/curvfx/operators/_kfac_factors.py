"""KFAC's Kronecker factors from data: layer-input and output-gradient second moments.

Notation (one supported layer l, ``z = W a + b``; ``nn.Conv1d/2d`` on unfolded patches):

* ``ã_nt = [a_nt; 1]`` [in'] is the input of sample n at position t (sequence step or
  output pixel, T positions) with a one appended when the bias is a parameter (bias = an
  extra input column: the block covers ``θ_l = vec_r([W | b])``, row-major [out, in']);
* ``g_knt = ∂⟨f, s_kn⟩/∂z_nt`` [out], the gradient at the layer output for the output
  factor column ``s_k`` (:func:`curvfx._factors.output_factor`: the loss's Hessian factor
  for "type-2", ``√(Z/M) ∇_f L(f, ỹ_m)`` at M sampled targets for "mc", at the observed
  targets for "empirical"; ``Σ_k s_kn s_knᵀ`` carries the loss's reduction, 1/Z);
* batches b weigh as in the other operators: ``w_b = Z_b / Σ_b' Z_b'`` for a mean
  reduction, ``w_b = 1`` for "sum".

Factors (``N_tot`` samples over all batches, ``T_n`` positions of sample n)::

    expand:  A = Σ_n Σ_t ã_nt ã_ntᵀ / Σ_n T_n,   B = Σ_b w_b Σ_{n∈b} Σ_k Σ_t g_knt g_kntᵀ
    reduce:  A = Σ_n ā_n ā_nᵀ / N_tot,          B = Σ_b w_b Σ_{n∈b} Σ_k ḡ_kn ḡ_knᵀ,
             ā_n = mean_t ã_nt,  ḡ_kn = Σ_t g_knt

A layer called several times in one forward pass has its calls' positions concatenated.
"expand" reads every row of a call's input alike; "reduce" and EKFAC read them per sample
(:mod:`curvfx.operators._kfac_samples`: batch-first or sequence-first calls; any other
input, or one not computed from the batch, raises ``ValueError`` naming the layer).
The eigenvalue corrections of EKFAC are the exact curvature's diagonal in the eigenbasis
``Q_B ⊗ Q_A`` of the factors: ``E = Σ_b w_b Σ_n Σ_k (Q_Bᵀ G_kn Q_A)²`` with the per-sample
layer gradient ``G_kn = Σ_t g_knt ã_ntᵀ`` [out, in'] (for both approximations).
Parameters outside supported layers get the exact diagonal ``Σ_b w_b Σ_n Σ_k (J_nᵀ s_kn)²``.

A model whose forward pass couples the samples (BatchNorm in train mode) makes ``g_knt``
depend on the factor entries ``s_kn'`` of every sample n' that z_nt reaches, so ``B`` holds
the cross-sample products ``s_kn s_kn'ᵀ`` (n ≠ n'). For "type-2" they are arbitrary: any
re-pairing of the per-sample factors' columns across samples is an equally valid factor
of the loss Hessian, and changes B, so it is refused. For "mc" the columns are the
sampled gradients, zero-mean and independent across samples: the cross terms vanish in
expectation, leaving each sample's block of the outputs' Fisher. "empirical" takes the
batch loss's gradient back-propagated through the coupling, ``g_nt = √Z · ∂L/∂z_nt``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._capture import captured, output_grads, positions, supported_layers
from curvfx._errors import check_autograd, check_output, sample_row
from curvfx._factors import factor_diagonal, output_factor
from curvfx._pytree import unsqueeze_leaves
from curvfx._structured import tracked_batch
from curvfx.functional import FunctionalModel, check_independent_samples
from curvfx.losses import Loss
from curvfx.operators._data import Batches
from curvfx.operators._kfac_moments import add_input_moment, add_second_moment
from curvfx.operators._kfac_samples import (
    batch_first,
    check_called_with_gradient,
    check_from_batch,
    check_pairing,
    check_used_in_calls,
    sample_axes,
)

__all__ = [
    "FISHER_TYPES",
    "KFAC_APPROXIMATIONS",
    "KroneckerBlock",
    "KroneckerFactors",
    "eigenvalue_corrections",
    "kronecker_factors",
    "layout",
    "moving_average",
]

FISHER_TYPES = ("type-2", "mc", "empirical")
Layers = dict[nn.Module, dict[str, str]]  # supported layer -> {"weight"/"bias": parameter name}
KFAC_APPROXIMATIONS = ("expand", "reduce")
_KIND = {"type-2": "ggn", "mc": "mc", "empirical": "empirical"}


@dataclass
class KroneckerBlock:
    """One layer's block ``B ⊗ A`` on ``θ_l = vec_r([W | b])`` (``kron(B, A)`` in torch's order).

    Attributes:
        module: Name of the layer in the model.
        params: ``"weight"``/``"bias"`` -> parameter name.
        shape: ``(out, in')``, the shape of ``[W | b]``.
        offsets: Positions of the weight's and the bias's first entries in the flat
            parameter vector (None where not a parameter).
        A: [in', in'] input second moment (None before the factors are computed).
        B: [out, out] output-gradient second moment.
    """

    module: str
    params: dict[str, str]
    shape: tuple[int, int]
    offsets: tuple[int | None, int | None]
    device: torch.device
    A: Tensor | None = None
    B: Tensor | None = None

    @functools.cached_property
    def index(self) -> Tensor:
        """[out, in'] position of each entry of ``[W | b]`` in the flat vector (built on first use)."""
        out, size_in = self.shape
        weight, bias = self.offsets
        columns = []
        if weight is not None:
            width = size_in - (bias is not None)
            columns.append(torch.arange(weight, weight + out * width, device=self.device).view(out, width))
        if bias is not None:
            columns.append(torch.arange(bias, bias + out, device=self.device).unsqueeze(1))
        return columns[0] if len(columns) == 1 else torch.cat(columns, 1)

    def with_factors(self, A: Tensor, B: Tensor) -> KroneckerBlock:
        """The same block with other factors (the index shared)."""
        new = dataclasses.replace(self, A=A, B=B)
        if "index" in self.__dict__:
            new.__dict__["index"] = self.index
        return new


@dataclass
class KroneckerFactors:
    """KFAC over all parameters: Kronecker blocks, and a diagonal for the other entries.

    Attributes:
        blocks: One :class:`KroneckerBlock` per supported layer.
        diagonal_params: Names of the parameters with a diagonal block.
        diagonal_spans: Their ``(offset, numel)`` in the flat parameter vector.
        diagonal: [D] the exact curvature diagonal there.
        size: P.
    """

    blocks: list[KroneckerBlock]
    diagonal_params: list[str]
    diagonal_spans: list[tuple[int, int]]
    diagonal: Tensor
    size: int

    @functools.cached_property
    def diagonal_index(self) -> Tensor:
        """[D] positions of the diagonal entries in the flat vector (built on first use)."""
        device = self.diagonal.device
        parts = [torch.arange(start, start + n, device=device) for start, n in self.diagonal_spans]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def with_values(self, blocks: list[KroneckerBlock], diagonal: Tensor) -> KroneckerFactors:
        """The same structure with other blocks' factors and diagonal (index shared)."""
        new = dataclasses.replace(self, blocks=blocks, diagonal=diagonal)
        if "diagonal_index" in self.__dict__:
            new.__dict__["diagonal_index"] = self.diagonal_index
        return new


def layout(
    model_fn: FunctionalModel, params: dict[str, Tensor], layers: Layers | None = None
) -> KroneckerFactors:
    """The block structure of ``params`` (no data read): factors are None, the diagonal zero.

    ``layers``: :func:`~curvfx._capture.supported_layers` of the model, if already found.
    """
    layers = supported_layers(model_fn.module, params) if layers is None else layers
    names = _module_names(model_fn.module, layers)
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = start
        start += p.numel()
    first = next(iter(params.values()))
    blocks = []
    for module, owned in layers.items():
        weight, bias = owned.get("weight"), owned.get("bias")
        out = params[weight].shape[0] if weight else params[bias].shape[0]
        size_in = (params[weight].numel() // out if weight else 0) + (bias is not None)
        where = (offsets[weight] if weight else None, offsets[bias] if bias else None)
        blocks.append(KroneckerBlock(names[module], dict(owned), (out, size_in), where, first.device))
    covered = {name for blk in blocks for name in blk.params.values()}
    rest = [name for name in params if name not in covered]
    spans = [(offsets[n], params[n].numel()) for n in rest]
    diagonal = torch.zeros(sum(n for _, n in spans), dtype=first.dtype, device=first.device)
    return KroneckerFactors(blocks, rest, spans, diagonal, start)


def kronecker_factors(
    model_fn: FunctionalModel,
    loss: Loss,
    params: dict[str, Tensor],
    data: Batches,
    *,
    fisher_type: str,
    kfac_approx: str,
    num_samples: int,
    seed: int,
) -> KroneckerFactors:
    """The factors A, B of every supported layer and the other parameters' exact diagonal.

    One forward pass and one batched backward pass of the K factor columns per batch (see
    the module docstring for the formulas), plus the per-sample route for the parameters
    outside supported layers.
    """
    layers = supported_layers(model_fn.module, params)
    factors = layout(model_fn, params, layers)
    blocks = {blk.module: blk for blk in factors.blocks}
    dtype, device = factors.diagonal.dtype, factors.diagonal.device
    summed = torch.promote_types(dtype, torch.float32)  # sums of squares overflow 16 bits
    for blk in factors.blocks:  # running means of Σ ã ãᵀ and Σ_b z_b Σ g gᵀ: uninitialized until written
        size_out, size_in = blk.shape
        blk.A = torch.empty(size_in, size_in, dtype=summed, device=device)
        blk.B = torch.empty(size_out, size_out, dtype=summed, device=device)
    counts = dict.fromkeys(blocks, 0)  # rows in A's mean
    weights = dict.fromkeys(blocks, 0.0)  # Σ_b z_b in B's mean ("mean" reduction; B sums for "sum")
    written = dict.fromkeys(blocks, False)
    mean = loss.reduction != "sum"
    diagonal, z_total = 0.0, 0.0
    reader = "reduce" if kfac_approx == "reduce" else None
    for z, x, S, read in _layer_batches(
        model_fn, loss, params, data, layers, fisher_type, num_samples, seed, reader
    ):
        for module, (a, gs) in read.items():
            if kfac_approx == "reduce":  # ā_n = mean_t ã_nt, ḡ_kn = Σ_t g_knt
                a, gs = (None if a is None else a.mean(1)), [g.sum(2) for g in gs]
            rows = gs[0].shape[1] * (gs[0].shape[2] if gs[0].dim() == 4 else 1)  # N·T (expand) or N (reduce)
            blk = blocks[module]
            keep_a, scale_a = _running(counts[module], rows, written[module])
            if mean:  # B as the running mean Σ_b z_b (·) / Σ_b z_b
                keep_b, scale_b = _running(weights[module], z, written[module])
            else:  # as the plain sum
                keep_b, scale_b = float(written[module]), 1.0
            add_input_moment(blk.A, a, rows, keep_a, scale_a)
            for b, g in enumerate(gs):  # z_b Σ_k Σ_n Σ_t g gᵀ, column block by column block
                add_second_moment(blk.B, g, keep_b if b == 0 else 1.0, z * scale_b)
            counts[module] += rows
            weights[module] += z
            written[module] = True
        if factors.diagonal_params:
            diagonal = diagonal + z * _diagonal(model_fn, params, factors.diagonal_params, x, S)
        z_total += z
    norm = _normalizer(loss, z_total)  # Σ_b w_b (·): w_b = Z_b / Σ Z, or 1
    for module, blk in blocks.items():
        if not written[module]:  # a layer never called: a zero block
            blk.A.zero_()
            blk.B.zero_()
        elif mean and weights[module] != norm:  # a layer left out of some batches: B's mean over all
            blk.B.mul_(weights[module] / norm)
        blk.A, blk.B = blk.A.to(dtype), blk.B.to(dtype)
    if factors.diagonal_params:
        factors.diagonal = diagonal / norm
    return factors


def eigenvalue_corrections(
    model_fn: FunctionalModel,
    loss: Loss,
    params: dict[str, Tensor],
    data: Batches,
    bases: dict[str, tuple[Tensor, Tensor]],
    *,
    fisher_type: str,
    num_samples: int,
    seed: int,
) -> dict[str, Tensor]:
    """EKFAC's ``E`` [out, in'] per block (module docstring) in the bases ``module -> (Q_B, Q_A)``.

    Same passes over the data as :func:`kronecker_factors` (the same targets for "mc").
    Per-sample layer gradients are formed only for layers with several positions, one
    factor column at a time (N·out·in' numbers). Sequence-first layer inputs are read
    with their axes swapped; other inputs without the samples on dim 0 raise ``ValueError``.
    """
    sums: dict[str, Any] = {m: None for m in bases}
    z_total = 0.0
    layers = supported_layers(model_fn.module, params)
    batches = _layer_batches(model_fn, loss, params, data, layers, fisher_type, num_samples, seed, "ekfac")
    for z, _, _, read in batches:
        for module, (a, gs) in read.items():
            QB, QA = bases[module]
            # Q_Aᵀ ã [N, T, in'] with ã = [a; 1]: a Q_A[:in] + Q_A[in] (no concatenation)
            if a is None:
                a_rot = QA[-1].expand(*gs[0].shape[1:3], 1)
            else:
                a_rot = a @ QA[: a.shape[-1]] + (QA[-1] if QA.shape[0] > a.shape[-1] else 0.0)
            for g in gs:
                g_rot = g @ QB  # Q_Bᵀ g [k_b, N, T, out]
                if a_rot.shape[1] == 1:  # one position: (Q_Bᵀ G Q_A)² = (Q_Bᵀ g)² (Q_Aᵀ ã)²ᵀ
                    e = torch.einsum("kno,ni->oi", g_rot[:, :, 0] ** 2, a_rot[:, 0] ** 2)
                else:
                    zero = a_rot.new_zeros(g_rot.shape[-1], a_rot.shape[-1])  # a block may have no columns
                    e = sum(((torch.einsum("nto,nti->noi", gk, a_rot) ** 2).sum(0) for gk in g_rot), zero)
                sums[module] = e * z if sums[module] is None else sums[module].add_(e, alpha=z)
        z_total += z
    norm = _normalizer(loss, z_total)
    out = {}
    for module, (QB, QA) in bases.items():
        e = sums[module]
        out[module] = QB.new_zeros(QB.shape[0], QA.shape[0]) if e is None else e / norm
    return out


def moving_average(old: KroneckerFactors, new: KroneckerFactors, decay: float) -> KroneckerFactors:
    """``decay · old + (1 - decay) · new`` factor by factor (same structure)."""
    blocks = [
        o.with_factors(torch.lerp(n.A, o.A, decay), torch.lerp(n.B, o.B, decay))
        for o, n in zip(old.blocks, new.blocks)
    ]
    return old.with_values(blocks, torch.lerp(new.diagonal, old.diagonal, decay))


def _layer_batches(
    model_fn: FunctionalModel,
    loss: Loss,
    params: dict[str, Tensor],
    data: Batches,
    layers: Layers,
    fisher_type: str,
    num_samples: int,
    seed: int,
    reader: str | None = None,
) -> Iterator[tuple[float, Any, Tensor, dict[str, tuple[Tensor | None, list[Tensor]]]]]:
    """Per batch: ``(Z_b or 1, x, S, {module: (a [N, T, in] or None, [g [k_b, N, T, out]])})``.

    ``a`` is the layers' input (None when the weight is not a parameter: ``ã = 1``), the
    calls of a layer concatenated along the positions T; the output gradients come in the
    column blocks of :func:`curvfx._capture.output_grads` (K columns in all). ``reader``
    (a key of :data:`~curvfx.operators._kfac_samples.PER_SAMPLE`) asks for N to be the
    samples (:func:`~curvfx.operators._kfac_samples.sample_axes`); without it, dim 0 of
    each call is taken as it is (all rows count alike for "expand").
    """
    check_autograd()
    check_pairing(model_fn, fisher_type)
    names = _module_names(model_fn.module, layers)
    mean = loss.reduction != "sum"
    device = next(iter(params.values())).device
    for b, (x, y) in enumerate(data):
        records: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
        checked = reader or ("type-2" if fisher_type == "type-2" else None)  # inputs from the batch
        inputs, batch = (x, []) if checked is None else tracked_batch(x)  # followed through the graph
        raw: dict[int, Any] = {}  # id(z) -> the call's input, with its graph
        with torch.enable_grad(), captured(records, raw):
            p = {k: v.detach().requires_grad_() for k, v in params.items()}
            outputs = check_output(model_fn(p, inputs))
        check_called_with_gradient(records, names)
        check_used_in_calls(outputs, p, layers, records, names)
        generator = torch.Generator(device).manual_seed(seed + b) if fisher_type == "mc" else None
        S = output_factor(loss, outputs.detach(), y, _KIND[fisher_type], num_samples, generator)
        if checked is not None:  # before output_grads, which may free the graph
            check_from_batch(batch, records, raw, names, checked)
        if reader is None:
            axes = {m: [0] * len(calls) for m, calls in records.items()}
        else:
            axes = sample_axes(outputs, records, S.shape[1], names, reader)
        zs = [z for calls in records.values() for _, z in calls]
        if S.shape[0] == 0:  # an empty factor (a loss linear in the outputs)
            grads = iter([[z.new_zeros(0, *z.shape)] for z in zs])
        else:
            grads = iter(output_grads(outputs, zs, S) if zs else ())
        per_layer = {}
        for module, calls in records.items():
            flat = [
                positions(module, *batch_first(a, next(grads), axis))
                for (a, _), axis in zip(calls, axes[module])
            ]
            if flat:  # several calls: their positions concatenated, column block by block
                a = flat[0][0] if len(flat) == 1 else torch.cat([a for a, _ in flat], 1)
                gs = flat[0][1] if len(flat) == 1 else [torch.cat(g, 2) for g in zip(*(gs for _, gs in flat))]
                per_layer[names[module]] = (a if "weight" in layers[module] else None, gs)
        z = float(loss.normalizer(y)) if mean else 1.0
        del outputs, records, raw, zs, grads  # the batch's graph, freed before the next forward pass
        yield z, x, S, per_layer


def _running(total: float, added: float, written: bool) -> tuple[float, float]:
    """``(keep, 1 / new)`` that turn a mean over ``total`` into one over ``new = total + added``.

    ``keep = 0`` where nothing was written yet; a new total of 0 (all-ignored batches,
    whose terms are zero) gives ``(0, 0)``.
    """
    new = total + added
    if new == 0:
        return 0.0, 0.0
    return (total / new if written else 0.0), 1.0 / new


def _normalizer(loss: Loss, z_total: float) -> float:
    """Σ_b Z_b for a mean reduction (batches whose positions are all ignored add 0), 1 for "sum"."""
    if loss.reduction == "sum":
        return 1.0
    if not z_total > 0:
        raise ValueError("data: every target position is ignored (the mean's normalizer is 0)")
    return z_total


def _diagonal(
    model_fn: FunctionalModel, params: dict[str, Tensor], names: list[str], x: Any, S: Tensor
) -> Tensor:
    """Exact ``Σ_n Σ_k (J_nᵀ s_kn)²`` of the parameters ``names``, flat [D]."""
    check_independent_samples(
        model_fn,
        f"the exact diagonal blocks of {names}",
        "call model.eval() or leave those parameters out of params=",
    )
    generic = {k: params[k] for k in names}
    fixed = {k: v for k, v in params.items() if k not in generic}
    if S.shape[0] == 0:
        return torch.cat([v.new_zeros(v.numel()) for v in generic.values()])

    def sample_outputs(sub, xn):
        return sample_row(model_fn({**fixed, **sub}, unsqueeze_leaves(xn)))

    size = sum(v.numel() for v in generic.values())
    chunk = max(1, 2**24 // max(1, S.shape[0] * size))
    diag = factor_diagonal(sample_outputs, generic, x, S, chunk)
    return torch.cat([diag[k].reshape(-1) for k in names])


def _module_names(root: nn.Module, modules: Iterable[nn.Module]) -> dict[nn.Module, str]:
    """Each of ``modules``' name in ``root`` (its first, for a module registered twice)."""
    first: dict[nn.Module, str] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        first.setdefault(m, name)
    return {m: first[m] for m in modules}
