"""Kernels with every derivative curvature needs, chosen for the duration of a forward pass.

Fused attention kernels (flash / memory-efficient ``scaled_dot_product_attention``, also on
CPU) have no double-backward and no forward-mode derivative, and cuDNN RNNs have no
double-backward. A forward pass run inside :func:`derivable_kernels` uses the math
attention kernel (and, for a module with recurrent layers, the native RNN instead of
cuDNN), whose derivatives are composed of ordinary operations, so every product that later
differentiates that pass works. The user's settings are restored on exit.

Two operations have torch derivatives that are wrong without an error: the double backward
of ``torch._weight_norm`` (weight normalization, new and old API: a Hessian 28 % off and
not symmetric) and the ``vmap`` rule of PReLU's backward (per-sample Jacobians and exact
diagonals wrong whenever the samples and factor columns vmapped together are equally many).
``F.embedding_bag`` has neither a forward-mode rule nor a double backward, so no
curvature product could pass through it. :class:`ComposedOps` runs these operations as
compositions of operations with correct rules; a model function enters it for modules
that contain them (:func:`needs_composed_ops`).

The attention flags are switched directly (the getter/setter pairs of
``torch.backends.cuda``, and torch's private pair for the "overrideable" backend of
out-of-tree devices) rather than through ``torch.nn.attention.sdpa_kernel``, whose
generic bookkeeping costs about 40 µs per forward pass — a tenth of a gradient of a small
MLP, paid by every product.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.overrides import TorchFunctionMode

__all__ = ["ComposedOps", "derivable_kernels", "needs_composed_ops", "within"]

_active = threading.local()  # .attention: an enclosing derivable_kernels chose the SDPA kernel
_cuda = torch.backends.cuda
_SDPA_FLAGS = (  # (getter, setter, value inside): only the math kernel on
    (_cuda.flash_sdp_enabled, _cuda.enable_flash_sdp, False),
    (_cuda.mem_efficient_sdp_enabled, _cuda.enable_mem_efficient_sdp, False),
    (_cuda.cudnn_sdp_enabled, _cuda.enable_cudnn_sdp, False),
    (_cuda.math_sdp_enabled, _cuda.enable_math_sdp, True),
)
if hasattr(torch._C, "_set_sdp_use_overrideable"):  # the backend of out-of-tree devices (no public API)
    _SDPA_FLAGS += ((torch._C._get_overrideable_sdp_enabled, torch._C._set_sdp_use_overrideable, False),)


@contextlib.contextmanager
def derivable_kernels(module: nn.Module | None = None) -> Iterator[None]:
    """Run the enclosed forward pass with the math SDPA kernel (and no cuDNN RNNs in ``module``).

    Inside, the flash, memory-efficient, cuDNN and overrideable attention kernels are off
    and the math kernel is on.

    Nested uses (a curvfx model function called inside a curvfx transform) choose the
    attention kernel once, at the outermost level.
    """
    if torch.compiler.is_compiling():  # the compiled graph decomposes attention itself
        yield
        return
    outermost = not getattr(_active, "attention", False)
    rnn = module is not None and _cudnn_on() and _has_rnn(module)
    if not (outermost or rnn):
        yield
        return
    with torch.backends.cudnn.flags(enabled=False) if rnn else contextlib.nullcontext():
        if not outermost:
            yield
            return
        before = [get() for get, _, _ in _SDPA_FLAGS]
        _set_sdpa([inside for _, _, inside in _SDPA_FLAGS])
        _active.attention = True
        try:
            yield
        finally:
            _active.attention = False
            _set_sdpa(before)


def _set_sdpa(values: list[bool]) -> None:
    for (_, set_flag, _), value in zip(_SDPA_FLAGS, values):
        set_flag(value)


def _cudnn_on() -> bool:
    return torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()


def _has_rnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


def _prelu(input: Tensor, weight: Tensor) -> Tensor:
    """``F.prelu``: ``max(0, x) + w min(0, x)``, w over the channels (dim 1, or one weight)."""
    if weight.numel() == 1:
        weight = weight.reshape(())
    elif input.dim() >= 2:
        weight = weight.reshape(-1, *([1] * (input.dim() - 2)))
    else:  # channels without a channel dim: torch's error
        return torch.prelu(input, weight)
    return torch.relu(input) - weight * torch.relu(-input)


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm``: ``g v / ‖v‖`` with the norm over every dim but ``dim`` (all for -1)."""
    if dim == -1:
        norm = (v * v).sum().sqrt()
    else:
        kept = dim % v.dim()
        others = tuple(d for d in range(v.dim()) if d != kept)
        norm = (v * v).sum(others, keepdim=True).sqrt() if others else (v * v).sqrt()
    return v * (g / norm)


