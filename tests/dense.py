"""Independent dense truths for the cases in ``cases.py``.

Everything here is built by a route different from curvfx's: the model is called with
our own ``torch.func.functional_call`` (on a deep copy, with fresh buffer copies), the
parameter pytree is flattened by our own slicing, and the matrices come from
``torch.autograd.functional.hessian`` (Hessians) and ``torch.func.jacrev`` (Jacobians)
on the flat parameter vector. Results are compared as pytrees, leaf by leaf.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import optree
import torch
from cases import CASES_BY_NAME, Case, Problem, slice_batch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

# ---------------------------------------------------------------------------------------
# pytree <-> flat (our own order: optree's leaf order, used only inside this module)


def tree_leaves(tree: Any) -> list[Tensor]:
    """Tensor leaves of ``tree``."""
    return optree.tree_leaves(tree, none_is_leaf=False)


def flatten(tree: Any) -> Tensor:
    """Concatenate the leaves of ``tree``, flattened, into a vector [P]."""
    return torch.cat([leaf.reshape(-1) for leaf in tree_leaves(tree)])


def unflatten(flat: Tensor, like: Any) -> Any:
    """Split ``flat`` [P] (or [..., P]) into a pytree shaped like ``like`` (batch dims kept)."""
    leaves, spec = optree.tree_flatten(like, none_is_leaf=False)
    out, start = [], 0
    batch = flat.shape[:-1]
    for leaf in leaves:
        stop = start + leaf.numel()
        out.append(flat[..., start:stop].reshape(*batch, *leaf.shape))
        start = stop
    assert start == flat.shape[-1], "flat vector length does not match the pytree"
    return optree.tree_unflatten(spec, out)


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """``optree.tree_map`` (None is an empty subtree)."""
    return optree.tree_map(fn, tree, *rest, none_is_leaf=False)


def random_like(tree: Any, generator: torch.Generator) -> Any:
    """Standard normal pytree shaped like ``tree`` (same dtype)."""
    return tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype), tree)


def tree_dot(a: Any, b: Any) -> Tensor:
    """Sum over leaves of <a_leaf, b_leaf>."""
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def same_structure(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same structure and leaf shapes."""
    sa = optree.tree_structure(a, none_is_leaf=False)
    sb = optree.tree_structure(b, none_is_leaf=False)
    return sa == sb and all(x.shape == y.shape for x, y in zip(tree_leaves(a), tree_leaves(b)))


# ---------------------------------------------------------------------------------------
# comparisons


def _as_vector(a: Any) -> Tensor:
    if isinstance(a, Tensor):
        return a.reshape(-1)
    return flatten(a)


