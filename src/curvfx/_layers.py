"""Per-sample gradients of one factored layer and their squares, from its inputs and output gradients.

Input: the calls ``[(a, g)]`` of one layer in a forward pass (:mod:`curvfx._capture`), with
``g = ∂⟨f, s_k⟩/∂z`` [K, *z.shape] the gradients at the layer output for K output-space
cotangents, given in column blocks (sums over k are taken block by block). Output, per
parameter: ``Σ_k Σ_n G_kn ⊙ G_kn`` (shaped like the parameter) with G_kn the per-sample
gradient of sample n for column k, or ``[Σ_k ‖G_kn‖²]_n`` [N] with ``per_sample``. Per
layer kind, with t the positions of a sample (sequence steps, output pixels) over all
calls of the layer:

* linear / convolution (patches ``a_nt`` per group): ``G_kn = Σ_t g_knt a_ntᵀ``, bias
  ``Σ_t g_knt``. One call at one position: ``Σ_k Σ_n g_kn² a_n²ᵀ``, no G_kn formed;
* embedding (ids ``i_nt``): ``G_kn = Σ_t e_{i_nt} g_kntᵀ``, the output gradients added into
  the rows of the ids, the padding row left out. Only the (sample, id) pairs that occur are
  formed: K·N·T·D numbers, never K·N·V·D;
* normalization (``x̂`` the normalized input): ``G_kn = Σ_t g_knt ⊙ x̂_nt`` for the scale,
  ``Σ_t g_knt`` for the shift, both [K, N, *shape].
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from curvfx._capture import layer_kind, patches

__all__ = ["layer_grads", "layer_squares", "reads_per_sample"]


def layer_squares(
    module: nn.Module,
    names: dict[str, str],
    calls: list[tuple[Tensor, list[Tensor]]],
    per_sample: bool,
    out: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Squared per-sample gradients of ``module``'s parameters ``names`` from its ``calls``.

    ``calls``: ``[(a, blocks)]`` with the output gradients in the column blocks of
    :func:`curvfx._capture.output_grads`; the squares are summed over the blocks. ``out``
    (optional, name -> tensor shaped like the result): where a result may be written
    instead of a new tensor (the caller's flat vector, saving a copy).
    """
    kind = layer_kind(module)
    if kind == "embedding":
        return {names["weight"]: _added(_embedding(module, block, per_sample) for block in _by_block(calls))}
    if kind == "norm":
        blocks = [_norm_grads(module, names, block) for block in _by_block(calls)]
    else:
        flat = [_positions(module, a, gs) for a, gs in calls]
        if len(flat) == 1 and flat[0][0].shape[1] == 1:  # one call, one position: factored
            return _outer_squares(module, names, flat[0], per_sample, out or {})
        blocks = [_linear_grads(module, names, block) for block in _by_block(flat)]
    reduce = (lambda G: (G**2).flatten(2).sum((0, 2))) if per_sample else (lambda G: (G**2).sum((0, 1)))
    return {names[attr]: _added(reduce(grads[attr]) for grads in blocks) for attr in blocks[0]}


def layer_grads(
    module: nn.Module, names: dict[str, str], calls: list[tuple[Tensor, list[Tensor]]]
) -> dict[str, Tensor]:
    """Per-sample gradients ``G_kn`` [K, N, *shape] of ``module``'s parameters ``names`` (by name).

    Linear layers, convolutions and normalization layers (the formulas of the module
    docstring); not embeddings, whose per-sample gradients are [K, N, V, D] dense tables.
    ``calls`` as in :func:`layer_squares`, with one column block.
    """
    if layer_kind(module) == "norm":
        (block,) = _by_block(calls)
        grads = _norm_grads(module, names, block)
    else:
        (block,) = _by_block([_positions(module, a, gs) for a, gs in calls])
        grads = _linear_grads(module, names, block)
    return {names[attr]: G for attr, G in grads.items()}


def _by_block(calls: list[tuple[Tensor, list[Tensor]]]) -> list[list[tuple[Tensor, Tensor]]]:
    """``[(a, blocks)]`` per call -> per column block, the calls ``[(a, g_block)]``."""
    return [[(a, gs[b]) for a, gs in calls] for b in range(len(calls[0][1]))]


def reads_per_sample(module: nn.Module, calls: list[tuple[Tensor, Tensor]], n: int) -> bool:
    """Whether a layer's calls can be read per sample: called, differentiable, batch-first.

    A layer that was not called, was called without gradient, or whose input does not
    lead with the N samples (rows of a flattened batch, a sequence-first layout, a
    parameter broadcast over samples, an unbatched convolution input) takes the generic
    route instead.
    """
    kind = layer_kind(module)
    if kind == "conv":
        least = len(module.kernel_size) + 2
    elif kind == "embedding":
        least = 1
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        least = len(module.normalized_shape) + 1
    else:
        least = 2
    return bool(calls) and all(z.requires_grad and a.dim() >= least and a.shape[0] == n for a, z in calls)


