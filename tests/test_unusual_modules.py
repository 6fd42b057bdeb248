"""Modules whose torch derivatives or caches used to give curvfx silently wrong numbers or crashes.

Each test names what was wrong before its fix:

* ``nn.PReLU``: torch's ``vmap`` rule of PReLU's backward returns right-shaped but wrong
  values when the samples and factor columns vmapped together are equally many (N = K
  classes), so exact diagonals, traces and per-sample Jacobians were wrong;
* weight normalization (``parametrizations.weight_norm`` and the old ``utils.weight_norm``):
  torch's double backward of ``torch._weight_norm`` is wrong, so Hessians were wrong and
  not symmetric;
* ``parametrize.cached()``: the cache kept the first call's weights, so later products
  reused them;
* operations without forward-mode derivatives (custom ``autograd.Function``, non-reentrant
  checkpointing, full backward hooks) crashed the forward-mode engines instead of falling
  back to double backprop;
* GroupNorm on a channels_last activation crashed diagonals and KFAC;
* inputs with non-tensor leaves (a scale, a flag beside the tensor) crashed the routes
  that vmap over samples, which split every leaf along dim 0.

Truths, all float64 and built without curvfx: the model written out by hand (weight norm as
``g v / ‖v‖``, never through ``torch._weight_norm``) or called through our own
``functional_call`` on a deep copy; Jacobians by ``torch.autograd.functional.jacobian``
(a loop of backward passes, no ``vmap``, so no batching rule is involved) or ``jacrev`` on
the hand-written model; Hessians by ``torch.autograd.functional.hessian``; per-sample
quantities by a loop over samples, each as a batch of one.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
import torch.utils.checkpoint as checkpoint
from dense import assert_close_rel, flat_jacobian, module_of_flat, named_flat, output_hessian_of, split_flat
from helpers import unchanged
from torch import Tensor, nn
from torch.func import jacrev
from torch.nn.utils import parametrizations, parametrize

import curvfx
from curvfx._kernels import ComposedOps

DTYPE = torch.float64
CE = nn.CrossEntropyLoss()
K = 3  # classes


# -- dense truths ------------------------------------------------------------------------------


def _ggn(J: Tensor, outputs: Tensor, y: Tensor, loss_fn: Callable = CE) -> Tensor:
    """Jᵀ (∇²_f loss) J, [P, P]."""
    return J.T @ output_hessian_of(loss_fn, outputs, y) @ J


def _per_sample_grads(loss_of: Callable[[Tensor, int], Tensor], flat: Tensor, num: int) -> Tensor:
    """[N, P]: gradient of sample n's loss (the sample as a batch of one), one n at a time."""
    rows = []
    for n in range(num):
        theta = flat.clone().requires_grad_(True)
        rows.append(torch.autograd.grad(loss_of(theta, n), theta)[0])
    return torch.stack(rows)


def _flat_of(tree: dict[str, Tensor], names: list[str], lead: int = 0) -> Tensor:
    """Concatenate ``tree``'s leaves in ``names`` order, keeping ``lead`` leading dims."""
    return torch.cat([tree[n].reshape(*tree[n].shape[:lead], -1) for n in names], -1)


# -- 1. PReLU ----------------------------------------------------------------------------------


def _prelu_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "conv":  # PReLU(C): one weight per channel of a 4-D activation
        layers = [nn.Conv2d(2, 4, 2), nn.PReLU(4, init=0.3), nn.Tanh(), nn.Flatten(), nn.Linear(24, K)]
    else:  # PReLU(): one shared weight after a Linear
        layers = [nn.Linear(4, 6), nn.PReLU(init=0.3), nn.Linear(6, K)]
    return nn.Sequential(*layers).to(DTYPE)


