"""Layer-aware ("structured") exact diagonals and per-sample gradient norms (float64).

The structured path (``curvfx._structured``) contracts the inputs of ``nn.Linear`` and
convolution layers (1-3-d, any groups and padding) with the gradients at their outputs,
scatters output gradients into rows for ``nn.Embedding`` and multiplies them with the
normalized input for the affine parameters of LayerNorm / RMSNorm / GroupNorm / BatchNorm
(eval), instead of forming per-sample gradients of the whole model; every other parameter
falls back to the generic per-sample vmap.
Truths, each reached by a different route:

* ``op.to_dense().diagonal()``: P products with the operator (no per-sample quantity);
* ``backend="generic"``: the per-sample vmap over all parameters;
* per-sample gradient norms from :func:`curvfx.per_sample_grad` and from a plain loop of
  ``torch.autograd.grad`` on each sample's own loss (the sample as a batch of one).

Side effects are checked on every call: no hooks left on any submodule (also when the
forward raises), parameters, buffers, ``.grad`` and the global RNG unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from dense import assert_close_rel
from helpers import unchanged
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import curvfx
import curvfx._capture
import curvfx._structured as structured_module
from curvfx._structured import structured_diagonal

DTYPE = torch.float64
N = 5
KINDS = ("ggn", "exact", "mc", "empirical")
BACKENDS = ("structured", "generic")


# -- models ---------------------------------------------------------------------------------


class SequenceMean(nn.Module):
    """``nn.Linear`` on (N, T, D) inputs, then the mean over T: [N, 3]."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x))).mean(1)


class Positions(nn.Module):
    """Per-position outputs: (N, T, D) -> logits (N, C, T) for cross-entropy."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x))).transpose(1, 2)


class EmbeddingModel(nn.Module):
    """``nn.Embedding`` on token ids (N, T), ``nn.Linear``, mean over T."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x))).mean(1)


class LayerNormModel(nn.Module):
    """Linear, LayerNorm (affine), Linear."""

    def __init__(self):
        super().__init__()
        self.lin1, self.norm, self.lin2 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.lin2(torch.tanh(self.norm(self.lin1(x))))


class Shared(nn.Module):
    """One ``nn.Linear`` called twice in a forward (weight sharing through the module)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class Tied(nn.Module):
    """Two ``nn.Linear`` modules holding the same weight Parameter (own biases)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Gate(nn.Module):
    """A custom layer: its own Parameter, used by functional code."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return torch.tanh(x * self.w) + F.softplus(self.w)


class Custom(nn.Module):
    """A known layer, a custom layer, a known layer."""

    def __init__(self):
        super().__init__()
        self.lin, self.custom, self.head = nn.Linear(4, 5), Gate(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.custom(self.lin(x)))


class UsedElsewhere(nn.Module):
    """Parameters of known layers also used outside their layer's calls (generic route)."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.lin(x) + F.linear(x.sin(), self.lin.weight)  # the weight once more
        return self.head(self.norm(h) + 0.1 * self.norm.weight * h)  # the scale once more


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn():  # [N, 2, 10, 10] -> 5x5 (stride) -> 5x5 (dilation) -> 4x4 (adaptive) -> 2x2 (max)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, 3, padding=2, dilation=2),
        nn.AdaptiveAvgPool2d(4),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def conv1d():  # [N, 2, 10] -> 5 -> 3
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(3, 2, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def conv_options():  # "same" padding, groups, a circular padding mode: [N, 2, 6, 6]
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Tanh(),
        nn.Conv2d(2, 2, 3, groups=2),
        nn.Tanh(),
        nn.Conv2d(2, 1, 3, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def frozen():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    return model


def no_bias():
    return nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))


def batchnorm(train: bool):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 4) * 2 + 1)
    return model.train(train)


def conv3d():  # [N, 2, 3, 5, 5] -> [4, 4, 3, 3] -> ("same", 2 groups) -> BatchNorm3d -> pooled [4]
    model = nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=1, dilation=(1, 1, 2)),
        nn.ReLU(inplace=True),
        nn.Conv3d(4, 4, 2, padding="same", groups=2),
        nn.BatchNorm3d(4),
        nn.Tanh(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return with_running_stats(model, (8, 2, 3, 5, 5))


def groupnorm_cnn():  # [N, 2, 6, 6]
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, groups=2, padding=1, padding_mode="reflect"),
        nn.GroupNorm(4, 4),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def batchnorm_cnn():  # BatchNorm2d in eval mode, a BatchNorm1d without affine shift: [N, 2, 6, 6]
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, 3),
    )
    return with_running_stats(model, (8, 2, 6, 6))


