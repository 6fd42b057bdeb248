"""laplax.curv.ggn (seed: laplax-curv-ggn.txt) in PyTorch: create_ggn_mv, create_ggn_mv_without_data.

The seed documents, for both factories,

    ggn_mv(v) = factor · Σ_i J_iᵀ ∇²_f L_i(f(x_i, θ), y_i) J_i v,

a sum over data points, with ``factor = num_total_samples / num_curv_samples`` for
``create_ggn_mv`` (``num_curv_samples`` defaults to the batch size, ``num_total_samples`` to
``num_curv_samples``). The truths here are dense: J by ``jacrev`` of the outputs with respect
to a flat parameter vector (our own flattening), the output Hessian by
``torch.autograd.functional.hessian`` of the documented per-datum losses written out by hand
(laplax's string losses are sums over data points: ``Σ (f - y)²``, softmax cross-entropy,
BCE on logits, ``½ Σ f²`` for "none"). Everything is float64.
"""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev, vmap

import curvfx
from curvfx import create_ggn_mv, create_ggn_mv_without_data

N, D, H, C = 6, 3, 4, 3
DTYPE = torch.float64
TOL = 1e-10


# ---------------------------------------------------------------------------------------
# problem: a two-layer tanh network on nested pytree params (dict of dict and list)


def make_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    # keys in sorted order: optree's default flattening (ours) and curvfx's insertion order agree
    return {"hidden": {"bias": randn(H), "weight": randn(H, D)}, "out": [randn(C, H), randn(C)]}


def model_fn(x, p):
    """laplax order (input, params); works on one data point [D] and on a batch [N, D]."""
    h = torch.tanh(x @ p["hidden"]["weight"].T + p["hidden"]["bias"])
    w, b = p["out"]
    return h @ w.T + b


def make_data(loss: str, seed: int = 1, n: int = N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=DTYPE)
    if loss == "cross_entropy":
        y = torch.randint(0, C, (n,), generator=g)
    elif loss == "binary_cross_entropy":
        y = torch.rand(n, C, generator=g, dtype=DTYPE)
    else:
        y = torch.randn(n, C, generator=g, dtype=DTYPE)
    return {"input": x, "target": y}


def random_like(params, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), params)


# ---------------------------------------------------------------------------------------
# dense truths, by a route independent of curvfx


def flat(tree):
    return torch.cat([leaf.reshape(-1) for leaf in optree.tree_leaves(tree)])


def unflat(theta, like):
    leaves, spec = optree.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(theta[start : start + leaf.numel()].reshape(leaf.shape))
        start += leaf.numel()
    return optree.tree_unflatten(spec, out)


def jacobian(model, params, x):
    """J [N·C, P] of all outputs of the batch, and the outputs F [N, C]."""
    theta = flat(params)

    def outputs_of(t):
        return model(x, unflat(t, params))

    outputs = outputs_of(theta).detach()
    return jacrev(outputs_of)(theta).reshape(outputs.numel(), -1), outputs


def documented_loss(name: str, y):
    """laplax's per-datum losses, summed over the data points (written out by hand)."""
    if name == "mse":
        return lambda f: ((f - y) ** 2).sum()
    if name == "cross_entropy":
        return lambda f: (torch.logsumexp(f, dim=1) - f[torch.arange(f.shape[0]), y]).sum()
    if name == "binary_cross_entropy":  # -(y log σ(f) + (1 - y) log(1 - σ(f)))
        return lambda f: (F.softplus(f) - y * f).sum()
    assert name == "none"
    return lambda f: 0.5 * (f**2).sum()


def dense_ggn(loss_of_outputs, params, x, model=model_fn):
    """Jᵀ (∇²_F loss(F)) J [P, P] with the loss of the whole batch of outputs F."""
    J, outputs = jacobian(model, params, x)
    Hf = torch.autograd.functional.hessian(loss_of_outputs, outputs).reshape(outputs.numel(), -1)
    return J.T @ Hf @ J


def dense_ggn_per_datum(loss_fn, params, x, y, model=model_fn):
    """Σ_n J_nᵀ ∇²_f loss_fn(f_n, y_n) J_n, the loss applied to each data point alone."""
    J, outputs = jacobian(model, params, x)
    blocks = [
        torch.autograd.functional.hessian(lambda f, yn=yn: loss_fn(f, yn), fn) for fn, yn in zip(outputs, y)
    ]
    return J.T @ torch.block_diag(*blocks) @ J


def relerr(a, b):
    return float((a - b).norm() / b.norm())


LOSSES = ["mse", "cross_entropy", "binary_cross_entropy", "none"]


