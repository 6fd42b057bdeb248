"""Kernels with every derivative curvature needs, chosen for the duration of a forward pass.

Fused attention kernels (flash / memory-efficient ``scaled_dot_product_attention``, also on
CPU) have no double-backward and no forward-mode derivative, and cuDNN RNNs have no
double-backward. A forward pass run inside :func:`derivable_kernels` uses the math
attention kernel (and, for a module with recurrent layers, the native RNN instead of
cuDNN), whose derivatives are composed of ordinary operations, so every product that later
differentiates that pass works. The user's settings are restored on exit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["derivable_kernels"]

_active = threading.local()  # .attention: an enclosing derivable_kernels chose the SDPA kernel


@contextlib.contextmanager
def derivable_kernels(module: nn.Module | None = None) -> Iterator[None]:
    """Run the enclosed forward pass with the math SDPA kernel (and no cuDNN RNNs in ``module``).

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
    with contextlib.ExitStack() as stack:
        if outermost:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            _active.attention = True
            stack.callback(setattr, _active, "attention", False)
        if rnn:
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


def _cudnn_on() -> bool:
    return torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()


def _has_rnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in module.modules())