def _prelu_data(arch: str, num: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (num, 2, 3, 4) if arch == "conv" else (num, 4)
    return torch.randn(shape, generator=gen, dtype=DTYPE), torch.randint(0, K, (num,), generator=gen)


@functools.cache
def _prelu_truth(arch: str, num: int) -> Tensor:
    """Dense GGN [P, P] of the PReLU model on ``num`` samples."""
    f, flat, _ = module_of_flat(_prelu_model(arch))
    x, y = _prelu_data(arch, num)
    return _ggn(flat_jacobian(lambda theta: f(theta, x), flat), f(flat, x).detach(), y)


PRELU_QUERIES = {
    "diagonal": lambda model, data: curvfx.diagonal(curvfx.ggn(model, CE, data), "exact"),
    "generic-diagonal": lambda model, data: curvfx.ggn(model, CE, data)._exact_diagonal(backend="generic"),
    "trace": lambda model, data: curvfx.trace(curvfx.ggn(model, CE, data), "exact").reshape(1),
    "fisher-diagonal": lambda model, data: curvfx.diagonal(
        curvfx.fisher(model, CE, data, kind="exact"), "exact"
    ),
}


@pytest.mark.parametrize("query", PRELU_QUERIES)
@pytest.mark.parametrize("arch", ["conv", "linear"])
def test_prelu_exact_diagonal_and_trace_with_as_many_samples_as_classes(arch, query):
    """Exact GGN / Fisher diagonals and traces through nn.PReLU with N = K samples.

    Before: the per-sample route vmaps over samples and factor columns; with N = K torch's
    PReLU backward batching rule gave right-shaped but wrong values (no error), so these
    came out wrong (for other N the rule raised and curvfx looped correctly).
    """
    model = _prelu_model(arch)
    x, y = _prelu_data(arch, K)
    G = _prelu_truth(arch, K)
    want = G.trace().reshape(1) if query == "trace" else G.diagonal()
    with unchanged(SimpleNamespace(model=model)):
        got = PRELU_QUERIES[query](model, (x, y))
    assert_close_rel(got, want)


@pytest.mark.parametrize("split", ["batches-4-3", "chunk-size-3"])
@pytest.mark.parametrize("arch", ["conv", "linear"])
def test_prelu_exact_diagonal_when_a_batch_or_chunk_has_as_many_samples_as_classes(arch, split):
    """N = 7 as batches [4, 3], or one batch with ``chunk_size=3``: the 3-sample part hits N = K.

    Before: the batch (or chunk) of 3 samples went through torch's wrong PReLU batching rule,
    so the diagonal was wrong although the whole data set has 7 samples.
    """
    model = _prelu_model(arch)
    x, y = _prelu_data(arch, 7)
    if split == "batches-4-3":
        G = curvfx.ggn(model, CE, [(x[:4], y[:4]), (x[4:], y[4:])])
    else:
        G = curvfx.ggn(model, CE, (x, y), chunk_size=3)
    assert_close_rel(curvfx.diagonal(G, "exact"), _prelu_truth(arch, 7).diagonal())


@pytest.mark.parametrize("arch", ["conv", "linear"])
def test_prelu_per_sample_jacobian_with_as_many_samples_as_classes(arch):
    """``per_sample_jacobian`` through nn.PReLU with N = C = 3 against a loop over samples.

    Before: vmap(jacrev) over 3 samples of 3 outputs each went through torch's wrong PReLU
    batching rule and returned wrong Jacobians.
    """
    model = _prelu_model(arch)
    x, _ = _prelu_data(arch, K)
    f, flat, names = module_of_flat(model)
    want = torch.stack([flat_jacobian(lambda theta, n=n: f(theta, x[n : n + 1])[0], flat) for n in range(K)])
    fn, params = curvfx.make_functional(model)
    got = _flat_of(curvfx.per_sample_jacobian(fn, params, x), names, lead=2)
    assert_close_rel(got, want)


# -- 2. weight normalization -------------------------------------------------------------------


def _weight_norm_problem(api: str, layer: str):
    """``(model, x, y, outputs_of_params)``: the logits written out with w = g v / ‖v‖ by hand.

    ``outputs_of_params({name: tensor})`` never calls ``torch._weight_norm``, whose double
    backward is wrong.
    """
    torch.manual_seed(0)
    if layer == "linear":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, K)).to(DTYPE)
        x, head = torch.randn(4, 4, dtype=DTYPE), "2"
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(18, K)).to(DTYPE)
        x, head = torch.randn(4, 2, 3, 4, dtype=DTYPE), "3"
    y = torch.randint(0, K, (4,))
    if api == "parametrization":
        parametrizations.weight_norm(model[0])
        g_name, v_name = "0.parametrizations.weight.original0", "0.parametrizations.weight.original1"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
            torch.nn.utils.weight_norm(model[0])
        g_name, v_name = "0.weight_g", "0.weight_v"

    def outputs_of_params(p: dict[str, Tensor]) -> Tensor:
        g, v = p[g_name], p[v_name]
        w = g * v / v.pow(2).sum(tuple(range(1, v.dim())), keepdim=True).sqrt()  # norm per output row
        if layer == "linear":
            h = torch.tanh(x @ w.T + p["0.bias"])
        else:
            h = torch.tanh(F.conv2d(x, w, p["0.bias"])).flatten(1)
        return h @ p[f"{head}.weight"].T + p[f"{head}.bias"]

    assert torch.allclose(outputs_of_params(dict(model.named_parameters())), model(x))
    return model, x, y, outputs_of_params


@functools.cache
def _weight_norm_truth(api: str, layer: str) -> tuple[Tensor, Tensor, Tensor]:
    """(Hessian [P, P], GGN [P, P] of the hand-written loss, a probe v [P]); named_parameters order."""
    model, _, y, outputs_of_params = _weight_norm_problem(api, layer)
    names, shapes, flat = named_flat(model)

    def outputs_of(theta: Tensor) -> Tensor:
        return outputs_of_params(split_flat(theta, names, shapes))

    H = torch.autograd.functional.hessian(lambda theta: CE(outputs_of(theta), y), flat)
    J = jacrev(outputs_of)(flat).reshape(-1, flat.numel())
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    return H, _ggn(J, outputs_of(flat).detach(), y), v


WEIGHT_NORMS = [(api, layer) for layer in ("linear", "conv") for api in ("parametrization", "old")]
WN_IDS = [f"{api}-{layer}" for api, layer in WEIGHT_NORMS]


@pytest.mark.parametrize(("api", "layer"), WEIGHT_NORMS, ids=WN_IDS)
def test_weight_norm_hessian_operator(api, layer):
    """``curvfx.hessian(...)`` of a weight-normed layer: ``to_dense()`` and ``H @ v``; H symmetric.

    Before: products went through torch's double backward of ``torch._weight_norm``, which is
    wrong: the Hessian was 12-37 % off here, and not symmetric.
    """
    model, x, y, _ = _weight_norm_problem(api, layer)
    H_true, _, v = _weight_norm_truth(api, layer)
    H = curvfx.hessian(model, CE, (x, y))
    dense = H.to_dense()
    assert_close_rel(dense, H_true)
    assert_close_rel(dense, dense.T)
    assert_close_rel(H @ v, H_true @ v)


