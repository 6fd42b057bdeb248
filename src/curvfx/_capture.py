"""Capture of layer inputs and output gradients for the layer-aware computations.

:func:`captured` records each call's ``(input a, output z)`` of chosen modules with forward
hooks that are removed on exit (also on error), :func:`output_grads` back-propagates K
output-space cotangents to every recorded z (in column blocks).
:func:`supported_layers` picks the layers read this way:

* the Kronecker layers (KFAC's blocks; the default): ``nn.Linear``, and ``nn.Conv1d/2d``
  with one group and numeric zero padding, whose per-sample weight gradient is
  ``Σ_t g_kt a_tᵀ`` over positions t: :func:`positions` puts a call into the form
  ``a`` [N, T, in], ``g`` [k_b, N, T, out] per column block (convolutions on unfolded
  patches, :func:`unfold`);
* with ``factored=True`` (the exact diagonals, :mod:`curvfx._layers`) also ``nn.Conv3d``,
  grouped convolutions and any padding mode (:func:`patches`), ``nn.Embedding``, and the
  affine parameters of ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and
  ``nn.BatchNorm1d/2d/3d`` in eval mode, for which the recorded input is the normalized
  input ``x̂`` (the gradient of the scale is ``Σ g ⊙ x̂``), computed in the hook from the
  statistics the call used.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from curvfx import _chunking
from curvfx._graph import leaf_inputs

__all__ = [
    "captured",
    "layer_kind",
    "output_grads",
    "parameter_uses",
    "patches",
    "positions",
    "supported_layers",
    "unfold",
]

NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def supported_layers(
    module: nn.Module, params: dict[str, Tensor], *, factored: bool = False
) -> dict[nn.Module, dict[str, str]]:
    """Supported layers owning trainable parameters: module -> {"weight"/"bias": param name}.

    ``factored=False``: the Kronecker layers only (``nn.Linear``, ``nn.Conv1d/2d`` with one
    group and numeric zero padding); ``True``: every layer of :func:`layer_kind`.
    """
    owners: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    plan = {}
    for prefix, m in module.named_modules():
        if not (layer_kind(m) if factored else _kronecker(m)):
            continue
        names = {}
        for attr, p in m.named_parameters(recurse=False):
            name = f"{prefix}.{attr}" if prefix else attr
            if name in params and owners[id(p)] == 1:
                names[attr] = name
        if names and "weight" in dict(m.named_parameters(recurse=False)):
            plan[m] = names
    return plan


def layer_kind(m: nn.Module) -> str | None:
    """The kind of a layer the exact diagonals factor ("linear", "conv", "embedding", "norm"), else None."""
    if _hooked(m):  # hooks may change what the layer computes
        return None
    kind = type(m)
    if kind is nn.Linear:
        return "linear"
    if kind in CONVS:
        return "conv"
    if kind is nn.Embedding:
        return "embedding" if m.max_norm is None and not m.scale_grad_by_freq else None
    if kind in NORMS[3:]:  # eval mode with running statistics: samples are independent
        return "norm" if not m.training and m.running_mean is not None and m.running_var is not None else None
    if kind in NORMS:
        return "norm"
    return None


def _kronecker(m: nn.Module) -> bool:
    if _hooked(m):
        return False
    if type(m) is nn.Linear:
        return True
    if type(m) in (nn.Conv1d, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return False


@contextlib.contextmanager
def captured(records: dict[nn.Module, list[tuple[Tensor, Tensor]]], inputs: dict[int, Any] | None = None):
    """Record ``(input, output)`` of every call of the modules in ``records``; hooks removed on exit.

    The input of a normalization layer is recorded normalized (``x̂``, without the affine
    map), any input detached. The hook hands a copy of the output downstream, so later
    in-place operations cannot change the recorded output's gradient. ``inputs``
    (optional): also keep each call's input as given, with its graph, under ``id(output)``.
    """

    def hook(module, args, kwargs, output):
        given = args[0] if args else kwargs.get("input")  # layer(x) or layer(input=x)
        if not isinstance(given, Tensor):  # not recorded: the layer takes the generic route
            return None
        records[module].append((_layer_input(module, given), output))
        if inputs is not None:
            inputs[id(output)] = given
        return output.clone()

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in records]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def output_grads(outputs: Tensor, zs: list[Tensor], S: Tensor) -> list[list[Tensor]]:
    """``∂⟨outputs, S[k]⟩/∂z`` for every z, in column blocks.

    Each z gets a list of blocks [k_b, *z.shape] that cover the K columns in order, with
    the same partition for every z: one block from one batched backward pass (vmap over
    the K columns) when K copies of the largest z fit in
    :data:`curvfx._chunking.COLUMN_NUMBERS` numbers; otherwise (large activations, where
    batching is slower: a CNN's type-2 KFAC factors took 1.3× the time of a loop) and for
    operations without a batching rule, one block per column from one backward pass each
    through the kept graph. Callers sum over the columns block by block: stacking the
    looped columns (a copy of K·|z| numbers) took a sixth of a CNN's exact diagonal.
    """
    k = S.shape[0]
    largest = max((z.numel() for z in zs), default=0)
    try:
        if k == 1:  # one column: a plain backward pass (no vmap overhead), same numbers
            return _blocks(zs, [_one_column(torch.autograd.grad(outputs, zs, S[0], allow_unused=True))], 1)
        if k * largest <= _chunking.COLUMN_NUMBERS:
            batched = torch.autograd.grad(  # the graph kept for the loop if a batching rule is missing
                outputs, zs, S, is_grads_batched=True, allow_unused=True, retain_graph=True
            )
            return _blocks(zs, [batched], k)
    except RuntimeError:  # an operation without a batching rule: the loop below
        pass
    columns = [torch.autograd.grad(outputs, zs, s, retain_graph=True, allow_unused=True) for s in S]
    return _blocks(zs, [_one_column(grads) for grads in columns], 1)


def parameter_uses(outputs: Tensor, params: list[Tensor]) -> list[int]:
    """How many operations of the autograd graph of ``outputs`` take each leaf of ``params`` as input.

    A supported layer's formulas cover the parameter uses inside its recorded calls, one
    per call; a parameter also used elsewhere (``F.linear(x, layer.weight)`` outside the
    layer, a penalty on the weight) has more, and must take the generic route.
    """
    index = {id(t): i for i, t in enumerate(params)}
    counts = [0] * len(params)
    for leaf in leaf_inputs(outputs):
        i = index.get(id(leaf))
        if i is not None:
            counts[i] += 1
    return counts


def _one_column(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    return tuple(None if g is None else g.unsqueeze(0) for g in grads)


def _blocks(zs: list[Tensor], per_block: list[tuple[Tensor | None, ...]], size: int) -> list[list[Tensor]]:
    """Per z its blocks [size, *z.shape]; a layer output that does not reach the outputs gets zeros."""
    return [
        [z.new_zeros(size, *z.shape) if g[i] is None else g[i] for g in per_block] for i, z in enumerate(zs)
    ]


def positions(module: nn.Module, a: Tensor, blocks: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One call of a Kronecker layer as ``a`` [N, T, in] and output-gradient blocks [k_b, N, T, out].

    ``a`` is the layer input (unfolded into patches for a convolution, once), the blocks
    those of :func:`output_grads`, both with the positions T flattened (views).
    """
    if type(module) is nn.Linear:
        a = a.reshape(a.shape[0], -1, a.shape[-1])  # T explicit below: a block may have no columns
        return a, [g.reshape(*g.shape[:2], a.shape[1], g.shape[-1]) for g in blocks]
    return unfold(module, a).transpose(1, 2), [g.flatten(3).transpose(2, 3) for g in blocks]


def unfold(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, a: Tensor) -> Tensor:
    """im2col of the input: [N, C_in·Π k, T] with T the output positions, channels outermost.

    Any dimension (1-3), padding (numeric or "same"/"valid") and padding mode: the input is
    padded as the layer pads it, then its windows are read as a strided view and copied
    once (for [64, 3, 32, 32] and a 3×3 kernel 0.20 ms against 1.23 ms for ``F.unfold``).
    """
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        a = F.pad(a, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    d = a.dim() - 2
    for i in range(d):  # windows of (k-1)·dilation + 1 entries, every dilation-th kept
        a = a.unfold(2 + i, (conv.kernel_size[i] - 1) * conv.dilation[i] + 1, conv.stride[i])
    a = a[(..., *(slice(None, None, s) for s in conv.dilation))]  # [N, C, *out, *k]
    n = a.shape[0]
    a = a.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))  # [N, C, *k, *out]
    return a.reshape(n, -1, a.shape[2 + d :].numel())


def patches(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, a: Tensor) -> Tensor:
    """im2col of a convolution's input, per group: [N, T, groups, C_in/groups · Π k] (:func:`unfold`)."""
    cols = unfold(conv, a)
    n, t = cols.shape[0], cols.shape[-1]
    return cols.reshape(n, conv.groups, -1, t).permute(0, 3, 1, 2)


def _layer_input(module: nn.Module, x: Tensor) -> Tensor:
    """What the hook records of a call's input: x, or x̂ for a normalization layer."""
    x = x.detach()
    if not isinstance(module, NORMS):
        return x
    with torch.no_grad():  # the statistics of this call (buffers as the forward sees them)
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if isinstance(module, nn.RMSNorm):
            return F.rms_norm(x, module.normalized_shape, None, module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, None, None, module.eps)
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)


def _hooked(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
    )
