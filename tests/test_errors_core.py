"""Bad input at the core's public boundary: a clear error naming the argument, never a silent number.

Each case here used to return a wrong number (a misspelled parameter name read as a zero
block, an empty batch's Hessian as zeros, class weights of the wrong length ignored) or to
fail deep inside torch with a message that named no argument.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from dense import flat_jacobian, module_of_flat, output_hessian_of
from torch import nn

import curvfx
from curvfx.api import empirical_fisher_diagonal, model_hvp


def _model_and_batch(classes: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, classes)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, classes, (5,))
    return model, x, y


def _params(model):
    return {k: p.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("constructor", [curvfx.ggn, curvfx.hessian, curvfx.empirical_fisher])
def test_operators_refuse_params_that_are_not_the_models(constructor):
    """A misspelled name used to give a zero block (the model read its own weight)."""
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    typo = {("0.weigth" if k == "0.weight" else k): p for k, p in _params(model).items()}
    with pytest.raises(ValueError, match=r"params: \['0.weigth'\] are not parameters of the model"):
        constructor(model, ce, (x, y), params=typo)
    with pytest.raises(
        ValueError, match=r"params\['2.bias'\]: shape \[3\] does not match the parameter's \[2\]"
    ):
        constructor(
            model, ce, (x, y), params={**_params(model), "2.bias": torch.zeros(3, dtype=torch.float64)}
        )
    with pytest.raises(TypeError, match=r"params\['0.weight'\]: expected a floating-point tensor, got dtype"):
        constructor(model, ce, (x, y), params={"0.weight": torch.zeros(4, 3, dtype=torch.int64)})
    with pytest.raises(TypeError, match="params: expected a non-empty dict"):
        constructor(model, ce, (x, y), params=list(model.parameters()))


def test_a_subset_of_the_parameters_is_still_accepted():
    """The check only refuses names and shapes that are not the model's: a subset stays a sub-block."""
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    sub = {"2.weight": _params(model)["2.weight"]}
    full = curvfx.ggn(model, ce, (x, y)).to_dense()
    block = curvfx.ggn(model, ce, (x, y), params=sub).to_dense()
    start = sum(p.numel() for p in list(model.parameters())[:2])
    assert torch.allclose(block, full[start : start + 8, start : start + 8], rtol=1e-12, atol=1e-14)


def test_model_function_refuses_swapped_arguments():
    """fn(x, params) instead of fn(params, x) used to fail inside torch's functional_call."""
    model, x, _ = _model_and_batch()
    fn, params = curvfx.make_functional(model)
    with pytest.raises(TypeError, match=r"params: a model function takes a dict .* fn\(params, x\)"):
        fn(x, params)


@pytest.mark.parametrize("strategy", ["auto", "rev-fwd", "autograd", "rev-rev"])
def test_hvp_refuses_a_non_finite_function_value(strategy):
    """The mean over an empty batch is nan, and autograd's Hessian-vector product of it is zeros."""
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    fn, params = curvfx.make_functional(model)
    v = torch.randn(26, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"f: the value is nan .* no Hessian"):
        curvfx.hvp(lambda p: ce(fn(p, x[:0]), y[:0]), params, v, strategy=strategy)
    hv = curvfx.hvp(lambda p: ce(fn(p, x), y), params, v, strategy=strategy)  # a finite value is fine
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0


def test_hvp_value_check_does_not_break_vmap():
    """Under vmap the value is batched: the check is skipped there, not turned into an error."""
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    fn, params = curvfx.make_functional(model)
    V = torch.randn(3, 26, dtype=torch.float64)
    batched = torch.func.vmap(lambda v: curvfx.hvp(lambda p: ce(fn(p, x), y), params, v))(V)
    looped = torch.stack([curvfx.hvp(lambda p: ce(fn(p, x), y), params, v) for v in V])
    assert torch.allclose(batched, looped, rtol=1e-10, atol=1e-12)


def test_model_hvp_refuses_an_empty_batch():
    model, x, y = _model_and_batch()
    with pytest.raises(ValueError, match=r"x: the batch is empty"):
        model_hvp(model, nn.CrossEntropyLoss(), x[:0], y[:0], torch.ones(26, dtype=torch.float64))


