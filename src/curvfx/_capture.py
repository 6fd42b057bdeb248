"""Capture of layer inputs and output gradients for the layer-aware computations.

For the layers whose per-sample gradient is an outer product of the layer input and the
gradient at the layer output (``nn.Linear``; ``nn.Conv1d/2d`` on unfolded patches),
:func:`captured` records each call's ``(input a, output z)`` with forward hooks that are
removed on exit (also on error), :func:`output_grads` back-propagates K output-space
cotangents to every recorded z in one batched backward pass, and :func:`positions` puts a
call into the common form ``a`` [N, T, in], ``g`` [K, N, T, out] (T positions: sequence
steps or output pixels) with per-sample weight gradient ``Σ_t g_kt a_tᵀ``.
Used by the exact diagonals (:mod:`curvfx._structured`) and the Kronecker factors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

__all__ = ["captured", "output_grads", "positions", "supported_layers", "unfold"]


def supported_layers(module: nn.Module, params: dict[str, Tensor]) -> dict[nn.Module, dict[str, str]]:
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
    if m._forward_hooks or m._forward_pre_hooks or _global_hooks():  # may change what the layer computes
        return False
    if type(m) is nn.Linear:
        return True
    if type(m) in (nn.Conv1d, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return False


@contextlib.contextmanager
def captured(records: dict[nn.Module, list[tuple[Tensor, Tensor]]]):
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


def output_grads(outputs: Tensor, zs: list[Tensor], S: Tensor) -> tuple[Tensor, ...]:
    """``∂⟨outputs, S[k]⟩/∂z`` for every z, stacked over k: one batched backward pass."""
    try:
        if S.shape[0] == 1:  # one column: a plain backward pass (no vmap overhead), same numbers
            grads = torch.autograd.grad(outputs, zs, S[0], allow_unused=True)
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        else:
            grads = torch.autograd.grad(outputs, zs, S, is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an operation without a batching rule: one backward per column
        cols = [torch.autograd.grad(outputs, zs, s, retain_graph=True, allow_unused=True) for s in S]
        grads = tuple(torch.stack(g) if g[0] is not None else None for g in zip(*cols))
    return tuple(  # a layer output that does not reach the outputs has zero gradient
        torch.zeros(S.shape[0], *z.shape, dtype=z.dtype, device=z.device) if g is None else g
        for g, z in zip(grads, zs)
    )


def positions(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """One call of a supported layer as ``a`` [N, T, in] and ``g`` [K, N, T, out].

    ``a`` is the layer input (unfolded into patches for a convolution), ``g`` the gradients
    at the layer output for K cotangents, both with the positions T flattened.
    """
    if type(module) is nn.Linear:
        return a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(*g.shape[:2], -1, g.shape[-1])
    return unfold(module, a).transpose(1, 2), g.flatten(3).transpose(2, 3)


def unfold(conv: nn.Conv1d | nn.Conv2d, a: Tensor) -> Tensor:
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


def _global_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)