def with_running_stats(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm running statistics."""
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape) * 2 + 1)
    return model.eval()


class Tokens(nn.Module):
    """Token ids (N, T) with a padding id -> Embedding -> LayerNorm -> logits (N, C, T)."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Embedding(6, 4, padding_idx=2), nn.LayerNorm(4)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.norm(self.emb(x)))).transpose(1, 2)


class OneToken(nn.Module):
    """One id per sample (N,): Embedding (padding id 0) -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(5, 3, padding_idx=0), nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x)))


class Norms(nn.Module):
    """RMSNorm, a LayerNorm over two dimensions without bias, a LayerNorm on a sequence."""

    def __init__(self):
        super().__init__()
        self.lin1, self.rms = nn.Linear(4, 6), nn.RMSNorm(6)
        self.ln2d, self.ln_seq = nn.LayerNorm((2, 3), bias=False), nn.LayerNorm(3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.rms(self.lin1(x))).reshape(-1, 2, 3)
        h = self.ln_seq(torch.tanh(self.ln2d(h)))  # the last one at 2 positions per sample
        return self.head(h.flatten(1))


def others():  # a layer the structured path does not know: InstanceNorm (affine)
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.Unflatten(1, (2, 3)),
        nn.InstanceNorm1d(2, affine=True),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def token_ids(*shape, vocab: int, padding: int):
    """Ids with repeats within each sample and the padding id at one position."""

    def draw(g):
        ids = torch.randint(0, vocab, shape, generator=g)
        if len(shape) > 1:
            ids[:, 1] = ids[:, 3]  # a repeated id in every sample
            ids[:, 0] = padding
        else:
            ids[0] = padding
        return ids

    return draw


def floats(*shape):
    return lambda g: torch.randn(shape, generator=g, dtype=DTYPE)


# name: (build the model, draw the input x [N, ...], parameters that take the generic route)
MODELS: dict[str, tuple[Callable, Callable, set[str]]] = {
    "mlp": (mlp, floats(N, 4), set()),
    "cnn": (cnn, floats(N, 2, 10, 10), set()),
    "conv1d": (conv1d, floats(N, 2, 10), set()),
    "sequence": (SequenceMean, floats(N, 4, 3), set()),
    "positions": (Positions, floats(N, 4, 3), set()),
    "embedding": (EmbeddingModel, lambda g: torch.randint(0, 7, (N, 3), generator=g), set()),
    "tokens": (Tokens, token_ids(N, 6, vocab=6, padding=2), set()),
    "one_token": (OneToken, token_ids(N, vocab=5, padding=0), set()),
    "layernorm": (LayerNormModel, floats(N, 4), set()),
    "norms": (Norms, floats(N, 4), set()),
    "groupnorm_cnn": (groupnorm_cnn, floats(N, 2, 6, 6), set()),
    "batchnorm_cnn": (batchnorm_cnn, floats(N, 2, 6, 6), set()),
    "conv3d": (conv3d, floats(N, 2, 3, 5, 5), set()),
    "others": (others, floats(N, 4), {"2.weight", "2.bias"}),
    "shared": (Shared, floats(N, 4), set()),
    "tied": (Tied, floats(N, 4), {"a.weight"}),
    "custom": (Custom, floats(N, 4), {"custom.w"}),
    "used_elsewhere": (UsedElsewhere, floats(N, 4), {"lin.weight", "lin.bias", "norm.weight", "norm.bias"}),
    "frozen": (frozen, floats(N, 4), set()),
    "no_bias": (no_bias, floats(N, 4), set()),
    "conv_options": (conv_options, floats(N, 2, 6, 6), set()),
    "bn_eval": (lambda: batchnorm(train=False), floats(N, 4), set()),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The model ``name`` (float64, parameters from ``seed``) and its input batch."""
    make_model, make_input, _ = MODELS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_model().to(DTYPE)
    return model, make_input(torch.Generator().manual_seed(seed + 1))


# -- losses -----------------------------------------------------------------------------------

IGNORE = -1
LOSSES = {
    "mse": lambda: nn.MSELoss(),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
    "ce": lambda: nn.CrossEntropyLoss(),
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "ce_ignore": lambda: nn.CrossEntropyLoss(ignore_index=IGNORE),
    "ce_ignore_sum": lambda: nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE),
    "bce": lambda: nn.BCEWithLogitsLoss(),
    "bce_sum": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}


def targets(loss: str, outputs: Tensor, g: torch.Generator) -> Tensor:
    """Targets for ``outputs``: values (MSE), probabilities (BCE) or class indices (CE)."""
    if loss.startswith("mse"):
        return torch.randn(outputs.shape, generator=g, dtype=DTYPE)
    if loss.startswith("bce"):
        return torch.rand(outputs.shape, generator=g, dtype=DTYPE)
    classes = outputs.shape[1]
    y = torch.randint(0, classes, (outputs.shape[0], *outputs.shape[2:]), generator=g)
    if "ignore" in loss:  # ignore some positions, never the first: every sample keeps a term
        drop = torch.rand(y.shape, generator=g) < 0.4
        drop[:, 0] = False
        y[drop] = IGNORE
    return y


def problem(model_name: str, loss: str, seed: int = 0):
    """``(model, loss_fn, x, y)`` for one case."""
    model, x = build(model_name, seed)
    with torch.no_grad():
        outputs = model(x)
    return model, LOSSES[loss](), x, targets(loss, outputs, torch.Generator().manual_seed(seed + 2))


CASES = [
    *(("mlp", loss) for loss in ("mse", "mse_sum", "ce", "ce_sum", "bce", "bce_sum")),
    *(("positions", loss) for loss in ("ce", "ce_sum", "ce_ignore", "ce_ignore_sum")),
    *(("cnn", loss) for loss in ("ce", "mse_sum", "bce")),
    ("conv1d", "ce"),
    ("conv1d", "mse"),
    ("sequence", "mse"),
    ("sequence", "ce_sum"),
    ("embedding", "ce"),
    ("embedding", "mse_sum"),
    ("layernorm", "ce"),
    ("layernorm", "bce_sum"),
    ("shared", "mse"),
    ("shared", "ce"),
    ("tied", "ce"),
    ("custom", "ce"),
    ("custom", "mse_sum"),
    ("used_elsewhere", "ce"),
    ("used_elsewhere", "mse"),
    ("frozen", "ce"),
    ("no_bias", "mse"),
    ("conv_options", "ce"),
    ("bn_eval", "ce"),
    ("tokens", "ce"),
    ("tokens", "ce_ignore_sum"),
    ("tokens", "mse"),
    ("tokens", "bce"),
    ("one_token", "ce"),
    ("one_token", "mse_sum"),
    ("norms", "ce"),
    ("norms", "bce"),
    ("groupnorm_cnn", "ce"),
    ("groupnorm_cnn", "mse"),
    ("batchnorm_cnn", "ce_sum"),
    ("batchnorm_cnn", "bce"),
    ("conv3d", "ce"),
    ("conv3d", "mse_sum"),
    ("conv3d", "bce"),
    ("others", "ce"),
]
CASE_IDS = [f"{m}-{loss}" for m, loss in CASES]