@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.NLLLoss])
def test_class_weights_must_fit_the_classes(loss_cls):
    """A weight longer than C used to be read only at the first C entries (torch refuses it)."""
    model, x, y = _model_and_batch()
    v = torch.randn(26, dtype=torch.float64)
    for weight in (torch.tensor([2.0, 3.0, 100.0]), torch.tensor([2.0])):
        G = curvfx.ggn(model, loss_cls(weight=weight.double()), (x, y))
        with pytest.raises(ValueError, match=r"weight: expected floating-point class weights \[C\] = \[2\]"):
            G @ v
    for weight, match in (
        (torch.tensor([1, 2]), "floating-point"),
        (torch.tensor([1.0, float("nan")]), "finite"),
    ):
        with pytest.raises(ValueError, match=f"weight: .*{match}"):  # checked once, when the loss is read
            curvfx.ggn(model, loss_cls(weight=weight), (x, y))


def test_non_finite_targets():
    """A nan target makes the loss nan: the Hessian's product is refused, the GGN (which does
    not read the targets of MSE) is the GGN at any targets."""
    model, x, _ = _model_and_batch()
    y = torch.randn(5, 2, dtype=torch.float64)
    bad = y.clone()
    bad[1, 0] = float("nan")
    v = torch.randn(26, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-finite"):
        curvfx.hessian(model, nn.MSELoss(), (x, bad)) @ v
    assert torch.equal(
        curvfx.ggn(model, nn.MSELoss(), (x, bad)) @ v, curvfx.ggn(model, nn.MSELoss(), (x, y)) @ v
    )


def test_bce_weights_must_broadcast_to_the_outputs():
    model, x, _ = _model_and_batch()
    y = torch.rand(5, 2, dtype=torch.float64)
    loss = nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"pos_weight: shape \[3\] does not broadcast to the outputs \[5, 2\]"
    ):
        curvfx.ggn(model, loss, (x, y)) @ torch.ones(26, dtype=torch.float64)


def test_a_loss_class_instead_of_an_instance():
    model, x, y = _model_and_batch()
    with pytest.raises(TypeError, match=r"loss_fn: got the class CrossEntropyLoss; pass an instance"):
        curvfx.ggn(model, nn.CrossEntropyLoss, (x, y)) @ torch.ones(26, dtype=torch.float64)


def test_generators_of_the_wrong_type():
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"generator: expected a torch\.Generator or None, got int"):
        curvfx.fisher(model, ce, (x, y), kind="mc", generator=0)
    with pytest.raises(TypeError, match=r"generator: expected a torch\.Generator or None, got str"):
        curvfx.kfac(model, ce, (x, y), generator="abc")


def test_empirical_kfac_checks_the_targets():
    """Out-of-range class indices used to reach torch's cross-entropy (an IndexError)."""
    model, x, y = _model_and_batch()
    K = curvfx.kfac(model, nn.CrossEntropyLoss(), (x, y + 5), fisher_type="empirical")
    with pytest.raises(ValueError, match=r"targets: .* class indices in \[0, C = 2\)"):
        K @ torch.ones(26, dtype=torch.float64)


def test_transforms_name_missing_or_misformed_arguments():
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    fn, params = curvfx.make_functional(model)
    v = torch.ones(26, dtype=torch.float64)
    with pytest.raises(TypeError, match="y: expected a tensor of targets, got NoneType"):
        curvfx.ggn_vp(fn, ce, params, x, None, v)
    with pytest.raises(TypeError, match="y: expected a tensor of targets, got NoneType"):
        curvfx.per_sample_grad(fn, ce, params, x, None)
    with pytest.raises(
        ValueError, match=r"x: expected a tensor or a tuple/mapping of tensors, got list without tensors"
    ):
        curvfx.ggn_vp(fn, ce, params, x.tolist(), y, v)
    with pytest.raises(TypeError, match="u: expected a tensor shaped like the outputs, got list"):
        curvfx.model_vjp(fn, params, x, [[0.0, 1.0]] * 5)
    with pytest.raises(ValueError, match="model: returned tuple"):
        curvfx.model_jvp(lambda p, xb: (fn(p, xb), 0), params, x, v)
    integer = {k: torch.zeros(p.shape, dtype=torch.int64) for k, p in params.items()}
    with pytest.raises(TypeError, match=r"params: expected floating-point tensors .*torch.int64"):
        curvfx.hvp(lambda p: sum(t.sum() for t in p.values()), integer, integer)


