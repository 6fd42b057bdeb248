"""curvfx.losses: values, output-Hessian products, factors and sampling against autograd."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from dense import assert_close_rel, output_hessian_of
from torch import Tensor, nn

import curvfx
from curvfx.losses import Loss, get_loss

DTYPE = torch.float64
_WEIGHT = torch.tensor([0.5, 2.0, 1.25, 0.75], dtype=DTYPE)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def _classes(g, *shape, num_classes=4):
    return torch.randint(0, num_classes, shape, generator=g)


def _with_ignored(y, ignore_index, where):
    y = y.clone()
    y[where] = ignore_index
    return y


@dataclass(frozen=True)
class LossCase:
    """A torch loss, how to draw (outputs, targets), and which family it is."""

    name: str
    loss: Callable
    data: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    family: str  # "mse", "ce", "bce", "nll"
    plain: bool = True  # no weight / ignore_index / smoothing / probability targets

    def make(self, seed: int = 0) -> tuple[Tensor, Tensor]:
        return self.data(torch.Generator().manual_seed(seed))


def _reg(g, shape=(4, 3)):
    return _randn(g, *shape), _randn(g, *shape)


def _cls(g):
    return _randn(g, 5, 4) * 2, _classes(g, 5)


def _seq(g):
    return _randn(g, 3, 4, 2), _classes(g, 3, 2)


def _bin(g):
    return _randn(g, 4, 3) * 2, torch.randint(0, 2, (4, 3), generator=g).to(DTYPE)


def _soft_bin(g):
    return _randn(g, 4, 3) * 2, torch.rand(4, 3, generator=g, dtype=DTYPE)


def _logp(g):
    return torch.log_softmax(_randn(g, 5, 4) * 2, dim=1), _classes(g, 5)


def _probs(g):
    return _randn(g, 5, 4) * 2, torch.softmax(_randn(g, 5, 4), dim=1)


def _seq_probs(g):
    return _randn(g, 3, 4, 2), torch.softmax(_randn(g, 3, 4, 2), dim=1)


def _cls_ignore(g, ignore_index=-100):
    out, y = _cls(g)
    return out, _with_ignored(y, ignore_index, [1, 3])


def _seq_ignore(g):
    out, y = _seq(g)
    return out, _with_ignored(y, -100, (torch.tensor([0, 2]), torch.tensor([1, 0])))


LOSS_CASES = [
    LossCase("MSELoss-mean", nn.MSELoss(), _reg, "mse"),
    LossCase("MSELoss-sum", nn.MSELoss(reduction="sum"), _reg, "mse"),
    LossCase("MSELoss-mean-3d", nn.MSELoss(), lambda g: _reg(g, (2, 3, 2)), "mse"),
    LossCase("mse_loss", F.mse_loss, _reg, "mse"),
    LossCase("partial-mse_loss-sum", functools.partial(F.mse_loss, reduction="sum"), _reg, "mse"),
    LossCase("CrossEntropyLoss-mean", nn.CrossEntropyLoss(), _cls, "ce"),
    LossCase("CrossEntropyLoss-sum", nn.CrossEntropyLoss(reduction="sum"), _cls, "ce"),
    LossCase("cross_entropy", F.cross_entropy, _cls, "ce"),
    LossCase(
        "partial-cross_entropy-sum",
        functools.partial(F.cross_entropy, reduction="sum"),
        _cls,
        "ce",
    ),
    LossCase("CrossEntropyLoss-seq-mean", nn.CrossEntropyLoss(), _seq, "ce"),
    LossCase("CrossEntropyLoss-seq-sum", nn.CrossEntropyLoss(reduction="sum"), _seq, "ce"),
    LossCase("CrossEntropyLoss-ignore-mean", nn.CrossEntropyLoss(), _cls_ignore, "ce", plain=False),
    LossCase(
        "CrossEntropyLoss-ignore2-sum",
        nn.CrossEntropyLoss(reduction="sum", ignore_index=2),
        lambda g: _cls_ignore(g, 2),
        "ce",
        plain=False,
    ),
    LossCase("CrossEntropyLoss-seq-ignore-mean", nn.CrossEntropyLoss(), _seq_ignore, "ce", plain=False),
    LossCase("CrossEntropyLoss-weight-mean", nn.CrossEntropyLoss(weight=_WEIGHT), _cls, "ce", plain=False),
    LossCase(
        "CrossEntropyLoss-weight-sum",
        nn.CrossEntropyLoss(weight=_WEIGHT, reduction="sum"),
        _cls,
        "ce",
        plain=False,
    ),
    LossCase(
        "CrossEntropyLoss-weight-ignore-mean",
        nn.CrossEntropyLoss(weight=_WEIGHT),
        _cls_ignore,
        "ce",
        plain=False,
    ),
    LossCase(
        "CrossEntropyLoss-weight-seq-mean",
        nn.CrossEntropyLoss(weight=_WEIGHT),
        _seq,
        "ce",
        plain=False,
    ),
    LossCase(
        "CrossEntropyLoss-smoothing-mean",
        nn.CrossEntropyLoss(label_smoothing=0.2),
        _cls,
        "ce",
        plain=False,
    ),
    LossCase(
        "CrossEntropyLoss-smoothing-ignore-sum",
        nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"),
        _cls_ignore,
        "ce",
        plain=False,
    ),
    LossCase(
        "cross_entropy-smoothing-seq",
        functools.partial(F.cross_entropy, label_smoothing=0.1),
        _seq,
        "ce",
        plain=False,
    ),
    LossCase("CrossEntropyLoss-probs-mean", nn.CrossEntropyLoss(), _probs, "ce", plain=False),
    LossCase(
        "CrossEntropyLoss-probs-sum",
        nn.CrossEntropyLoss(reduction="sum"),
        _probs,
        "ce",
        plain=False,
    ),
    LossCase("CrossEntropyLoss-seq-probs-mean", nn.CrossEntropyLoss(), _seq_probs, "ce", plain=False),
    LossCase("BCEWithLogitsLoss-mean", nn.BCEWithLogitsLoss(), _bin, "bce"),
    LossCase("BCEWithLogitsLoss-sum", nn.BCEWithLogitsLoss(reduction="sum"), _bin, "bce"),
    LossCase("BCEWithLogitsLoss-soft-mean", nn.BCEWithLogitsLoss(), _soft_bin, "bce"),
    LossCase("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, _bin, "bce"),
    LossCase(
        "partial-bce_with_logits-sum",
        functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"),
        _bin,
        "bce",
    ),
    LossCase("NLLLoss-mean", nn.NLLLoss(), _logp, "nll"),
    LossCase("NLLLoss-sum", nn.NLLLoss(reduction="sum"), _logp, "nll"),
    LossCase("nll_loss", F.nll_loss, _logp, "nll"),
    LossCase("partial-nll_loss-sum", functools.partial(F.nll_loss, reduction="sum"), _logp, "nll"),
]

_PLAIN = [c for c in LOSS_CASES if c.plain]


def _ids(cases):
    return [c.name for c in cases]


@pytest.fixture(params=LOSS_CASES, ids=_ids(LOSS_CASES))
def loss_case(request):
    return request.param


@pytest.fixture(params=_PLAIN, ids=_ids(_PLAIN))
def plain_case(request):
    return request.param


def _reconstruct(S: Tensor, outputs: Tensor) -> Tensor:
    """Σ_k Σ_n vec(S[k, n]) vec(S[k, n])ᵀ placed on sample n's diagonal block, [M, M]."""
    N = outputs.shape[0]
    D = outputs[0].numel()
    H = torch.zeros(N * D, N * D, dtype=outputs.dtype)
    for n in range(N):
        Sn = S[:, n].reshape(S.shape[0], D)
        H[n * D : (n + 1) * D, n * D : (n + 1) * D] = Sn.T @ Sn
    return H


