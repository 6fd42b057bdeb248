"""curvfx-side glue shared by the tests: functional form of a problem, side-effect checks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import optree
import torch
from cases import Problem

import curvfx

CONSTRUCTORS = {  # the curvature operators built from (model, loss_fn, data, **options)
    "hessian": curvfx.hessian,
    "ggn": curvfx.ggn,
    "fisher_exact": lambda *a, **k: curvfx.fisher(*a, kind="exact", **k),
    "empirical_fisher": curvfx.empirical_fisher,
}


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
    """``curvfx.hvp``; None where a strategy declines the function with a ValueError.

    torch 2.13's ``jvp`` of ``grad`` fails on ``mse_loss``, so "fwd-rev" may refuse an MSE
    loss; "rev-fwd" refuses functions with an operation outside its checked list (batch
    norm, log-softmax, layer norm, attention, recurrent layers; ``tests/test_func.py``
    checks that it accepts the plain models). Anywhere else every strategy must work.
    """
    if (strategy == "fwd-rev" and mse) or strategy == "rev-fwd":
        try:
            return curvfx.hvp(f, params, v, strategy=strategy)
        except ValueError as err:
            if strategy == "rev-fwd" and "rev-fwd" not in str(err):
                raise
            return None
    return curvfx.hvp(f, params, v, strategy=strategy)


@contextmanager
def unchanged(problem: Problem, params: Any = None):
    """Check that the block leaves model params, buffers, ``.grad``, params and RNG alone.

    Before the block every trainable parameter gets a known ``.grad`` (frozen ones keep
    ``None``), so that both "grad written" and "grad cleared" are detected. Also checked:
    the parameter objects and their ``requires_grad``, the hooks of every submodule and
    parameter, torch's global module hooks, and global settings (grad mode, SDPA backend
    flags, cuDNN, ...; see :func:`global_settings`).
    """
    model = problem.model
    if model is not None:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 0.125)
        state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        training = [m.training for m in model.modules()]
        parameters = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
        hooks = module_hooks(model)
    settings = global_settings()
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
        now = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
        assert [n for n, *_ in now] == [n for n, *_ in parameters], "parameter names changed"
        for (n, p, rg), (_, q, rg_now) in zip(parameters, now):
            assert q is p, f"parameter {n!r} was replaced"
            assert rg_now == rg, f"{n}.requires_grad changed"
        assert module_hooks(model) == hooks, "hooks were left on (or removed from) the model"
    changed = {k: (v, global_settings()[k]) for k, v in settings.items() if global_settings()[k] != v}
    assert not changed, f"global settings changed (before, after): {changed}"
    if params is not None:
        for before, now in zip(leaves, _leaves(params)):
            assert torch.equal(before, now.detach()), "params changed"
    assert torch.equal(torch.random.get_rng_state(), rng), "global RNG state consumed"


_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


def module_hooks(model: torch.nn.Module) -> dict:
    """The hook handles (ids) on every submodule and parameter of ``model``."""
    out = {}
    for name, m in model.named_modules():
        for attr in _MODULE_HOOK_DICTS:
            out[name, attr] = tuple(getattr(m, attr, {}))
    for name, p in model.named_parameters():
        out[name, "tensor_hooks"] = tuple(p._backward_hooks or ())
        out[name, "post_accumulate"] = tuple(getattr(p, "_post_accumulate_grad_hooks", None) or ())
    return out


def global_settings() -> dict:
    """Global torch state a curvature computation must restore (grad mode, kernels, hooks)."""
    module = torch.nn.modules.module
    settings = {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "cudnn.enabled": torch.backends.cudnn.enabled,
        "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math_sdp": torch.backends.cuda.math_sdp_enabled(),
        "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
    }
    if hasattr(torch._C, "_get_sdp_priority_order"):
        settings["sdp_priority"] = tuple(torch._C._get_sdp_priority_order())
    for attr in _GLOBAL_HOOK_DICTS:
        settings[attr] = tuple(getattr(module, attr, {}))
    return settings


def _leaves(tree: Any) -> list:
    return optree.tree_leaves(tree, none_is_leaf=False)
