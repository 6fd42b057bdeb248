"""Pytree helpers on optree: flat vectors <-> parameter pytrees, and validation of vectors.

Leaf order is the order a user sees: dicts keep their insertion order (so a module's
parameter dict flattens in ``named_parameters()`` order), sequences their index order.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from enum import Enum
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = [
    "as_columns",
    "as_tree",
    "batch_size",
    "batch_tree",
    "flatten",
    "leaves",
    "num_params",
    "ravel",
    "sample_of",
    "sample_split",
    "tree_map",
    "unflatten",
    "unravel",
    "unsqueeze_leaves",
]

PyTree = Any
_NAMESPACE = "curvfx"
# curvfx's own optree namespace keeps dict insertion order (a module's parameter order), set
# once here rather than per call so that flattening also traces under torch.compile.
_INSERTION_ORDER = optree.dict_insertion_ordered(True, namespace=_NAMESPACE)  # kept alive: its exit
_INSERTION_ORDER.__enter__()  # would restore the sorted order


def flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """Leaves of ``tree`` (dicts in insertion order, ``None`` an empty subtree) and its spec."""
    return optree.tree_flatten(tree, none_is_leaf=False, namespace=_NAMESPACE)


def unflatten(spec: optree.PyTreeSpec, leaves: list[Any]) -> PyTree:
    """Inverse of :func:`flatten`."""
    return optree.tree_unflatten(spec, leaves)


def leaves(tree: PyTree) -> list[Any]:
    """Leaves of ``tree`` in :func:`flatten` order."""
    return flatten(tree)[0]


def tree_map(fn, tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply ``fn`` leafwise over ``tree`` and trees of the same structure ``rest``."""
    leaves_, spec = flatten(tree)
    others = [spec.flatten_up_to(r) for r in rest]
    return unflatten(spec, [fn(*args) for args in zip(leaves_, *others)])


def num_params(tree: PyTree) -> int:
    """P, the total number of entries over the leaves of ``tree``."""
    return sum(leaf.numel() for leaf in leaves(tree))


def ravel(tree: PyTree) -> Tensor:
    """Concatenate the leaves of ``tree``, each flattened, into a vector [P].

    A leading batch dimension can be kept with :func:`torch.func.vmap` over ``ravel``.

    Raises:
        TypeError: If a leaf of ``tree`` is not a tensor.
        ValueError: If ``tree`` has no leaves, or its leaves differ in dtype (``torch.cat``
            would silently promote them).
    """
    parts = leaves(tree)
    if not parts:
        raise ValueError("ravel: the pytree has no tensor leaves")
    _check_leaves(parts, "tree")
    return torch.cat([leaf.reshape(-1) for leaf in parts])


def unravel(flat: Tensor, like: PyTree) -> PyTree:
    """Inverse of :func:`ravel`: split ``flat`` [P] into a pytree shaped like ``like``.

    The leaves keep ``flat``'s dtype (float32 eigenvectors of a bfloat16 operator stay
    float32). Under :func:`torch.func.vmap` ``flat`` is one example's vector (the checks
    read only its static shape).

    Raises:
        TypeError: If ``flat`` is not a tensor, or a leaf of ``like`` is not a tensor.
        ValueError: If ``flat`` is not 1-D of length P (the leaves' total size), or ``like``
            has no leaves or leaves of several dtypes.
    """
    flat_leaves, spec = flatten(like)
    if not flat_leaves:
        raise ValueError("like: the pytree has no tensor leaves")
    _check_leaves(flat_leaves, "like")
    if not isinstance(flat, Tensor):
        raise TypeError(f"flat: expected a tensor [P], got {type(flat).__name__}")
    sizes = [leaf.numel() for leaf in flat_leaves]
    if flat.dim() != 1 or flat.shape[0] != sum(sizes):
        raise ValueError(f"flat: expected a vector [P] = [{sum(sizes)}], got shape {list(flat.shape)}")
    chunks = torch.split(flat, sizes)
    return unflatten(spec, [c.reshape(leaf.shape) for c, leaf in zip(chunks, flat_leaves)])


def as_tree(v: PyTree | Tensor, params: PyTree, name: str = "v") -> tuple[PyTree, bool]:
    """Return ``v`` as a pytree shaped like ``params`` and whether it was given flat.

    ``v`` is either a pytree with the structure and leaf shapes of ``params`` or a
    flat tensor of length P. dtype and device must match ``params`` leaf by leaf.

    Raises:
        TypeError: If ``v`` is neither a tensor nor a pytree of tensors.
        ValueError: On a structure, shape, dtype or device mismatch; the message names
            ``name``, the offending leaf and both shapes.
    """
    param_leaves, spec = flatten(params)
    if not param_leaves:
        raise ValueError("params has no tensor leaves")
    if isinstance(v, Tensor) and not (isinstance(params, Tensor) and v.shape == params.shape):
        total = sum(p.numel() for p in param_leaves)
        if v.dim() != 1 or v.shape[0] != total:
            raise ValueError(f"{name}: a flat vector must have shape [P] = [{total}], got {list(v.shape)}")
        _check_dtype_device(v, param_leaves[0], name)
        return unravel(v, params), True
    try:
        v_leaves = spec.flatten_up_to(v)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name}: structure does not match params; expected {spec}, got {flatten(v)[1]}"
        ) from err
    for i, (leaf, p) in enumerate(zip(v_leaves, param_leaves)):
        matches = isinstance(leaf, Tensor) and (leaf.shape, leaf.dtype) == (p.shape, p.dtype)
        if matches and leaf.device == p.device:
            continue
        path = optree.tree_paths(params, none_is_leaf=False, namespace=_NAMESPACE)[i]
        where = f"{name}{''.join(f'[{k!r}]' for k in path)}"  # the message names the leaf
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{where}: expected a tensor, got {type(leaf).__name__}")
        if leaf.shape != p.shape:
            raise ValueError(
                f"{where}: shape {list(leaf.shape)} does not match the parameter's {list(p.shape)}"
            )
        _check_dtype_device(leaf, p, where)
    return v, False


