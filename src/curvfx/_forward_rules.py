"""Forward-mode rules that skip the zero tangent of a constant operand.

Torch's forward-mode formula for an affine map ``y = x Wᵀ + b`` (``F.linear``, and the
same for ``F.conv1d/2d/3d``) is ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``; when ``x`` carries no tangent
(the model's input, seen by the first layer) it still multiplies a zero ``ẋ`` by ``W``,
one full product of the layer's size: for a 784-256-256-10 MLP about a third of the
tangent pass. Inside :class:`ConstantInputTangents` such calls compute ``y`` from the
primal weights (keeping the reverse-mode graph to them) and ``ẏ = x Ẇᵀ + ḃ`` directly.
Every other call, every call whose input carries a tangent, and every call under a
``torch.func`` transform (a model that vmaps inside) runs unchanged.
"""

from __future__ import annotations

import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvfx._errors import inside_transform

__all__ = ["ConstantInputTangents"]

_SPATIAL_DIMS = {F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}  # op(input, weight, bias=None, *config)


class ConstantInputTangents(TorchFunctionMode):
    """Run affine layers whose input has no tangent without the ``ẋ Wᵀ`` term (see module)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SPATIAL_DIMS and len(args) >= 2 and not inside_transform() and _tangent(args[0]) is None:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            w_primal, w_tangent = fwad.unpack_dual(args[1])
            b_primal, b_tangent = fwad.unpack_dual(bias) if isinstance(bias, Tensor) else (bias, None)
            if w_tangent is not None or b_tangent is not None:
                rest, options = args[3:], {k: a for k, a in kwargs.items() if k != "bias"}
                out = func(args[0], w_primal, b_primal, *rest, **options)
                if w_tangent is None:  # ẏ = ḃ, broadcast over the batch and spatial dims
                    tangent = b_tangent.reshape((-1,) + (1,) * _SPATIAL_DIMS[func]).expand_as(out)
                else:
                    tangent = func(args[0], w_tangent, b_tangent, *rest, **options)  # x Ẇᵀ + ḃ
                return fwad.make_dual(out, tangent)
        return func(*args, **kwargs)


def _tangent(t) -> Tensor | None:
    return fwad.unpack_dual(t).tangent if isinstance(t, Tensor) else None