def _embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """``F.embedding_bag`` with ``mode`` "sum" or "mean": ``Σ_{i∈bag} w_i E[id_i]`` (/ the bag's size).

    Rows at ``padding_idx`` are left out of the bags (and of the mean's count); an empty
    bag gives zeros. Options this does not cover ("max", ``max_norm``) run torch's kernel.
    """
    if mode not in ("sum", "mean") or max_norm is not None:
        return F.embedding_bag(
            input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
            per_sample_weights, include_last_offset, padding_idx,
        )  # fmt: skip
    if input.dim() == 2:  # fixed-size bags, one per row
        bags, size = (
            torch.arange(input.shape[0], device=input.device).repeat_interleave(input.shape[1]),
            input.shape[0],
        )
        input = input.reshape(-1)
        per_sample_weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    else:  # bag b holds input[offsets[b]:offsets[b + 1]]
        starts = offsets[:-1] if include_last_offset else offsets
        size = starts.shape[0]
        bags = torch.bucketize(torch.arange(input.shape[0], device=input.device), starts, right=True) - 1
    kept = (
        torch.ones_like(input, dtype=weight.dtype)
        if padding_idx is None
        else (input != padding_idx).to(weight.dtype)
    )
    rows = F.embedding(input, weight) * (
        kept if per_sample_weights is None else kept * per_sample_weights
    ).unsqueeze(1)
    out = weight.new_zeros(size, weight.shape[1]).index_add(0, bags, rows)
    if mode == "mean":
        counts = weight.new_zeros(size).index_add(0, bags, kept)
        out = out / counts.clamp(min=1).unsqueeze(1)
    return out


_COMPOSED = {
    torch.prelu: _prelu,
    Tensor.prelu: _prelu,
    torch._weight_norm: _weight_norm,
    F.embedding_bag: _embedding_bag,
}
_OLD_WEIGHT_NORM = importlib.import_module("torch.nn.utils.weight_norm").WeightNorm


class ComposedOps(TorchFunctionMode):
    """Runs PReLU, EmbeddingBag and weight normalization as compositions (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        composed = _COMPOSED.get(func)
        return (composed or func)(*args, **(kwargs or {}))


def within(context: Callable[[], contextlib.AbstractContextManager], f: Callable) -> Callable:
    """``f`` run inside a fresh ``context()`` at every call.

    ``within(ComposedOps, f)`` for functions whose modules curvfx does not see (a user's
    pure function, a loss closure): the mode costs one Python call per torch function, not
    measurable on an MLP's HVP (2.39 against 2.40 ms).
    """

    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with context():
            return f(*args, **kwargs)

    return wrapped


def needs_composed_ops(module: nn.Module) -> bool:
    """Whether ``module`` has a PReLU, an EmbeddingBag or a weight normalization (parametrization or hook)."""
    for m in module.modules():
        if isinstance(m, (nn.PReLU, nn.EmbeddingBag, parametrizations._WeightNorm)):
            return True
        if any(isinstance(hook, _OLD_WEIGHT_NORM) for hook in m._forward_pre_hooks.values()):
            return True
    return False