def operator(kind: str, model, loss_fn, data, **kwargs):
    """The curvature operator of ``kind`` (MC Fisher: 3 draws from a fixed generator)."""
    if kind == "ggn":
        return curvfx.ggn(model, loss_fn, data, **kwargs)
    if kind == "mc":
        g = torch.Generator().manual_seed(7)
        return curvfx.fisher(model, loss_fn, data, kind="mc", num_samples=3, generator=g, **kwargs)
    return curvfx.fisher(model, loss_fn, data, kind=kind, **kwargs)


# -- truths and checks ------------------------------------------------------------------------


def loop_norms(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """``‖∇_θ loss_fn(model(x_n), y_n)‖`` [N] by one ``torch.autograd.grad`` per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for n in range(len(y)):
        grads = torch.autograd.grad(loss_fn(model(x[n : n + 1]), y[n : n + 1]), params, allow_unused=True)
        norms.append(sum((g**2).sum() for g in grads if g is not None).sqrt())
    return torch.stack(norms)


def norms_of(per_sample: dict[str, Tensor]) -> Tensor:
    """Norms [N] of per-sample gradient leaves [N, *shape]."""
    return sum((g.flatten(1) ** 2).sum(1) for g in per_sample.values()).sqrt()


def assert_no_hooks(model: nn.Module) -> None:
    """No module hook of any kind on any submodule, and no global module hook."""
    for name, m in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, kind), f"{kind} left on {name or 'the model'}: {getattr(m, kind)}"
    module = torch.nn.modules.module
    assert not module._global_forward_hooks and not module._global_forward_pre_hooks


@pytest.fixture
def generic_calls(monkeypatch):
    """The parameter names of every generic-route call made by the structured path."""
    seen: list[set[str]] = []
    real = structured_module.factor_diagonal

    def spy(sample_outputs, params, *args, **kwargs):
        seen.append(set(params))
        return real(sample_outputs, params, *args, **kwargs)

    monkeypatch.setattr(structured_module, "factor_diagonal", spy)
    return seen


# -- exact diagonals --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("model_name", "loss"), CASES, ids=CASE_IDS)
def test_exact_diagonal_matches_dense(model_name, loss, kind):
    model, loss_fn, x, y = problem(model_name, loss)
    op = operator(kind, model, loss_fn, (x, y))
    with unchanged(SimpleNamespace(model=model)):
        diagonals = {backend: op._exact_diagonal(backend=backend) for backend in BACKENDS}
        by_diagonal, by_trace = curvfx.diagonal(op, "exact"), curvfx.trace(op, "exact")
    assert_no_hooks(model)
    dense = op.to_dense().diagonal()
    assert dense.abs().sum() > 0
    for backend, d in diagonals.items():
        assert d.dtype == DTYPE and d.shape == dense.shape, backend
        assert_close_rel(d, dense)
    # the public estimators take the structured route and give the same numbers
    assert torch.equal(by_diagonal, diagonals["structured"])
    assert_close_rel(by_trace, diagonals["structured"].sum(), tol=1e-13)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_only_unknown_parameters_take_the_generic_route(model_name, generic_calls):
    model, loss_fn, x, y = problem(model_name, "mse_sum" if model_name == "positions" else "ce")
    expected = MODELS[model_name][2]
    for backend in ("auto", "structured"):
        generic_calls.clear()
        curvfx.ggn(model, loss_fn, (x, y))._exact_diagonal(backend=backend)
        curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend=backend)
        assert generic_calls == ([expected] * 2 if expected else []), backend


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("model_name", "loss"), [("cnn", "ce"), ("sequence", "mse"), ("positions", "ce_ignore")]
)
def test_exact_diagonal_over_unequal_batches(model_name, loss, kind):
    model, loss_fn, x, y = problem(model_name, loss)
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    dense = operator(kind, model, loss_fn, data, factor=3.0).to_dense().diagonal()
    op = operator(kind, model, loss_fn, data, factor=3.0, chunk_size=2)  # generic: 2 samples a call
    for backend in BACKENDS:
        assert_close_rel(op._exact_diagonal(backend=backend), dense)


def test_exact_diagonal_for_a_subset_of_perturbed_parameters():
    # parameters passed explicitly: a subset (a bias without its weight, a weight without its
    # bias), at values other than the module's own
    model, loss_fn, x, y = problem("cnn", "ce")
    g = torch.Generator().manual_seed(3)
    named = dict(model.named_parameters())
    params = {
        k: named[k].detach() + 0.1 * torch.randn(named[k].shape, generator=g, dtype=DTYPE)
        for k in ("0.bias", "2.weight", "6.weight")
    }
    for kind in KINDS:
        op = operator(kind, model, loss_fn, (x, y), params=params)
        with unchanged(SimpleNamespace(model=model), params):
            diagonals = [op._exact_diagonal(backend=backend) for backend in BACKENDS]
        dense = op.to_dense().diagonal()
        for d in diagonals:
            assert_close_rel(d, dense)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "shared", "positions"])
def test_unbatched_backward_fallback(model_name, monkeypatch):
    # an operation without a batching rule makes the batched backward raise: one backward per column
    loss = "ce_ignore" if model_name == "positions" else "ce"
    model, loss_fn, x, y = problem(model_name, loss)
    op = operator("ggn", model, loss_fn, (x, y))
    expected = op._exact_diagonal(backend="generic")
    expected_norms = curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend="generic")
    real = torch.autograd.grad
    batched = []

    def no_batching(*args, is_grads_batched=False, **kwargs):
        batched.append(is_grads_batched)
        if is_grads_batched:
            raise RuntimeError("no batching rule (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    assert_close_rel(op._exact_diagonal(backend="structured"), expected)
    norms = curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend="structured")
    assert_close_rel(norms, expected_norms)
    assert True in batched and False in batched
    assert_no_hooks(model)


@pytest.mark.parametrize(("model_name", "loss"), CASES, ids=CASE_IDS)
def test_one_backward_pass_per_column(model_name, loss, monkeypatch):
    # large activations: one backward pass per factor column, the squares summed block by block
    model, loss_fn, x, y = problem(model_name, loss)
    op = operator("ggn", model, loss_fn, (x, y))
    batched = op._exact_diagonal(backend="structured")
    real, batched_calls = torch.autograd.grad, []

    def spy(*args, is_grads_batched=False, **kwargs):
        batched_calls.append(is_grads_batched)
        return real(*args, is_grads_batched=is_grads_batched, **kwargs)

    monkeypatch.setattr(curvfx._chunking, "COLUMN_NUMBERS", 0)
    monkeypatch.setattr(torch.autograd, "grad", spy)
    assert_close_rel(op._exact_diagonal(backend="structured"), batched, tol=1e-12)
    assert not any(batched_calls)  # one backward pass per column
    assert_close_rel(op._exact_diagonal(backend="structured"), op._exact_diagonal(backend="generic"))


# -- per-sample gradient norms ----------------------------------------------------------------


@pytest.mark.parametrize(("model_name", "loss"), CASES, ids=CASE_IDS)
def test_per_sample_grad_norms(model_name, loss):
    model, loss_fn, x, y = problem(model_name, loss)
    with unchanged(SimpleNamespace(model=model)):
        norms = {
            backend: curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend=backend)
            for backend in ("auto", *BACKENDS)
        }
        chunked = curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, 2, backend="generic")
        from_leaves = norms_of(curvfx.per_sample_grad(model, loss_fn, None, x, y))
    assert_no_hooks(model)
    truth = loop_norms(model, loss_fn, x, y)
    assert truth.shape == (N,) and bool((truth > 0).all())
    assert_close_rel(from_leaves, truth)
    for backend, n in {**norms, "generic-chunked": chunked}.items():
        assert n.dtype == DTYPE and n.shape == (N,), backend
        assert_close_rel(n, truth)
    assert torch.equal(norms["auto"], norms["structured"])


def loop_grads(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``∇_θ loss_fn(model(x_n), y_n)`` [N, *shape] per trainable parameter, one backward per sample."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    rows = []
    for n in range(len(y)):
        loss = loss_fn(model(x[n : n + 1]), y[n : n + 1])
        grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(named.values(), grads)])
    return {k: torch.stack(column) for k, column in zip(named, zip(*rows))}


@pytest.mark.parametrize(("model_name", "loss"), CASES, ids=CASE_IDS)
def test_per_sample_grad_backends(model_name, loss):
    # the structured route (layer inputs and output gradients) equals a loop of backward passes
    model, loss_fn, x, y = problem(model_name, loss)
    truth = loop_grads(model, loss_fn, x, y)
    with unchanged(SimpleNamespace(model=model)):
        grads = {
            backend: curvfx.per_sample_grad(model, loss_fn, None, x, y, backend=backend)
            for backend in ("auto", *BACKENDS)
        }
    assert_no_hooks(model)
    for backend, result in grads.items():
        assert list(result) == list(truth), backend
        for name, g in result.items():
            assert g.shape == truth[name].shape and not g.requires_grad, (backend, name)
        assert_close_rel(result, truth)
    for name in truth:  # "auto" is vmap(grad), exact for every model
        assert torch.equal(grads["auto"][name], grads["generic"][name])


def test_per_sample_grad_structured_needs_an_eager_module():
    model, loss_fn, x, y = problem("mlp", "ce")
    fn, params = curvfx.make_functional(model)

    def pure(p, inputs):
        return fn(p, inputs)

    with pytest.raises(ValueError, match="backend"):
        curvfx.per_sample_grad(pure, loss_fn, params, x, y, backend="structured")
    with pytest.raises(ValueError, match="backend"):
        curvfx.per_sample_grad(model, loss_fn, None, x, y, backend="fast")
    with pytest.raises(ValueError, match=r"torch\.func"):  # the structured route detaches
        torch.func.grad(
            lambda p: curvfx.per_sample_grad(fn, loss_fn, p, x, y, backend="structured")["0.bias"].sum()
        )(params)
    g = torch.func.grad(lambda p: curvfx.per_sample_grad(fn, loss_fn, p, x, y)["0.bias"].sum())(params)
    assert g["0.weight"].abs().sum() > 0  # "auto" composes with torch.func
    assert_close_rel(curvfx.per_sample_grad(pure, loss_fn, params, x, y), loop_grads(model, loss_fn, x, y))


def test_per_sample_grad_norms_with_a_functional_model():
    # make_functional's (fn, params) take the structured route as well
    model, loss_fn, x, y = problem("cnn", "ce")
    fn, params = curvfx.make_functional(model)
    for backend in BACKENDS:
        norms = curvfx.per_sample_grad_norms(fn, loss_fn, params, x, y, backend=backend)
        assert_close_rel(norms, loop_norms(model, loss_fn, x, y))


# -- random layer configurations --------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    dims=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2)),
    padding=st.sampled_from([(0, 0, 0), (1, 2, 0), (2, 0, 1), "same", "valid"]),
    padding_mode=st.sampled_from(["zeros", "circular", "reflect", "replicate"]),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_convolution_configurations(
    dims, kernel, stride, padding, padding_mode, dilation, groups, bias, seed
):
    g = torch.Generator().manual_seed(seed)
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    if padding == "same":  # stride 1 only
        stride = (1, 1, 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        conv = conv_type(
            2,
            4,
            kernel[:dims],
            stride=stride[:dims],
            padding=padding if isinstance(padding, str) else padding[:dims],
            dilation=dilation[:dims],
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        x = torch.randn(3, 2, *(7, 6, 5)[:dims], generator=g, dtype=DTYPE)
        features = conv.to(DTYPE)(x).numel() // 3
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 3)).to(DTYPE)
    y = torch.randint(0, 3, (3,), generator=g)
    check_backends_agree(model, nn.CrossEntropyLoss(), x, y, structured={"0.weight", *("0.bias",) * bias})


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    n=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_on_any_leading_dimensions(lead, n, bias, seed):
    g = torch.Generator().manual_seed(seed)

    class Leading(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(3, 4, bias=bias), nn.Linear(4, 2)

        def forward(self, x):  # [n, *lead, 3] -> [n, 2]
            return self.head(torch.tanh(self.lin(x))).reshape(x.shape[0], -1, 2).mean(1)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Leading().to(DTYPE)
    x = torch.randn(n, *lead, 3, generator=g, dtype=DTYPE)
    y = torch.randn(n, 2, generator=g, dtype=DTYPE)
    check_backends_agree(model, nn.MSELoss(reduction="sum"), x, y)


def check_backends_agree(model, loss_fn, x, y, structured=()):
    """Structured and generic exact diagonals (GGN, empirical Fisher) and norms agree.

    The parameters ``structured`` must not take the generic route.
    """
    factored = curvfx._capture.supported_layers(model, dict(model.named_parameters()), factored=True)
    assert set(structured) <= {name for names in factored.values() for name in names.values()}
    for kind in ("ggn", "empirical"):
        op = operator(kind, model, loss_fn, (x, y))
        structured, generic = (op._exact_diagonal(backend=b) for b in BACKENDS)
        assert_close_rel(structured, generic)
    structured, generic = (
        curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend=b) for b in BACKENDS
    )
    assert_close_rel(structured, generic)
    assert_no_hooks(model)


# -- hooks and model state --------------------------------------------------------------------

CALLS = {
    "ggn-structured": lambda m, L, x, y: curvfx.ggn(m, L, (x, y))._exact_diagonal(backend="structured"),
    "ggn-auto": lambda m, L, x, y: curvfx.diagonal(curvfx.ggn(m, L, (x, y)), "exact"),
    "exact-fisher": lambda m, L, x, y: curvfx.trace(curvfx.fisher(m, L, (x, y), kind="exact"), "exact"),
    "mc-fisher": lambda m, L, x, y: operator("mc", m, L, (x, y))._exact_diagonal(backend="structured"),
    "empirical-fisher": lambda m, L, x, y: curvfx.empirical_fisher(m, L, (x, y))._exact_diagonal(),
    "norms-structured": lambda m, L, x, y: curvfx.per_sample_grad_norms(
        m, L, None, x, y, backend="structured"
    ),
    "norms-auto": lambda m, L, x, y: curvfx.per_sample_grad_norms(m, L, None, x, y),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_leaves_no_hooks_and_keeps_user_hooks(call):
    model, loss_fn, x, y = problem("shared", "ce")
    CALLS[call](model, loss_fn, x, y)
    assert_no_hooks(model)
    # a hook of the user's stays in place, is called as usual, and is the only one left
    seen = []
    handle = model.lin.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with unchanged(SimpleNamespace(model=model)):
        CALLS[call](model, loss_fn, x, y)
    assert len(model.lin._forward_hooks) == 1 and seen
    handle.remove()
    assert_no_hooks(model)


class FailsUnderHooks(nn.Module):
    """Raises in its forward when any of its layers carries a forward hook (curvfx's capture)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.lin1(x)  # a call is recorded before the error
        if self.lin1._forward_hooks or self.lin2._forward_hooks:
            raise RuntimeError("boom")
        return self.lin2(torch.tanh(h))


@pytest.mark.parametrize("call", sorted(CALLS))
def test_hooks_removed_when_the_forward_raises(call):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FailsUnderHooks().to(DTYPE)
    x = torch.randn(N, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (N,))
    with unchanged(SimpleNamespace(model=model)):
        with pytest.raises(RuntimeError, match="boom"):
            CALLS[call](model, nn.CrossEntropyLoss(), x, y)
    assert_no_hooks(model)
    # the model works afterwards, and the generic route (no hooks) gives the numbers
    curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y))._exact_diagonal(backend="generic")