@pytest.mark.parametrize("strategy", ["auto", "rev-fwd", "autograd", "rev-rev"])
@pytest.mark.parametrize(("api", "layer"), WEIGHT_NORMS[:2], ids=WN_IDS[:2])
def test_weight_norm_hvp_every_strategy(api, layer, strategy):
    """``curvfx.hvp`` of the loss of a weight-normed Linear, for every strategy.

    Before: "auto", "autograd" and "rev-rev" differentiated ``torch._weight_norm`` twice
    through torch's wrong double backward and returned a wrong H v (45 % off); "rev-fwd"
    refused the function (no differentiable forward-mode rule for ``_weight_norm``).
    """
    model, x, y, _ = _weight_norm_problem(api, layer)
    H_true, _, v = _weight_norm_truth(api, layer)
    fn, params = curvfx.make_functional(model)
    hv = curvfx.hvp(lambda p: CE(fn(p, x), y), params, curvfx.unravel(v, params), strategy=strategy)
    assert_close_rel(curvfx.ravel(hv), H_true @ v)


@pytest.mark.parametrize(("api", "layer"), WEIGHT_NORMS[:2], ids=WN_IDS[:2])
def test_weight_norm_through_closures_and_pure_functions(api, layer):
    """Functions whose modules curvfx does not see run weight norm composed too: the seed
    API's loss closure (``exact_hvp``), a user's pure function over ``functional_call``
    (``curvfx.hvp``, ``curvfx.hessian(fn, params=)``).

    Before: all three used torch's wrong double backward of ``torch._weight_norm`` (18 % off,
    not symmetric).
    """
    model, x, y, _ = _weight_norm_problem(api, layer)
    H_true, _, v = _weight_norm_truth(api, layer)
    plist = list(model.parameters())
    assert_close_rel(curvfx.exact_hvp(lambda: CE(model(x), y), plist, v), H_true @ v)
    own = {k: p.detach() for k, p in model.named_parameters()}

    def pure(p, inputs):
        return torch.func.functional_call(model, p, (inputs,))

    hv = curvfx.hvp(lambda p: CE(pure(p, x), y), own, curvfx.unravel(v, own))
    assert_close_rel(curvfx.ravel(hv), H_true @ v)
    assert_close_rel(curvfx.hessian(pure, CE, (x, y), params=own).to_dense(), H_true)


@pytest.mark.parametrize("kind", ["old weight_norm", "prune"])
def test_tensors_set_by_pre_hooks_are_put_back(kind):
    """Old-style weight norm and pruning set ``module.weight`` in a forward pre-hook: after
    curvfx's calls it is the model's own tensor again, not one computed at the call's
    parameters with curvfx's graph or ``torch.func`` wrappers."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).to(DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "prune":
            prune.l1_unstructured(layer, "weight", amount=0.3)
        else:
            torch.nn.utils.weight_norm(layer)
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, K)).to(DTYPE)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randint(0, K, (5,))
    before = layer.weight
    fn, params = curvfx.make_functional(model)
    moved = {k: p + 1.0 for k, p in params.items()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    curvfx.ggn_vp(fn, CE, moved, x, y, v)
    curvfx.per_sample_grad(fn, CE, params, x, y)
    curvfx.hvp(lambda p: CE(fn(p, x), y), params, v, strategy="rev-rev")
    assert layer.weight is before


@pytest.mark.parametrize(("api", "layer"), WEIGHT_NORMS, ids=WN_IDS)
def test_weight_norm_ggn_unchanged(api, layer):
    """The GGN of a weight-normed layer against Jᵀ H J from ``jacrev`` of the hand-written model.

    Guard: the GGN needs only first derivatives of ``torch._weight_norm`` and was right before;
    running weight norm as a composition must keep it right.
    """
    model, x, y, _ = _weight_norm_problem(api, layer)
    _, G_true, _ = _weight_norm_truth(api, layer)
    assert_close_rel(curvfx.ggn(model, CE, (x, y)).to_dense(), G_true)


# -- 3. parametrize.cached() -------------------------------------------------------------------


class _Softplus(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return F.softplus(w)


def _softplus_problem():
    """A Linear whose weight is ``softplus(original)`` (a registered parametrization), its data,
    and the logits written out by hand as a function of the flat parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, K)).to(DTYPE)
    parametrize.register_parametrization(model[0], "weight", _Softplus())
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.randint(0, K, (4,))
    names, shapes, flat = named_flat(model)
    assert names == ["0.bias", "0.parametrizations.weight.original", "2.weight", "2.bias"]

    def outputs_of(theta: Tensor, xs: Tensor = x) -> Tensor:
        p = split_flat(theta, names, shapes)
        h = torch.tanh(xs @ F.softplus(p["0.parametrizations.weight.original"]).T + p["0.bias"])
        return h @ p["2.weight"].T + p["2.bias"]

    return model, x, y, outputs_of, flat


