"""curvfx-side glue shared by the tests: functional form of a problem, side-effect checks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import optree
import torch
from cases import Problem

import curvfx


def _with_advertised(required: tuple[str, ...], advertised: str) -> tuple[str, ...]:
    """The strategies the brief requires, plus any further ones curvfx.func advertises."""
    extra = getattr(curvfx.func, advertised, ())
    return required + tuple(s for s in extra if s not in required)


HVP_STRATEGIES = _with_advertised(("auto", "autograd", "rev-rev", "fwd-rev"), "HVP_STRATEGIES")
GGN_STRATEGIES = _with_advertised(("auto", "autograd", "func"), "GGN_STRATEGIES")


def functional(problem: Problem) -> tuple[Any, Any]:
    """``(fn, params)`` as curvfx sees the problem (``make_functional`` for modules)."""
    if problem.model is None:
        return problem.pure_fn, problem.pure_params
    return curvfx.make_functional(problem.model)


def loss_of_params(problem: Problem, fn: Any) -> Any:
    """``f(params) = loss_fn(fn(params, x), y)``, the scalar whose Hessian ``hvp`` takes."""
    return lambda params: problem.loss_fn(fn(params, problem.x), problem.y)


def hvp_or_none(f: Any, params: Any, v: Any, strategy: str, *, mse: bool) -> Any:
    """``curvfx.hvp``; returns None where "fwd-rev" declines an MSE loss with ValueError.

    torch 2.13's ``jvp`` of ``grad`` fails on ``mse_loss``; curvfx may refuse that
    strategy there with a ValueError. Anywhere else every strategy must work.
    """
    if strategy == "fwd-rev" and mse:
        try:
            return curvfx.hvp(f, params, v, strategy=strategy)
        except ValueError:
            return None
    return curvfx.hvp(f, params, v, strategy=strategy)


@contextmanager
def unchanged(problem: Problem, params: Any = None):
    """Check that the block leaves model params, buffers, ``.grad``, params and RNG alone.

    Before the block every trainable parameter gets a known ``.grad`` (frozen ones keep
    ``None``), so that both "grad written" and "grad cleared" are detected.
    """
    model = problem.model
    if model is not None:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 0.125)
        state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        training = [m.training for m in model.modules()]
    leaves = [] if params is None else [t.detach().clone() for t in _leaves(params)]
    rng = torch.random.get_rng_state()
    yield
    if model is not None:
        after = model.state_dict(keep_vars=True)
        assert after.keys() == state.keys()
        for k, before in state.items():
            assert torch.equal(after[k].detach(), before), f"model state {k!r} changed"
        for n, p in model.named_parameters():
            if grads[n] is None:
                assert p.grad is None, f"{n}.grad was set"
            else:
                assert p.grad is not None and torch.equal(p.grad, grads[n]), f"{n}.grad changed"
        assert [m.training for m in model.modules()] == training, "train/eval mode changed"
    if params is not None:
        for before, now in zip(leaves, _leaves(params)):
            assert torch.equal(before, now.detach()), "params changed"
    assert torch.equal(torch.random.get_rng_state(), rng), "global RNG state consumed"


def _leaves(tree: Any) -> list:
    return optree.tree_leaves(tree, none_is_leaf=False)