def test_hooks_removed_on_an_input_of_wrong_shape():
    model, _, x, _ = problem("mlp", "ce")
    fn, params = curvfx.make_functional(model)
    S = torch.randn(2, N, 3, dtype=DTYPE)
    with unchanged(SimpleNamespace(model=model)), pytest.raises(RuntimeError):
        structured_diagonal(fn, params, x[:, :3], S)
    assert_no_hooks(model)
    with unchanged(SimpleNamespace(model=model)), pytest.raises(RuntimeError):
        curvfx.per_sample_grad_norms(model, nn.CrossEntropyLoss(), None, x[:, :3], torch.zeros(N, dtype=int))
    assert_no_hooks(model)


# -- BatchNorm, errors ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_batchnorm_in_train_mode_is_refused(kind):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = batchnorm(train=True).to(DTYPE)
    x, y = torch.randn(N, 4, dtype=DTYPE), torch.randint(0, 3, (N,))
    op = operator(kind, model, nn.CrossEntropyLoss(), (x, y))
    with unchanged(SimpleNamespace(model=model)):
        for backend in ("auto", *BACKENDS):
            with pytest.raises(ValueError, match="BatchNorm"):
                op._exact_diagonal(backend=backend)
        with pytest.raises(ValueError, match="BatchNorm"):
            curvfx.diagonal(op, "exact")
        with pytest.raises(ValueError, match="BatchNorm"):
            curvfx.per_sample_grad_norms(model, nn.CrossEntropyLoss(), None, x, y)
    assert_no_hooks(model)
    model.eval()  # the same model in eval mode: matches dense (case bn_eval for every loss)
    assert_close_rel(op._exact_diagonal(backend="structured"), op.to_dense().diagonal())