def _per_sample_grad(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    fn, params = curvfx.make_functional(model)
    return curvfx.per_sample_grad(fn, CE, params, x, y)


CACHED_PRODUCTS = {
    "ggn@v": lambda model, data, v: curvfx.ggn(model, CE, data) @ v,
    "hessian@v": lambda model, data, v: curvfx.hessian(model, CE, data) @ v,
    "empirical_fisher@v": lambda model, data, v: curvfx.empirical_fisher(model, CE, data) @ v,
    "ggn-diagonal": lambda model, data, v: curvfx.diagonal(curvfx.ggn(model, CE, data), "exact"),
    "per_sample_grad": lambda model, data, v: _per_sample_grad(model, *data),
}


@pytest.mark.parametrize("product", CACHED_PRODUCTS)
def test_parametrize_cached_is_refused(product):
    """Curvature inside ``torch.nn.utils.parametrize.cached()`` raises a ValueError naming it.

    Before: the cache kept the parametrized weight of the first (dual / functorch-wrapped)
    evaluation and later products reused it: silently wrong numbers (the exact diagonal
    crashed with an unrelated in-place RuntimeError instead). After the refusal the model
    still gives the right product outside the block (nothing cached is left behind).
    """
    model, x, y, outputs_of, flat = _softplus_problem()
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    with parametrize.cached(), pytest.raises(ValueError, match=r"parametrize\.cached"):
        CACHED_PRODUCTS[product](model, (x, y), v)
    G_true = _ggn(flat_jacobian(outputs_of, flat), outputs_of(flat).detach(), y)
    assert_close_rel(curvfx.ggn(model, CE, (x, y)) @ v, G_true @ v)


def test_parametrize_outside_cached_matches_dense():
    """Guard: outside a ``cached()`` block the parametrized model's products match the truth."""
    model, x, y, outputs_of, flat = _softplus_problem()
    names = named_flat(model)[0]
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    H_true = torch.autograd.functional.hessian(lambda theta: CE(outputs_of(theta), y), flat)
    G_true = _ggn(flat_jacobian(outputs_of, flat), outputs_of(flat).detach(), y)
    per_sample = _per_sample_grads(lambda t, n: CE(outputs_of(t, x[n : n + 1]), y[n : n + 1]), flat, 4)
    with unchanged(SimpleNamespace(model=model)):
        assert_close_rel(CACHED_PRODUCTS["ggn@v"](model, (x, y), v), G_true @ v)
        assert_close_rel(CACHED_PRODUCTS["hessian@v"](model, (x, y), v), H_true @ v)
        assert_close_rel(CACHED_PRODUCTS["ggn-diagonal"](model, (x, y), v), G_true.diagonal())
        assert_close_rel(_flat_of(_per_sample_grad(model, x, y), names, lead=1), per_sample)


# -- 4. no forward-mode derivative: fall back to double backprop -------------------------------


class _Tanh(torch.autograd.Function):
    """tanh with a hand-written backward and no ``jvp``."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (t,) = ctx.saved_tensors
        return grad * (1 - t * t)


class _CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_Tanh.apply(self.a(x)))


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(checkpoint.checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False))


def _backward_hooked() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, K))
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return model


NO_FORWARD_MODE = {
    "custom-function": _CustomFunction,
    "checkpoint": _Checkpointed,
    "full-backward-hook": _backward_hooked,
}


@functools.cache
def _mlp_truth() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(H, G, empirical Fisher, v) of the plain Linear-tanh-Linear written out by hand.

    All three models compute ``W2 tanh(W1 x + b1) + b2`` with parameters in the order W1, b1,
    W2, b2 (the same initial values for the same seed).
    """
    x, y, flat = _mlp_data()
    shapes = [torch.Size([5, 4]), torch.Size([5]), torch.Size([K, 5]), torch.Size([K])]

    def outputs_of(theta: Tensor, xs: Tensor = x) -> Tensor:
        W1, b1, W2, b2 = split_flat(theta, ["W1", "b1", "W2", "b2"], shapes).values()
        return torch.tanh(xs @ W1.T + b1) @ W2.T + b2

    H = torch.autograd.functional.hessian(lambda theta: CE(outputs_of(theta), y), flat)
    G = _ggn(jacrev(outputs_of)(flat).reshape(-1, flat.numel()), outputs_of(flat).detach(), y)
    g = _per_sample_grads(lambda t, n: CE(outputs_of(t, x[n : n + 1]), y[n : n + 1]), flat, len(y))
    EF = g.T @ g / len(y)  # mean reduction: (1/N) Σ_n g_n g_nᵀ
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    return H, G, EF, v


def _mlp_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return NO_FORWARD_MODE[kind]().to(DTYPE)


def _mlp_data() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 4, generator=gen, dtype=DTYPE), torch.randint(0, K, (4,), generator=gen)
    flat = named_flat(_mlp_model("custom-function"))[2]
    return x, y, flat


def _ggn_vp_auto(model: nn.Module, data, v: Tensor) -> Tensor:
    fn, params = curvfx.make_functional(model)
    out = curvfx.ggn_vp(fn, CE, params, *data, curvfx.unravel(v, params), strategy="auto")
    return curvfx.ravel(out)