def test_seed_empirical_fisher_names_its_targets():
    model, x, y = _model_and_batch()
    with pytest.raises(TypeError, match="targets: empirical_fisher_diagonal expected a tensor, got list"):
        empirical_fisher_diagonal(model, nn.CrossEntropyLoss(), x, y.tolist())


# -- inputs that must stay accepted (the Hessian is the loss as written) ----------------------


def _flat_hessian(model: nn.Module, loss_of_outputs, x) -> torch.Tensor:
    """Dense Hessian of ``loss_of_outputs(model(x))`` in the flat parameters (named_parameters order)."""
    outputs_at, flat, _ = module_of_flat(model)
    return torch.autograd.functional.hessian(lambda theta: loss_of_outputs(outputs_at(theta, x)), flat)


def test_hessian_of_a_model_with_an_auxiliary_output_and_a_callable_loss():
    """A callable loss gets the model's outputs as returned (here a tuple), as before."""

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, x):
            out = self.body(x)
            return out, (out**2).mean()

    torch.manual_seed(0)
    model = WithAux().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))

    def loss(outputs, targets):
        logits, aux = outputs
        return nn.functional.cross_entropy(logits, targets) + 0.1 * aux

    H = curvfx.hessian(model, loss, (x, y)).to_dense()
    assert torch.allclose(H, _flat_hessian(model, lambda out: loss(out, y), x), rtol=1e-10, atol=1e-12)


def test_hessian_of_a_sequence_model_with_flattened_targets():
    """Logits [N·T, V] for inputs [N, T] and targets [N·T]: x and y need not share N."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids))).reshape(-1, 7)

    torch.manual_seed(0)
    model = LM().double()
    ids, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (15,))
    ce = nn.CrossEntropyLoss()
    truth = _flat_hessian(model, lambda out: ce(out, y), ids)
    assert torch.allclose(curvfx.hessian(model, ce, (ids, y)).to_dense(), truth, rtol=1e-10, atol=1e-12)
    v = [torch.randn_like(p) for p in model.parameters()]
    hv = torch.cat([t.reshape(-1) for t in model_hvp(model, ce, ids, y, v)])
    assert torch.allclose(hv, truth @ torch.cat([t.reshape(-1) for t in v]), rtol=1e-10, atol=1e-12)


def test_targets_of_another_float_dtype_and_inputs_with_non_tensor_leaves():
    """torch promotes float32 targets; a scale passed with the inputs is the model's business."""
    from collections import UserDict

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, x, scale=1.0):
            return self.net(x) * scale

    torch.manual_seed(0)
    model = Scaled().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    mse = nn.MSELoss()
    v = torch.randn(26, dtype=torch.float64)
    reference = curvfx.ggn(model, mse, (x, y)) @ v
    assert torch.allclose(curvfx.ggn(model, mse, (x, y.float())) @ v, reference, rtol=1e-6)
    scaled = curvfx.ggn(model, mse, ((x, 2.0), y)) @ v
    assert torch.allclose(curvfx.ggn(model, mse, (UserDict(x=x, scale=2.0), y)) @ v, scaled)
    assert torch.allclose(scaled, 4 * reference, rtol=1e-10)  # the outputs scale by 2, the GGN by 4
    truth = _flat_hessian(model, lambda out: mse(out * 2.0, y), x)
    assert torch.allclose(curvfx.hessian(model, mse, ((x, 2.0), y)) @ v, truth @ v, rtol=1e-10, atol=1e-12)