def test_unknown_backend():
    model, loss_fn, x, y = problem("mlp", "ce")
    for kind in KINDS:
        with pytest.raises(ValueError, match="backend"):
            operator(kind, model, loss_fn, (x, y))._exact_diagonal(backend="fast")
    with pytest.raises(ValueError, match="backend"):
        curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend="Structured")
    assert_no_hooks(model)


def test_pure_function():
    # a pure function has no layers to see: "structured" is refused, "auto" takes the generic route
    def fn(params, x):
        return torch.tanh(x @ params["w1"]) @ params["w2"]

    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(4, 5, generator=g, dtype=DTYPE),
        "w2": torch.randn(5, 3, generator=g, dtype=DTYPE),
    }
    x, y = torch.randn(N, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (N,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    for kind in KINDS:
        op = operator(kind, fn, loss_fn, (x, y), params=params)
        with pytest.raises(ValueError, match="backend"):
            op._exact_diagonal(backend="structured")
        dense = op.to_dense().diagonal()
        for backend in ("auto", "generic"):
            assert_close_rel(op._exact_diagonal(backend=backend), dense)
    with pytest.raises(ValueError, match="backend"):
        curvfx.per_sample_grad_norms(fn, loss_fn, params, x, y, backend="structured")
    norms = curvfx.per_sample_grad_norms(fn, loss_fn, params, x, y)
    assert_close_rel(norms, norms_of(curvfx.per_sample_grad(fn, loss_fn, params, x, y)))


# -- known bugs -------------------------------------------------------------------------------


class Unused(nn.Module):
    """A registered ``nn.Linear`` that the forward never calls."""

    def __init__(self):
        super().__init__()
        self.lin, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


class OnlyUnused(nn.Module):
    """The only ``nn.Linear`` is never called; the output comes from a custom parameter."""

    def __init__(self):
        super().__init__()
        self.spare, self.w = nn.Linear(4, 3), nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return x @ self.w


class NoGradBranch(nn.Module):
    """A trainable ``nn.Linear`` called under ``torch.no_grad()`` inside the forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.frozen_branch = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.frozen_branch(x)
        return self.lin(x) + h


@pytest.mark.parametrize("model_type", [Unused, OnlyUnused, NoGradBranch])
def test_layers_without_a_gradient_path(model_type):
    # such layers take the generic route (zeros for an unused layer)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_type().to(DTYPE)
    x, y = torch.randn(N, 4, dtype=DTYPE), torch.randint(0, 3, (N,))
    op = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y))
    assert_close_rel(op._exact_diagonal(backend="structured"), op.to_dense().diagonal())


class FlatRows(nn.Module):
    """``nn.Linear`` on the positions flattened into rows: input [N·T, D]."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        n, t, _ = x.shape
        return self.lin(x.reshape(n * t, -1)).reshape(n, t, -1).mean(1)


class SequenceFirst(nn.Module):
    """``nn.Linear`` on a (T, N, D) view of the (N, T, D) input (as ``batch_first=False``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.transpose(0, 1)).mean(0)


class ScaledByHook(nn.Module):
    """A user forward hook that changes a layer's output."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.lin.register_forward_hook(lambda module, args, output: 2 * output)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)))


class LearnedQuery(nn.Module):
    """``nn.Linear`` on a parameter without a batch dimension, broadcast over the samples."""

    def __init__(self):
        super().__init__()
        self.query, self.proj, self.lin = nn.Parameter(torch.randn(1, 4)), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * self.proj(self.query)


class ClassFeatures(nn.Module):
    """Logits against a learned table of N class embeddings (N rows, as many as the batch)."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = nn.Linear(4, 3), nn.Linear(5, 3)
        self.classes = nn.Parameter(torch.randn(N, 5))

    def forward(self, x):
        return torch.tanh(self.img(x)) @ self.txt(torch.tanh(self.classes)).T  # [N, N]


class LinearProbe(nn.Module):
    """A head on features computed under no_grad."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.backbone(x))
        return self.head(h)


class ClampsInPlace(nn.Module):
    """Writes its input in place before its layers (``clamp``: or clamps out of place)."""

    def __init__(self, clamp_in_place: bool = True):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.clamp_in_place = clamp_in_place

    def forward(self, x):
        x = x.clamp_(-1.0, 1.0) if self.clamp_in_place else x.clamp(-1.0, 1.0)
        return self.head(torch.tanh(self.lin(x)))


class SequenceFirstNorm(nn.Module):
    """A sequence-first layer norm and linear layer, and a batch-first linear layer after them."""

    def __init__(self):
        super().__init__()
        self.norm, self.lin, self.head = nn.LayerNorm(4), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(self.norm(x.transpose(0, 1)))).transpose(0, 1)  # [N, T, 5]
        return self.head(h).mean(1)


class SequenceFirstCentered(SequenceFirst):
    """Its outputs are centered logits: every sample's outputs sum to 0, so the gradient of that
    sum vanishes and told the sequence-first layer apart from a batch-first one no more."""

    def forward(self, x):
        out = super().forward(x)
        return out - out.mean(-1, keepdim=True)


@pytest.mark.parametrize("model_type", [SequenceFirst, SequenceFirstNorm, SequenceFirstCentered])
def test_sequence_first_layers_with_as_many_positions_as_samples(model_type, generic_calls):
    # [T, N, D] with T = N has the shape of a batch-first input: sample 0's gradient decides
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_type().to(DTYPE)
    x, y = torch.randn(N, N, 4, dtype=DTYPE), torch.randint(0, 3, (N,))
    loss_fn = nn.CrossEntropyLoss()
    op = curvfx.ggn(model, loss_fn, (x, y))
    assert_close_rel(op._exact_diagonal(backend="structured"), op.to_dense().diagonal())
    truth = loop_norms(model, loss_fn, x, y)
    assert_close_rel(curvfx.per_sample_grad_norms(model, loss_fn, None, x, y), truth)
    assert_close_rel(
        curvfx.per_sample_grad(model, loss_fn, None, x, y, backend="structured"),
        loop_grads(model, loss_fn, x, y),
    )
    sequence_first = {"lin.weight", "lin.bias"} | (
        {"norm.weight", "norm.bias"} if model_type is SequenceFirstNorm else set()
    )
    assert generic_calls and all(
        calls == sequence_first for calls in generic_calls
    )  # "head" stays structured


def test_inputs_without_a_graph_are_read_per_sample(generic_calls):
    """A head on features computed under no_grad (a linear probe): no graph reaches its
    input, so it is taken per sample (structured), exactly; a forward that writes its input
    in place runs too (the batch is tracked through a copy)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LinearProbe().to(DTYPE)
    x, y = 3 * torch.randn(N, 4, dtype=DTYPE), torch.randint(0, 3, (N,))
    loss_fn = nn.CrossEntropyLoss()
    op = curvfx.ggn(model, loss_fn, (x, y))
    assert_close_rel(op._exact_diagonal(backend="structured"), op.to_dense().diagonal())
    assert generic_calls == [{"backbone.weight", "backbone.bias"}]  # the head stays structured
    generic_calls.clear()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ClampsInPlace().to(DTYPE)
    x_in = x.clone()
    norms = curvfx.per_sample_grad_norms(model, loss_fn, None, x_in, y)
    diag = curvfx.diagonal(curvfx.ggn(model, loss_fn, (x_in, y)), "exact")
    assert torch.equal(x_in, x) and not generic_calls  # the caller's batch is not written
    model.clamp_in_place = False  # the same numbers without the in-place write
    assert_close_rel(norms, loop_norms(model, loss_fn, x, y))
    assert_close_rel(diag, curvfx.ggn(model, loss_fn, (x, y)).to_dense().diagonal())


@pytest.mark.parametrize("model_type", [FlatRows, SequenceFirst, LearnedQuery, ScaledByHook, ClassFeatures])
def test_layer_inputs_the_structured_path_misreads(model_type):
    # the structured path takes dim 0 of the recorded layer input as the sample and the
    # recorded output as W a + b; each model breaks one of these. Generic route and dense agree.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_type().to(DTYPE)
    x, y = torch.randn(N, 3, 4, dtype=DTYPE), torch.randint(0, 3, (N,))
    if model_type not in (FlatRows, SequenceFirst):
        x = x[:, 0]
    loss_fn = nn.CrossEntropyLoss()
    op = curvfx.ggn(model, loss_fn, (x, y))
    dense = op.to_dense().diagonal()
    assert_close_rel(op._exact_diagonal(backend="generic"), dense)
    truth = loop_norms(model, loss_fn, x, y)
    assert_close_rel(curvfx.per_sample_grad_norms(model, loss_fn, None, x, y, backend="generic"), truth)
    assert_close_rel(curvfx.per_sample_grad_norms(model, loss_fn, None, x, y), truth)
    assert_close_rel(op._exact_diagonal(backend="structured"), dense)
    grads = curvfx.per_sample_grad(model, loss_fn, None, x, y, backend="structured")
    assert_close_rel(grads, loop_grads(model, loss_fn, x, y))


# -- which layers are factored ----------------------------------------------------------------


def test_layer_kinds():
    kind = curvfx._capture.layer_kind
    assert kind(nn.Conv3d(2, 2, 3, groups=2, padding="same", padding_mode="circular")) == "conv"
    assert kind(nn.Embedding(5, 3, padding_idx=1)) == "embedding"
    assert kind(nn.Embedding(5, 3, max_norm=1.0)) is None  # renormalizes the table in the forward
    assert kind(nn.Embedding(5, 3, scale_grad_by_freq=True)) is None  # couples the samples
    assert kind(nn.BatchNorm2d(3).eval()) == "norm"
    assert kind(nn.BatchNorm2d(3)) is None  # train mode: batch statistics
    assert kind(nn.BatchNorm2d(3, track_running_stats=False).eval()) is None
    assert kind(nn.GroupNorm(1, 3)) == kind(nn.LayerNorm(3)) == kind(nn.RMSNorm(3)) == "norm"
    for other in (nn.InstanceNorm1d(3, affine=True), nn.PReLU(), nn.Bilinear(2, 2, 2), nn.LSTM(2, 2)):
        assert kind(other) is None
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda *args: None)
    assert kind(hooked) is None


def test_kfac_keeps_its_kronecker_layers():
    # KFAC blocks: nn.Linear and nn.Conv1d/2d with one group and zero padding; the layers
    # only the exact diagonals factor get KFAC's diagonal blocks, as before
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).to(DTYPE)
    x = torch.randn(4, 2, 6, 6, dtype=DTYPE)
    y = torch.randint(0, 3, (4,))
    representation = curvfx.kfac(model, nn.CrossEntropyLoss(), (x, y)).representation
    kron = {k for k, v in representation.items() if v == "kronecker"}
    assert kron == {"0.weight", "0.bias", "4.weight", "4.bias"}
    params = dict(model.named_parameters())
    assert set(curvfx._capture.supported_layers(model, params)) == {model[0], model[4]}
    assert set(curvfx._capture.supported_layers(model, params, factored=True)) == {*model[:3], model[4]}


def test_embedding_forms_only_the_pairs_that_occur(monkeypatch):
    # a large table, few ids: the per-sample rows are (sample, id) pairs, never N·V·D numbers
    vocab, dim = 100_000, 4
    model = nn.Sequential(nn.Embedding(vocab, dim, padding_idx=0), nn.Flatten(), nn.Linear(3 * dim, 2)).to(
        DTYPE
    )
    x = torch.tensor([[0, 5, 5], [7, 7, 99_999], [5, 1, 2]])
    y = torch.randint(0, 2, (3,))
    real = torch.Tensor.new_zeros
    sizes = []

    def spy(self, *size, **kwargs):
        sizes.append(torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size).numel())
        return real(self, *size, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", spy)
    norms = curvfx.per_sample_grad_norms(model, nn.CrossEntropyLoss(), None, x, y, backend="structured")
    monkeypatch.undo()
    assert max(sizes) < vocab  # no [N, V, D] buffer (the diagonal itself is [V, D])
    assert_close_rel(norms, loop_norms(model, nn.CrossEntropyLoss(), x, y))


# -- a batching-rule bug guarded ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_prelu_diagonal_and_norms_match_dense(kind, backend):
    """Nested vmap of PReLU's backward returns misshapen (or, with as many samples as
    columns, wrong) gradients (torch 2.13); curvfx runs PReLU composed, so the generic route
    vmaps it without a fallback warning and gets the dense diagonal."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 3)).double()
    x = torch.randn(N, 3, dtype=DTYPE)
    y = torch.randint(0, 3, (N,))
    loss = nn.CrossEntropyLoss()
    op = curvfx.ggn(model, loss, (x, y)) if kind == "ggn" else curvfx.empirical_fisher(model, loss, (x, y))
    with _no_warning():
        diag = op._exact_diagonal(backend)
    assert_close_rel(diag, op.to_dense().diagonal())
    fn, params = curvfx.make_functional(model)
    loop = [
        torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(
                    loss(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
                )
            ]
        )
        for i in range(N)
    ]
    norms = curvfx.per_sample_grad_norms(fn, loss, params, x, y, backend=backend)
    assert_close_rel(norms, torch.stack(loop).norm(dim=1))


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


