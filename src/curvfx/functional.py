"""Turn an ``nn.Module`` into a pure function ``fn(params, x)`` over a dict of parameters."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from curvfx._engines import kept_rng
from curvfx._errors import describe, inside_transform
from curvfx._graph import leaf_inputs
from curvfx._kernels import ComposedOps, derivable_kernels, needs_composed_ops
from curvfx._pytree import leaves

__all__ = [
    "FunctionalModel",
    "as_function",
    "call_with_inputs",
    "check_independent_samples",
    "check_reads",
    "holding",
    "make_functional",
]


def make_functional(model: nn.Module) -> tuple[FunctionalModel, dict[str, Tensor]]:
    """Split ``model`` into a pure function and its trainable parameters.

    Returns ``(fn, params)`` with ``fn(params, x) == model(x)`` for the parameter values
    in ``params``. ``params`` maps each trainable parameter's name to a detached tensor
    sharing the parameter's storage, in ``named_parameters()`` order; a tied parameter
    appears once, under its first name.

    ``fn`` is pure:

    * parameters with ``requires_grad=False`` are not in ``params``; ``fn`` uses the
      model's current values of them, detached — as it does for any parameter missing from
      the ``params`` it is called with (a subset of the parameters is held fixed);
    * buffers are used, but ``fn`` passes copies of them to the module, so a forward
      that updates buffers in place (BatchNorm in train mode updates its running
      statistics) leaves the model's buffers unchanged;
    * the module's mode (``train()``/``eval()``) at call time decides its behaviour,
      as in ``model(x)``;
    * embeddings with ``scale_grad_by_freq=True`` are refused (``ValueError``): their
      backward is not the derivative of the forward pass; those with ``max_norm`` (which
      renormalize the rows they read in place) get a copy of their weight, so the model's
      weight is not changed;
    * attention runs with the math ``scaled_dot_product_attention`` kernel and recurrent
      layers without cuDNN during the call (:mod:`curvfx._kernels`): fused kernels have no
      second derivatives. Your global settings are restored afterwards.

    Several inputs: ``x`` is passed as ``model(x)`` when it is a tensor,
    ``model(*x)`` when it is a tuple or list, and ``model(**x)`` when it is a mapping
    (Hugging Face style ``{"input_ids": ..., "attention_mask": ...}``). A model whose
    single input is itself a tuple needs a small wrapper module.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> fn, params = make_functional(model)
        >>> list(params)
        ['weight', 'bias']
        >>> x = torch.randn(4, 3)
        >>> torch.equal(fn(params, x), model(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq:
            raise ValueError(
                f"model: embedding {name!r} has scale_grad_by_freq=True, whose backward divides "
                "gradients by id counts in the batch: not a derivative, so its curvature is not "
                "defined; set scale_grad_by_freq=False for curvature computations"
            )
    renormed = {
        f"{name}.weight" if name else "weight" for name, m in model.named_modules() if _renormalizes(m)
    }
    fn = FunctionalModel(model, renormed)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return fn, params


class FunctionalModel:
    """Pure function ``fn(params, x)`` over an ``nn.Module`` (built by :func:`make_functional`).

    Attributes:
        module: The wrapped module (not copied; its frozen parameters and buffers are read
            at call time).
        renormed: Names of the weights of embeddings with ``max_norm``, copied at each call.
    """

    def __init__(self, module: nn.Module, renormed: frozenset[str] | set[str] = frozenset()):
        self.module, self.renormed = module, frozenset(renormed)
        self.composed = needs_composed_ops(module)  # PReLU, weight norm: see curvfx._kernels
        self.fixed: dict[str, Tensor] = {}  # values of parameters a call leaves out (see holding)
        self.aliases_checked = False  # see _check_aliases

    def __call__(self, params: Mapping[str, Tensor], x: Any) -> Any:
        """Evaluate the module at ``params`` on input ``x`` (see :func:`make_functional`)."""
        if not isinstance(params, Mapping):
            raise TypeError(
                f"params: a model function takes a dict name -> tensor, got {type(params).__name__} "
                "(is the argument order fn(params, x)?)"
            )
        state, hooked = self._state(params)
        _check_uncached(self.module)
        composed = ComposedOps() if self.composed else contextlib.nullcontext()

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.module, state, args, kwargs, tie_weights=False)

        try:
            with derivable_kernels(self.module), composed:
                outputs = call_with_inputs(call, x)
        finally:  # tensors the modules' pre-hooks set (old weight_norm, prune) are put back
            for m, attributes in hooked:
                _put_back(m, attributes)
        if not torch.compiler.is_compiling() and not self.aliases_checked:  # traced: no guard on the flag
            self._check_aliases(params, outputs, state)
        return outputs

    def _check_aliases(self, params: Mapping[str, Tensor], outputs: Any, state: dict[str, Tensor]) -> None:
        """Raise ``ValueError`` if ``outputs`` depend on a parameter of ``params`` read past the swap.

        ``functional_call`` swaps the module's attributes; a parameter the forward also reads
        through an unregistered reference (a Python list, a closure) stays the model's own
        tensor there, so every derivative would silently treat that use as a constant. The
        graph of the outputs shows it (the walk stops at the call's values, which may be
        computed from the parameters). Checked once per model function, at its first call in
        grad mode outside ``torch.func`` transforms whose values are not the module's own
        parameters (reads through a list would then look like the module's; one visit per
        operation of the graph).
        """
        if not torch.is_grad_enabled() or inside_transform():
            return
        named = self.module.named_parameters()
        own = {id(p): name for name, p in named if p.requires_grad and name in params}  # those differentiated
        if any(id(v) in own for v in state.values()):
            return
        stops = {v.grad_fn for v in state.values() if v.grad_fn is not None}
        roots = [t for t in leaves(outputs) if isinstance(t, Tensor) and t.grad_fn is not None]
        for root in roots:
            for leaf in leaf_inputs(root, stops):
                if id(leaf) in own:  # none of own is a value of this call (returned above)
                    raise ValueError(
                        f"model: its forward reads the parameter {own[id(leaf)]!r} other than as a module "
                        "attribute (e.g. from a Python list), where curvfx cannot put the parameter "
                        "values of a call: derivatives would treat that use as a constant; reach it "
                        "through registered modules (a shared submodule, nn.ParameterList)"
                    )
        self.aliases_checked = True

    def _state(
        self, params: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], list[tuple[nn.Module, dict[str, Tensor]]]]:
        """The tensor this call uses for each parameter and buffer name, and the hooked modules.

        A parameter gets its value in ``params`` (under any of its names; tied names share
        it), else its value in ``fixed`` (:func:`holding`), else its current value detached;
        a buffer a copy. A submodule registered twice has its tensors named once, under its
        first name: ``functional_call`` swaps every name it is given and swaps them back in
        order, so a second name of the same attribute would leave the swapped-in tensor in
        the model (torch's own untying does). The modules with forward hooks come with
        their tensor attributes, which the hooks may overwrite (:func:`_put_back`).
        """
        groups: dict[int, tuple[Tensor, bool, list[str], list[str]]] = {}  # id -> (t, param?, swapped, names)
        visited: set[int] = set()
        hooked = []
        for prefix, m in self.module.named_modules(remove_duplicate=False):
            first = id(m) not in visited
            visited.add(id(m))
            if first and (m._forward_pre_hooks or m._forward_hooks):
                hooked.append((m, {k: v for k, v in vars(m).items() if isinstance(v, Tensor)}))
            dot = f"{prefix}." if prefix else ""
            for is_param, members in ((True, m._parameters), (False, m._buffers)):
                for name, t in members.items():
                    if t is not None:
                        _, _, swapped, names = groups.setdefault(id(t), (t, is_param, [], []))
                        names.append(dot + name)
                        if first:
                            swapped.append(dot + name)
        state, known = {}, set()
        for t, is_param, swapped, names in groups.values():
            known.update(names)
            given = {id(params[n]): params[n] for n in names if n in params}
            if len(given) > 1:
                raise ValueError(f"params: different tensors for the tied names {names}")
            held = [self.fixed[n] for n in names if n in self.fixed]
            if given:
                value = next(iter(given.values()))
            elif held:
                value = held[0]
            else:
                value = t.detach() if is_param else t
            if not is_param:  # a forward may update buffers in place (BatchNorm in train mode)
                value = value.clone()
            if self.renormed.intersection(names):  # embeddings with max_norm write their weight
                value = value.clone()
            state.update(dict.fromkeys(swapped, value))
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ValueError(f"params: {unknown} are not parameters or buffers of the model")
        return state, hooked

    @property
    def couples_samples(self) -> bool:
        """Whether a forward pass mixes samples: a BatchNorm normalizing with batch statistics.

        That is BatchNorm in train mode, or in eval mode with ``track_running_stats=False``.
        """
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
            for m in self.module.modules()
        )

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__})"