def _check_factor(S: Tensor, outputs: Tensor, expected: Tensor) -> None:
    assert S.dtype == outputs.dtype
    assert S.dim() == outputs.dim() + 1 and S.shape[1:] == outputs.shape, (
        f"factor shape {tuple(S.shape)} is not [K, {', '.join(map(str, outputs.shape))}]"
    )
    assert_close_rel(_reconstruct(S, outputs), expected, tol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# value, Hessian-vector product, factor


def test_get_loss_returns_a_loss(loss_case):
    assert isinstance(get_loss(loss_case.loss), Loss)


def test_get_loss_returns_loss_instances_as_is(loss_case):
    loss = get_loss(loss_case.loss)
    assert get_loss(loss) is loss


def test_value_equals_torch(loss_case):
    outputs, targets = loss_case.make()
    value = get_loss(loss_case.loss)(outputs, targets)
    assert_close_rel(value, loss_case.loss(outputs, targets), tol=1e-14)


def test_hessian_vp_equals_autograd_hessian(loss_case):
    outputs, targets = loss_case.make(1)
    v = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    H = output_hessian_of(loss_case.loss, outputs, targets)
    Hv = get_loss(loss_case.loss).hessian_vp(outputs, targets, v)
    assert Hv.shape == outputs.shape
    assert_close_rel(Hv, (H @ v.reshape(-1)).reshape(outputs.shape), tol=1e-12, atol=1e-14)


def test_output_hessian_is_block_diagonal_over_samples(loss_case):
    """Truth check behind the factor contract: cross-sample blocks are zero."""
    outputs, targets = loss_case.make(3)
    H = output_hessian_of(loss_case.loss, outputs, targets)
    N, D = outputs.shape[0], outputs[0].numel()
    mask = torch.block_diag(*[torch.ones(D, D, dtype=torch.bool)] * N)
    assert torch.all(H[~mask] == 0)


def test_hessian_factor_reconstructs_output_hessian(loss_case):
    outputs, targets = loss_case.make(4)
    H = output_hessian_of(loss_case.loss, outputs, targets)
    S = get_loss(loss_case.loss).hessian_factor(outputs, targets)
    _check_factor(S, outputs, H)


def test_fisher_factor_equals_hessian_factor_for_canonical_links(plain_case):
    if plain_case.family == "nll":
        pytest.skip("NLL on log-probabilities is linear: Fisher != Hessian (see enumeration)")
    outputs, targets = plain_case.make(5)
    loss = get_loss(plain_case.loss)
    H = _reconstruct(loss.hessian_factor(outputs, targets), outputs)
    _check_factor(loss.fisher_factor(outputs, targets), outputs, H)


def _normalizer(loss_case: LossCase, outputs: Tensor) -> float:
    """1/c: how many terms a "mean" reduction averages over (1 for "sum")."""
    reduction = getattr(loss_case.loss, "reduction", None)
    if reduction is None:
        reduction = getattr(loss_case.loss, "keywords", {}).get("reduction", "mean")
    if reduction == "sum":
        return 1.0
    if loss_case.family in ("ce", "nll"):
        return outputs.numel() / outputs.shape[1]
    return float(outputs.numel())


def _support(loss_case: LossCase, outputs: Tensor):
    """All targets of one sample and their probabilities under the predictive."""
    if loss_case.family in ("ce", "nll"):
        logp = outputs if loss_case.family == "nll" else torch.log_softmax(outputs, dim=0)
        return [(torch.tensor(c), logp[c].exp()) for c in range(outputs.shape[0])]
    assert loss_case.family == "bce"
    p = torch.sigmoid(outputs)
    out = []
    for bits in itertools.product([0.0, 1.0], repeat=outputs.numel()):
        y = torch.tensor(bits, dtype=DTYPE).reshape(outputs.shape)
        out.append((y, torch.prod(torch.where(y == 1, p, 1 - p))))
    return out


@pytest.mark.parametrize(
    "name",
    [c.name for c in _PLAIN if c.family in ("ce", "nll", "bce") and "seq" not in c.name],
)
def test_fisher_factor_equals_exact_expectation(name):
    """F_n = (1/c) E_{ỹ ~ p(f_n)} [g gᵀ], g = ∇_{f_n} L(f, y with y_n := ỹ), by enumeration."""
    loss_case = next(c for c in LOSS_CASES if c.name == name)
    outputs, targets = loss_case.make(6)
    N, D = outputs.shape[0], outputs[0].numel()
    expected = torch.zeros(N * D, N * D, dtype=DTYPE)
    for n in range(N):
        block = torch.zeros(D, D, dtype=DTYPE)
        for y_n, prob in _support(loss_case, outputs[n]):
            y = targets.clone()
            y[n] = y_n
            f = outputs.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_case.loss(f, y), f)
            gn = g[n].reshape(-1)
            block += prob * torch.outer(gn, gn)
        expected[n * D : (n + 1) * D, n * D : (n + 1) * D] = block
    expected *= _normalizer(loss_case, outputs)
    _check_factor(get_loss(loss_case.loss).fisher_factor(outputs, targets), outputs, expected)