# ---------------------------------------------------------------------------------------
# the seed's documented formulas


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batch"])
@pytest.mark.parametrize("loss", LOSSES)
def test_create_ggn_mv_is_the_sum_over_data_points(loss, vmap_over_data):
    """Defaults: factor = N/N = 1, so ggn_mv(v) = Σ_n J_nᵀ H_n J_n v (a sum, not a mean)."""
    params, data, v = make_params(), make_data(loss), random_like(make_params())
    G = dense_ggn(documented_loss(loss, data["target"]), params, data["input"])
    ggn_mv = create_ggn_mv(model_fn, params, data, loss, vmap_over_data=vmap_over_data)
    out = ggn_mv(v)
    assert optree.tree_structure(out) == optree.tree_structure(params)
    assert relerr(flat(out), G @ flat(v)) < TOL


@pytest.mark.parametrize("data_form", ["dict", "tuple"])
@pytest.mark.parametrize("loss", LOSSES)
def test_without_data_scales_by_factor(loss, data_form):
    params, data, v = make_params(), make_data(loss), random_like(make_params())
    G = dense_ggn(documented_loss(loss, data["target"]), params, data["input"])
    batch = data if data_form == "dict" else (data["input"], data["target"])
    ggn_mv = create_ggn_mv_without_data(model_fn, params, loss, 0.37)
    assert relerr(flat(ggn_mv(v, batch)), 0.37 * G @ flat(v)) < TOL


def test_tensor_factor_scales_as_the_number_and_passes_gradients():
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    expected = flat(create_ggn_mv_without_data(model_fn, params, "mse", 0.37)(v, data))
    factor = torch.tensor(0.37, dtype=DTYPE, requires_grad=True)
    out = flat(create_ggn_mv_without_data(model_fn, params, "mse", factor)(v, data))
    assert relerr(out.detach(), expected) < TOL
    (grad,) = torch.autograd.grad(out.sum(), factor)  # d(factor · G v)/d factor = Σ G v
    assert relerr(grad * 0.37, expected.sum()) < TOL
    with pytest.raises(TypeError, match="factor"):
        create_ggn_mv_without_data(model_fn, params, "mse", torch.tensor(True))


def test_without_data_sums_over_batches():
    """No data is hardcoded: products on the parts of a split batch add up to the whole."""
    params, data, v = make_params(), make_data("cross_entropy"), random_like(make_params())
    ggn_mv = create_ggn_mv_without_data(model_fn, params, "cross_entropy", factor=2.0)
    parts = [{key: value[i : i + 2] for key, value in data.items()} for i in range(0, N, 2)]
    total = sum(flat(ggn_mv(v, part)) for part in parts)
    assert relerr(total, flat(ggn_mv(v, data))) < TOL


