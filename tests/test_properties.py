"""Hypothesis properties of hvp / ggn_vp: linearity, symmetry, GGN ⪰ 0, GGN == H for linear models."""

from __future__ import annotations

import torch
from cases import CASES, CASES_BY_NAME
from dense import assert_close_rel, random_like, tree_dot, tree_leaves, tree_map
from helpers import GGN_STRATEGIES, HVP_STRATEGIES, functional, hvp_or_none, loss_of_params, unchanged
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import curvfx

SETTINGS = settings(max_examples=25, deadline=None)

case_names = st.sampled_from([c.name for c in CASES])
linear_case_names = st.sampled_from([c.name for c in CASES if c.linear])
seeds = st.integers(0, 2**31 - 1)
scalars = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)
operators = st.sampled_from([("hvp", s) for s in HVP_STRATEGIES] + [("ggn_vp", s) for s in GGN_STRATEGIES])


def _operator(name, kind, strategy):
    """``(A, params)`` with ``A(v)`` the curvfx product for case ``name``."""
    case = CASES_BY_NAME[name]
    problem = case.make()
    fn, params = functional(problem)
    if kind == "hvp":
        f = loss_of_params(problem, fn)

        def apply(v):
            out = hvp_or_none(f, params, v, strategy, mse=case.mse)
            assume(out is not None)  # "fwd-rev" declined an MSE loss
            return out

    else:

        def apply(v):
            return curvfx.ggn_vp(fn, problem.loss_fn, params, problem.x, problem.y, v, strategy=strategy)

    return apply, params, problem


def _axpby(a, u, b, w):
    return tree_map(lambda x, y: a * x + b * y, u, w)


def _norm(tree):
    return torch.sqrt(tree_dot(tree, tree)).item()


@SETTINGS
@given(name=case_names, op=operators, a=scalars, b=scalars, seed=seeds)
def test_linear_in_v(name, op, a, b, seed):
    A, params, _ = _operator(name, *op)
    g = torch.Generator().manual_seed(seed)
    u, w = random_like(params, g), random_like(params, g)
    lhs = A(_axpby(a, u, b, w))
    rhs = _axpby(a, A(u), b, A(w))
    scale = (abs(a) * _norm(A(u)) + abs(b) * _norm(A(w))) or 1.0
    diff = _norm(_axpby(1.0, lhs, -1.0, rhs))
    assert diff <= 1e-10 * scale + 1e-13, (diff, scale)


@SETTINGS
@given(name=case_names, op=operators, seed=seeds)
def test_symmetric(name, op, seed):
    A, params, _ = _operator(name, *op)
    g = torch.Generator().manual_seed(seed)
    u, v = random_like(params, g), random_like(params, g)
    Au, Av = A(u), A(v)
    uAv, vAu = tree_dot(u, Av).item(), tree_dot(v, Au).item()
    scale = _norm(u) * _norm(Av) + _norm(v) * _norm(Au)
    assert abs(uAv - vAu) <= 1e-10 * scale + 1e-13, (uAv, vAu)


@SETTINGS
@given(name=case_names, strategy=st.sampled_from(GGN_STRATEGIES), seed=seeds)
def test_ggn_is_positive_semidefinite_for_convex_losses(name, strategy, seed):
    # every loss in the registry is convex in the model outputs
    A, params, _ = _operator(name, "ggn_vp", strategy)
    v = random_like(params, torch.Generator().manual_seed(seed))
    Gv = A(v)
    vGv = tree_dot(v, Gv).item()
    assert vGv >= -1e-12 * _norm(v) * _norm(Gv), vGv


@SETTINGS
@given(
    name=linear_case_names,
    hvp_strategy=st.sampled_from(HVP_STRATEGIES),
    ggn_strategy=st.sampled_from(GGN_STRATEGIES),
    seed=seeds,
)
def test_ggn_equals_hessian_for_models_linear_in_params(name, hvp_strategy, ggn_strategy, seed):
    H, params, _ = _operator(name, "hvp", hvp_strategy)
    G, _, _ = _operator(name, "ggn_vp", ggn_strategy)
    v = random_like(params, torch.Generator().manual_seed(seed))
    assert_close_rel(G(v), H(v))


@SETTINGS
@given(name=case_names, op=operators, seed=seeds)
def test_flat_and_pytree_v_agree(name, op, seed):
    A, params, _ = _operator(name, *op)
    v = random_like(params, torch.Generator().manual_seed(seed))
    from_tree = A(v)
    from_flat = A(curvfx.ravel(v))
    assert isinstance(from_flat, torch.Tensor) and from_flat.dim() == 1
    assert_close_rel(curvfx.unravel(from_flat, params), from_tree, tol=1e-12)
    assert_close_rel(from_flat, curvfx.ravel(from_tree), tol=1e-12)


@SETTINGS
@given(name=case_names, op=operators, seed=seeds)
def test_no_side_effects(name, op, seed):
    A, params, problem = _operator(name, *op)
    v = random_like(params, torch.Generator().manual_seed(seed))
    v_before = [t.clone() for t in tree_leaves(v)]
    with unchanged(problem, params):
        A(v)
    for before, now in zip(v_before, tree_leaves(v)):
        assert torch.equal(before, now), "v was modified in place"