FALLBACK_PRODUCTS = {
    "ggn_vp-auto": (_ggn_vp_auto, 1),
    "ggn@v": (lambda model, data, v: curvfx.ggn(model, CE, data) @ v, 1),
    "empirical_fisher@v": (lambda model, data, v: curvfx.empirical_fisher(model, CE, data) @ v, 2),
    "hessian@v": (lambda model, data, v: curvfx.hessian(model, CE, data) @ v, 0),
}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # torch's note
@pytest.mark.parametrize("product", FALLBACK_PRODUCTS)
@pytest.mark.parametrize("kind", NO_FORWARD_MODE)
def test_no_forward_mode_falls_back_to_double_backprop(kind, product):
    """Products on models without forward-mode derivatives fall back to double backprop.

    Before: the forward-mode engine raised errors that the "auto" engines did not take as
    "no forward-mode rule" (NotImplementedError "You must implement the jvp function" for
    the custom Function and for the Function torch inserts for a full backward hook;
    CheckpointError for checkpointing), so the products crashed instead of falling back.
    Side effects checked: no hooks left behind (the user's own hook kept), parameters,
    ``.grad`` and the global RNG unchanged.
    """
    model = _mlp_model(kind)
    x, y, flat = _mlp_data()
    assert torch.equal(named_flat(model)[2], flat)  # same parameters as the hand-written truth
    compute, which = FALLBACK_PRODUCTS[product]
    truth, v = _mlp_truth()[which], _mlp_truth()[3]
    with unchanged(SimpleNamespace(model=model)):
        got = compute(model, (x, y), v)
    assert_close_rel(got, truth @ v)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # torch's note
@pytest.mark.parametrize("kind", NO_FORWARD_MODE)
def test_jacobian_vector_products_without_forward_mode(kind):
    """``model_jvp`` and ``jacobian(...) @ v`` take Jv as the transpose of u -> Jᵀu where an
    operation has no forward-mode rule; ``ggn_vp`` with an explicit forward-mode strategy
    says so with a ValueError.

    Before: torch's NotImplementedError (also for spectral norm's power iteration in train
    mode, an ``out=`` operation).
    """
    model = _mlp_model(kind)
    x, y, flat = _mlp_data()
    shapes = [torch.Size([5, 4]), torch.Size([5]), torch.Size([K, 5]), torch.Size([K])]

    def outputs_of(theta: Tensor) -> Tensor:
        W1, b1, W2, b2 = split_flat(theta, ["W1", "b1", "W2", "b2"], shapes).values()
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    J = jacrev(outputs_of)(flat).reshape(-1, flat.numel())
    v = _mlp_truth()[3]
    assert_close_rel(curvfx.model_jvp(model, None, x, v).reshape(-1), J @ v)
    assert_close_rel(curvfx.jacobian(model, x) @ v, J @ v)
    with pytest.raises(ValueError, match="strategy: 'forward-ad' cannot differentiate this model"):
        curvfx.ggn_vp(model, CE, None, x, y, v, strategy="forward-ad")


# -- 5. GroupNorm on a channels_last activation ------------------------------------------------


def _group_norm_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(24, K)).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 3, 4, generator=gen, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    return model, x, torch.randint(0, K, (3,), generator=gen)


@functools.cache
def _group_norm_truth() -> Tensor:
    """Dense GGN [P, P]; the truth's model sees the same values in the default memory format."""
    model, x, y = _group_norm_problem()
    f, flat, _ = module_of_flat(model)
    xc = x.contiguous()
    return _ggn(flat_jacobian(lambda theta: f(theta, xc), flat), f(flat, xc).detach(), y)


GROUP_NORM_QUERIES = {
    "ggn@v": lambda G, v: G @ v,
    "diagonal": lambda G, v: curvfx.diagonal(G, "exact"),
    "trace": lambda G, v: curvfx.trace(G, "exact").reshape(1),
}