def _put_back(module: nn.Module, attributes: dict[str, Tensor]) -> None:
    """Restore ``module``'s plain tensor attributes to ``attributes`` (those a hook added are removed).

    Pre-hooks such as old-style ``weight_norm``'s or ``prune``'s recompute ``module.weight``
    from the parameters at every forward pass; inside a curvfx call that is a tensor of the
    call's parameter values, with its graph or ``torch.func`` wrappers.
    """
    for k in [k for k, v in vars(module).items() if isinstance(v, Tensor) and k not in attributes]:
        delattr(module, k)
    for k, v in attributes.items():
        vars(module)[k] = v


def _check_uncached(module: nn.Module) -> None:
    """Refuse a call inside ``torch.nn.utils.parametrize.cached()`` for a parametrized module.

    The cache keeps the first call's parametrized weights (computed from that call's
    parameter values), and later calls at other values would silently reuse them.
    """
    if getattr(parametrize, "_cache_enabled", 0) and any(
        parametrize.is_parametrized(m) for m in module.modules()
    ):
        raise ValueError(
            "model: curvature inside torch.nn.utils.parametrize.cached() would reuse weights cached "
            "at other parameter values; compute it outside the cached() block"
        )


def check_independent_samples(fn: Any, what: str, advice: str) -> None:
    """Raise ``ValueError`` ("``what`` needs independent samples ...; ``advice``") if ``fn`` couples them.

    ``fn.couples_samples`` (:class:`FunctionalModel`; pure functions never do): a BatchNorm
    normalizing with batch statistics makes each output depend on the whole batch, so
    quantities defined per sample (per-sample gradients and Jacobians, exact diagonals as
    sums over samples) do not exist.
    """
    if getattr(fn, "couples_samples", False):
        raise ValueError(
            f"{what} needs independent samples, but the model has a BatchNorm that normalizes "
            "with batch statistics, coupling the samples (train mode, or "
            f"track_running_stats=False); {advice}"
        )


