"""Layer-aware exact diagonals: per-sample gradients of known layers in factored form.

For a layer ``z = W a (+ b)`` (``nn.Linear``; ``nn.Conv1d/2d`` after unfolding the input
into patches) the gradient of sample n for a cotangent ``s`` at the model outputs is
``G_n = Σ_t g_nt a_ntᵀ`` with ``g = ∂⟨f, s⟩/∂z`` and t the positions (sequence steps,
spatial locations). The diagonal of ``Σ_n Σ_k J_nᵀ s_kn s_knᵀ J_n`` is ``Σ_n Σ_k G_kn ⊙ G_kn``:

* one position, one call of the layer: ``Σ_k Σ_n g_kn² a_nᵀ²`` — no per-sample gradient is
  formed (``einsum("kno,ni->oi", g², a²)``), the cost of K backward passes to the layer
  outputs (done as one batched backward) plus one contraction;
* several positions or calls (sequences, convolutions, a layer used twice): the per-sample
  layer gradients ``G_kn`` are formed for that layer only (K·N·|W| numbers) and squared.

Layer inputs and outputs are captured by forward hooks on the wrapped module that are
removed before returning, also on error. Parameters of other modules (and of modules
called with options this path does not cover) take the generic per-sample route
(:func:`curvfx._factors.factor_diagonal`) restricted to those parameters, so every model
the generic route accepts works, with the same numbers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvfx._factors import factor_diagonal
from curvfx._pytree import unsqueeze_leaves
from curvfx.functional import FunctionalModel

__all__ = ["structured_diagonal"]


def structured_diagonal(
    fn: FunctionalModel,
    params: dict[str, Tensor],
    x: Any,
    S: Tensor,
    chunk_size: int | None = None,
    per_sample: bool = False,
) -> dict[str, Tensor]:
    """``Σ_n Σ_k (J_nᵀ s_kn)²`` per parameter for ``S`` [K, N, *output_shape] (a dict like ``params``).

    With ``per_sample=True``: ``[Σ_k ‖J_nᵀ s_kn‖²]_n`` [N] per parameter instead. Known
    layers (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` with zero padding and one group)
    are handled in factored form; every other parameter by the generic route.
    """
    if S.shape[0] == 0:  # an empty factor (e.g. a loss linear in the outputs)
        return {k: S.new_zeros(S.shape[1]) if per_sample else torch.zeros_like(v) for k, v in params.items()}
    layers = _plan(fn.module, params)
    structured = {name for names in layers.values() for name in names.values()}
    diag: dict[str, Tensor] = {}
    if layers:
        records: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
        with torch.enable_grad(), _captured(records):
            p = {k: v.detach().requires_grad_(k in structured) for k, v in params.items()}
            outputs = fn(p, x)
        zs = [z for calls in records.values() for _, z in calls]
        grads = iter(_batched_grad(outputs, zs, S))  # ∂⟨f, s_k⟩/∂z for every call, [K, *z.shape]
        for module, calls in records.items():
            per_call = [(a, next(grads)) for a, _ in calls]
            diag.update(_layer_squares(module, layers[module], per_call, per_sample))
    generic = {k: v for k, v in params.items() if k not in structured}
    if generic:
        fixed = {k: v for k, v in params.items() if k in structured}

        def sample_outputs(sub, xn):
            return fn({**fixed, **sub}, unsqueeze_leaves(xn))[0]

        diag.update(factor_diagonal(sample_outputs, generic, x, S, chunk_size, per_sample))
    return {k: diag[k] for k in params}


def _plan(module: nn.Module, params: dict[str, Tensor]) -> dict[nn.Module, dict[str, str]]:
    """Supported layers owning trainable parameters: module -> {"weight"/"bias": param name}."""
    owners: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    plan = {}
    for prefix, m in module.named_modules():
        if not _supported(m):
            continue
        names = {}
        for attr, p in m.named_parameters(recurse=False):
            name = f"{prefix}.{attr}" if prefix else attr
            if name in params and owners[id(p)] == 1:
                names[attr] = name
        if names and "weight" in dict(m.named_parameters(recurse=False)):
            plan[m] = names
    return plan


def _supported(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    if type(m) in (nn.Conv1d, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return False


@contextlib.contextmanager
def _captured(records: dict[nn.Module, list[tuple[Tensor, Tensor]]]):
    """Record ``(input, output)`` of every call of the modules in ``records``; hooks removed on exit.

    The hook hands a copy of the output downstream, so later in-place operations cannot
    change the recorded output's gradient.
    """

    def hook(module, args, output):
        records[module].append((args[0].detach(), output))
        return output.clone()

    handles = [m.register_forward_hook(hook) for m in records]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _batched_grad(outputs: Tensor, zs: list[Tensor], S: Tensor) -> tuple[Tensor, ...]:
    """``∂⟨outputs, S[k]⟩/∂z`` for every z, stacked over k: one batched backward pass."""
    try:
        grads = torch.autograd.grad(outputs, zs, S, is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an operation without a batching rule: one backward per column
        cols = [torch.autograd.grad(outputs, zs, s, retain_graph=True, allow_unused=True) for s in S]
        grads = tuple(torch.stack(g) if g[0] is not None else None for g in zip(*cols))
    return tuple(  # a layer output that does not reach the outputs has zero gradient
        torch.zeros(S.shape[0], *z.shape, dtype=z.dtype, device=z.device) if g is None else g
        for g, z in zip(grads, zs)
    )


def _layer_squares(
    module: nn.Module, names: dict[str, str], calls: list[tuple[Tensor, Tensor]], per_sample: bool
) -> dict[str, Tensor]:
    """Squared per-sample gradients of ``module``'s parameters, from its calls ``[(a, ∂/∂z [K, ...])]``.

    Summed over samples and columns k (the diagonal, shaped like the parameter), or, with
    ``per_sample``, over columns and entries ([N]).
    """
    if type(module) is nn.Linear:
        flat = [
            (a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(*g.shape[:2], -1, g.shape[-1]))
            for a, g in calls
        ]
    else:
        flat = [(_patches(module, a), g.flatten(3)) for a, g in calls]
        flat = [(a.transpose(1, 2), g.transpose(2, 3)) for a, g in flat]
    # flat: [(a [N, T, in], g [K, N, T, out])]; per-sample gradient G_kn = Σ_calls Σ_t g_knt a_ntᵀ
    out = {}
    if len(flat) == 1 and flat[0][0].shape[1] == 1:  # one call, one position: factored
        a2, g2 = flat[0][0][:, 0] ** 2, flat[0][1][:, :, 0] ** 2  # [N, in], [K, N, out]
        if "weight" in names:
            w = "kno,ni->n" if per_sample else "kno,ni->oi"
            out[names["weight"]] = torch.einsum(w, g2, a2)
        if "bias" in names:
            out[names["bias"]] = g2.sum((0, 2)) if per_sample else g2.sum((0, 1))
    else:  # per-sample layer gradients, then squared
        if "weight" in names:
            grads = sum(torch.einsum("knto,nti->knoi", g, a) for a, g in flat)
            out[names["weight"]] = (grads**2).sum((0, 2, 3) if per_sample else (0, 1))
        if "bias" in names:
            bias = sum(g.sum(2) for _, g in flat) ** 2  # [K, N, out]
            out[names["bias"]] = bias.sum((0, 2)) if per_sample else bias.sum((0, 1))
    if not per_sample and "weight" in names:
        out[names["weight"]] = out[names["weight"]].reshape(module.weight.shape)
    return out


def _patches(conv: nn.Conv1d | nn.Conv2d, a: Tensor) -> Tensor:
    """im2col of the input: [N, C_in·k, L] with L the output positions."""
    if isinstance(conv, nn.Conv1d):  # as a 2-D convolution of height 1
        return F.unfold(
            a.unsqueeze(2),
            (1, conv.kernel_size[0]),
            dilation=(1, conv.dilation[0]),
            padding=(0, conv.padding[0]),
            stride=(1, conv.stride[0]),
        )
    return F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