@pytest.mark.parametrize("query", GROUP_NORM_QUERIES)
def test_group_norm_channels_last_ggn(query):
    """Conv2d → GroupNorm → Flatten → Linear on a channels_last input: GGN products and queries.

    Before: ``G @ v`` crashed (torch's forward-mode group_norm fails on channels_last with an
    error the engine did not take as "no forward mode"), and the exact diagonal and trace
    crashed ("backward through the graph a second time": the batched backward freed the graph
    before its per-column fallback).
    """
    model, x, y = _group_norm_problem()
    G_true = _group_norm_truth()
    v = torch.randn(G_true.shape[0], generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    want = {"ggn@v": G_true @ v, "diagonal": G_true.diagonal(), "trace": G_true.trace().reshape(1)}[query]
    with unchanged(SimpleNamespace(model=model)):
        got = GROUP_NORM_QUERIES[query](curvfx.ggn(model, CE, (x, y)), v)
    assert_close_rel(got, want)


def test_group_norm_channels_last_kfac():
    """``curvfx.kfac(...).to_dense()`` on the channels_last GroupNorm model runs and is symmetric.

    Before: it crashed like the exact diagonal (the output gradients' batched backward freed
    the graph that its per-column fallback needed).
    """
    model, x, y = _group_norm_problem()
    with unchanged(SimpleNamespace(model=model)):
        dense = curvfx.kfac(model, CE, (x, y)).to_dense()
    assert dense.shape == _group_norm_truth().shape
    assert torch.isfinite(dense).all() and dense.abs().sum() > 0
    assert_close_rel(dense, dense.T)


# -- EmbeddingBag: no forward-mode rule and no double backward in torch ---------------------


_BAGS = {  # (input, offsets, include_last_offset)
    "rows": (torch.tensor([[1, 2, 4], [2, 2, 2], [0, 6, 5]]), None, False),
    "offsets": (torch.tensor([1, 2, 4, 2, 2, 0, 6, 5]), torch.tensor([0, 3, 3, 5]), False),
    "last-offset": (torch.tensor([1, 2, 4, 2, 2, 0, 6, 5]), torch.tensor([0, 3, 3, 5, 8]), True),
}


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("bags", list(_BAGS))
def test_composed_embedding_bag_has_torchs_values(bags, mode, padding_idx):
    """The composition curvfx runs (empty bags and padding rows included) equals torch's kernel."""
    ids, offsets, last = _BAGS[bags]
    torch.manual_seed(0)
    weight = torch.randn(7, 3, dtype=DTYPE)
    psw = torch.rand(ids.shape, dtype=DTYPE) if mode == "sum" else None
    options = {
        "mode": mode,
        "padding_idx": padding_idx,
        "include_last_offset": last,
        "per_sample_weights": psw,
    }
    with ComposedOps():
        composed = F.embedding_bag(ids, weight, offsets, **options)
    assert torch.equal(composed, F.embedding_bag(ids, weight, offsets, **options))


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_curvature_products(mode):
    """Products through an EmbeddingBag used to raise (torch has no double backward for it)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.EmbeddingBag(7, 3, mode=mode, padding_idx=0), nn.Tanh(), nn.Linear(3, 2)
    ).double()
    ids, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 2, (5,))
    names, shapes, flat = named_flat(model)

    def outputs_of(theta: Tensor) -> Tensor:  # the bag mean written out, padding rows left out
        p = split_flat(theta, names, shapes)
        kept = (ids != 0).to(DTYPE).unsqueeze(-1)
        bag = (p["0.weight"][ids] * kept).sum(1)
        bag = bag / kept.sum(1).clamp(min=1) if mode == "mean" else bag
        return torch.tanh(bag) @ p["2.weight"].T + p["2.bias"]

    assert torch.allclose(outputs_of(flat), model(ids), rtol=1e-12, atol=1e-14)
    H_true = torch.autograd.functional.hessian(lambda t: CE(outputs_of(t), y), flat)
    G_true = _ggn(flat_jacobian(outputs_of, flat), outputs_of(flat), y)
    v = torch.randn(flat.numel(), dtype=DTYPE)
    with unchanged(SimpleNamespace(model=model)):
        H = curvfx.hessian(model, CE, (ids, y))
        G = curvfx.ggn(model, CE, (ids, y))
        assert_close_rel(H @ v, H_true @ v)
        assert_close_rel(G.to_dense(), G_true)
        assert_close_rel(curvfx.diagonal(G, "exact"), G_true.diagonal())


@pytest.mark.parametrize(
    ("api", "name", "dim"),
    [
        ("new", "weight", -2),
        ("old", "weight", -2),
        ("new", "bias", 0),
        ("new", "weight", -1),
        ("old", "weight", None),
    ],
)
def test_weight_norm_values_for_every_dim(api, name, dim):
    """The composed weight norm takes torch's `dim` convention (negative dims, -1/None: the whole tensor)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).double()
    if api == "new":
        layer = parametrizations.weight_norm(layer, name=name, dim=dim)
    else:
        layer = torch.nn.utils.weight_norm(layer, name=name, dim=dim)
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=DTYPE)
    fn, params = curvfx.make_functional(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API's deprecation
        assert torch.allclose(fn(params, x), model(x), rtol=1e-12, atol=1e-14)


def test_compile_with_composed_ops_runs_eagerly():
    """torch.compile does not trace curvfx's function mode: such models warn and run eagerly."""
    model = _prelu_model("linear")
    x, y = _prelu_data("linear", 3)
    with pytest.warns(RuntimeWarning, match="run eagerly"):
        G = curvfx.ggn(model, CE, (x, y), compile=True)
    assert G.compile_options is None
    assert_close_rel(G.to_dense().diagonal(), curvfx.diagonal(curvfx.ggn(model, CE, (x, y)), "exact"))


def test_a_genuine_model_error_recurs_without_a_chained_forward_mode_error():
    """The forward-mode attempt's error is dropped: the fallback's own error is the one raised."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x).reshape(7, -1)

    model = Broken().double()
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 4, dtype=DTYPE)
    fn, params = curvfx.make_functional(model)
    with pytest.raises(RuntimeError, match="invalid for input of size") as caught:
        curvfx.ggn_vp(fn, nn.MSELoss(), params, x, y, torch.ones(16, dtype=DTYPE))
    assert caught.value.__context__ is None and caught.value.__cause__ is None


# ---------------------------------------------------------------------------------------
# inputs with non-tensor leaves (a scale, a flag) crashed the per-sample routes


class _Flagged(nn.Module):
    """``net(x) · gain · scale`` (then ``sin`` if ``flag``); the gain is outside any known layer."""

    def __init__(self, recurrent: bool = False):
        super().__init__()
        self.gru = nn.GRU(3, 3, batch_first=True) if recurrent else None
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x, scale=1.0, flag=False):
        if self.gru is not None:
            x = self.gru(x)[0][:, -1]
        out = self.net(x) * self.gain * scale
        return out.sin() if flag else out


class _Batch(dict):
    """A dict subclass, which optree does not open."""


def _flagged_inputs(form: str, x: Tensor):
    from collections import UserDict

    forms = {
        "dict": lambda: {"x": x, "scale": 2.0, "flag": True},
        "UserDict": lambda: UserDict(x=x, scale=2.0, flag=True),
        "dict subclass": lambda: _Batch(x=x, scale=2.0, flag=True),
        "tuple": lambda: (x, 2.0, True),
    }
    return forms[form]()


@pytest.mark.parametrize("form", ["dict", "UserDict", "dict subclass", "tuple"])
def test_per_sample_routes_pass_non_tensor_leaves_to_every_sample(form):
    """Per-sample gradients and Jacobians, exact GGN diagonal and trace, with a scale and a flag."""
    torch.manual_seed(0)
    model, ce = _Flagged().double(), nn.CrossEntropyLoss()
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 2, 1, 1, 0])
    X = _flagged_inputs(form, x)
    copied = copy.deepcopy(model)
    names, shapes, flat = named_flat(copied)

    def outputs(theta, rows):
        return torch.func.functional_call(copied, split_flat(theta, names, shapes), (rows, 2.0, True))

    sample_jac = torch.stack([flat_jacobian(lambda t, n=n: outputs(t, x[n : n + 1]), flat) for n in range(5)])
    theta = flat.clone().requires_grad_()
    sample_grads = torch.stack(
        [torch.autograd.grad(ce(outputs(theta, x[n : n + 1]), y[n : n + 1]), theta)[0] for n in range(5)]
    )
    J = flat_jacobian(lambda t: outputs(t, x), flat)
    ggn = J.T @ output_hessian_of(ce, outputs(flat, x), y) @ J

    fn, params = curvfx.make_functional(model)
    grads = curvfx.per_sample_grad(fn, ce, params, X, y)
    assert_close_rel(torch.cat([grads[k].reshape(5, -1) for k in names], 1), sample_grads)
    jac = curvfx.per_sample_jacobian(fn, params, X)
    assert_close_rel(torch.cat([jac[k].reshape(5, 3, -1) for k in names], 2), sample_jac)
    G = curvfx.ggn(model, ce, (X, y))
    assert_close_rel(curvfx.diagonal(G, "exact"), ggn.diagonal())
    assert_close_rel(curvfx.trace(G, "exact"), ggn.trace())


def test_per_sample_loop_passes_non_tensor_leaves_to_every_sample():
    """Where vmap fails (a native GRU), the loop over samples gets the scale and flag as well."""
    torch.manual_seed(0)
    model, ce = _Flagged(recurrent=True).double(), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 2, 3, dtype=DTYPE), torch.tensor([0, 2, 1, 1])
    copied = copy.deepcopy(model)
    names, shapes, flat = named_flat(copied)
    theta = flat.clone().requires_grad_()

    def loss_of_sample(n):
        out = torch.func.functional_call(copied, split_flat(theta, names, shapes), (x[n : n + 1], 2.0, True))
        return ce(out, y[n : n + 1])

    truth = torch.stack([torch.autograd.grad(loss_of_sample(n), theta)[0] for n in range(4)])
    fn, params = curvfx.make_functional(model)
    with pytest.warns(RuntimeWarning, match="could not vmap"):
        grads = curvfx.per_sample_grad(fn, ce, params, _flagged_inputs("UserDict", x), y)
    assert_close_rel(torch.cat([grads[k].reshape(4, -1) for k in names], 1), truth)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, a, extra):
        return self.a(a) * self.b(extra["b"]).tanh()


@pytest.mark.parametrize("container", ["UserDict", "dict subclass"])
def test_nested_mappings_optree_does_not_open_are_split_per_sample(container):
    """A UserDict or dict subclass below the top level reached every sample whole (2.25 off)."""
    from collections import UserDict

    torch.manual_seed(0)
    model = _TwoInputs().double()
    a, b = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    extra = UserDict(b=b) if container == "UserDict" else _Batch(b=b)
    fn, params = curvfx.make_functional(model)
    jac = curvfx.per_sample_jacobian(fn, params, (a, extra))
    for n in range(4):
        truth = jacrev(lambda p, n=n: fn(p, (a[n : n + 1], {"b": b[n : n + 1]}))[0])(params)
        for k in params:
            assert_close_rel(jac[k][n], truth[k])


def test_a_leaf_the_per_sample_routes_cannot_split_is_refused():
    """A NumPy array beside the tensors reached every sample whole (1.26 off); now a ValueError."""
    np = pytest.importorskip("numpy")
    model = _TwoInputs().double()
    fn, params = curvfx.make_functional(model)
    x = (torch.randn(4, 3, dtype=DTYPE), {"b": torch.randn(4, 2, dtype=DTYPE), "m": np.ones((4, 3))})
    with pytest.raises(ValueError, match=r"x: the routes that vmap over samples .* got a ndarray"):
        curvfx.per_sample_jacobian(fn, params, x)


def test_per_sample_gradients_of_outputs_without_a_leading_sample_dimension():
    """Outputs [T, V] of one sequence (targets flattened by the loss): the target check on the first
    sample's outputs must not assume outputs [N, ...]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5)).double()

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):  # [N, T, 3] -> [N·T, 5]
            return self.net(x).reshape(-1, 5)

    flat = Flat()
    x, y = torch.randn(2, 4, 3, dtype=DTYPE), torch.randint(0, 5, (2, 4))

    def loss(outputs, targets):
        return F.cross_entropy(outputs, targets.reshape(-1))

    fn, params = curvfx.make_functional(flat)
    grads = curvfx.per_sample_grad(fn, loss, params, x, y)
    for n in range(2):
        truth = torch.func.grad(lambda p, n=n: loss(fn(p, x[n : n + 1]), y[n : n + 1]))(params)
        for k in params:
            assert_close_rel(grads[k][n], truth[k])


