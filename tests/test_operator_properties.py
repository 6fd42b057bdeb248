"""Hypothesis properties of the operators and transforms that ``test_properties.py`` leaves out.

``test_properties.py`` draws vectors for ``hvp`` / ``ggn_vp`` on the fixed registry cases;
here the *problems* are drawn too (widths, batch size, one or two batches, seed, loss and
its reduction), in float64, and the properties cover the operators (``hessian``, ``ggn``,
``fisher`` of every kind, ``empirical_fisher``, ``kfac``, ``ekfac``, ``jacobian``), their
arithmetic and formats, ``fisher_vp`` and the scaling of ``per_sample_grad``. Where a
property has an independent truth (``dense.py``: autograd Hessians and jacrev Jacobians of
the whole batch, a loop of single-sample gradients), the operator is compared with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from cases import Problem
from dense import DenseTruth, assert_close_rel, unflatten
from helpers import GGN_STRATEGIES, HVP_STRATEGIES, hvp_or_none
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import curvfx

DTYPE = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)
FEW = settings(max_examples=25, deadline=None)
PER_OPERATOR = settings(max_examples=10, deadline=None)  # with the operator a pytest parameter

seeds = st.integers(0, 2**31 - 1)
coefficients = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)

# ---------------------------------------------------------------------------------------
# drawn problems

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse_mean": nn.MSELoss,
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
    "ce_mean": nn.CrossEntropyLoss,
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "ce_ignore_mean": nn.CrossEntropyLoss,  # targets -100 (ignored) at drawn positions
    "bce_mean": nn.BCEWithLogitsLoss,
    "bce_sum": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}


@dataclasses.dataclass(frozen=True)
class Drawn:
    """A drawn problem: a float64 module, its loss, one batch (x, y) and how ``data`` is cut."""

    model: nn.Module
    loss: str
    x: Tensor
    y: Tensor
    bounds: tuple[int, ...]  # the batch cut into data batches [bounds[i], bounds[i + 1])
    seed: int

    @property
    def loss_fn(self) -> nn.Module:
        return LOSSES[self.loss]()

    @property
    def data(self) -> list[tuple[Tensor, Tensor]]:
        """``data`` as the operators take it: one or two batches of the drawn batch."""
        b = self.bounds
        return [(self.x[i:j], self.y[i:j]) for i, j in zip(b[:-1], b[1:])]

    @property
    def names(self) -> list[str]:
        """Trainable parameter names in ``named_parameters()`` order (curvfx's flat order)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def truth(self) -> DenseTruth:
        """Dense truth of the whole batch (``dense.py``; a deep copy of the model)."""
        return DenseTruth(Problem(f"drawn-{self.loss}", self.model, None, None, self.loss_fn, self.x, self.y))

    def random(self, *shape: int, seed: int = 0) -> Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# every sample counts equally (no ignored targets): mean = (1/N) Σ_n (sample n's own mean)
COUNTED_LOSSES = tuple(name for name in LOSSES if "ignore" not in name)
ARCHITECTURES = ("mlp", "linear", "frozen_features")
LINEAR_IN_PARAMS = ("linear", "frozen_features")


@st.composite
def problems(draw, losses=tuple(LOSSES), archs=ARCHITECTURES, max_n: int = 5) -> Drawn:
    """A float64 model of a drawn architecture, N samples, data in one or two batches.

    "mlp": Linear(d_in, h) -> Tanh -> Linear(h, C); "linear": Linear(d_in, C);
    "frozen_features": the MLP with its first layer frozen, f = W tanh(A x + a) + b, which
    is linear in the trainable (W, b) but not in x.
    """
    d_in, hidden, classes = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(2, 3))
    n, seed = draw(st.integers(1, max_n)), draw(seeds)
    loss, arch = draw(st.sampled_from(losses)), draw(st.sampled_from(archs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "linear":
            model = nn.Linear(d_in, classes)
        else:
            model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
            if arch == "frozen_features":
                model[0].requires_grad_(False)
        model = model.to(DTYPE)
        x = torch.randn(n, d_in, dtype=DTYPE)
        if loss.startswith("mse"):
            y = torch.randn(n, classes, dtype=DTYPE)
        elif loss.startswith("ce"):
            y = torch.randint(0, classes, (n,))
        else:
            y = torch.rand(n, classes, dtype=DTYPE)  # soft binary targets
    if loss == "ce_ignore_mean":  # sample 0 counts, so the batch mean is defined
        ignored = draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
        y[1:][torch.tensor(ignored, dtype=torch.bool)] = -100
    cut = draw(st.integers(1, n - 1)) if n > 1 and draw(st.booleans()) else None
    bounds = (0, n) if cut is None else (0, cut, n)
    return Drawn(model, loss, x, y, bounds, seed)


# ---------------------------------------------------------------------------------------
# operators of a drawn problem

KFAC_TYPES = ("type-2", "mc", "empirical")


def _curvature(constructor: Callable, **options) -> Callable:
    """``build(p, **kwargs)``: ``constructor(p.model, p.loss_fn, p.data, **options, **kwargs)``."""

    def build(p: Drawn, model=None, **kwargs):
        if options.get("kind") == "mc":  # MC draws seeded by the problem: one fixed matrix
            kwargs["generator"] = torch.Generator().manual_seed(p.seed)
        return constructor(p.model if model is None else model, p.loss_fn, p.data, **options, **kwargs)

    return build


def _kfac(which: str, fisher_type: str) -> Callable:
    def build(p: Drawn):
        g = torch.Generator().manual_seed(p.seed)
        constructor = curvfx.kfac if which == "kfac" else curvfx.ekfac
        return constructor(p.model, p.loss_fn, p.data, fisher_type=fisher_type, generator=g)

    return build


CURVATURE: dict[str, Callable[..., curvfx.LinearOperator]] = {
    "hessian": _curvature(curvfx.hessian),
    "ggn": _curvature(curvfx.ggn),
    "fisher_exact": _curvature(curvfx.fisher, kind="exact"),
    "fisher_mc": _curvature(curvfx.fisher, kind="mc", num_samples=2),
    "fisher_empirical": _curvature(curvfx.fisher, kind="empirical"),
    "empirical_fisher": _curvature(curvfx.empirical_fisher),
}
OPERATORS: dict[str, Callable[[Drawn], curvfx.LinearOperator]] = {
    **CURVATURE,
    **{f"{w}_{t}": _kfac(w, t) for w in ("kfac", "ekfac") for t in KFAC_TYPES},
}
PSD_OPERATORS = [name for name in OPERATORS if name != "hessian"]
# exact (non-random) operators with an independent dense truth below
TRUTHS = ["hessian", "ggn", "fisher_exact", "fisher_empirical", "empirical_fisher"]
FISHER_KINDS = ("exact", "mc", "empirical")


def _order(p: Drawn, dense: DenseTruth) -> Tensor:
    """Indices ``perm``: (curvfx flat vector)[i] = (dense.py flat vector)[perm[i]]."""
    index = unflatten(torch.arange(dense.num_params), dense.params)  # dense.py position of each entry
    return torch.cat([index[n].reshape(-1) for n in p.names])


def _truth(name: str, p: Drawn) -> Tensor:
    """The matrix of operator ``name`` built without curvfx, rows/columns in curvfx's order.

    Hessian: ``torch.autograd.functional.hessian`` of the whole-batch loss. GGN and exact
    Fisher (equal for MSE, cross-entropy, BCE with logits): ``Jᵀ (∇²_f L) J`` with J from
    jacrev. Empirical Fisher: ``Σ_n g_n g_nᵀ`` (sum) or ``(1/Z) Σ_n g_n g_nᵀ`` (mean) with
    g_n the gradient of sample n's summed loss by a loop of ``torch.autograd.grad`` and Z
    read off torch as ``L_sum / L_mean``.
    """
    dense = p.truth()
    perm = _order(p, dense)
    if name == "hessian":
        M = dense.hessian
    elif name in ("ggn", "fisher_exact"):
        M = dense.ggn
    else:
        summed = LOSSES[p.loss.split("_")[0] + "_sum"]()
        rows = []
        for n in range(len(p.y)):
            flat = dense.flat.detach().clone().requires_grad_(True)
            loss_n = summed(dense.fn(unflatten(flat, dense.params), p.x[n : n + 1]), p.y[n : n + 1])
            rows.append(torch.autograd.grad(loss_n, flat)[0])
        G = torch.stack(rows)
        M = G.T @ G
        if p.loss.endswith("_mean"):
            M = M / (summed(dense.outputs, p.y) / p.loss_fn(dense.outputs, p.y))
    return M[perm][:, perm]


def _tree(p: Drawn, flat: Tensor) -> dict[str, Tensor]:
    """``flat`` [P] cut into the model's trainable parameters, by our own slicing."""
    out, start = {}, 0
    for name, param in p.model.named_parameters():
        if param.requires_grad:
            out[name] = flat[start : start + param.numel()].reshape(param.shape)
            start += param.numel()
    assert start == flat.numel()
    return out


def _close(a: Tensor, b: Tensor, scale: float, tol: float = 1e-10) -> None:
    """||a - b|| <= tol · scale (+ tiny), with ``scale`` the size of the terms that make up b."""
    diff = torch.linalg.vector_norm(a - b).item()
    assert diff <= tol * scale + 1e-13, f"|diff| = {diff:.3e} > {tol:.0e} · {scale:.3e}"


def _psd_tolerance(D: Tensor) -> float:
    return 1e-10 * max(1.0, D.abs().max().item())


# ---------------------------------------------------------------------------------------
# symmetry, transpose, linearity


@pytest.mark.parametrize("name", list(OPERATORS))
@PER_OPERATOR
@given(p=problems(), seed=seeds)
def test_operators_are_symmetric_and_their_own_transpose(name, p, seed):
    """uᵀ(A v) == vᵀ(A u) for every curvature operator on a drawn problem (MC draws are
    fixed per operator, so the MC Fisher and MC KFAC are one symmetric matrix too), and
    ``A.T``, ``v @ A`` and ``A.T.to_dense()`` give A's own products: a symmetric operator
    must be flagged so and transpose to itself."""
    A = OPERATORS[name](p)
    u, v = p.random(A.shape[0], seed=seed), p.random(A.shape[0], seed=seed + 1)
    Au, Av = A @ u, A @ v
    scale = (u.norm() * Av.norm() + v.norm() * Au.norm()).item()
    assert abs((u @ Av - v @ Au).item()) <= 1e-10 * scale + 1e-13
    assert A.symmetric
    _close(A.T @ v, Av, Av.norm().item(), tol=1e-12)
    _close(v @ A, Av, Av.norm().item(), tol=1e-12)
    D = A.to_dense()
    _close(A.T.to_dense(), D, D.norm().item(), tol=1e-12)
    _close(D.T, D, D.norm().item())


@SETTINGS
@given(p=problems(), seed=seeds)
def test_jacobian_transpose_is_its_adjoint(p, seed):
    """⟨u, J v⟩ == ⟨Jᵀ u, v⟩ for the Jacobian operator [N·C, P] (J.T is a separate product,
    one backward pass), ``u @ J == J.T @ u``, ``J.T.T`` is J again, and the transposed
    dense matrix equals ``J.to_dense().T``; J itself is compared with jacrev."""
    J = curvfx.jacobian(p.model, p.x)
    dense = p.truth()
    Jd = dense.jacobian[:, _order(p, dense)]
    assert tuple(J.shape) == tuple(Jd.shape)
    v, u = p.random(J.shape[1], seed=seed), p.random(J.shape[0], seed=seed + 1)
    Jv, Jtu = J @ v, J.T @ u
    assert abs((u @ Jv - Jtu @ v).item()) <= 1e-10 * (u.norm() * Jv.norm() + v.norm() * Jtu.norm()).item()
    _close(u @ J, Jtu, Jtu.norm().item(), tol=1e-12)
    _close(J.T.T @ v, Jv, Jv.norm().item(), tol=1e-12)
    _close(Jv, Jd @ v, (Jd @ v).norm().item())
    _close(J.T.to_dense(), Jd.T, Jd.norm().item())


@SETTINGS
@given(
    p=problems(),
    name=st.sampled_from([*OPERATORS, "jacobian", "jacobian.T"]),
    a=coefficients,
    b=coefficients,
    seed=seeds,
)
def test_operators_are_linear(p, name, a, b, seed):
    """A(a u + b w) == a A u + b A w for every operator, the Jacobian and its transpose included."""
    if name.startswith("jacobian"):
        J = curvfx.jacobian(p.model, p.x)
        A = J.T if name == "jacobian.T" else J
    else:
        A = OPERATORS[name](p)
    u, w = p.random(A.shape[1], seed=seed), p.random(A.shape[1], seed=seed + 1)
    Au, Aw = A @ u, A @ w
    _close(A @ (a * u + b * w), a * Au + b * Aw, abs(a) * Au.norm().item() + abs(b) * Aw.norm().item())


# ---------------------------------------------------------------------------------------
# positive semi-definiteness


@pytest.mark.parametrize("name", PSD_OPERATORS)
@PER_OPERATOR
@given(p=problems(), seed=seeds)
def test_gauss_newton_fisher_and_kronecker_operators_are_psd(name, p, seed):
    """GGN, the Fisher of every kind, the empirical Fisher, KFAC and EKFAC (every Fisher
    type) are ⪰ 0 for convex losses: vᵀAv >= -tol for a random v and, stronger, the smallest
    eigenvalue of ``to_dense()`` is >= -tol (a random v can miss a negative direction)."""
    A = OPERATORS[name](p)
    v = p.random(A.shape[0], seed=seed)
    Av = A @ v
    assert (v @ Av).item() >= -1e-12 * (v.norm() * Av.norm()).item()
    D = A.to_dense()
    assert torch.linalg.eigvalsh((D + D.T) / 2).min().item() >= -_psd_tolerance(D)


@SETTINGS
@given(p=problems(), kind=st.sampled_from(FISHER_KINDS), strategy=st.sampled_from(GGN_STRATEGIES))
def test_fisher_vp_is_psd_for_every_kind_and_engine(p, kind, strategy):
    """The transform ``fisher_vp`` (not the operator): the matrix of its products with the
    identity columns, for each kind and engine, has no eigenvalue below -tol."""
    fn, params = curvfx.make_functional(p.model)
    P = p.num_params

    def product(e):
        g = torch.Generator().manual_seed(p.seed)  # one draw of MC targets for all columns
        return curvfx.fisher_vp(fn, p.loss_fn, params, p.x, p.y, e, kind=kind, generator=g, strategy=strategy)

    D = torch.stack([product(e) for e in torch.eye(P, dtype=DTYPE)], 1)
    _close(D, D.T, D.norm().item())
    assert torch.linalg.eigvalsh((D + D.T) / 2).min().item() >= -_psd_tolerance(D)


# ---------------------------------------------------------------------------------------
# GGN == Hessian for models linear in θ


@SETTINGS
@given(p=problems(archs=LINEAR_IN_PARAMS))
def test_ggn_operator_equals_hessian_for_models_linear_in_params(p):
    """f linear in θ: the Hessian's second term Σ (∂ℓ/∂f) ∇²_θ f vanishes, so GGN == H for
    every loss, cross-entropy and BCE as well as MSE (a plain Linear, or a frozen nonlinear
    feature map followed by a trainable Linear), over one or two batches; both equal the
    autograd Hessian of the whole batch."""
    G, H = OPERATORS["ggn"](p).to_dense(), OPERATORS["hessian"](p).to_dense()
    truth = _truth("hessian", p)
    assert truth.norm() > 0
    assert_close_rel(H, truth)
    assert_close_rel(G, truth)


@SETTINGS
@given(
    p=problems(archs=LINEAR_IN_PARAMS),
    hvp_strategy=st.sampled_from(HVP_STRATEGIES),
    ggn_strategy=st.sampled_from(GGN_STRATEGIES),
    seed=seeds,
)
def test_ggn_vp_equals_hvp_for_drawn_models_linear_in_params(p, hvp_strategy, ggn_strategy, seed):
    """The transforms on drawn linear-in-θ models (test_properties.py uses two fixed cases):
    ``ggn_vp == hvp`` for every engine pair, MSE, cross-entropy and BCE, mean and sum."""
    fn, params = curvfx.make_functional(p.model)
    v = _tree(p, p.random(p.num_params, seed=seed))
    Hv = hvp_or_none(
        lambda q: p.loss_fn(fn(q, p.x), p.y), params, v, hvp_strategy, mse=p.loss.startswith("mse")
    )
    assume(Hv is not None)  # an engine declined the function (see helpers.hvp_or_none)
    Gv = curvfx.ggn_vp(fn, p.loss_fn, params, p.x, p.y, v, strategy=ggn_strategy)
    assert_close_rel(Gv, Hv)


# ---------------------------------------------------------------------------------------
# formats: pytree / flat, matmat / matvec, to_dense


@SETTINGS
@given(p=problems(), name=st.sampled_from([*OPERATORS, "jacobian"]), seed=seeds)
def test_operators_give_the_same_answer_for_pytree_and_flat_vectors(p, name, seed):
    """``A @ tree`` is a dict like the parameters whose leaves are the slices of
    ``A @ flat`` (parameters in ``named_parameters()`` order); the Jacobian maps a params
    pytree to the flat output vector. Slicing is ours, not ``curvfx.unravel``."""
    A = curvfx.jacobian(p.model, p.x) if name == "jacobian" else OPERATORS[name](p)
    v = p.random(A.shape[1], seed=seed)
    from_flat, from_tree = A @ v, A @ _tree(p, v)
    assert isinstance(from_flat, Tensor) and from_flat.shape == (A.shape[0],)
    if name == "jacobian":
        assert isinstance(from_tree, Tensor)
        _close(from_tree, from_flat, from_flat.norm().item(), tol=1e-12)
        return
    expected = _tree(p, from_flat)
    assert isinstance(from_tree, dict) and list(from_tree) == list(expected)
    for key, leaf in from_tree.items():
        assert leaf.shape == expected[key].shape, key
        _close(leaf, expected[key], from_flat.norm().item(), tol=1e-12)


def _nested(p: Drawn) -> tuple[Callable, dict]:
    """The drawn MLP as a pure function of nested params ``{"layer": [A, a], "out": (W, b)}``."""
    first, last = p.model[0], p.model[2]
    params = {
        "layer": [first.weight.detach().clone(), first.bias.detach().clone()],
        "out": (last.weight.detach().clone(), last.bias.detach().clone()),
    }

    def fn(q, x):
        (A, a), (W, b) = q["layer"], q["out"]
        return torch.tanh(x @ A.T + a) @ W.T + b

    return fn, params


def _nested_tree(flat: Tensor, like: dict) -> dict:
    """``flat`` cut into ``like``'s leaves in the order layer[0], layer[1], out[0], out[1]."""
    shapes = [t.shape for t in (*like["layer"], *like["out"])]
    sizes = [s.numel() for s in shapes]
    leaves = [chunk.reshape(s) for chunk, s in zip(flat.split(sizes), shapes)]
    return {"layer": leaves[:2], "out": tuple(leaves[2:])}


@SETTINGS
@given(p=problems(archs=("mlp",)), name=st.sampled_from([*CURVATURE, "jacobian"]), seed=seeds)
def test_operators_over_nested_pytree_params_match_the_module(p, name, seed):
    """A pure function over nested params (dict of a list and a tuple) gives the operator of
    the module it mirrors: flat products equal (same parameter order), and a nested v gives
    a nested result of the same structure whose leaves are the slices of the flat result."""
    fn, params = _nested(p)
    if name == "jacobian":
        A, B = curvfx.jacobian(fn, p.x, params=params), curvfx.jacobian(p.model, p.x)
    else:
        A, B = CURVATURE[name](p, model=fn, params=params), CURVATURE[name](p)
    v = p.random(A.shape[1], seed=seed)
    from_flat = A @ v
    _close(from_flat, B @ v, from_flat.norm().item())
    from_tree = A @ _nested_tree(v, params)
    if name == "jacobian":
        _close(from_tree, from_flat, from_flat.norm().item(), tol=1e-12)
        return
    expected = _nested_tree(from_flat, params)
    assert isinstance(from_tree, dict) and list(from_tree) == ["layer", "out"]
    assert isinstance(from_tree["layer"], list) and isinstance(from_tree["out"], tuple)
    for got, want in zip((*from_tree["layer"], *from_tree["out"]), (*expected["layer"], *expected["out"])):
        assert got.shape == want.shape
        _close(got, want, from_flat.norm().item(), tol=1e-12)


@SETTINGS
@given(p=problems(), kind=st.sampled_from(FISHER_KINDS), strategy=st.sampled_from(GGN_STRATEGIES), seed=seeds)
def test_fisher_vp_gives_the_same_answer_for_pytree_and_flat_vectors(p, kind, strategy, seed):
    """``fisher_vp`` (every kind and engine; MC draws from one seed) on a pytree v and on the
    flat v: the same numbers, each in the form of its input."""
    fn, params = curvfx.make_functional(p.model)
    flat = p.random(p.num_params, seed=seed)

    def product(v):
        g = torch.Generator().manual_seed(p.seed)
        return curvfx.fisher_vp(fn, p.loss_fn, params, p.x, p.y, v, kind=kind, generator=g, strategy=strategy)

    from_flat, from_tree = product(flat), product(_tree(p, flat))
    assert isinstance(from_flat, Tensor) and from_flat.shape == flat.shape
    expected = _tree(p, from_flat)
    assert isinstance(from_tree, dict) and list(from_tree) == list(expected)
    for key, leaf in from_tree.items():
        _close(leaf, expected[key], from_flat.norm().item(), tol=1e-12)


@SETTINGS
@given(
    p=problems(),
    name=st.sampled_from([*OPERATORS, "jacobian", "jacobian.T"]),
    k=st.integers(1, 4),
    chunk_size=st.sampled_from([None, 1, 2]),
    seed=seeds,
)
def test_matmat_equals_stacked_matvecs(p, name, k, chunk_size, seed):
    """``A @ V`` and ``A.matmat(V)`` (columns vmapped or shared) equal the K matvecs one at
    a time, stacked; also through ``chunk_size`` for the operators that take it."""
    if name.startswith("jacobian"):
        J = curvfx.jacobian(p.model, p.x, chunk_size=chunk_size)
        A = J.T if name == "jacobian.T" else J
    elif name in CURVATURE:
        A = CURVATURE[name](p, chunk_size=chunk_size)
    else:
        A = OPERATORS[name](p)
    V = p.random(A.shape[1], k, seed=seed)
    stacked = torch.stack([A @ V[:, j] for j in range(k)], 1)
    scale = stacked.norm().item()
    assert (A @ V).shape == (A.shape[0], k)
    _close(A @ V, stacked, scale)
    _close(A.matmat(V), stacked, scale)


@FEW
@given(
    p=problems(),
    product=st.sampled_from(
        [("hvp", s) for s in HVP_STRATEGIES]
        + [("ggn", s) for s in GGN_STRATEGIES]
        + [(kind, s) for kind in FISHER_KINDS for s in GGN_STRATEGIES]
    ),
    k=st.integers(1, 3),
    seed=seeds,
)
def test_transforms_of_a_matrix_are_the_products_of_its_columns(p, product, k, seed):
    """``hvp`` / ``ggn_vp`` / ``fisher_vp`` of V [P, K] (one shared forward pass, or vmap)
    equal the K products of its columns, on drawn problems and every engine."""
    fn, params = curvfx.make_functional(p.model)
    what, strategy = product

    def apply(v):
        if what == "hvp":
            out = hvp_or_none(
                lambda q: p.loss_fn(fn(q, p.x), p.y), params, v, strategy, mse=p.loss.startswith("mse")
            )
            assume(out is not None)
            return out
        if what == "ggn":
            return curvfx.ggn_vp(fn, p.loss_fn, params, p.x, p.y, v, strategy=strategy)
        g = torch.Generator().manual_seed(p.seed)
        return curvfx.fisher_vp(fn, p.loss_fn, params, p.x, p.y, v, kind=what, generator=g, strategy=strategy)

    V = p.random(p.num_params, k, seed=seed)
    stacked = torch.stack([apply(V[:, j]) for j in range(k)], 1)
    got = apply(V)
    assert got.shape == (p.num_params, k)
    _close(got, stacked, stacked.norm().item())


@pytest.mark.parametrize("name", list(OPERATORS))
@PER_OPERATOR
@given(p=problems(), seed=seeds)
def test_to_dense_is_consistent_with_matvec_and_the_independent_truth(name, p, seed):
    """``to_dense() @ v == A @ v`` for every operator (KFAC/EKFAC assemble ``to_dense`` from
    their factors, not from products), and for the exact operators ``to_dense()`` equals
    the matrix built without curvfx (autograd Hessian, jacrev GGN, per-sample loop)."""
    A = OPERATORS[name](p)
    D = A.to_dense()
    assert D.shape == (p.num_params, p.num_params) and D.dtype == DTYPE
    v = p.random(p.num_params, seed=seed)
    Av = A @ v
    _close(D @ v, Av, (D.abs() @ v.abs()).norm().item())
    if name in TRUTHS:
        assert_close_rel(D, _truth(name, p), atol=1e-12)


# ---------------------------------------------------------------------------------------
# arithmetic and damping


@SETTINGS
@given(
    p=problems(),
    names=st.lists(st.sampled_from(list(OPERATORS)), min_size=2, max_size=3),
    c=st.lists(coefficients, min_size=3, max_size=3),
    seed=seeds,
)
def test_sums_and_scalings_of_operators_act_term_by_term(p, names, c, seed):
    """(c₀A₀ + c₁A₁ [- c₂A₂]) @ v == c₀A₀v + c₁A₁v [- c₂A₂v] for drawn operators and
    coefficients (built with ``+``, ``-``, scalar ``*`` on both sides and unary ``-``),
    for a vector, a matrix and ``to_dense``; the sum of symmetric operators stays symmetric."""
    ops = [OPERATORS[n](p) for n in names]
    S = c[0] * ops[0] + ops[1] * c[1]
    if len(ops) == 3:
        S = S - c[2] * ops[2]
    signs = [c[0], c[1], -c[2]][: len(ops)]
    v = p.random(p.num_params, seed=seed)
    V = p.random(p.num_params, 2, seed=seed + 1)
    terms = [s * (A @ v) for s, A in zip(signs, ops)]
    _close(S @ v, sum(terms), sum(t.norm().item() for t in terms))
    columns = [s * (A @ V) for s, A in zip(signs, ops)]
    _close(S @ V, sum(columns), sum(t.norm().item() for t in columns))
    dense = [s * A.to_dense() for s, A in zip(signs, ops)]
    _close(S.to_dense(), sum(dense), sum(t.norm().item() for t in dense))
    _close((-S) @ v, -(S @ v), (S @ v).norm().item(), tol=1e-12)
    assert S.symmetric
    assert S.shape == ops[0].shape and S.dtype == DTYPE


@SETTINGS
@given(
    p=problems(),
    name=st.sampled_from(list(OPERATORS)),
    c=st.floats(1e-3, 10.0, allow_nan=False),
    left=st.booleans(),
    seed=seeds,
)
def test_damping_adds_c_times_the_identity(p, name, c, left, seed):
    """``A + c * identity(P)`` (or ``c * identity(P) + A``): ``(A + cI) v == A v + c v``,
    ``to_dense() == A.to_dense() + c I``, float64 kept from A (identity's default dtype is
    float32), and for the operators that are ⪰ 0 every eigenvalue moves up to >= c."""
    A = OPERATORS[name](p)
    P = A.shape[0]
    damped = c * curvfx.identity(P) + A if left else A + c * curvfx.identity(P)
    assert damped.dtype == DTYPE and damped.symmetric
    v = p.random(P, seed=seed)
    Av = A @ v
    _close(damped @ v, Av + c * v, Av.norm().item() + c * v.norm().item())
    D = A.to_dense()
    expected = D + c * torch.eye(P, dtype=DTYPE)
    _close(damped.to_dense(), expected, expected.norm().item())
    if name in PSD_OPERATORS:
        low = torch.linalg.eigvalsh(damped.to_dense()).min().item()
        assert low >= c - _psd_tolerance(D) - 1e-10 * c


# ---------------------------------------------------------------------------------------
# Jacobian and per-sample gradients against the GGN and the batch gradient


@SETTINGS
@given(p=problems(losses=("mse_mean", "mse_sum")), seed=seeds)
def test_jacobian_gram_is_the_ggn_for_mse(p, seed):
    """MSE: ∇²_f L = 2 I (sum) or 2/(N·C) I (mean), so GGN v == c Jᵀ(J v) with that c, for
    the Jacobian operator's two products, the composed operator ``J.T @ J`` and the dense
    jacrev truth. The GGN operator is built on the same batch, in one piece."""
    J = curvfx.jacobian(p.model, p.x)
    G = curvfx.ggn(p.model, p.loss_fn, (p.x, p.y))
    c = 2.0 if p.loss == "mse_sum" else 2.0 / p.y.numel()
    v = p.random(p.num_params, seed=seed)
    Gv = G @ v
    scale = Gv.norm().item()
    _close(c * (J.T @ (J @ v)), Gv, scale)
    _close(c * ((J.T @ J) @ v), Gv, scale)
    dense = p.truth()
    Jd = dense.jacobian[:, _order(p, dense)]
    _close(c * (Jd.T @ (Jd @ v)), Gv, scale)
    D = G.to_dense()
    _close(c * (J.T @ J).to_dense(), D, D.norm().item())


@SETTINGS
@given(p=problems(losses=COUNTED_LOSSES, max_n=6), backend=st.sampled_from(["auto", "generic", "structured"]))
def test_per_sample_grads_average_or_add_up_to_the_batch_gradient(p, backend):
    """``per_sample_grad`` g_n is the gradient of sample n's own loss: the batch gradient
    (``torch.autograd.grad`` of the whole-batch loss on the module) is (1/N) Σ_n g_n for a
    mean reduction (MSE, BCE: every sample has C entries; CE: one) and Σ_n g_n for a sum,
    for every backend; and each g_n is the gradient of ``loss_fn`` on sample n alone (no 1/N
    folded in)."""
    fn, params = curvfx.make_functional(p.model)
    grads = curvfx.per_sample_grad(fn, p.loss_fn, params, p.x, p.y, backend=backend)
    n = len(p.y)
    assert list(grads) == p.names
    trainable = [q for q in p.model.parameters() if q.requires_grad]
    batch = torch.autograd.grad(p.loss_fn(p.model(p.x), p.y), trainable)
    scale = 1.0 / n if p.loss.endswith("_mean") else 1.0
    for name, g_batch in zip(p.names, batch):
        assert grads[name].shape == (n, *g_batch.shape), name
        _close(scale * grads[name].sum(0), g_batch, g_batch.norm().item())
    # each g_n itself: the gradient of loss_fn on sample n alone
    for k in range(n):
        alone = torch.autograd.grad(p.loss_fn(p.model(p.x[k : k + 1]), p.y[k : k + 1]), trainable)
        for name, g in zip(p.names, alone):
            _close(grads[name][k], g, g.norm().item())


@pytest.mark.parametrize("name", ["ggn", "fisher_exact", "empirical_fisher", "kfac_type-2"])
def test_the_drawn_problems_are_not_degenerate(name):
    """Guard for the properties above: on a typical drawn problem the matrices are nonzero
    and not diagonal, so symmetry, PSD and sums are not checked on zeros."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
        x, y = torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 3, (5,))
    p = Drawn(model, "ce_mean", x, y, (0, 2, 5), 0)
    D = OPERATORS[name](p).to_dense()
    off = D - torch.diag(D.diagonal())
    assert D.norm() > 1e-3 and off.norm() > 1e-3 * D.norm()
