"""torch-secorder's closures ``func()`` made pure functions ``f(params)`` of a list of tensors.

:class:`_Substitute` evaluates ``func()`` with every torch operation seeing a stand-in tensor
wherever it would read one of ``params`` (a ``TorchFunctionMode``); the parameters are never
written to. A read that bypasses torch's function dispatch is detected and refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import optree
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvfx._engines import rng_state, set_rng_state
from curvfx._errors import describe, inside_transform
from curvfx._graph import leaf_inputs
from curvfx._kernels import ComposedOps


def param_list(params: Iterable[Tensor]) -> list[Tensor]:
    """``params`` (a list, tuple, generator or other iterable of tensors) as a non-empty list."""
    if isinstance(params, Tensor):
        raise TypeError("params: expected a list (or iterable) of tensors, got a single tensor; use [tensor]")
    if not isinstance(params, Iterable):
        raise TypeError(f"params: expected a list (or iterable) of tensors, got {describe(params)}")
    out = list(params)
    if not out:
        raise ValueError("params: no tensors (an empty list, or an exhausted generator)")
    for i, p in enumerate(out):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}]: expected a tensor, got {describe(p)}")
    check_distinct(out)
    return out


def check_distinct(params: list[Tensor]) -> None:
    """Raise if a tensor is listed twice in ``params``.

    ``func`` reads one tensor however often it is listed, so its derivative cannot be split
    between the entries: curvfx would give the first entry zeros, plain double backprop
    (torch-secorder) gives every entry the whole product ``H (v_i + v_j)``.
    """
    first: dict[int, int] = {}
    for j, p in enumerate(params):
        i = first.setdefault(id(p), j)
        if i != j:
            raise ValueError(
                f"params: params[{i}] and params[{j}] are the same tensor; list each tensor once "
                "(tied weights are one parameter, as in model.parameters())"
            )


class _Substitute(TorchFunctionMode):
    """While active, every torch function sees ``stand_ins[i]`` wherever it is given ``originals[i]``.

    ``used`` collects the indices of the originals that were read.
    """

    def __init__(self, originals: list[Tensor], stand_ins: list[Tensor]):
        super().__init__()  # TorchFunctionMode's own state
        self.index = {id(t): i for i, t in enumerate(originals)}
        self.stand_ins = stand_ins
        self.used: set[int] = set()

    def _swap(self, obj: Any) -> Any:
        i = self.index.get(id(obj)) if isinstance(obj, Tensor) else None
        if i is None:
            return obj
        self.used.add(i)
        return self.stand_ins[i]

    def __torch_function__(self, fn, types, args=(), kwargs=None):
        args = optree.tree_map(self._swap, args, none_is_leaf=True)
        kwargs = optree.tree_map(self._swap, kwargs or {}, none_is_leaf=True)
        return fn(*args, **kwargs)


def pure_function(func: Callable[[], Tensor], params: list[Tensor]) -> Callable[[list[Tensor]], Tensor]:
    """``f(p) = func()`` evaluated with ``p[i]`` in place of ``params[i]`` (see :class:`_Substitute`).

    Every evaluation of ``f`` replays the random numbers of the first: torch's global
    random-number state (CPU, and CUDA when initialized) is saved before the first call and
    restored before each later one. A ``func`` with active dropout therefore sees one fixed
    mask at every point (as the ``H`` of one call of ``func`` requires), and the global
    stream is left as one evaluation of ``func`` leaves it.
    """
    check_callable(func, "func")
    first_state: list[tuple] = []  # the RNG state before the first evaluation

    def pure(stand_ins: list[Tensor]) -> Tensor:
        if first_state:
            set_rng_state(first_state[0])  # the same dropout masks as the first evaluation
        else:
            first_state.append(rng_state())
        mode = _Substitute(params, list(stand_ins))
        with mode, ComposedOps():  # inside: the composed operations read the stand-ins
            value = func()
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"func: must return a scalar tensor, got {describe(value)}")
        if not inside_transform():
            _check_substituted(value, params)
        if not mode.used:
            raise ValueError(
                "func: reads none of the tensors in params; pass the tensors func computes with "
                "(e.g. list(model.parameters())), not copies of them"
            )
        return value.reshape(())

    return pure


def _check_substituted(value: Tensor, params: list[Tensor]) -> None:
    """Raise if ``value``'s autograd graph still reaches one of ``params`` (a read not redirected)."""
    index = {id(p): i for i, p in enumerate(params)}
    for leaf in leaf_inputs(value):
        i = index.get(id(leaf))
        if i is not None:
            raise ValueError(
                f"func: reads params[{i}] through a tensor computed from it before func runs "
                "(compute it inside func) or through an operation that bypasses torch's function "
                "dispatch (e.g. a custom torch.autograd.Function), so its curvature cannot be "
                "taken; write the loss with torch operations inside func, or use curvfx.hvp on a "
                "pure f(params)"
            )


def check_callable(obj: Any, name: str) -> None:
    if not callable(obj):
        raise TypeError(f"{name}: expected a callable, got {describe(obj)}")