def test_scalar_arguments_from_numpy_and_one_element_tensors():
    np = pytest.importorskip("numpy")
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    v = torch.randn(26, dtype=torch.float64)
    G = curvfx.ggn(model, ce, (x, y))
    assert torch.allclose(curvfx.ggn(model, ce, (x, y), factor=torch.tensor([2.0])) @ v, 2 * (G @ v))
    assert torch.allclose((G * np.float64(2.0)) @ v, 2 * (G @ v))
    assert torch.allclose(curvfx.ggn(model, ce, (x, y), chunk_size=np.int64(2)) @ v, G @ v)
    _, std = curvfx.trace(G, "hutchinson", num_samples=4, return_std=np.True_)
    assert std.dim() == 0
    top = curvfx.eigsh(G, k=1, tol=torch.tensor(1e-8, dtype=torch.float64), return_eigenvectors=np.False_)
    assert torch.allclose(top, torch.linalg.eigvalsh(G.to_dense())[-1:], rtol=1e-6)


def test_batches_with_negative_weight_sums_still_count():
    """Only batches whose mean normalizer is exactly 0 are skipped (class weights may be negative)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(9, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 2, 1, 1, 1, 2, 0, 1])
    ce = nn.CrossEntropyLoss(weight=torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    batches = [(x[:4], y[:4]), (x[4:6], y[4:6]), (x[6:], y[6:])]  # the middle batch has Z_b = -1
    H = curvfx.hessian(model, ce, batches).to_dense()
    assert torch.allclose(H, _flat_hessian(model, lambda out: ce(out, y), x), rtol=1e-10, atol=1e-12)
    outputs_at, flat, _ = module_of_flat(model)
    J = flat_jacobian(lambda theta: outputs_at(theta, x), flat)
    H_out = output_hessian_of(ce, outputs_at(flat, x), y)
    G = curvfx.ggn(model, ce, batches).to_dense()
    assert torch.allclose(G, J.T @ H_out @ J, rtol=1e-10, atol=1e-12)


def test_an_out_of_range_class_is_refused_even_where_its_weight_would_be_zero():
    """A clamped index read class C-1's weight 0, made Z_b = 0, and the batch was skipped unread."""
    model, x, _ = _model_and_batch(classes=3)
    ce = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    good, bad = (x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([2, 7, 2]))
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for constructor in (curvfx.hessian, curvfx.ggn, curvfx.empirical_fisher):
        for data in ([good, bad], [bad]):
            with pytest.raises(ValueError, match=r"targets: .*class indices in \[0, C = 3\)"):
                constructor(model, ce, data) @ v


@pytest.mark.parametrize("backend", ["generic", "structured"])
def test_per_sample_gradients_refuse_an_out_of_range_class_before_vmapping(backend):
    """vmap hid the class indices from the loss's checks: a misleading "could not vmap" warning, then
    torch's IndexError from the loop."""
    model, x, _ = _model_and_batch(classes=3)
    fn, params = curvfx.make_functional(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not vmap" warning either
        with pytest.raises(ValueError, match=r"targets: .*class indices in \[0, C = 3\)"):
            curvfx.per_sample_grad(
                fn, nn.CrossEntropyLoss(), params, x, torch.tensor([0, 1, 7, 2, 1]), backend=backend
            )


def test_per_sample_gradients_refuse_an_out_of_range_class_in_the_last_chunk():
    """The targets are checked all at once (once per call), not only those of the first chunk."""
    model, x, _ = _model_and_batch(classes=3)
    fn, params = curvfx.make_functional(model)
    with pytest.raises(ValueError, match=r"targets: .*class indices in \[0, C = 3\)"):
        y = torch.tensor([0, 1, 2, 2, 5])
        curvfx.per_sample_grad(fn, nn.CrossEntropyLoss(), params, x, y, chunk_size=2)


def test_class_targets_of_any_integer_dtype_and_probabilities_of_another_float_dtype():
    """uint8 indices were read as a boolean mask by the weight lookup; float32 probabilities
    crashed a float64 einsum."""
    model, x, y = _model_and_batch(classes=3)
    y = torch.tensor([2, 1, 1, 0, 2])
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64))
    for data in ((x[:3], y[:3]), (x, y)):
        indices = curvfx.ggn(model, weighted, data) @ v
        assert torch.allclose(curvfx.ggn(model, weighted, (data[0], data[1].to(torch.uint8))) @ v, indices)
    probabilities = torch.softmax(torch.randn(5, 3, dtype=torch.float64), 1)
    ce = nn.CrossEntropyLoss()
    reference = curvfx.ggn(model, ce, (x, probabilities)) @ v
    assert torch.allclose(curvfx.ggn(model, ce, (x, probabilities.float())) @ v, reference, rtol=1e-6)