def test_routes_reading_rows_refuse_outputs_without_a_leading_sample_dimension():
    """Outputs [N·T, V]: per-sample gradient norms and the structured route read sample n as row
    n of the batch's outputs; they failed with vmap's size mismatch, now a ValueError that
    names the requirement."""
    model = nn.Sequential(nn.Linear(3, 5)).double()
    fn, params = curvfx.make_functional(model)

    def merged(p, x):  # [N, T, 3] -> [N·T, 5]
        return fn(p, x).reshape(-1, 5)

    def loss(outputs, targets):
        return F.cross_entropy(outputs, targets.reshape(-1))

    x, y = torch.randn(2, 4, 3, dtype=DTYPE), torch.randint(0, 5, (2, 4))
    with pytest.raises(ValueError, match=r"needs outputs \[N = 2, \.\.\.\]; got a tensor of shape \[8, 5\]"):
        curvfx.per_sample_grad_norms(merged, loss, params, x, y)
    flat = _FlatOutputs(model)
    fn, params = curvfx.make_functional(flat)
    with pytest.raises(ValueError, match=r"needs outputs \[N = 2, \.\.\.\]"):
        curvfx.per_sample_grad(fn, loss, params, x, y, backend="structured")


class _FlatOutputs(nn.Module):
    """[N, T, 3] -> [N·T, 5] through the wrapped layer."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).reshape(-1, 5)


class _Listed(nn.Module):
    """Scales each sample's outputs by an entry of a Python list passed beside the tensor."""

    def __init__(self):
        super().__init__()
        self.lin, self.gain = nn.Linear(3, 2), nn.Parameter(torch.ones(2))

    def forward(self, a, w):
        return self.lin(a) * torch.tensor(w, dtype=a.dtype)[:, None] * self.gain