def check_reads(fn: Any, params: Mapping[str, Tensor], x: Any) -> None:
    """Run a model function's pending check of parameters read past the swap, on input ``x``.

    For routes that call the model only inside ``torch.func`` transforms, where
    :meth:`FunctionalModel._check_aliases` cannot look: one forward pass in grad mode at the
    parameters detached (only such reads then record a graph), the random state kept.
    """
    if torch.compiler.is_compiling() or not isinstance(fn, FunctionalModel):  # traced: checked eagerly
        return
    if fn.aliases_checked or inside_transform():
        return
    with torch.enable_grad(), kept_rng(next(iter(params.values())).device):
        fn({k: v.detach() for k, v in params.items()}, x)


def holding(fn: Callable, fixed: dict[str, Tensor], order: list[str]) -> Callable:
    """``fn`` with the parameters ``fixed`` held at their values: ``(p, x) -> fn(p ∪ fixed, x)``.

    For a restricted operator (``op.restrict``), whose ``params`` are a subset of the dict
    ``fn`` was built for. A :class:`FunctionalModel` stays one (the layer-aware routes
    read its module); a pure function gets the full dict in the key ``order`` it had.
    """
    if isinstance(fn, FunctionalModel):
        held = copy.copy(fn)
        held.fixed = {**fn.fixed, **fixed}
        return held

    def pure(p: Mapping[str, Tensor], x: Any) -> Any:
        return fn({k: p[k] if k in p else fixed[k] for k in order}, x)

    return pure


def call_with_inputs(fn, x: Any) -> Any:
    """Call ``fn(x)``, ``fn(*x)`` or ``fn(**x)`` for a tensor, sequence or mapping ``x``."""
    if isinstance(x, Mapping):
        return fn(**x)
    if isinstance(x, (tuple, list)):
        return fn(*x)
    return fn(x)


def as_function(fn: Any, params: Any) -> tuple[Any, Any]:
    """Normalize ``(model_or_fn, params)`` to a pure ``fn(params, x)`` and its params.

    A module is made functional; ``params=None`` then means its trainable parameters.
    A callable is used as is and needs ``params``.
    """
    if isinstance(fn, nn.Module):
        pure, own = make_functional(fn)
        if params is None:
            return pure, own
        _check_module_params(fn, params)
        return pure, params
    if not callable(fn):
        raise TypeError(f"fn: expected an nn.Module or a callable fn(params, x), got {type(fn).__name__}")
    if params is None:
        raise ValueError("params: required when fn is a pure function, not an nn.Module")
    if isinstance(fn, FunctionalModel):  # already runs with derivable kernels
        return fn, params
    return _with_derivable_kernels(fn), params


def _check_module_params(module: nn.Module, params: Any) -> None:
    """Raise unless ``params`` maps names of ``module``'s parameters to float tensors of their shapes."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError(
            "params: expected a non-empty dict of the model's parameters (name -> tensor, names "
            f"from named_parameters()), got {type(params).__name__}"
        )
    named = dict(module.named_parameters())
    unknown = [name for name in params if name not in named]
    if unknown:
        aliases = {name for name, _ in module.named_parameters(remove_duplicate=False)} - set(named)
        tied = [name for name in unknown if name in aliases]
        hint = f" ({tied} are second names of tied parameters: use their first names)" if tied else ""
        raise ValueError(
            f"params: {unknown} are not parameters of the model (names from named_parameters()){hint}"
        )
    for name, value in params.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            got = f"dtype {value.dtype}" if isinstance(value, Tensor) else describe(value)
            raise TypeError(f"params[{name!r}]: expected a floating-point tensor, got {got}")
        if value.shape != named[name].shape:
            raise ValueError(
                f"params[{name!r}]: shape {list(value.shape)} does not match the parameter's "
                f"{list(named[name].shape)}"
            )


def _with_derivable_kernels(fn):
    def pure(params, x):
        with derivable_kernels(), ComposedOps():  # the modules are unknown: compose where needed
            return fn(params, x)

    return pure


def _renormalizes(module: nn.Module) -> bool:
    """Whether ``module`` is an embedding that renormalizes its weight in place (``max_norm``)."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None