def test_factors_and_products_leave_inputs_alone(loss_case):
    outputs, targets = loss_case.make(7)
    outputs.requires_grad_(True)
    before = outputs.detach().clone(), targets.clone()
    loss = get_loss(loss_case.loss)
    v = torch.ones_like(outputs)
    loss.hessian_vp(outputs, targets, v)
    loss.hessian_factor(outputs, targets)
    assert outputs.grad is None
    assert torch.equal(outputs.detach(), before[0]) and torch.equal(targets, before[1])


# ---------------------------------------------------------------------------------------
# sampling from the predictive


def _draw(loss_obj, outputs, seed=0):
    return get_loss(loss_obj).sample_targets(outputs, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loss_obj", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")])
def test_categorical_sampling_matches_softmax(loss_obj):
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 1.5, 0.2]], dtype=DTYPE)
    M = 20_000
    samples = _draw(loss_obj, logits.repeat(M, 1))
    assert samples.shape == (3 * M,) and samples.dtype == torch.int64
    samples = samples.reshape(M, 3)
    probs = torch.softmax(logits, dim=1)
    for i in range(3):
        freq = torch.bincount(samples[:, i], minlength=4).to(DTYPE) / M
        se = torch.sqrt(probs[i] * (1 - probs[i]) / M)
        assert torch.all((freq - probs[i]).abs() <= 4 * se), (i, freq, probs[i])


