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
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["derivable_kernels"]


@contextlib.contextmanager
def derivable_kernels(module: nn.Module | None = None) -> Iterator[None]:
    """Run the enclosed forward pass with the math SDPA kernel (and no cuDNN RNNs in ``module``)."""
    if torch.compiler.is_compiling():  # the compiled graph decomposes attention itself
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if module is not None and torch.backends.cudnn.enabled and _has_rnn(module):
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


def _has_rnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in module.modules())