class _PositionalLM(nn.Module):
    """Token plus positional embedding: ``pos(arange(T))`` has T rows, which equal N below."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.fc = nn.Embedding(11, 6), nn.Embedding(4, 6), nn.Linear(6, 11)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.fc(torch.tanh(h)).transpose(1, 2)


class _ClassTable(nn.Module):
    """Image-text logits against a learned table of C classes (C = N below): rows not samples."""

    def __init__(self):
        super().__init__()
        self.img, self.labels, self.txt = nn.Linear(5, 6), nn.Embedding(4, 6), nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.img(x)) @ self.txt(self.labels(torch.arange(4))).T


class _FirstTokenSequenceFirst(nn.Module):
    """A sequence-first Linear [T, N, D] read at t = 0 only (a CLS token), T = N below."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x.transpose(0, 1)))[0])


@pytest.mark.parametrize("make", [_PositionalLM, _ClassTable, _FirstTokenSequenceFirst])
def test_rows_that_are_not_the_samples_when_their_count_equals_n(make):
    """Shapes cannot tell these layers' rows from the N samples: the diagonal and norms stay exact."""
    torch.manual_seed(0)
    model = make().double()
    if make is _PositionalLM:
        x, y = torch.randint(0, 11, (4, 4)), torch.randint(0, 11, (4, 4))
    elif make is _ClassTable:
        x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    else:
        x, y = torch.randn(4, 4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    ce = nn.CrossEntropyLoss()
    G = curvfx.ggn(model, ce, (x, y))
    assert_close_rel(curvfx.diagonal(G), G.to_dense().diagonal(), tol=1e-10)
    params = dict(model.named_parameters())
    loop = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(ce(model(x[n : n + 1]), y[n : n + 1]), list(params.values()))
                ]
            )
            for n in range(4)
        ]
    ).norm(dim=1)
    fn, detached = curvfx.make_functional(model)
    assert_close_rel(curvfx.per_sample_grad_norms(fn, ce, detached, x, y), loop, tol=1e-10)