def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| over all leaves (0 if both are 0, inf if only b is 0)."""
    va, vb = _as_vector(a), _as_vector(b)
    assert va.shape == vb.shape, f"shapes differ: {va.shape} vs {vb.shape}"
    diff = torch.linalg.vector_norm(va - vb).item()
    ref = torch.linalg.vector_norm(vb).item()
    if diff == 0.0:
        return 0.0
    return diff / ref if ref > 0 else float("inf")


def assert_close_rel(a: Any, b: Any, tol: float = 1e-10, atol: float = 1e-13) -> None:
    """Assert ||a - b|| <= tol ||b|| + atol; a and b are tensors or same-structured pytrees.

    ``atol`` only matters when the truth ``b`` is (close to) zero, e.g. the GGN of
    NLLLoss on log-probabilities, whose Hessian with respect to the outputs is 0.
    """
    if not isinstance(b, Tensor):
        assert not isinstance(a, Tensor), "expected a pytree, got a tensor"
        assert same_structure(a, b), (
            f"structure differs:\n{optree.tree_structure(a)}\nvs\n{optree.tree_structure(b)}"
        )
    else:
        assert isinstance(a, Tensor), f"expected a tensor, got {type(a).__name__}"
        assert a.shape == b.shape, f"shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    va, vb = _as_vector(a), _as_vector(b)
    assert va.dtype == vb.dtype, f"dtype {va.dtype} != expected {vb.dtype}"
    diff = torch.linalg.vector_norm(va - vb).item()
    ref = torch.linalg.vector_norm(vb).item()
    assert diff <= tol * ref + atol, (
        f"relative error {rel_err(a, b):.3e} (|diff|={diff:.3e}, |truth|={ref:.3e}) > {tol:.0e}"
    )


# ---------------------------------------------------------------------------------------
# the problem as a pure function, built without curvfx


def truth_function(problem: Problem) -> tuple[Callable[[Any, Any], Tensor], Any]:
    """``(fn, params)`` with ``fn(params, x)`` the model output, independent of curvfx.

    Modules: a deep copy called through ``functional_call`` with fresh copies of the
    buffers on every call (BatchNorm train-mode updates hit throwaway tensors); params are
    detached clones of the trainable parameters (tied ones once, frozen ones left in the
    copy).
    """
    if problem.model is None:
        params = tree_map(lambda t: t.detach().clone(), problem.pure_params)
        return problem.pure_fn, params
    model = copy.deepcopy(problem.model)
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def fn(p: Any, x: Any) -> Tensor:
        fresh = {name: b.clone() for name, b in buffers.items()}
        if isinstance(x, dict):
            return functional_call(model, (p, fresh), (), x)
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        return functional_call(model, (p, fresh), args)

    return fn, params


class DenseTruth:
    """Dense matrices of one problem, in our flat order (see :func:`flatten`).

    Attributes:
        fn, params: From :func:`truth_function`.
        num_params: P.
    """

    def __init__(self, problem: Problem):
        self.problem = problem
        self.fn, self.params = truth_function(problem)
        self.flat = flatten(self.params)
        self.num_params = self.flat.numel()
        self.outputs = self.fn(self.params, problem.x).detach()

    def loss_of_flat(self, flat: Tensor) -> Tensor:
        """L(θ) as a function of the flat parameter vector."""
        p = self.problem
        return p.loss_fn(self.fn(unflatten(flat, self.params), p.x), p.y)

    def outputs_of_flat(self, flat: Tensor) -> Tensor:
        """f(X; θ), all outputs, as a function of the flat parameter vector."""
        return self.fn(unflatten(flat, self.params), self.problem.x)

    @functools.cached_property
    def hessian(self) -> Tensor:
        """∇²_θ L, [P, P]."""
        return torch.autograd.functional.hessian(self.loss_of_flat, self.flat)

    @functools.cached_property
    def jacobian(self) -> Tensor:
        """J = ∂ vec(f) / ∂θ for all outputs, [M, P] with M = outputs.numel()."""
        return jacrev(self.outputs_of_flat)(self.flat).reshape(-1, self.num_params)

    @functools.cached_property
    def output_hessian(self) -> Tensor:
        """∇²_f L, [M, M]."""
        y = self.problem.y
        loss_fn = self.problem.loss_fn
        H = torch.autograd.functional.hessian(lambda f: loss_fn(f, y), self.outputs)
        return H.reshape(self.outputs.numel(), self.outputs.numel())

    @functools.cached_property
    def ggn(self) -> Tensor:
        """G = Jᵀ (∇²_f L) J, [P, P]."""
        J = self.jacobian
        return J.T @ self.output_hessian @ J

    def hvp(self, v: Any) -> Any:
        """H v for a params-shaped pytree ``v``."""
        return unflatten(self.hessian @ flatten(v), self.params)

    def ggn_vp(self, v: Any) -> Any:
        """G v for a params-shaped pytree ``v``."""
        return unflatten(self.ggn @ flatten(v), self.params)

    @functools.cached_property
    def per_sample_grads(self) -> Any:
        """Pytree like params, leaves [N, *shape]: ∇θ loss_fn(f(x[n:n+1]), y[n:n+1])."""
        p = self.problem
        grads = []
        for n in range(p.num_samples):
            theta = tree_map(lambda t: t.detach().clone().requires_grad_(True), self.params)
            xn, yn = slice_batch(p.x, n, n + 1), p.y[n : n + 1]
            loss = p.loss_fn(self.fn(theta, xn), yn)
            leaves = tree_leaves(theta)
            g = torch.autograd.grad(loss, leaves, allow_unused=True)
            g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, leaves)]
            grads.append(g)
        stacked = [torch.stack(gs) for gs in zip(*grads)]
        return optree.tree_unflatten(optree.tree_structure(self.params, none_is_leaf=False), stacked)

    @functools.cached_property
    def per_sample_jacobians(self) -> Any:
        """Pytree like params, leaves [N, *out_shape, *shape]: ∂ f(x[n:n+1])[0] / ∂θ."""
        p = self.problem
        per_n = []
        for n in range(p.num_samples):
            xn = slice_batch(p.x, n, n + 1)
            per_n.append(jacrev(lambda theta, xn=xn: self.fn(theta, xn)[0])(self.params))
        return tree_map(lambda *js: torch.stack(js), *per_n)


@functools.cache
def _dense_truth(name: str) -> DenseTruth:
    return DenseTruth(CASES_BY_NAME[name].make())


def dense_truth(case: Case) -> DenseTruth:
    """Cached :class:`DenseTruth` of ``case`` (built once per test session)."""
    return _dense_truth(case.name)


def output_hessian_of(loss_fn: Callable, outputs: Tensor, targets: Tensor) -> Tensor:
    """∇²_f loss_fn(f, targets) at ``outputs``, [M, M]."""
    M = outputs.numel()
    H = torch.autograd.functional.hessian(lambda f: loss_fn(f, targets), outputs.detach())
    return H.reshape(M, M)


# ---------------------------------------------------------------------------------------
# modules over one flat parameter vector (named_parameters() order)


def named_flat(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    """Names and shapes of the trainable parameters, and their values as one flat vector [P]."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
    return [n for n, _ in named], [p.shape for _, p in named], flat


def split_flat(flat: Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, Tensor]:
    """Flat vector [P] -> {name: tensor}, in ``named_parameters()`` order."""
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        out[name] = flat[start : start + shape.numel()].reshape(shape)
        start += shape.numel()
    return out


def module_of_flat(model: nn.Module) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor, list[str]]:
    """``(f, flat, names)`` with ``f(flat, x)`` the outputs of a deep copy of ``model``."""
    copied = copy.deepcopy(model)
    names, shapes, flat = named_flat(copied)
    return (lambda theta, x: functional_call(copied, split_flat(theta, names, shapes), (x,))), flat, names


def flat_jacobian(out_fn: Callable[[Tensor], Tensor], flat: Tensor) -> Tensor:
    """∂ vec(out_fn) / ∂θ, [M, P], by one backward pass per output (no vmap)."""
    return torch.autograd.functional.jacobian(out_fn, flat).reshape(-1, flat.numel())
