"""Small shared helpers for argument checking and error messages."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvfx._pytree import batch_tree, leaves

__all__ = [
    "UnsupportedInputError",
    "all_finite",
    "check_autograd",
    "check_batch",
    "check_generator",
    "check_output",
    "check_real",
    "check_targets",
    "describe",
    "holds_values",
    "inside_transform",
    "needs_graph",
    "sample_row",
]


class UnsupportedInputError(ValueError, NotImplementedError):
    """An argument value the function does not support.

    A ``ValueError`` (curvfx's rule for bad input) that is also a ``NotImplementedError``,
    for the seed APIs whose originals raise that for the same input.
    """


def describe(obj: Any) -> str:
    """A short description of ``obj`` for error messages (shape for tensors, else the type)."""
    if isinstance(obj, Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    return type(obj).__name__


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (no inf/nan).

    One sum first (a reduction without a temporary; any inf/nan makes it non-finite), the
    entrywise check only when the sum is not finite (an overflow of finite entries).
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def inside_transform() -> bool:
    """Whether we run under a ``torch.func`` transform (where ``torch.autograd`` cannot be used)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def holds_values(t: Tensor) -> bool:
    """Whether the entries of ``t`` can be read for a check.

    Not while compiling, nor for a tensor wrapped by a ``torch.func`` transform (batched by
    ``vmap``: its values are per-example); a tensor captured from outside a transform
    (targets under a vmap over columns) is read as usual.
    """
    return not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_autograd() -> None:
    """Raise ``ValueError`` under ``torch.inference_mode()``, where autograd cannot run.

    ``torch.enable_grad()`` does not lift inference mode: tangents and gradients would come
    back missing (read as zeros) instead of failing.
    """
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():  # eager check
        raise ValueError(
            "curvature needs autograd, which torch.inference_mode() turns off; compute "
            "it outside the inference-mode block (or inside `with torch.inference_mode(False):`, "
            "with tensors not created in inference mode)"
        )


def needs_graph(*trees: Any) -> bool:
    """Whether a result computed from ``trees`` must carry an autograd graph.

    True when gradients are being recorded, outside ``torch.func`` transforms (which carry
    their own), and a tensor of ``trees`` requires grad: the result then has to be
    differentiable with respect to it, as torch's operations are.
    """
    if inside_transform() or not torch.is_grad_enabled():
        return False
    return any(leaf.requires_grad for leaf in leaves(trees) if isinstance(leaf, Tensor))


def check_real(tree: Any, name: str) -> None:
    """Raise unless the tensors of ``tree`` are real floating point (complex: products are not C-linear)."""
    tensors = [leaf for leaf in leaves(tree) if isinstance(leaf, Tensor)]
    integer = sorted({str(t.dtype) for t in tensors if not (t.is_floating_point() or t.is_complex())})
    if integer:
        raise TypeError(f"{name}: expected floating-point tensors (they are differentiated), got {integer}")
    if any(t.is_complex() for t in tensors):
        raise ValueError(
            f"{name}: complex tensors are not supported (the curvature of a real loss in "
            "complex parameters is not a complex-linear map); split them into real and "
            "imaginary parts"
        )


def check_targets(y: Any) -> Tensor:
    """``y`` if it is a tensor; ``TypeError`` naming it otherwise (for transforms that need targets)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a tensor of targets, got {describe(y)}")
    return y


def check_generator(generator: Any) -> torch.Generator | None:
    """``generator`` if it is a ``torch.Generator`` or None; TypeError naming it otherwise."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_output(outputs: Any) -> Tensor:
    """``outputs`` if the model returned one tensor; else ``ValueError`` saying what to do."""
    if not isinstance(outputs, Tensor):
        raise ValueError(
            f"model: returned {describe(outputs)}; curvature needs one output tensor [N, ...] "
            "(the loss's input): wrap the model to return it, e.g. lambda p, x: fn(p, x)[0]"
        )
    return outputs


def sample_row(outputs: Any) -> Tensor:
    """``outputs[0]`` of a model evaluated on one sample as a batch of one, checked to be its only row.

    The routes that vmap over samples need outputs [N, ...], one row per sample. Outputs
    that merge the samples with other dims ([N·T, V]), or an input entry that is not split
    per sample (a list of N numbers) broadcasting against the batch, give a batch of one
    several rows, of which ``[0]`` would silently keep one.
    """
    if not isinstance(outputs, Tensor) or outputs.dim() == 0 or outputs.shape[0] != 1:
        got = list(outputs.shape) if isinstance(outputs, Tensor) else describe(outputs)
        raise ValueError(
            f"x: the model's outputs for one sample (a batch of one) are {got}, not [1, ...]; the "
            "routes that vmap over samples need outputs [N, ...] with one row per sample (pass "
            "per-sample values as tensors [N, ...], and keep the samples apart from other dims)"
        )
    return outputs[0]


def check_batch(x: Any, y: Tensor | None) -> None:
    """Raise ``ValueError`` unless the tensors of ``x`` (and ``y``, if given) share a leading N > 0.

    Other leaves of ``x`` (a flag or a scale passed to the model) are left alone; mappings
    optree does not open (a ``UserDict``, such as a tokenizer's batch) are read as dicts
    (:func:`curvfx._pytree.batch_tree`).
    """
    x_leaves = [x] if isinstance(x, Tensor) else [t for t in leaves(batch_tree(x)) if isinstance(t, Tensor)]
    if not x_leaves:
        raise ValueError(
            f"x: expected a tensor or a tuple/mapping of tensors, got {describe(x)} without tensors"
        )
    n = x_leaves[0].shape[0] if x_leaves[0].dim() > 0 else None
    if n is None or any(t.dim() == 0 or t.shape[0] != n for t in x_leaves):
        raise ValueError("x: every input tensor needs the same leading batch dimension N")
    if n == 0:
        raise ValueError("x: the batch is empty (N = 0)")
    if y is not None and (not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n):
        raise ValueError(f"y: expected targets with leading dimension N = {n}, got {describe(y)}")