def test_categorical_sampling_uses_dim_1_for_sequences():
    logits = torch.tensor([[[3.0, -2.0], [0.0, 0.0], [-1.0, 2.0]]], dtype=DTYPE)  # [1, 3, 2]
    M = 10_000
    samples = _draw(nn.CrossEntropyLoss(), logits.repeat(M, 1, 1))
    assert samples.shape == (M, 2) and samples.dtype == torch.int64
    probs = torch.softmax(logits[0], dim=0)  # [3, 2]: classes x positions
    for t in range(2):
        freq = torch.bincount(samples[:, t], minlength=3).to(DTYPE) / M
        se = torch.sqrt(probs[:, t] * (1 - probs[:, t]) / M)
        assert torch.all((freq - probs[:, t]).abs() <= 4 * se), (t, freq, probs[:, t])


def test_nll_sampling_matches_exp_of_log_probabilities():
    logp = torch.log_softmax(torch.tensor([[1.0, -1.0, 0.3, 2.0]], dtype=DTYPE), dim=1)
    M = 20_000
    samples = _draw(nn.NLLLoss(), logp.repeat(M, 1))
    assert samples.shape == (M,) and samples.dtype == torch.int64
    p = logp[0].exp()
    freq = torch.bincount(samples, minlength=4).to(DTYPE) / M
    assert torch.all((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / M)), (freq, p)


def test_bernoulli_sampling_matches_sigmoid():
    logits = torch.tensor([[-2.0, 0.0, 1.0, 3.0]], dtype=DTYPE)
    M = 20_000
    samples = _draw(nn.BCEWithLogitsLoss(), logits.repeat(M, 1))
    assert samples.shape == (M, 4) and samples.dtype == DTYPE
    assert torch.all((samples == 0) | (samples == 1))
    p = torch.sigmoid(logits[0])
    freq = samples.mean(0)
    assert torch.all((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / M)), (freq, p)


@pytest.mark.parametrize("loss_obj", [nn.MSELoss(), nn.MSELoss(reduction="sum")])
def test_gaussian_sampling_has_mean_outputs_and_variance_one_half(loss_obj):
    f = torch.tensor([[1.5, -0.5, 0.0]], dtype=DTYPE)
    M = 20_000
    samples = _draw(loss_obj, f.repeat(M, 1))
    assert samples.shape == (M, 3) and samples.dtype == DTYPE
    noise = samples - f
    var = 0.5
    assert torch.all(noise.mean(0).abs() <= 4 * (var / M) ** 0.5), noise.mean(0)
    cov = noise.T @ noise / M
    var_se = var * (2 / M) ** 0.5
    assert torch.all((cov.diagonal() - var).abs() <= 4 * var_se), cov.diagonal()
    off = cov - torch.diag(cov.diagonal())
    assert torch.all(off.abs() <= 4 * var / M**0.5), off


