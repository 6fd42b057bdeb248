"""Normalization, softmax and attention written with the operations of :data:`curvfx._forward_rules.TRUSTED`.

Torch's forward-mode formulas for these operations cannot be back-propagated correctly
(see :mod:`curvfx._forward_rules`). Inside the reverse-over-forward HVP, a call with a
tangent input runs the function below instead: the same values, from means, sums,
products, ``exp``, ``log`` and ``rsqrt`` only, whose formulas are checked against dense
Hessians. Each function takes the arguments of the torch function it stands for. Options
they do not cover (attention dropout, grouped-query attention, an implicit softmax
dimension) raise ``NotImplementedError``, and the caller uses double backprop.

The maximum subtracted for a stable softmax is taken from the primal values without a
tangent: softmax does not depend on it, so neither do its derivatives.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DECOMPOSITIONS"]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    return _affine(_normalized(input, dims, eps), weight, bias)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y = input * torch.rsqrt((input * input).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    y = _normalized(input.reshape(input.shape[0], num_groups, -1), (2,), eps).reshape(input.shape)
    return _affine(y, _channels(weight, input), _channels(bias, input))


def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    dims = (0, *range(2, input.dim()))
    if training or running_mean is None:  # batch statistics
        mean = input.mean(dims, keepdim=True)
        centered = input - mean
        var = (centered * centered).mean(dims, keepdim=True)  # biased, for the normalization
        if training and running_mean is not None:  # torch's update (unbiased variance), no tangents
            with torch.no_grad():
                count = input.numel() // input.shape[1]
                running_mean.mul_(1 - momentum).add_(momentum * _primal(mean).reshape(-1))
                running_var.mul_(1 - momentum).add_(
                    momentum * _primal(var).reshape(-1) * count / max(count - 1, 1)
                )
        y = centered * torch.rsqrt(var + eps)
    else:
        y = (input - _channels(running_mean, input)) * torch.rsqrt(_channels(running_var, input) + eps)
    return _affine(y, _channels(weight, input), _channels(bias, input))


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    z = _shifted(input, dim, dtype)
    e = torch.exp(z)
    return e / e.sum(dim, keepdim=True)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    z = _shifted(input, dim, dtype)
    return z - torch.log(torch.exp(z).sum(dim, keepdim=True))


def logsumexp(input, dim, keepdim=False):
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    m = _primal(input).amax(dims, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = torch.log(torch.exp(input - m).sum(dims, keepdim=True)) + m
    return out if keepdim else out.squeeze(dims)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    if dropout_p > 0 or enable_gqa:
        raise NotImplementedError("attention with dropout or grouped-query attention")
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    shape = (query.shape[-2], key.shape[-2])
    if is_causal:
        scores = scores + _additive(torch.ones(shape, dtype=torch.bool, device=query.device).tril(), query)
    if attn_mask is not None:  # boolean: True attends; float: added to the scores
        scores = scores + (_additive(attn_mask, query) if attn_mask.dtype == torch.bool else attn_mask)
    return torch.matmul(softmax(scores, -1), value)


def _normalized(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    centered = x - x.mean(dims, keepdim=True)
    return centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)


def _affine(y: Tensor, weight, bias) -> Tensor:
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _channels(t, input: Tensor):
    """A per-channel tensor [C] shaped to broadcast over ``input`` [N, C, *spatial]."""
    return None if t is None else t.reshape((-1,) + (1,) * (input.dim() - 2))


def _shifted(input: Tensor, dim, dtype) -> Tensor:
    if dim is None:
        raise NotImplementedError("softmax without an explicit dim")
    x = input if dtype is None else input.to(dtype)
    m = _primal(x).amax(dim, keepdim=True)
    return x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _additive(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean mask (True: attend) as 0 / -inf to add to the scores."""
    zeros = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
    return zeros.masked_fill(~mask, float("-inf"))


def _primal(t: Tensor) -> Tensor:
    return fwad.unpack_dual(t).primal.detach()


_T = torch.Tensor
DECOMPOSITIONS = {
    F.layer_norm: layer_norm,
    F.rms_norm: rms_norm,
    F.group_norm: group_norm,
    F.batch_norm: batch_norm,
    F.softmax: softmax,
    torch.softmax: lambda input, dim, dtype=None: softmax(input, dim, dtype=dtype),
    _T.softmax: lambda input, dim, dtype=None: softmax(input, dim, dtype=dtype),
    F.log_softmax: log_softmax,
    torch.log_softmax: lambda input, dim, dtype=None: log_softmax(input, dim, dtype=dtype),
    _T.log_softmax: lambda input, dim, dtype=None: log_softmax(input, dim, dtype=dtype),
    torch.logsumexp: logsumexp,
    _T.logsumexp: logsumexp,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
}