def test_options_given_as_tensors_are_stored_as_numbers_and_model_hvp_checks_targets():
    model, x, y = _model_and_batch()
    opt = curvfx.optim.DiagonalNaturalGradient(
        model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), lr=torch.tensor([0.1])
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and isinstance(opt.param_groups[0]["lr"], float)
    opt.step((x, y))
    reg = nn.Sequential(nn.Linear(3, 1)).double()
    with pytest.raises(ValueError, match=r"targets: MSELoss.*shaped like the outputs \[5, 1\], got \[5\]"):
        model_hvp(
            reg, nn.MSELoss(), x, torch.randn(5, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        )


def test_sums_of_operators_and_tied_parameter_names():
    model, x, y = _model_and_batch()
    ce = nn.CrossEntropyLoss()
    H, G = curvfx.hessian(model, ce, (x, y)), curvfx.ggn(model, ce, (x, y))
    v = torch.randn(26, dtype=torch.float64)
    assert torch.allclose(sum([H, G]) @ v, H @ v + G @ v)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"second names of tied parameters: use their first names"):
        curvfx.ggn(
            tied,
            nn.MSELoss(),
            (x, torch.zeros(5, 3, dtype=torch.float64)),
            params={"2.weight": tied[0].weight},
        )


def test_losses_torch_cannot_evaluate_are_refused_clearly():
    """Before: torch's raw TypeError / RuntimeError, and numbers from the GGN where torch's
    own loss refuses its inputs (uint8 indices for [N, C, T] logits, float32 class weights
    with float64 outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(
        ValueError, match=r"loss_fn: curvfx calls loss_fn\(outputs, targets\), but GaussianNLLLoss"
    ):
        curvfx.hessian(model, nn.GaussianNLLLoss(), (x, y.double()))
    with pytest.raises(ValueError, match="loss_fn: <lambda> must return a scalar tensor, got \\[6, 3\\]"):
        curvfx.ggn(model, lambda o, t: (o - t) ** 2, (x, torch.randn(6, 3, dtype=torch.float64))).to_dense()
    with pytest.raises(ValueError, match=r"weight: torch\.float32 class weights with torch\.float64 outputs"):
        curvfx.ggn(model, nn.CrossEntropyLoss(weight=torch.ones(3)), (x, y)).to_dense()
    conv = nn.Conv1d(2, 3, 1).double()
    seq_x, seq_y = torch.randn(6, 2, 5, dtype=torch.float64), torch.randint(0, 3, (6, 5), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"targets: .* takes uint8 class indices for outputs \[N, C\] only"):
        curvfx.ggn(conv, nn.CrossEntropyLoss(), (seq_x, seq_y)).to_dense()
    with pytest.raises(ValueError, match=r"data: a batch has no targets \(y of shape \[0, 3\]\)"):
        curvfx.ggn(
            model,
            nn.MSELoss(),
            [(x, torch.randn(6, 3, dtype=torch.float64)), (x[:0], y[:0, None].expand(0, 3).double())],
        ).to_dense()


def test_uint8_class_indices_that_wrap_onto_ignore_index_and_weights_under_autocast():
    """uint8 156 == -100 in torch's comparison, though torch's loss counts class 156: refused
    (before: dropped as ignored). Class weights in float32 with bfloat16 outputs under
    autocast are what torch takes (its loss runs in float32): accepted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 200)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([156, 3, 7], dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 class 156 would read as ignore_index = -100"):
        curvfx.ggn(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    small = nn.Sequential(nn.Linear(4, 3))
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = curvfx.ggn(small, weighted, (x.float(), torch.tensor([0, 1, 2]))) @ torch.ones(15)
    assert out.shape == (15,) and torch.isfinite(out).all()