def test_mc_fisher_from_samples_matches_fisher_factor():
    """Mean of (1/c) g gᵀ over sampled targets is within 5 standard errors of fisher_factor."""
    loss = get_loss(nn.CrossEntropyLoss())
    logits = torch.tensor([[1.0, -0.5, 0.0, 2.0], [0.3, 0.2, -1.0, 0.0]], dtype=DTYPE)
    N, M = logits.shape[0], 20_000
    ys = loss.sample_targets(logits.repeat(M, 1), generator=torch.Generator().manual_seed(11))
    f = logits.repeat(M, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(f, ys, reduction="sum"), f)  # rows: p - e_ỹ
    g = g.reshape(M, N, -1)
    outer = torch.einsum("mnc,mnd->mncd", g, g) / N  # c = 1/N of the mean reduction
    mc, se = outer.mean(0), outer.std(0) / M**0.5
    S = loss.fisher_factor(logits, torch.zeros(N, dtype=torch.int64))
    exact = torch.stack([S[:, n].T @ S[:, n] for n in range(N)])
    assert torch.all((mc - exact).abs() <= 5 * se + 1e-12), (mc - exact) / (se + 1e-300)


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
@pytest.mark.parametrize("ignore_index", [0, 2, -100])
def test_mc_fisher_factor_with_ignore_index_a_class(name, ignore_index):
    """The Monte-Carlo Fisher factor's mean S Sᵀ is within 5 standard errors of the exact
    Fisher's, also where ``ignore_index`` is a class a draw can hit (before: a draw of that
    class was ignored, and the estimate was about half of the exact Fisher)."""
    from curvfx._factors import output_factor

    torch.manual_seed(0)
    logits = torch.randn(4, 3, dtype=DTYPE)
    y = torch.tensor([1, ignore_index, 0, 2]) if ignore_index >= 0 else torch.tensor([1, -100, 0, 2])
    module = nn.CrossEntropyLoss if name == "cross_entropy" else nn.NLLLoss
    loss = get_loss(module(ignore_index=ignore_index))
    outputs = logits if name == "cross_entropy" else logits.log_softmax(1)
    M = 8_000
    S = output_factor(loss, outputs, y, "mc", M, torch.Generator().manual_seed(5))  # [M, N, C]
    per_draw = M * torch.einsum("mnc,mnd->mncd", S, S)  # mean over m: the estimate
    mc, se = per_draw.mean(0), per_draw.std(0) / M**0.5
    E = loss.fisher_factor(outputs, y)
    exact = torch.einsum("knc,knd->ncd", E, E)
    assert torch.all((mc - exact).abs() <= 5 * se + 1e-12), (mc - exact) / (se + 1e-300)
    assert exact[1].abs().max() == 0 and mc[1].abs().max() == 0  # the ignored position


def test_sampled_classes_follow_the_softmax_and_skip_impossible_classes():
    """Draws over dim 1 of logits [N, C, d]: frequencies within 5 standard errors of softmax,
    and classes whose probability underflows to zero (last class included) never drawn."""
    logits = torch.tensor([[0.0, -1e3, 1.0, -1e3], [2.0, 0.5, -1e3, -1e3]]).T.unsqueeze(0)  # [1, 4, 2]
    M = 50_000
    draws = get_loss(nn.CrossEntropyLoss()).sample_targets(
        logits.expand(M, 4, 2), generator=torch.Generator().manual_seed(3)
    )
    assert draws.shape == (M, 2) and draws.dtype == torch.int64
    freq = torch.stack([torch.bincount(draws[:, d], minlength=4) for d in range(2)], 1).double() / M
    p = logits[0].double().softmax(0)
    assert torch.all(freq[p == 0] == 0)
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / M).sqrt() + 1e-12), freq - p