def test_a_list_of_per_sample_numbers_is_refused_not_shared():
    """A list of N numbers is not split per sample: it broadcast against a batch of one and every
    sample took the whole batch's values (3.3 to 95 off); the per-sample routes now refuse it."""
    model = _Listed().double()
    fn, params = curvfx.make_functional(model)
    a, w, y = torch.randn(4, 3, dtype=DTYPE), [1.0, 2.0, 3.0, 4.0], torch.randn(4, 2, dtype=DTYPE)

    def mse(outputs, targets):
        return ((outputs - targets) ** 2).mean()

    calls = {
        "per_sample_jacobian": lambda: curvfx.per_sample_jacobian(fn, params, (a, w)),
        "per_sample_grad": lambda: curvfx.per_sample_grad(fn, mse, params, (a, w), y),
        "exact diagonal": lambda: curvfx.diagonal(curvfx.ggn(model, nn.MSELoss(), ((a, w), y)), "exact"),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"^x: the model's outputs"):
            call()


def test_per_sample_gradients_refuse_a_shared_list_that_broadcasts_against_two_samples():
    """A list of 2 numbers beside a batch of 4: one sample gets 2 rows, two samples 2 rows (not
    4); checked on the first two samples (the batch itself fails in the model)."""
    model = _Listed().double()
    fn, params = curvfx.make_functional(model)
    a, y = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)

    def mse(outputs, targets):
        return ((outputs - targets) ** 2).mean()

    with pytest.raises(ValueError, match=r"outputs are \[2, 2\] for 2 samples \(of N = 4\) but \[2, 2\]"):
        curvfx.per_sample_grad(fn, mse, params, (a, [1.0, 2.0]), y)


def test_per_sample_jacobians_refuse_outputs_merging_samples_with_positions():
    """Outputs [N·T, V]: the Jacobian kept row 0 of each sample's [T, V] (token 0) silently."""
    model = nn.Sequential(nn.Linear(3, 5)).double()
    fn, params = curvfx.make_functional(model)

    def merged(p, x):  # [N, T, 3] -> [N·T, 5]
        return fn(p, x).reshape(-1, 5)

    with pytest.raises(ValueError, match=r"one sample \(a batch of one\) are \[4, 5\], not \[1"):
        curvfx.per_sample_jacobian(merged, params, torch.randn(2, 4, 3, dtype=DTYPE))


def test_per_sample_gradients_of_a_callable_loss_on_tuple_outputs():
    """A callable loss takes the outputs as returned (here with an auxiliary term), as for the
    Hessian; the per-sample route crashed in the loss's batch check (AttributeError)."""
    torch.manual_seed(0)

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 4)

        def forward(self, x):
            out = self.net(x)
            return out, (out**2).mean()

    def loss(outputs, targets):
        return F.cross_entropy(outputs[0], targets) + 0.1 * outputs[1]

    fn, params = curvfx.make_functional(WithAux().double())
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 3, 1, 2, 2])
    grads = curvfx.per_sample_grad(fn, loss, params, x, y)
    for n in range(5):
        truth = torch.func.grad(lambda p, n=n: loss(fn(p, x[n : n + 1]), y[n : n + 1]))(params)
        for k in params:
            assert_close_rel(grads[k][n], truth[k])