@settings(max_examples=15, deadline=None)
@given(
    num_curv_samples=st.one_of(st.none(), st.integers(1, 50)),
    num_total_samples=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_factor_is_total_over_curv_samples(num_curv_samples, num_total_samples):
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    s = N if num_curv_samples is None else num_curv_samples
    m = s if num_total_samples is None else num_total_samples
    G = dense_ggn(documented_loss("mse", data["target"]), params, data["input"])
    ggn_mv = create_ggn_mv(
        model_fn,
        params,
        data,
        "mse",
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
    )
    assert relerr(flat(ggn_mv(v)), (m / s) * G @ flat(v)) < TOL


def test_mse_is_two_jtj_without_any_mean():
    """ "mse" has H_n = 2 I: ggn_mv = 2 · (M/S) · Σ_n J_nᵀ J_n, no 1/N and no 1/C."""
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    J, _ = jacobian(model_fn, params, data["input"])
    ggn_mv = create_ggn_mv(model_fn, params, data, "mse", num_total_samples=60)
    assert relerr(flat(ggn_mv(v)), (60 / N) * 2 * J.T @ (J @ flat(v))) < TOL


# ---------------------------------------------------------------------------------------
# forms: flat vectors, pytrees, data, vmap_over_data


@pytest.mark.parametrize("loss", LOSSES)
def test_vmap_over_data_true_and_false_agree(loss):
    params, data, v = make_params(), make_data(loss), random_like(make_params())
    a = create_ggn_mv(model_fn, params, data, loss, vmap_over_data=True)(v)
    b = create_ggn_mv(model_fn, params, data, loss, vmap_over_data=False)(v)
    assert relerr(flat(a), flat(b)) < TOL


def test_flat_vec_returns_flat_in_curvfx_order():
    params = {"w": torch.randn(C, D, dtype=DTYPE), "a": torch.randn(C, dtype=DTYPE)}  # not sorted

    def affine(x, p):
        return x @ p["w"].T + p["a"]

    data, v = make_data("mse"), random_like(params)
    ggn_mv = create_ggn_mv(affine, params, data, "mse")
    out = ggn_mv(curvfx.ravel(v))
    assert out.shape == (C * D + C,)
    assert torch.allclose(out, curvfx.ravel(ggn_mv(v)), rtol=1e-12, atol=0)


def test_tuple_params_and_model_written_for_one_data_point():
    """laplax vmaps model_fn over data points: a model valid only on one point [D] works."""
    g = torch.Generator().manual_seed(3)
    params = (torch.randn(C, D, generator=g, dtype=DTYPE), torch.randn(C, generator=g, dtype=DTYPE))

    def per_point(x, p):
        assert x.shape == (D,)
        w, b = p
        return torch.sin(w @ x) + b  # `w @ x` is wrong for a batch [N, D]

    data, v = make_data("cross_entropy"), random_like(params)

    def batched(x, p):
        return torch.sin(x @ p[0].T) + p[1]

    G = dense_ggn(documented_loss("cross_entropy", data["target"]), params, data["input"], batched)
    out = create_ggn_mv(per_point, params, data, "cross_entropy")(v)
    assert isinstance(out, tuple)
    assert relerr(flat(out), G @ flat(v)) < TOL


def test_composes_with_vmap_over_vectors():
    params, data = make_params(), make_data("binary_cross_entropy")
    G = dense_ggn(documented_loss("binary_cross_entropy", data["target"]), params, data["input"])
    ggn_mv = create_ggn_mv(model_fn, params, data, "binary_cross_entropy")
    P = G.shape[0]
    # ggn_mv of a flat vector is a flat vector: vmap over the columns of I gives G
    assert relerr(vmap(ggn_mv)(torch.eye(P, dtype=DTYPE)), G) < TOL


def test_params_and_state_untouched():
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    before = [t.clone() for t in optree.tree_leaves(params)]
    create_ggn_mv(model_fn, params, data, "mse")(v)
    assert all(torch.equal(a, b) for a, b in zip(before, optree.tree_leaves(params)))


# ---------------------------------------------------------------------------------------
# torch losses and callables: per data point with vmap_over_data=True, as written otherwise


@pytest.mark.parametrize(
    "loss_fn, loss",
    [
        (nn.MSELoss(), "mse"),
        (nn.CrossEntropyLoss(), "cross_entropy"),
        (F.binary_cross_entropy_with_logits, "binary_cross_entropy"),
        (lambda f, y: ((f - y) ** 4).sum(), "mse"),
    ],
    ids=["MSELoss-mean", "CrossEntropyLoss-mean", "bce_with_logits", "callable"],
)
def test_callable_loss_per_data_point_and_as_written(loss_fn, loss):
    params, data, v = make_params(), make_data(loss), random_like(make_params())
    x, y = data["input"], data["target"]
    per_point = dense_ggn_per_datum(loss_fn, params, x, y)  # laplax: loss_fn on each point alone
    whole = dense_ggn(lambda f: loss_fn(f, y), params, x)  # laplax without vmap: loss_fn on the batch
    a = create_ggn_mv(model_fn, params, data, loss_fn, vmap_over_data=True)(v)
    b = create_ggn_mv(model_fn, params, data, loss_fn, vmap_over_data=False)(v)
    assert relerr(flat(a), per_point @ flat(v)) < TOL
    assert relerr(flat(b), whole @ flat(v)) < TOL


def test_mean_reduced_torch_loss_differs_by_batch_size_between_modes():
    """nn.MSELoss(): per point H_n = (2/C) I; on the batch (2/(N·C)) I, a factor N apart."""
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    a = create_ggn_mv(model_fn, params, data, nn.MSELoss(), vmap_over_data=True)(v)
    b = create_ggn_mv(model_fn, params, data, nn.MSELoss(), vmap_over_data=False)(v)
    s = create_ggn_mv(model_fn, params, data, "mse")(v)
    assert relerr(flat(a), flat(s) / C) < TOL
    assert relerr(flat(b), flat(s) / (N * C)) < TOL


def test_sum_reduced_torch_loss_equals_the_string():
    params, data, v = make_params(), make_data("cross_entropy"), random_like(make_params())
    s = create_ggn_mv(model_fn, params, data, "cross_entropy")(v)
    for vmap_over_data in (True, False):
        t = create_ggn_mv(
            model_fn, params, data, nn.CrossEntropyLoss(reduction="sum"), vmap_over_data=vmap_over_data
        )(v)
        assert relerr(flat(t), flat(s)) < TOL


# ---------------------------------------------------------------------------------------
# loss_hessian_mv


def ce_hessian_mv_per_point(jv, pred, **kwargs):
    """laplax's cross-entropy product, written for one data point (pred [C])."""
    p = pred.softmax(dim=-1)
    return p * jv - p * (p @ jv)


def ce_hessian_mv_batch(jv, pred, target, **kwargs):
    p = pred.softmax(dim=-1)
    return p * jv - p * (p * jv).sum(-1, keepdim=True)


def test_loss_hessian_mv_per_point_and_on_batch():
    params, data, v = make_params(), make_data("cross_entropy"), random_like(make_params())
    G = dense_ggn(documented_loss("cross_entropy", data["target"]), params, data["input"])
    a = create_ggn_mv(model_fn, params, data, loss_hessian_mv=ce_hessian_mv_per_point)(v)
    b = create_ggn_mv(model_fn, params, data, loss_hessian_mv=ce_hessian_mv_batch, vmap_over_data=False)(v)
    assert relerr(flat(a), G @ flat(v)) < TOL
    assert relerr(flat(b), G @ flat(v)) < TOL


def test_loss_hessian_mv_replaces_loss_fn_without_data():
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    J, _ = jacobian(model_fn, params, data["input"])

    def three(jv, pred, target):
        return 3.0 * jv

    ggn_mv = create_ggn_mv_without_data(model_fn, params, "mse", 0.5, loss_hessian_mv=three)
    assert relerr(flat(ggn_mv(v, data)), 0.5 * 3.0 * J.T @ (J @ flat(v))) < TOL


# ---------------------------------------------------------------------------------------
# bad input


def test_errors():
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    with pytest.raises(ValueError, match="unknown loss 'nll'"):
        create_ggn_mv(model_fn, params, data, "nll")
    with pytest.raises(ValueError, match="give one of them"):
        create_ggn_mv(model_fn, params, data)
    with pytest.raises(ValueError, match="only one of them"):
        create_ggn_mv(model_fn, params, data, "mse", loss_hessian_mv=ce_hessian_mv_batch)
    with pytest.raises(ValueError, match="loss_fn: None"):
        create_ggn_mv_without_data(model_fn, params, None, 1.0)
    with pytest.raises(TypeError, match="loss_fn"):
        create_ggn_mv_without_data(model_fn, params, 3, 1.0)
    with pytest.raises(TypeError, match="model_fn"):
        create_ggn_mv_without_data("model", params, "mse", 1.0)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['target'\]"):
        create_ggn_mv(model_fn, params, {"input": data["input"]}, "mse")
    ggn_mv = create_ggn_mv_without_data(model_fn, params, "mse", 1.0)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['input'\]"):
        ggn_mv(v, {"x": data["input"], "target": data["target"]})
    with pytest.raises(TypeError, match="data"):
        ggn_mv(v, data["input"])
    with pytest.raises(ValueError, match="data: expected an"):
        ggn_mv(v, (data["input"],))
    with pytest.raises(ValueError, match="vec: structure does not match"):
        ggn_mv({"hidden": v["hidden"]}, data)
    with pytest.raises(ValueError, match=r"vec\['out'\]\[1\]: shape"):
        ggn_mv({"hidden": v["hidden"], "out": [v["out"][0], torch.zeros(C + 1, dtype=DTYPE)]}, data)
    with pytest.raises(ValueError, match="flat vector must have shape"):
        ggn_mv(torch.zeros(5, dtype=DTYPE), data)
    with pytest.raises(ValueError, match="targets: MSELoss"):
        ggn_mv(v, {"input": data["input"], "target": data["target"][:, 0]})
    with pytest.raises(ValueError, match="batch is empty"):
        create_ggn_mv(model_fn, params, {"input": torch.zeros(0, D), "target": torch.zeros(0, C)}, "mse")
    with pytest.raises(ValueError, match="num_total_samples: expected an int >= 1"):
        create_ggn_mv(model_fn, params, data, "mse", num_total_samples=0)
    with pytest.raises(ValueError, match="num_curv_samples: expected an int >= 1"):
        create_ggn_mv(model_fn, params, data, "mse", num_curv_samples=2.5)
    with pytest.raises(TypeError, match="factor"):
        create_ggn_mv_without_data(model_fn, params, "mse", "1")
    with pytest.raises(ValueError, match="factor: expected a finite number"):
        create_ggn_mv_without_data(model_fn, params, "mse", float("nan"))


def test_cross_entropy_needs_one_logit_vector_per_point():
    params = {"w": torch.randn(2, C, D, dtype=DTYPE)}
    data = {"input": torch.randn(N, D, dtype=DTYPE), "target": torch.zeros(N, 2, dtype=torch.long)}
    ggn_mv = create_ggn_mv(
        lambda x, p: torch.einsum("tcd,...d->...tc", p["w"], x), params, data, "cross_entropy"
    )
    with pytest.raises(ValueError, match=r"needs logits \[N, C\]"):
        ggn_mv(random_like(params))


def test_loss_hessian_mv_with_wrong_output_shape():
    params, data, v = make_params(), make_data("mse"), random_like(make_params())
    ggn_mv = create_ggn_mv(model_fn, params, data, loss_hessian_mv=lambda jv, **kw: jv.sum())
    with pytest.raises(ValueError, match="shaped like its jv argument"):
        ggn_mv(v)
