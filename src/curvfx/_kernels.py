"""Kernels with every derivative curvature needs, chosen for the duration of a forward pass.

Fused attention kernels (flash / memory-efficient ``scaled_dot_product_attention``, also on
CPU) have no double-backward and no forward-mode derivative, and cuDNN RNNs have no
double-backward. A forward pass run inside :func:`derivable_kernels` uses the math
attention kernel (and, for a module with recurrent layers, the native RNN instead of
cuDNN), whose derivatives are composed of ordinary operations, so every product that later
differentiates that pass works. The user's settings are restored on exit.

The attention flags are switched directly (the getter/setter pairs of
``torch.backends.cuda``, and torch's private pair for the "overrideable" backend of
out-of-tree devices) rather than through ``torch.nn.attention.sdpa_kernel``, whose
generic bookkeeping costs about 40 µs per forward pass — a tenth of a gradient of a small
MLP, paid by every product.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["derivable_kernels"]

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
