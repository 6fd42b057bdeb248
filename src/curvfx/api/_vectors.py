"""The vector forms of torch-secorder's API: one tensor, a flat tensor [P], or a list over params."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvfx._errors import describe
from curvfx._pytree import as_tree, num_params, ravel
from curvfx.functional import make_functional

Vector = Tensor | list[Tensor]


def vector_as_list(v: Any, params: list[Tensor], name: str = "v") -> tuple[list[Tensor], str]:
    """``v`` as a list shaped like ``params`` and its form: "tensor", "flat" or "list"."""
    if isinstance(v, Tensor):
        if len(params) == 1 and v.shape == params[0].shape:
            return as_tree([v], params, name)[0], "tensor"
        return as_tree(v, params, name)[0], "flat"
    if isinstance(v, list | tuple):
        if len(v) != len(params):
            raise ValueError(f"{name}: expected {len(params)} tensors (one per parameter), got {len(v)}")
        return as_tree(list(v), params, name)[0], "list"
    raise TypeError(f"{name}: expected a tensor or a list of tensors matching params, got {describe(v)}")


def vector_from_list(out: list[Tensor], form: str) -> Vector:
    """The inverse of :func:`vector_as_list` for a result ``out``."""
    if form == "tensor":
        return out[0]
    if form == "flat":
        return ravel(out)
    return list(out)


def model_parts(model: nn.Module, create_graph: bool) -> tuple[Any, dict[str, Tensor], dict[int, str]]:
    """``(fn, params, index)``: the model made pure, its trainable parameters, name by ``id``.

    ``params`` maps names to the parameters themselves when ``create_graph`` (results keep
    their autograd graph), else to detached tensors sharing their storage.
    """
    fn, detached = make_functional(model)
    named = dict(model.named_parameters())
    params = {name: named[name] for name in detached} if create_graph else detached
    index = {id(named[name]): name for name in detached}
    if not params:
        raise ValueError("model: has no trainable parameters (all have requires_grad=False)")
    return fn, params, index


def model_vector(
    v: Any, model: nn.Module, params: dict[str, Tensor], index: dict[int, str]
) -> tuple[dict[str, Tensor], str, list[Tensor]]:
    """``v`` as a dict like ``params``, its form, and the parameter list it was given over.

    A list (or flat vector) over ``model.parameters()`` is accepted, and so is a list over
    the trainable parameters only (when that length differs).
    """
    every = list(model.parameters())
    trainable = [p for p in every if id(p) in index]
    like = every
    if isinstance(v, list | tuple) and len(v) == len(trainable) != len(every):
        like = trainable
    elif isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] == num_params(trainable) != num_params(every):
        like = trainable
    v_list, form = vector_as_list(v, like)
    by_name = {index[id(p)]: vi for p, vi in zip(like, v_list) if id(p) in index}
    return {name: by_name[name] for name in params}, form, like


def model_result(out: dict[str, Tensor], form: str, like: list[Tensor], index: dict[int, str]) -> Vector:
    """A result dict over the trainable parameters in the form and order of the given vector."""
    return vector_from_list(
        [out[index[id(p)]] if id(p) in index else torch.zeros_like(p) for p in like], form
    )