@pytest.mark.parametrize(
    "loss_obj, outputs",
    [
        (nn.CrossEntropyLoss(), torch.zeros(50, 4, dtype=DTYPE)),
        (nn.NLLLoss(), torch.log_softmax(torch.zeros(50, 4, dtype=DTYPE), 1)),
        (nn.BCEWithLogitsLoss(), torch.zeros(50, 4, dtype=DTYPE)),
        (nn.MSELoss(), torch.zeros(50, 4, dtype=DTYPE)),
    ],
    ids=["ce", "nll", "bce", "mse"],
)
def test_sampling_is_reproducible_and_leaves_global_rng_alone(loss_obj, outputs):
    rng = torch.random.get_rng_state()
    a, b, c = _draw(loss_obj, outputs, 1), _draw(loss_obj, outputs, 1), _draw(loss_obj, outputs, 2)
    assert torch.equal(torch.random.get_rng_state(), rng), "a seeded draw consumed the global RNG"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    loss = get_loss(loss_obj)
    torch.manual_seed(3)
    d = loss.sample_targets(outputs)
    torch.manual_seed(3)
    e = loss.sample_targets(outputs)
    assert torch.equal(d, e), "without a generator, sampling must follow the global seed"


# ---------------------------------------------------------------------------------------
# generic fallback


def quartic_loss(outputs, targets):
    return ((outputs - targets) ** 4).sum() + (outputs.sin() * targets).mean()


@pytest.mark.parametrize(
    "loss_obj, name",
    [(quartic_loss, "quartic_loss"), (nn.HuberLoss(delta=0.7), "HuberLoss")],
    ids=["quartic_loss", "HuberLoss"],
)
def test_generic_loss_hessian_vp_and_no_factor(loss_obj, name):
    outputs, targets = _reg(torch.Generator().manual_seed(8))
    loss = get_loss(loss_obj)
    assert isinstance(loss, Loss)
    assert_close_rel(loss(outputs, targets), loss_obj(outputs, targets), tol=1e-14)
    v = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    H = output_hessian_of(loss_obj, outputs, targets)
    assert_close_rel(loss.hessian_vp(outputs, targets, v), (H @ v.reshape(-1)).reshape(v.shape))
    with pytest.raises(ValueError, match=name):
        loss.hessian_factor(outputs, targets)
    with pytest.raises(ValueError, match=name):
        loss.fisher_factor(outputs, targets)
    with pytest.raises(ValueError, match=name):
        loss.sample_targets(outputs, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------
# unsupported options are refused, never ignored


def _use(loss_obj, outputs, targets):
    loss = get_loss(loss_obj)
    loss(outputs, targets)
    loss.hessian_vp(outputs, targets, torch.ones_like(outputs))
    loss.hessian_factor(outputs, targets)


@pytest.mark.parametrize(
    "loss_obj, data, match",
    [
        (nn.MSELoss(reduction="none"), _reg, "reduction"),
        (functools.partial(F.mse_loss, reduction="none"), _reg, "reduction"),
        (nn.CrossEntropyLoss(reduction="none"), _cls, "reduction"),
        (functools.partial(F.cross_entropy, reduction="none"), _cls, "reduction"),
        (nn.BCEWithLogitsLoss(reduction="none"), _bin, "reduction"),
        (nn.NLLLoss(reduction="none"), _logp, "reduction"),
    ],
    ids=[
        "MSELoss-none",
        "mse_loss-none",
        "CE-none",
        "cross_entropy-none",
        "BCE-none",
        "NLL-none",
    ],
)
def test_unsupported_options_raise(loss_obj, data, match):
    outputs, targets = data(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        _use(loss_obj, outputs, targets)


@pytest.mark.parametrize(
    "loss_obj, data",
    [
        (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 3.0], dtype=DTYPE)), _bin),
        (nn.BCEWithLogitsLoss(weight=torch.tensor([0.5, 2.0, 3.0], dtype=DTYPE)), _soft_bin),
        (nn.NLLLoss(weight=_WEIGHT), _logp),
        (nn.NLLLoss(ignore_index=1), _logp),
        (nn.CrossEntropyLoss(weight=_WEIGHT), _probs),
        (nn.CrossEntropyLoss(label_smoothing=0.3), _probs),
        (nn.CrossEntropyLoss(weight=_WEIGHT, reduction="sum"), _seq_ignore),
        (functools.partial(F.cross_entropy, ignore_index=0), _cls),
        (nn.CrossEntropyLoss(weight=_WEIGHT, label_smoothing=0.1), _cls),
        (nn.CrossEntropyLoss(weight=_WEIGHT, label_smoothing=0.1, reduction="sum"), _cls_ignore),
        (functools.partial(F.cross_entropy, weight=_WEIGHT, label_smoothing=0.1), _seq_ignore),
        (nn.CrossEntropyLoss(weight=_WEIGHT, label_smoothing=0.2), _seq_probs),
    ],
    ids=[
        "BCE-pos_weight",
        "BCE-weight",
        "NLL-weight",
        "NLL-ignore_index",
        "CE-weight-probs",
        "CE-smoothing-probs",
        "CE-weight-seq-ignore",
        "cross_entropy-ignore_index",
        "CE-weight+smoothing-mean",
        "CE-weight+smoothing-ignore-sum",
        "cross_entropy-weight+smoothing-seq-ignore",
        "CE-weight+smoothing-seq-probs",
    ],
)
def test_other_options_are_exact_or_refused(loss_obj, data):
    """An option is either modelled exactly or refused with ValueError, never dropped."""
    outputs, targets = data(torch.Generator().manual_seed(1))
    try:
        loss = get_loss(loss_obj)
        value = loss(outputs, targets)
    except ValueError:
        return
    assert_close_rel(value, loss_obj(outputs, targets), tol=1e-14)
    H = output_hessian_of(loss_obj, outputs, targets)
    v = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    assert_close_rel(loss.hessian_vp(outputs, targets, v), (H @ v.reshape(-1)).reshape(v.shape), atol=1e-14)
    try:
        S = loss.hessian_factor(outputs, targets)
    except ValueError:
        return
    _check_factor(S, outputs, H)