def _positions(module: nn.Module, a: Tensor, blocks: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A call as ``a`` [N, T, G, in] and blocks ``g`` [k_b, N, T, G, out] (G groups; 1 for a linear layer)."""
    if type(module) is nn.Linear:
        a = a.reshape(a.shape[0], -1, 1, a.shape[-1])
        return a, [g.reshape(*g.shape[:2], -1, 1, g.shape[-1]) for g in blocks]
    flat = [g.flatten(3).transpose(2, 3) for g in blocks]  # [k_b, N, T, out]
    return patches(module, a), [g.reshape(*g.shape[:3], module.groups, -1) for g in flat]


def _outer_squares(
    module: nn.Module,
    names: dict[str, str],
    call: tuple[Tensor, list[Tensor]],
    per_sample: bool,
    out: dict[str, Tensor],
) -> dict[str, Tensor]:
    """One position: ``Σ_k (g_k aᵀ)² = (Σ_k g_k²) (a²)ᵀ``, contracted without forming G_kn."""
    a = call[0][:, 0]  # [N, G, in]
    a2 = a * a
    g2 = _added(_squares_over_columns(g[:, :, 0]) for g in call[1])  # Σ_k g_k² [N, G, out]
    result = {}
    if "weight" in names:
        if per_sample:  # Σ_g (Σ_o g²)(Σ_i a²)
            result[names["weight"]] = (g2.sum(2) * a2.sum(2)).sum(1)
        else:  # Σ_n g_n² a_n²ᵀ per group: one batched matrix product [G, out, in]
            dtype = torch.promote_types(g2.dtype, a2.dtype)  # under autocast they may differ
            into = out.get(names["weight"])
            into = (
                None
                if into is None or into.dtype != dtype
                else into.view(a.shape[1], g2.shape[-1], a.shape[-1])
            )
            with torch.autocast(a.device.type, enabled=False):  # summed in that precision
                w = torch.bmm(g2.permute(1, 2, 0).to(dtype), a2.transpose(0, 1).to(dtype), out=into)
            result[names["weight"]] = w.reshape(module.weight.shape)
    if "bias" in names:
        result[names["bias"]] = g2.sum((1, 2)) if per_sample else g2.sum(0).reshape(-1)
    return result


def _squares_over_columns(g: Tensor) -> Tensor:
    """``Σ_k g_k²`` over the first dimension (no sum for one column)."""
    return g[0] * g[0] if g.shape[0] == 1 else (g * g).sum(0)


def _linear_grads(
    module: nn.Module, names: dict[str, str], flat: list[tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """Per-sample gradients [k_b, N, *shape] of a linear layer or convolution (one column block)."""
    grads = {}
    k, n = flat[0][1].shape[:2]
    if "weight" in names:  # G_kn = Σ_calls Σ_t g_knt a_ntᵀ, per group
        w = _added(torch.einsum("kntgo,ntgi->kngoi", g, a) for a, g in flat)
        grads["weight"] = w.reshape(k, n, *module.weight.shape)
    if "bias" in names:
        grads["bias"] = _added(g.sum(2) for _, g in flat).reshape(k, n, -1)
    return grads


def _added(terms: Iterable[Tensor]) -> Tensor:
    """The sum of new tensors, accumulated into the first (``sum`` would copy it once more)."""
    terms = iter(terms)
    total = next(terms)
    for term in terms:
        total += term
    return total


def _norm_grads(
    module: nn.Module, names: dict[str, str], calls: list[tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """Per-sample gradients [K, N, *shape] of a normalization layer's scale and shift."""
    shape = module.weight.shape
    grads = {}
    for xhat, g in calls:
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):  # [K, N, positions, *normalized_shape]
            g = g.reshape(*g.shape[:2], -1, *shape)
            xhat = xhat.reshape(xhat.shape[0], -1, *shape)
        else:  # channels on dim 1: [K, N, C, positions] -> [K, N, positions, C]
            g = g.reshape(*g.shape[:3], -1).transpose(2, 3)
            xhat = xhat.reshape(*xhat.shape[:2], -1).transpose(1, 2)
        terms = {"weight": (g * xhat).sum(2), "bias": g.sum(2)}
        for attr in names:
            grads[attr] = terms[attr] if attr not in grads else grads[attr] + terms[attr]
    return grads


def _embedding(module: nn.Embedding, calls: list[tuple[Tensor, Tensor]], per_sample: bool) -> Tensor:
    """Squared per-sample gradients of an embedding table, by (sample, id) pair."""
    ids = torch.cat([i.reshape(i.shape[0], -1) for i, _ in calls], 1)  # [N, T]
    g = torch.cat([g.reshape(*g.shape[:2], -1, g.shape[-1]) for _, g in calls], 2)  # [K, N, T, D]
    k, n, t, d = g.shape
    vocab = module.num_embeddings
    if module.padding_idx is not None:  # that row gets no gradient
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    if t == 1:  # one id per sample: its row gets g_kn, so G_kn² = e_i (g_kn²)ᵀ
        g2 = (g[:, :, 0] ** 2).sum(0)  # [N, D]
        if per_sample:
            return g2.sum(1)
        return g2.new_zeros(vocab, d).index_add_(0, ids[:, 0], g2)
    # one row per (sample, id) pair that occurs: Σ over the positions with that pair
    pairs, where = torch.unique(
        torch.arange(n, device=ids.device).unsqueeze(1) * vocab + ids, return_inverse=True
    )
    rows = g.new_zeros(k, pairs.numel(), d).index_add_(1, where.reshape(-1), g.reshape(k, n * t, d))
    squares = (rows**2).sum(0)  # [pairs, D]
    if per_sample:
        return squares.new_zeros(n).index_add_(0, pairs // vocab, squares.sum(1))
    return squares.new_zeros(vocab, d).index_add_(0, pairs % vocab, squares)