class _KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(3, 5), nn.Dropout(0.0), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(input=x))))


def test_layers_called_by_keyword_and_dropout_without_probability():
    """``layer(input=x)`` is read like ``layer(x)``; Dropout(p=0) in train mode draws nothing."""
    torch.manual_seed(0)
    model = _KeywordCall().double().train()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y))
    assert_close_rel(curvfx.diagonal(G), G.to_dense().diagonal(), tol=1e-10)
    assert_close_rel(
        curvfx.diagonal(curvfx.kfac(model, nn.CrossEntropyLoss(), (x, y))).sum(),
        curvfx.kfac(model, nn.CrossEntropyLoss(), (x, y)).to_dense().trace(),
        tol=1e-10,
    )


def test_max_norm_embeddings_leave_the_model_weight_alone():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, max_norm=0.5).double()
    with torch.no_grad():
        emb.weight.mul_(3)  # rows above max_norm: the forward pass would renormalize them in place
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(8, 3)).double()
    before = emb.weight.detach().clone()
    ids, y = torch.randint(0, 10, (5, 2)), torch.randint(0, 3, (5,))
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (ids, y))
    curvfx.diagonal(G)
    G @ torch.ones(G.shape[0], dtype=torch.float64)
    assert torch.equal(emb.weight, before)


def test_a_model_returning_a_tuple_is_named():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    for compute in (
        lambda G: G @ torch.ones(G.shape[0]),
        lambda G: curvfx.diagonal(G),
    ):
        with pytest.raises(ValueError, match="model: returned tuple; curvature needs one output tensor"):
            compute(curvfx.ggn(Pair(), nn.CrossEntropyLoss(), (x, y)))


def test_structured_per_sample_grads_keep_the_parameters_dtype_under_autocast():
    """Under bfloat16 autocast the structured route returned three of four leaves in bfloat16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = curvfx.per_sample_grad(model, nn.CrossEntropyLoss(), None, x, y, backend="structured")
        generic = curvfx.per_sample_grad(model, nn.CrossEntropyLoss(), None, x, y, backend="generic")
    assert {k: g.dtype for k, g in grads.items()} == dict.fromkeys(generic, torch.float32)
    assert_close_rel(grads, generic, tol=5e-2)