def test_a_subclass_with_its_own_forward_is_not_taken_for_its_parent():
    """``2 · cross-entropy`` written as a subclass: autograd on its forward, not the parent's formula."""

    class ScaledCE(nn.CrossEntropyLoss):
        def forward(self, input, target):
            return 2 * super().forward(input, target)

    class SameCE(nn.CrossEntropyLoss):  # no forward of its own: the closed form stays
        pass

    loss = get_loss(ScaledCE())
    assert type(loss).__name__ == "AutogradLoss" and loss.reduction == "mean"
    assert type(get_loss(SameCE())).__name__ == "CrossEntropyLoss"
    g = torch.Generator().manual_seed(3)
    f, t = torch.randn(4, 3, generator=g, dtype=DTYPE), torch.tensor([0, 2, 1, 2])
    v = torch.randn(4, 3, generator=g, dtype=DTYPE)
    H = torch.autograd.functional.hessian(lambda o: ScaledCE()(o, t), f).reshape(12, 12)
    assert torch.allclose(loss.hessian_vp(f, t, v).reshape(-1), H @ v.reshape(-1), rtol=1e-12, atol=0)
    assert float(loss(f, t)) == float(ScaledCE()(f, t))


@pytest.mark.parametrize("loss_obj", [nn.CrossEntropyLoss(), nn.NLLLoss(ignore_index=7)], ids=["ce", "nll"])
def test_class_indices_outside_the_classes_are_refused(loss_obj):
    """Torch raises for them in the loss value; the curvature (which need not index by them) must too."""
    loss = get_loss(loss_obj)
    f = torch.zeros(4, 3, dtype=DTYPE).log_softmax(1)
    with pytest.raises(ValueError, match=r"targets: .* needs class indices in \[0, C = 3\)"):
        loss.hessian_factor(f, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"got values in \[-2, 1\]"):
        loss.hessian_vp(f, torch.tensor([0, -2, 1, 1]), f)
    if isinstance(loss_obj, nn.NLLLoss):  # ignore_index is not a class, and may lie outside
        loss.hessian_vp(f, torch.tensor([0, 7, 1, 2]), f)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8])
def test_class_index_dtypes_torch_refuses_are_refused(dtype):
    """Torch's losses take int64 or uint8 indices; the curvature (which need not call them) too."""
    f, t = torch.zeros(4, 3, dtype=DTYPE), torch.tensor([0, 1, 2, 1])
    with pytest.raises(RuntimeError):
        nn.CrossEntropyLoss()(f, t.to(dtype))
    for loss in (get_loss(nn.CrossEntropyLoss()), get_loss(nn.NLLLoss())):
        with pytest.raises(ValueError, match=r"int64 or uint8"):
            loss.hessian_vp(f, t.to(dtype), f)
        loss.hessian_vp(f, t.to(torch.uint8), f)