def as_columns(V: Any, params: PyTree, name: str = "v") -> list[PyTree] | None:
    """The columns of a matrix ``V`` [P, K] as pytrees shaped like ``params``; None if ``V`` is a vector.

    ``V`` is a matrix when it is a 2-D tensor and ``params`` is not a single tensor of that
    shape (then ``V`` is one pytree-shaped vector).

    Raises:
        ValueError: If ``V`` has K = 0 columns, or a row count, dtype or device that does not
            match ``params``; the message names ``name``.
    """
    if not isinstance(V, Tensor) or V.dim() != 2 or (isinstance(params, Tensor) and V.shape == params.shape):
        return None
    param_leaves = leaves(params)
    total = sum(p.numel() for p in param_leaves)
    if V.shape[0] != total or V.shape[1] == 0:
        raise ValueError(
            f"{name}: a matrix of flat vectors must have shape [P, K] = [{total}, K ≥ 1], got {list(V.shape)}"
        )
    _check_dtype_device(V, param_leaves[0], name)
    rows = V.T.contiguous()  # column k as a contiguous vector (strided tangents slow every kernel)
    return [unravel(row, params) for row in rows]


def _check_leaves(tree_leaves: list[Any], name: str) -> None:
    """TypeError unless every leaf is a tensor, ValueError unless they share one dtype (static checks)."""
    for leaf in tree_leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name}: expected a pytree of tensors, got a leaf of type {type(leaf).__name__}")
    dtype = tree_leaves[0].dtype
    for leaf in tree_leaves:
        if leaf.dtype != dtype:
            raise ValueError(
                f"{name}: the leaves must share one dtype (their concatenation is one vector), "
                f"got {dtype} and {leaf.dtype}"
            )


def _check_dtype_device(v: Tensor, p: Tensor, where: str) -> None:
    if v.dtype != p.dtype:
        raise ValueError(f"{where}: dtype {v.dtype} does not match params dtype {p.dtype}")
    if v.device != p.device:
        raise ValueError(f"{where}: device {v.device} does not match params device {p.device}")


def unsqueeze_leaves(tree: PyTree) -> PyTree:
    """Every tensor leaf with a new leading dimension of size 1 (one sample as a batch of one).

    Other leaves (a flag or a scale passed to the model) are left as they are.
    """
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, tree)


def batch_tree(x: PyTree) -> PyTree:
    """A batch input with every mapping optree does not open as a dict, at any depth.

    Such mappings are a tokenizer's ``UserDict`` batch or a dict subclass. This is the tree
    the batch checks and the per-sample routes read; the model still receives ``x`` as given.
    """
    return optree.tree_map(
        lambda leaf: batch_tree(dict(leaf)) if isinstance(leaf, Mapping) else leaf,
        x,
        none_is_leaf=False,
        namespace=_NAMESPACE,
    )


def sample_split(x: PyTree) -> tuple[PyTree, PyTree]:
    """``(x, in_dims)`` for ``vmap`` over the samples of a batch input ``x`` (as :func:`batch_tree`).

    Tensor leaves are split along dim 0; numbers, strings, dtypes, devices and enums (a
    flag or a scale passed to the model) reach every sample as they are (``in_dims``
    None). Any other leaf (a NumPy array, an object holding tensors) cannot be split and
    raises ``ValueError``.
    """
    x = batch_tree(x)
    return x, tree_map(_sample_dim, x)


def sample_of(x: PyTree, n: int) -> PyTree:
    """Sample ``n`` of an input from :func:`sample_split`: row n of each tensor, other leaves as they are."""
    return tree_map(lambda t: t[n] if isinstance(t, Tensor) else t, x)


def batch_size(x: PyTree) -> int:
    """N, the leading dimension of the first tensor leaf of a checked batch input ``x``."""
    return next(t for t in leaves(batch_tree(x)) if isinstance(t, Tensor)).shape[0]


_SHARED_LEAVES = (
    numbers.Number,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    Enum,
    torch.Size,
)


def _sample_dim(leaf: Any) -> int | None:
    if isinstance(leaf, Tensor):
        return 0
    if isinstance(leaf, _SHARED_LEAVES):
        return None
    raise ValueError(
        f"x: the routes that vmap over samples split each tensor of the input along dim 0 and "
        f"pass numbers and flags to every sample, but got a {type(leaf).__name__}; pass it as a "
        "tensor [N, ...] (or as a number), or keep it inside the model"
    )