_Y3 = torch.tensor([0, 2, 1, 2])
_Y3_BYTES = torch.tensor([0, 255, 1, 2], dtype=torch.uint8)  # uint8 class indices, one ignored


@pytest.mark.parametrize(
    "loss_obj, outputs, targets",
    [
        (nn.CrossEntropyLoss(), torch.randn(4, 3, dtype=DTYPE), _Y3),
        (nn.CrossEntropyLoss(reduction="sum"), torch.randn(4, 3, dtype=DTYPE), _Y3),
        (nn.CrossEntropyLoss(ignore_index=2), torch.randn(4, 3, dtype=DTYPE), _Y3),
        (nn.CrossEntropyLoss(ignore_index=9), torch.randn(4, 3, dtype=DTYPE), _Y3.where(_Y3 != 1, 9)),
        (nn.CrossEntropyLoss(ignore_index=255), torch.randn(4, 3, dtype=DTYPE), _Y3_BYTES),
        (nn.CrossEntropyLoss(), torch.randn(4, 3, 2, dtype=DTYPE), torch.stack([_Y3, _Y3.flip(0)], 1)),
        (nn.MSELoss(), torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 3, dtype=DTYPE)),
        (nn.MSELoss(reduction="sum"), torch.randn(4, 3, 2, dtype=DTYPE), torch.randn(4, 3, 2, dtype=DTYPE)),
    ],
)
def test_closed_form_gradient_equals_autograd(loss_obj, outputs, targets):
    """Loss.gradient against torch.autograd.grad of the loss as torch computes it."""
    f = outputs.clone().requires_grad_(True)
    (truth,) = torch.autograd.grad(loss_obj(f, targets), f)
    assert_close_rel(get_loss(loss_obj).gradient(outputs, targets), truth)


@pytest.mark.parametrize(
    "loss_obj, targets",
    [
        (nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DTYPE)), _Y3),
        (nn.CrossEntropyLoss(label_smoothing=0.1), _Y3),
        (nn.CrossEntropyLoss(), torch.rand(4, 3, dtype=DTYPE).softmax(1)),
        (nn.BCEWithLogitsLoss(), torch.rand(4, 3, dtype=DTYPE)),
    ],
)
def test_closed_form_gradient_is_none_where_there_is_none(loss_obj, targets):
    """Options without a closed form here leave the gradient to autograd (None), not a wrong formula."""
    assert get_loss(loss_obj).gradient(torch.randn(4, 3, dtype=DTYPE), targets) is None


def test_closed_form_mse_gradient_keeps_the_outputs_dtype():
    """float32 outputs against float64 targets: the gradient is float32, as torch's is."""
    f, t = torch.randn(4, 3), torch.randn(4, 3, dtype=DTYPE)
    g = get_loss(nn.MSELoss()).gradient(f, t)
    assert g.dtype == torch.float32
    assert_close_rel(g.double(), 2 * (f.double() - t) / 12, tol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_from_non_finite_outputs_is_refused(bad):
    """nan or inf logits have no predictive distribution: a ValueError, not plausible classes."""
    logits = torch.tensor([[0.0, bad, 1.0], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="not finite"):
        get_loss(nn.CrossEntropyLoss()).sample_targets(logits, generator=torch.Generator().manual_seed(0))


def test_bce_with_float32_targets_keeps_float64_precision_inside_transforms():
    """torch.func.grad of torch's BCE with float32 targets and float64 logits is float32-accurate
    (6.8e-8); the loss converts the targets first, so per-sample gradients and the empirical
    Fisher's matmat agree with float64 targets (they were 7e-8 and 9e-8 off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, t = torch.randn(5, 3, dtype=DTYPE), torch.rand(5, 2, dtype=DTYPE).float()  # full float32 mantissas
    loss = nn.BCEWithLogitsLoss()
    fn, params = curvfx.make_functional(model)
    wide = curvfx.per_sample_grad(fn, loss, params, x, t.double())
    narrow = curvfx.per_sample_grad(fn, loss, params, x, t)
    for k in params:
        assert_close_rel(narrow[k], wide[k], tol=1e-14)
    narrow_ef = curvfx.empirical_fisher(model, loss, (x, t)).to_dense()
    assert_close_rel(narrow_ef, curvfx.empirical_fisher(model, loss, (x, t.double())).to_dense(), tol=1e-14)
