"""KFAC and EKFAC operators against dense truths built without curvfx (float64).

The truth GGN is ``Jᵀ (∇²_f L) J`` with J from ``jacrev`` on the flat parameter vector (in
``named_parameters()`` order) and ``∇²_f L`` from ``torch.autograd.functional.hessian`` of
the loss as written. KFAC is compared with it on its blocks: exactly where KFAC is exact
(deep linear network with MSE; one sample), and through EKFAC's eigenbasis identity.
Single factors are compared with the documented formulas evaluated on a layer's input
and ``∂f/∂z`` from plain autograd (:func:`kfac_truth`), with the samples on the axis the
test names (sequence-first layers, flattened rows, BatchNorm in train mode).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from dense import assert_close_rel, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from operator_checks import assert_matches_dense
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvfx
from curvfx.operators.kfac import ekfac, kfac

DTYPE = torch.float64


# -- truths -------------------------------------------------------------------------------


def dense_ggn(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """``Jᵀ (∇²_f L) J`` [P, P] in ``named_parameters()`` order (trainable parameters)."""
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    flat = torch.cat([p.reshape(-1) for p in named.values()])

    def outputs(theta: Tensor) -> Tensor:
        parts, start = {}, 0
        for n, p in named.items():
            parts[n] = theta[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return functional_call(model, parts, (x,))

    f = outputs(flat).detach()
    J = jacrev(outputs)(flat).reshape(f.numel(), -1)
    H = torch.autograd.functional.hessian(lambda out: loss_fn(out, y), f).reshape(f.numel(), f.numel())
    return J.T @ H @ J


def dense_empirical_fisher(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """``EF = (1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` [P, P] (docs/conventions.md), one autograd pass per sample.

    ℓ_n is sample n's unnormalized loss (the ``reduction="none"`` entries of sample n,
    summed), Z the loss's normalizer: the number of those entries for ``"mean"``, 1 for
    ``"sum"`` (plain MSE / cross-entropy without weights or ignored targets).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    unreduced = copy.copy(loss_fn)
    unreduced.reduction = "none"
    entries = unreduced(model(x), y)
    z = entries.numel() if loss_fn.reduction == "mean" else 1
    ell = entries.reshape(x.shape[0], -1).sum(1)
    rows = []
    for n in range(x.shape[0]):
        grads = torch.autograd.grad(ell[n], params, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in grads]))
    G = torch.stack(rows)  # [N, P]
    return G.T @ G / z


def block_mask(op) -> Tensor:
    """[P, P] True on KFAC's blocks (layer blocks and the diagonal of the other parameters)."""
    f = op.factors
    mask = torch.zeros(f.size, f.size, dtype=torch.bool)
    for blk in f.blocks:
        i = blk.index.reshape(-1)
        mask[i.unsqueeze(1), i] = True
    mask[f.diagonal_index, f.diagonal_index] = True
    return mask


def kron_basis(op) -> Tensor:
    """The eigenbasis ``⊕_l Q_B ⊗ Q_A ⊕ I`` of KFAC as a dense orthogonal [P, P] matrix."""
    f = op.factors
    Q = torch.zeros(f.size, f.size, dtype=DTYPE)
    for blk, (QB, _, QA, _) in zip(f.blocks, op._eigh()):
        i = blk.index.reshape(-1)
        Q[i.unsqueeze(1), i] = torch.kron(QB, QA)
    Q[f.diagonal_index, f.diagonal_index] = 1.0
    return Q


def layer_jacobian(model: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, f, ∂f/∂z)`` of the one call of ``layer``: its input, the outputs, and [F, *z.shape].

    By plain autograd, one backward pass per output entry, through a zero added to the
    layer's output (works through BatchNorm in train mode, which couples the samples).
    """
    seen = []

    def hook(module, args, out):
        delta = torch.zeros_like(out, requires_grad=True)
        seen.append((args[0].detach(), delta))
        return out + delta

    handle = layer.register_forward_hook(hook)
    try:
        f = model(x)
    finally:
        handle.remove()
    ((a, delta),) = seen
    rows = [
        torch.autograd.grad(fi, delta, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
        for fi in f.reshape(-1)
    ]
    return a, f.detach(), torch.stack(rows)


def kfac_truth(model, loss_fn, x, y, layer: nn.Module, approx: str, axis: int = 0) -> tuple[Tensor, Tensor]:
    """Type-2 factors ``(A, B)`` of one layer with weight and bias, from the documented formulas.

    The layer's input and output hold the samples on ``axis``; positions t are the other
    dims. ``A = Σ_n Σ_t ã_nt ã_ntᵀ / (N·T)``, ``B = Σ_n Σ_t J_ntᵀ H J_nt`` with
    ``J_nt = ∂f/∂z_nt`` [F, out] and H the loss Hessian of all outputs f ("reduce":
    ``ã_n`` averaged and ``J_n`` summed over t first).
    """
    a, f, J = layer_jacobian(model, layer, x)
    H = torch.autograd.functional.hessian(lambda out: loss_fn(out, y), f).reshape(f.numel(), f.numel())
    a = torch.cat([a, torch.ones_like(a[..., :1])], -1).movedim(axis, 0)  # [N, ..., in+1]
    J = J.movedim(1 + axis, 1)  # [F, N, ..., out]
    n = a.shape[0]
    a, J = a.reshape(n, -1, a.shape[-1]), J.reshape(J.shape[0], n, -1, J.shape[-1])
    if approx == "reduce":
        a, J = a.mean(1, keepdim=True), J.sum(2, keepdim=True)
    A = torch.einsum("nti,ntj->ij", a, a) / (a.shape[0] * a.shape[1])
    B = torch.einsum("fnto,fg,gntp->op", J, H, J)
    return A, B


def block_of(op, module: str):
    """The Kronecker block of layer ``module``."""
    return next(blk for blk in op.factors.blocks if blk.module == module)


# -- models -------------------------------------------------------------------------------


def seeded(factory, seed: int = 0):
    torch.manual_seed(seed)
    return factory().to(DTYPE)


def mlp(act=nn.Tanh, widths=(4, 5, 3)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


class Scale(nn.Module):
    """A layer without Kronecker structure: ``x * s`` with a parameter s [d]."""

    def __init__(self, d: int):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


def mixed():
    """Linear, a LayerNorm, an elementwise scale, a Conv1d, a tied-free Linear."""
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Unflatten(1, (2, 3)),
        nn.Conv1d(2, 2, 2),
        nn.Flatten(),
        Scale(4),
        nn.Linear(4, 3),
    )


class Sequence(nn.Module):
    """x [N, T, 4] -> [N, 3]; ``l1`` sees the batch-first x, or with ``transpose`` the [T, N, 4] x.T."""

    def __init__(self, transpose: bool):
        super().__init__()
        self.transpose = transpose
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x.transpose(0, 1) if self.transpose else x))
        return self.l2(h.mean(0 if self.transpose else 1))


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=False)``: its linear1/linear2 see [T, N, ...]."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=False)
        self.o = nn.Linear(4, 3)

    def forward(self, x):  # x [N, T, 4]
        return self.o(self.enc(x.transpose(0, 1)).mean(0))


class BothLayouts(nn.Module):
    """One Linear called batch-first on x [N, T, 4] and sequence-first on x.T [T, N, 4]."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).mean(1) + torch.tanh(self.l1(x.transpose(0, 1))).mean(0))


class Flattened(nn.Module):
    """``l1`` sees the rows [N·T, 4] of x [N, T, 4]: no sample axis."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        n, t, _ = x.shape
        return self.l2(torch.tanh(self.l1(x.reshape(n * t, -1))).reshape(n, t, -1).mean(1))


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def classes(n, c=3, seed=2):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


LOSSES = {
    "mse_mean": (nn.MSELoss(), lambda n, c: rand(n, c, seed=3)),
    "mse_sum": (nn.MSELoss(reduction="sum"), lambda n, c: rand(n, c, seed=3)),
    "ce_mean": (nn.CrossEntropyLoss(), lambda n, c: classes(n, c)),
    "ce_sum": (nn.CrossEntropyLoss(reduction="sum"), lambda n, c: classes(n, c)),
    "bce_mean": (nn.BCEWithLogitsLoss(), lambda n, c: (rand(n, c, seed=4) > 0).to(DTYPE)),
}


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_deep_linear_mse_is_exact(reduction, approx, bias):
    """Deep linear network + MSE: KFAC type-2 == the GGN's block diagonal (several batches)."""
    model = seeded(
        lambda: nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Linear(5, 3, bias=bias), nn.Linear(3, 2))
    )
    x, y = rand(9, 4), rand(9, 2, seed=5)
    loss = nn.MSELoss(reduction=reduction)
    K = kfac(model, loss, [(x[:5], y[:5]), (x[5:], y[5:])], kfac_approx=approx)
    assert set(K.representation.values()) == {"kronecker"}
    G = dense_ggn(model, loss, x, y)
    assert_close_rel(K.to_dense(), G * block_mask(K))


def test_deep_linear_sequence_mse_expand_is_exact():
    """Weight sharing over T positions: "expand" is exact for a deep linear net with MSE."""
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)))
    x, y = rand(3, 6, 4), rand(3, 6, 3, seed=5)
    K = kfac(model, nn.MSELoss(), (x, y), kfac_approx="expand")
    G = dense_ggn(model, nn.MSELoss(), x, y)
    assert_close_rel(K.to_dense(), G * block_mask(K))


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_single_sample_is_exact(loss_name, act):
    """One sample: KFAC (and EKFAC) type-2 == the GGN's block diagonal, any nonlinearity."""
    model = seeded(lambda: mlp(act, (4, 6, 5, 3)))
    loss, targets = LOSSES[loss_name]
    x, y = rand(1, 4), targets(1, 3)
    G = dense_ggn(model, loss, x, y)
    K = kfac(model, loss, (x, y))
    assert_close_rel(K.to_dense(), G * block_mask(K))
    assert_close_rel(ekfac(model, loss, (x, y)).to_dense(), G * block_mask(K), tol=1e-9)


def test_mixed_representation():
    """Parameters without Kronecker structure get the exact GGN diagonal; inspectable."""
    model = seeded(mixed)
    x, y = rand(1, 4), classes(1)
    K = kfac(model, nn.CrossEntropyLoss(), (x, y))
    assert K.representation == {
        "0.weight": "kronecker",
        "0.bias": "kronecker",
        "1.weight": "diagonal",
        "1.bias": "diagonal",
        "4.weight": "kronecker",
        "4.bias": "kronecker",
        "6.s": "diagonal",
        "7.weight": "kronecker",
        "7.bias": "kronecker",
    }
    G = dense_ggn(model, nn.CrossEntropyLoss(), x, y)
    mask = block_mask(K)
    D = K.to_dense()
    kron = torch.zeros(G.shape[0], dtype=torch.bool)
    for blk in K.factors.blocks:
        kron[blk.index.reshape(-1)] = True
    # Linear blocks exact on one sample; conv (2 positions) only approximates; diagonals exact
    assert_close_rel(D.diagonal()[~kron], G.diagonal()[~kron])
    lin = torch.cat([blk.index.reshape(-1) for blk in K.factors.blocks if blk.module in ("0", "7")])
    assert_close_rel(D[lin][:, lin], (G * mask)[lin][:, lin])
    assert torch.equal(D != 0, (D != 0) & mask)


def test_params_subset_and_tied_weights():
    """``params=`` restricts the operator; a weight shared by two layers gets a diagonal block."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
            self.b.weight = nn.Parameter(torch.randn(2, 3))
            self.c = nn.Linear(3, 2, bias=False)
            self.c.weight = self.b.weight

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h) + self.c(h)

    model = seeded(Tied)
    x, y = rand(1, 3), rand(1, 2)
    K = kfac(model, nn.MSELoss(), (x, y))
    assert K.representation == {
        "a.weight": "kronecker",
        "a.bias": "kronecker",
        "b.weight": "diagonal",
        "b.bias": "kronecker",
    }
    G = dense_ggn(model, nn.MSELoss(), x, y)
    assert_close_rel(K.to_dense(), G * block_mask(K))
    sub = {"a.weight": model.a.weight.detach()}
    K_sub = kfac(model, nn.MSELoss(), (x, y), params=sub)
    assert K_sub.shape == (9, 9) and K_sub.representation == {"a.weight": "kronecker"}
    assert_close_rel(K_sub.to_dense(), G[:9, :9])
    K_bias = kfac(model, nn.MSELoss(), (x, y), params={"a.bias": model.a.bias.detach()})  # ã = 1
    assert K_bias.representation == {"a.bias": "kronecker"}
    assert_close_rel(K_bias.to_dense(), G[9:12, 9:12])
    assert_close_rel(ekfac(model, nn.MSELoss(), (x, y), params=sub).to_dense(), G[:9, :9], tol=1e-9)


def test_unused_layer_and_bias_only_blocks_over_batches():
    """A layer the forward never calls has a zero block; a bias alone (ã = 1) over two batches."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = seeded(Unused)
    model.used.weight.requires_grad_(False)
    x, y = rand(5, 4), rand(5, 3, seed=3)
    K = kfac(model, nn.MSELoss(), [(x[:2], y[:2]), (x[2:], y[2:])])
    assert K.representation == dict.fromkeys(["used.bias", "unused.weight", "unused.bias"], "kronecker")
    G = dense_ggn(model, nn.MSELoss(), x, y)
    assert_close_rel(K.to_dense(), G * block_mask(K))  # the bias block is exact: B = Σ g gᵀ
    assert K.to_dense()[3:, 3:].abs().max() == 0


def test_wide_input_factor_equals_the_dense_second_moment():
    """A layer with 1,100 inputs over batches of 600 and 5 rows: A = Σ ã ãᵀ / N, from
    blocks of the halves' halves (their lower blocks copied from the upper ones) for the
    first batch, from one product for the second."""
    model = seeded(lambda: nn.Linear(1100, 2))
    x, y = rand(605, 1100), rand(605, 2, seed=5)
    A = kfac(model, nn.MSELoss(), [(x[:600], y[:600]), (x[600:], y[600:])]).factors.blocks[0].A
    a = torch.cat([x, torch.ones(605, 1, dtype=DTYPE)], 1)
    assert_close_rel(A, a.T @ a / 605)


def test_batches_combine_like_their_concatenation():
    """Unequal batches with ignored targets: the same factors as one concatenated batch."""
    model = seeded(lambda: mlp(nn.Tanh))
    x, y = rand(7, 4), classes(7)
    y[0], y[1] = -100, -100  # the first batch is all ignored: it adds to A only
    for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")):
        split = kfac(model, loss, [(x[:2], y[:2]), (x[2:], y[2:])]).to_dense()
        assert_close_rel(split, kfac(model, loss, (x, y)).to_dense())
        split = ekfac(model, loss, [(x[:2], y[:2]), (x[2:], y[2:])]).to_dense()
        assert_close_rel(split, ekfac(model, loss, (x, y)).to_dense(), tol=1e-9)


def test_layer_called_in_some_batches_only():
    """A layer the forward calls on one batch of two: its A is that batch's mean, its B the
    batch's term weighted by its share of the targets, ``Z_2 / (Z_1 + Z_2)``."""

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x) + (self.extra(x) if x.shape[0] > 2 else 0.0)

    model = seeded(Branch)
    x, y = rand(7, 4), classes(7)
    for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")):
        both = kfac(model, loss, [(x[:2], y[:2]), (x[2:], y[2:])]).factors.blocks[1]
        alone = kfac(model, loss, (x[2:], y[2:])).factors.blocks[1]
        share = 5 / 7 if loss.reduction == "mean" else 1.0
        assert both.module == alone.module == "extra"
        assert_close_rel(both.A, alone.A, tol=1e-13)
        assert_close_rel(both.B, share * alone.B, tol=1e-13)


# -- EKFAC ----------------------------------------------------------------------------------


EKFAC_CASES = {
    "mlp-ce": (lambda: mlp(nn.ReLU, (4, 6, 3)), nn.CrossEntropyLoss(), rand(8, 4), classes(8), "expand"),
    "cnn-ce-expand": (cnn, nn.CrossEntropyLoss(), rand(4, 2, 6, 6), classes(4), "expand"),
    "cnn-mse-reduce": (cnn, nn.MSELoss(reduction="sum"), rand(4, 2, 6, 6), rand(4, 3, seed=7), "reduce"),
    "sequence-mse": (lambda: mlp(nn.Tanh), nn.MSELoss(), rand(3, 5, 4), rand(3, 5, 3, seed=7), "expand"),
}


@pytest.mark.parametrize("name", list(EKFAC_CASES))
def test_ekfac_diagonal_in_kfac_eigenbasis(name):
    """In KFAC's eigenbasis Q, EKFAC is diagonal and diag(Qᵀ E Q) == diag(Qᵀ G_blocks Q)."""
    factory, loss, x, y, approx = EKFAC_CASES[name]
    model = seeded(factory)
    E = ekfac(model, loss, (x, y), kfac_approx=approx)
    Q = kron_basis(E.kfac)
    G = dense_ggn(model, loss, x, y) * block_mask(E.kfac)
    rotated = Q.T @ E.to_dense() @ Q
    assert_close_rel(rotated, torch.diag(rotated.diagonal()), tol=1e-9)
    assert_close_rel(rotated.diagonal(), (Q.T @ G @ Q).diagonal(), tol=1e-9)


@pytest.mark.parametrize("name", list(EKFAC_CASES))
def test_ekfac_empirical_diagonal_in_kfac_eigenbasis(name):
    """fisher_type="empirical": in the empirical KFAC's eigenbasis Q, EKFAC is diagonal and
    diag(Qᵀ E Q) == diag(Qᵀ EF_blocks Q), EF the empirical Fisher (1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ from
    per-sample gradients by autograd (not the squared batch gradient)."""
    factory, loss, x, y, approx = EKFAC_CASES[name]
    model = seeded(factory)
    E = ekfac(model, loss, (x, y), fisher_type="empirical", kfac_approx=approx)
    Q = kron_basis(E.kfac)
    EF = dense_empirical_fisher(model, loss, x, y) * block_mask(E.kfac)
    rotated = Q.T @ E.to_dense() @ Q
    assert_close_rel(rotated, torch.diag(rotated.diagonal()), tol=1e-9)
    assert_close_rel(rotated.diagonal(), (Q.T @ EF @ Q).diagonal(), tol=1e-9)


@pytest.mark.parametrize("name", list(EKFAC_CASES))
def test_one_backward_pass_per_column_gives_the_same_factors(name, monkeypatch):
    """Large activations take one backward pass per factor column (summed block by block)."""
    factory, loss, x, y, approx = EKFAC_CASES[name]
    model = seeded(factory)
    batched = ekfac(model, loss, (x, y), kfac_approx=approx).to_dense()
    calls = []
    real = torch.autograd.grad

    def spy(*args, is_grads_batched=False, **kwargs):
        calls.append(is_grads_batched)
        return real(*args, is_grads_batched=is_grads_batched, **kwargs)

    monkeypatch.setattr(curvfx._chunking, "COLUMN_NUMBERS", 0)
    monkeypatch.setattr(torch.autograd, "grad", spy)
    looped = ekfac(model, loss, (x, y), kfac_approx=approx).to_dense()
    assert calls and not any(calls)  # no batched backward pass
    assert_close_rel(looped, batched, tol=1e-12)


# -- layer input layouts: "reduce" and EKFAC read per sample ----------------------------------


LAYOUT_CASES = {  # model, x [N, T, 4] (T = N: settled by a backward pass)
    "transposed": (lambda: Sequence(transpose=True), rand(6, 5, 4)),
    "transposed-T=N": (lambda: Sequence(transpose=True), rand(5, 5, 4)),
    "batch-first-T=N": (lambda: Sequence(transpose=False), rand(5, 5, 4)),
    "encoder": (Encoder, rand(6, 5, 4)),
    "encoder-T=N": (Encoder, rand(5, 5, 4)),
    "both-layouts-T=N": (BothLayouts, rand(5, 5, 4)),
}
SEQUENCE_FIRST = {  # the layers called sequence-first, in the cases with one call per layer
    "transposed": ["l1"],
    "transposed-T=N": ["l1"],
    "batch-first-T=N": [],
    "encoder": ["enc.linear1", "enc.linear2"],
    "encoder-T=N": ["enc.linear1", "enc.linear2"],
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention's backward
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_ekfac_reads_sequence_first_inputs_per_sample(name, approx):
    """[T, N, d] layer inputs (TransformerEncoderLayer(batch_first=False), x.transpose(0, 1)):
    EKFAC's eigenvalues == diag(Qᵀ G Q) of the exact GGN's blocks in KFAC's eigenbasis Q."""
    factory, x = LAYOUT_CASES[name]
    model, loss, y = seeded(factory).eval(), nn.CrossEntropyLoss(), classes(x.shape[0])
    E = ekfac(model, loss, (x, y), kfac_approx=approx)
    Q = kron_basis(E.kfac)
    G = dense_ggn(model, loss, x, y) * block_mask(E.kfac)
    assert_close_rel((Q.T @ E.to_dense() @ Q).diagonal(), (Q.T @ G @ Q).diagonal(), tol=1e-9)


@pytest.mark.parametrize("name", list(SEQUENCE_FIRST))
def test_reduce_reads_sequence_first_inputs_per_sample(name):
    """KFAC "reduce" on [T, N, d] inputs: A == Σ_n ā_n ā_nᵀ/N, B == Σ_n J̄_nᵀ H J̄_n over samples n."""
    factory, x = LAYOUT_CASES[name]
    model, loss, y = seeded(factory).eval(), nn.CrossEntropyLoss(), classes(x.shape[0])
    K = kfac(model, loss, (x, y), kfac_approx="reduce")
    modules = dict(model.named_modules())
    for blk in K.factors.blocks:
        axis = 1 if blk.module in SEQUENCE_FIRST[name] else 0
        A, B = kfac_truth(model, loss, x, y, modules[blk.module], "reduce", axis)
        assert_close_rel(blk.A, A)
        assert_close_rel(blk.B, B)


def test_inputs_without_a_sample_axis_are_refused_by_reduce_and_ekfac():
    """Flattened rows [N·T, d]: "reduce" and EKFAC raise naming the layer; "expand" reads all rows."""
    model, loss = seeded(Flattened), nn.CrossEntropyLoss()
    x, y = rand(6, 5, 4), classes(6)
    with pytest.raises(ValueError, match=r"layer 'l1' has an input of shape \(30, 4\).*kfac_approx='expand'"):
        kfac(model, loss, (x, y), kfac_approx="reduce").to_dense()
    for approx in ("expand", "reduce"):
        with pytest.raises(ValueError, match=r"layer 'l1' .*EKFAC"):
            ekfac(model, loss, (x, y), kfac_approx=approx).to_dense()
    K = kfac(model, loss, (x, y))  # expand: every row alike, N·T = 30 of them
    A, B = kfac_truth(model, loss, x, y, model.l1, "expand")
    assert_close_rel(block_of(K, "l1").A, A)
    assert_close_rel(block_of(K, "l1").B, B)


class ClassFeatures(nn.Module):
    """Logits against a learned table of 6 class embeddings (as many rows as the batch's 6 samples)."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = nn.Linear(4, 3), nn.Linear(5, 3)
        self.classes = nn.Parameter(torch.randn(6, 5))

    def forward(self, x):
        return torch.tanh(self.img(x)) @ self.txt(torch.tanh(self.classes)).T


class LinearProbe(nn.Module):
    """A head on features computed under no_grad, from an input the forward writes in place."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        x.clamp_(-1.0, 1.0)
        with torch.no_grad():
            h = torch.tanh(self.backbone(x))
        return self.head(h)


def test_inputs_without_a_graph_are_taken_per_sample():
    """No graph reaches the head's input (a linear probe): "reduce", EKFAC and type-2 take it
    per sample; a forward that writes its input in place runs (the batch is tracked via a copy)."""
    model, loss = seeded(LinearProbe), nn.CrossEntropyLoss()
    x, y = 3 * rand(6, 4), classes(6)
    x_in = x.clone()
    head = {n: p for n, p in model.named_parameters() if n.startswith("head.")}
    for approx in ("expand", "reduce"):
        K = kfac(model, loss, (x_in, y), kfac_approx=approx, params=head)
        A, B = kfac_truth(model, loss, x.clamp(-1.0, 1.0), y, model.head, approx)
        assert_close_rel(block_of(K, "head").A, A)
        assert_close_rel(block_of(K, "head").B, B)
        ekfac(model, loss, (x_in, y), kfac_approx=approx, params=head).spectrum  # noqa: B018  (runs)
    assert torch.equal(x_in, x)  # the caller's batch is not written
    with pytest.raises(ValueError, match=r"layer 'backbone' is called without gradient"):
        kfac(model, loss, (x_in, y)).to_dense()  # the backbone's own block: no output gradient


def test_inputs_not_computed_from_the_batch_are_refused_by_reduce_ekfac_and_type2():
    """``txt(features)`` has N rows that are not samples: read per sample it would be wrong,
    and its output, shared by the samples, would pair type-2's factor columns across them."""
    model, loss = seeded(ClassFeatures), nn.CrossEntropyLoss()
    x, y = rand(6, 4), classes(6)
    message = "layer 'txt' has an input that is not computed from the batch"
    with pytest.raises(ValueError, match=rf"{message}.*kfac_approx='reduce'"):
        kfac(model, loss, (x, y), kfac_approx="reduce", fisher_type="empirical").to_dense()
    with pytest.raises(ValueError, match=rf"{message}.*EKFAC"):
        ekfac(model, loss, (x, y), fisher_type="empirical").to_dense()
    with pytest.raises(ValueError, match=rf"{message}.*fisher_type='mc' or 'empirical'"):
        kfac(model, loss, (x, y)).to_dense()
    K = kfac(model, loss, (x, y), fisher_type="empirical")  # expand: every row alike
    A, _ = kfac_truth(model, loss, x, y, model.txt, "expand")
    assert_close_rel(block_of(K, "txt").A, A)


def test_reduce_with_sequence_outputs_follows_the_formula():
    """Outputs [N, T, C]: "reduce" type-2 is Σ_n J̄_nᵀ H J̄_n with the loss Hessian H (no
    cross-position terms; curvlinops differs here, see test_matches_curvlinops)."""
    model = seeded(lambda: mlp(nn.Tanh, (4, 5, 3)))
    x, y = rand(5, 6, 4), rand(5, 6, 3, seed=5)
    K = kfac(model, nn.MSELoss(), (x, y), kfac_approx="reduce")
    for blk in K.factors.blocks:
        A, B = kfac_truth(model, nn.MSELoss(), x, y, model[int(blk.module)], "reduce")
        assert_close_rel(blk.A, A)
        assert_close_rel(blk.B, B)


# -- structured queries ------------------------------------------------------------------------


OPERATOR_CASES = {
    "mlp-ce": (lambda: mlp(nn.Tanh, (4, 6, 3)), nn.CrossEntropyLoss(), rand(40, 4), classes(40)),
    "cnn-ce": (cnn, nn.CrossEntropyLoss(), rand(12, 2, 6, 6), classes(12)),
    "mixed-mse": (mixed, nn.MSELoss(), rand(30, 4), rand(30, 3, seed=8)),
}


def build(name, which):
    factory, loss, x, y = OPERATOR_CASES[name]
    model = seeded(factory)
    return (kfac if which == "kfac" else ekfac)(model, loss, (x, y))


@pytest.mark.parametrize("which", ["kfac", "ekfac"])
@pytest.mark.parametrize("name", list(OPERATOR_CASES))
def test_queries_match_dense(name, which):
    """Products in every format, trace, diagonal and logdet equal those of ``to_dense()``."""
    op = build(name, which)
    D = op.to_dense()
    assert_close_rel(D, D.T, tol=1e-12)
    assert_matches_dense(op, D)
    assert_close_rel(op @ torch.eye(D.shape[0], dtype=DTYPE), D)  # products vs the assembled blocks
    assert_close_rel(curvfx.trace(op, "exact"), D.trace())
    assert_close_rel(curvfx.diagonal(op, "exact"), D.diagonal())
    eye = torch.eye(D.shape[0], dtype=DTYPE)
    for damping in (1e-3, 0.5):
        assert_close_rel(op.logdet(damping), torch.logdet(D + damping * eye))
        assert_close_rel(op.det(damping), torch.det(D + damping * eye))


@pytest.mark.parametrize("which", ["kfac", "ekfac"])
@pytest.mark.parametrize("name", list(OPERATOR_CASES))
def test_inverse_times_operator_is_identity(name, which):
    """``op.inverse(λ) @ (op + λ I) == I`` (relerr < 1e-10), and the inverse's own queries."""
    op = build(name, which)
    D = op.to_dense()
    eye = torch.eye(D.shape[0], dtype=DTYPE)
    damping = 1e-2 * float(D.diagonal().mean())
    inv = op.inverse(damping=damping)
    assert rel_err(inv.to_dense() @ (D + damping * eye), eye) < 1e-10
    assert rel_err(inv @ (op @ eye + damping * eye), eye) < 1e-10
    assert_matches_dense(inv, inv.to_dense())
    assert_close_rel(curvfx.trace(inv, "exact"), inv.to_dense().trace())
    assert_close_rel(curvfx.diagonal(inv, "exact"), inv.to_dense().diagonal())
    assert_close_rel(inv.logdet(), -torch.logdet(D + damping * eye))


def test_inverse_without_damping_on_a_nonsingular_kfac():
    model = seeded(lambda: mlp(nn.Tanh, (3, 4, 3)))
    K = kfac(model, nn.MSELoss(), (rand(40, 3), rand(40, 3, seed=9)))
    D = K.to_dense()
    assert rel_err(K.inverse(0.0).to_dense() @ D, torch.eye(D.shape[0], dtype=DTYPE)) < 1e-10


def test_heuristic_damping_is_pi_damping():
    """``method="heuristic"``: per block (B + √λ/π I)⁻¹ ⊗ (A + π√λ I)⁻¹, diagonal 1/(d + λ)."""
    op = build("mixed-mse", "kfac")
    damping = 1e-2
    f = op.factors
    truth = torch.zeros(f.size, f.size, dtype=DTYPE)
    for blk in f.blocks:
        A, B = blk.A, blk.B
        pi = ((A.trace() / A.shape[0]) / (B.trace() / B.shape[0])).sqrt()
        root = damping**0.5
        inv = torch.kron(
            torch.linalg.inv(B + root / pi * torch.eye(B.shape[0], dtype=DTYPE)),
            torch.linalg.inv(A + root * pi * torch.eye(A.shape[0], dtype=DTYPE)),
        )
        i = blk.index.reshape(-1)
        truth[i.unsqueeze(1), i] = inv
    truth[f.diagonal_index, f.diagonal_index] = 1 / (f.diagonal + damping)
    assert_close_rel(op.inverse(damping, method="heuristic").to_dense(), truth, tol=1e-9)


def test_factors_are_computed_once_and_cached():
    model = seeded(lambda: mlp(nn.Tanh))
    calls = []
    model[1].register_forward_hook(lambda *args: calls.append(1))  # (a hooked Linear would get a diagonal)
    K = kfac(model, nn.MSELoss(), [(rand(3, 4), rand(3, 3)), (rand(2, 4), rand(2, 3))])
    assert calls == []  # nothing computed at construction
    v = rand(K.shape[0])
    K @ v, K @ v, K.inverse(1e-3) @ v, K.logdet(), curvfx.trace(K, "exact"), K.to_dense()
    assert len(calls) == 2  # one pass over the two batches


# -- Fisher types ---------------------------------------------------------------------------


def test_mc_converges_to_type2():
    """The MC KFAC's error to type-2 falls below 2% within 4,096 draws per sample (~1/√M)."""
    model = seeded(lambda: mlp(nn.Tanh, (4, 5, 3)))
    x, y = rand(16, 4), classes(16)
    exact = kfac(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    errors = []
    for num_samples in (16, 4096):
        g = torch.Generator().manual_seed(0)
        mc = kfac(
            model, nn.CrossEntropyLoss(), (x, y), fisher_type="mc", num_samples=num_samples, generator=g
        )
        errors.append(rel_err(mc.to_dense(), exact))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 3, errors


def test_ekfac_mc_converges_to_type2_in_its_own_eigenbasis():
    """MC EKFAC's eigenvalues → the exact GGN's diagonal in the MC KFAC's eigenbasis.

    The basis Q = Q_B ⊗ Q_A is that of the *MC* KFAC, random and different from type-2's
    (close eigenvalues make it converge slowly, and only up to sign and rotation within
    them), so the quantity compared lives in that same basis: the MC corrections
    Λ_mc = diag(Qᵀ E_mc Q) against diag(Qᵀ G_blocks Q), the GGN (= Fisher, cross-entropy)
    blocks by jacrev/hessian — what type-2 EKFAC would give in Q, for any Q. Within 2 % at
    2,048 draws per sample (0.5 % here), and more than 3× closer than at 16 (~1/√M: 4 %).
    """
    model = seeded(lambda: mlp(nn.Tanh, (4, 5, 3)))
    x, y = rand(16, 4), classes(16)
    G = dense_ggn(model, nn.CrossEntropyLoss(), x, y)
    errors = []
    for num_samples in (16, 2048):
        g = torch.Generator().manual_seed(0)
        E = ekfac(
            model, nn.CrossEntropyLoss(), (x, y), fisher_type="mc", num_samples=num_samples, generator=g
        )
        Q = kron_basis(E.kfac)
        rotated = Q.T @ E.to_dense() @ Q
        assert_close_rel(rotated, torch.diag(rotated.diagonal()), tol=1e-9)
        errors.append(rel_err(rotated.diagonal(), (Q.T @ (G * block_mask(E.kfac)) @ Q).diagonal()))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 3, errors


def test_mc_is_reproducible_and_leaves_global_rng_alone():
    model = seeded(lambda: mlp(nn.Tanh))
    x, y = rand(6, 4), classes(6)
    state = torch.random.get_rng_state()
    a = kfac(
        model, nn.CrossEntropyLoss(), (x, y), fisher_type="mc", generator=torch.Generator().manual_seed(3)
    )
    b = kfac(
        model, nn.CrossEntropyLoss(), (x, y), fisher_type="mc", generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a.to_dense(), b.to_dense())
    E = ekfac(
        model, nn.CrossEntropyLoss(), (x, y), fisher_type="mc", generator=torch.Generator().manual_seed(3)
    )
    assert E.to_dense().isfinite().all()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_empirical_single_sample_is_the_empirical_fisher_block():
    model = seeded(lambda: mlp(nn.ReLU, (4, 6, 3)))
    x, y = rand(1, 4), classes(1)
    K = kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="empirical")
    params = [p for p in model.parameters()]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), params)])
    assert_close_rel(K.to_dense(), torch.outer(g, g) * block_mask(K))


def test_no_side_effects():
    model = seeded(lambda: mlp(nn.Tanh))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = copy.deepcopy(model.state_dict())
    K = kfac(model, nn.CrossEntropyLoss(), (rand(5, 4), classes(5)))
    K.to_dense(), ekfac(model, nn.CrossEntropyLoss(), (rand(5, 4), classes(5))).to_dense()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def coupled():
    """Linear, BatchNorm (train mode: couples the samples), Tanh, Linear; BN parameters frozen."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model[1].requires_grad_(False)
    return model


def test_type2_refuses_coupled_samples():
    """BatchNorm in train mode: type-2 raises, since its B would depend on how the loss Hessian's
    per-sample factor columns pair up across samples; model.eval() lifts it."""
    model, loss, data = seeded(coupled), nn.CrossEntropyLoss(), (rand(6, 4), classes(6))
    message = r"fisher_type: 'type-2'.*batch statistics.*model\.eval\(\).*fisher_type='mc'"
    with pytest.raises(ValueError, match=message):
        kfac(model, loss, data).to_dense()
    with pytest.raises(ValueError, match=message):
        ekfac(model, loss, data, kfac_approx="reduce").to_dense()
    assert kfac(model.eval(), loss, data).to_dense().isfinite().all()


def test_empirical_with_coupled_samples_back_propagates_the_batch_gradient():
    """BatchNorm in train mode, "empirical": B = Z Σ_n (∂L/∂z_n)(∂L/∂z_n)ᵀ, the batch loss's
    gradient at each sample's layer output (Z = N for a mean cross-entropy); EKFAC runs."""
    model, loss = seeded(coupled), nn.CrossEntropyLoss()
    x, y = rand(6, 4), classes(6)
    K = kfac(model, loss, (x, y), fisher_type="empirical")
    for blk in K.factors.blocks:
        _, f, J = layer_jacobian(model, model[int(blk.module)], x)  # [F, N, out]
        grad_f = torch.autograd.grad(loss(f.requires_grad_(), y), f)[0].reshape(-1)
        grad_z = torch.einsum("f,fno->no", grad_f, J)
        assert_close_rel(blk.B, 6 * grad_z.T @ grad_z)
    E = ekfac(model, loss, (x, y), fisher_type="empirical").to_dense()
    assert E.isfinite().all() and E.abs().sum() > 0


def test_mc_with_coupled_samples_is_unbiased():
    """BatchNorm in train mode, "mc": B → Σ_n J_nᵀ H J_n (H block-diagonal over samples) as the
    draws grow: the sampled gradients' cross-sample terms vanish in expectation."""
    model, loss = seeded(coupled), nn.CrossEntropyLoss()
    x, y = rand(6, 4), classes(6)
    g = torch.Generator().manual_seed(0)
    K = kfac(model, loss, (x, y), fisher_type="mc", num_samples=8192, generator=g)
    for blk in K.factors.blocks:
        _, B = kfac_truth(model, loss, x, y, model[int(blk.module)], "expand")
        assert rel_err(blk.B, B) < 0.01, rel_err(blk.B, B)  # 0.0025 here; 0.05–0.1 with 64 draws
    assert ekfac(model, loss, (x, y), fisher_type="mc", generator=g).to_dense().isfinite().all()


# -- errors ---------------------------------------------------------------------------------


def test_errors_name_the_problem():
    model = seeded(lambda: mlp(nn.Tanh))
    data = (rand(3, 4), classes(3))
    loss = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        kfac(lambda p, x: x, loss, data, params={"w": rand(2)})
    with pytest.raises(ValueError, match="fisher_type"):
        kfac(model, loss, data, fisher_type="exact")
    with pytest.raises(ValueError, match="kfac_approx"):
        kfac(model, loss, data, kfac_approx="sum")
    with pytest.raises(ValueError, match="num_samples"):
        kfac(model, loss, data, num_samples=3)
    with pytest.raises(ValueError, match="params"):
        kfac(model, loss, data, params={"nope": rand(2)})
    K = kfac(model, loss, data)
    with pytest.raises(ValueError, match="damping"):
        K.inverse(-1.0)
    with pytest.raises(ValueError, match="method"):
        K.inverse(1.0, method="pi")
    with pytest.raises(ValueError, match="singular"):
        K.inverse(0.0)  # 3 samples: rank-deficient factors
    with pytest.raises(ValueError, match="only 'exact'"):
        ekfac(model, loss, data).inverse(1.0, method="heuristic")
    quartic, reg = (lambda f, y: (f - y).pow(4).mean()), (rand(3, 4), rand(3, 3))
    with pytest.raises(ValueError, match="fisher_type='empirical'"):
        kfac(model, quartic, reg)
    assert kfac(model, quartic, reg, fisher_type="empirical").to_dense().isfinite().all()
    bn = seeded(lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="BatchNorm"):
        kfac(bn, loss, data).to_dense()
    with pytest.raises(ValueError, match="data"):
        kfac(model, loss, iter([data])).to_dense()
    with pytest.raises(ValueError, match="every target position is ignored"):
        kfac(model, loss, (data[0], torch.full((3,), -100))).to_dense()


# -- cross-check with curvlinops -------------------------------------------------------------


CURVLINOPS_CASES = {
    "mlp-ce_mean": (lambda: mlp(nn.Tanh, (4, 5, 3)), nn.CrossEntropyLoss(), rand(6, 4), classes(6), "expand"),
    "mlp-ce_sum": (
        lambda: mlp(nn.Tanh, (4, 5, 3)),
        nn.CrossEntropyLoss(reduction="sum"),
        rand(6, 4),
        classes(6),
        "expand",
    ),
    "mlp-mse_mean": (lambda: mlp(nn.ReLU, (4, 5, 3)), nn.MSELoss(), rand(6, 4), rand(6, 3, seed=6), "expand"),
    "mlp-bce_mean": (
        lambda: mlp(nn.Tanh, (4, 5, 3)),
        nn.BCEWithLogitsLoss(),
        rand(6, 4),
        (rand(6, 3) > 0).to(DTYPE),
        "expand",
    ),
    "cnn-ce-expand": (cnn, nn.CrossEntropyLoss(), rand(5, 2, 6, 6), classes(5), "expand"),
    "cnn-ce-reduce": (cnn, nn.CrossEntropyLoss(), rand(5, 2, 6, 6), classes(5), "reduce"),
    "cnn-ce-reduce-nonsingular": (cnn, nn.CrossEntropyLoss(), rand(32, 2, 6, 6), classes(32), "reduce"),
}


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", list(CURVLINOPS_CASES))
def test_matches_curvlinops(name, fisher_type):
    """Same matrices as curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator``.

    Scaling map (curvlinops -> curvfx): curvlinops normalizes A by ``num_data·T`` and folds
    its loss-reduction correction (``num_loss_terms² / (num_data · terms per example)``
    for "mean", 1 for "sum") into B; curvfx's B is ``Σ_n Σ_k g gᵀ`` with the loss as written
    (its 1/Z inside the output factor) and batch weights Z_b/ΣZ. Both give the same
    ``A ⊗ B``, so the mapping is the identity once curvlinops treats weight and bias jointly
    (``separate_weight_and_bias=False`` == curvfx's [W | b] block) and both use column-
    vs row-major vec consistently (curvlinops ``A ⊗ B`` on vec = curvfx ``kron(B, A)`` on
    vec_r: the same matrix in the parameters' own flattening). Two batches check the
    weights.

    Covered: 2-D outputs (one output position per sample) of MLPs with cross-entropy (mean,
    sum), MSE and BCE, and of a CNN (2 convolutions + linear) with cross-entropy, for
    "expand" and "reduce", type-2 and empirical; EKFAC for "expand", and for "reduce" with
    nonsingular factors (32 samples). Not covered, because the libraries differ there:
    1. type-2 with outputs of more than 2 dims ([N, T, C], cross-entropy's [N, C, d]):
    curvlinops back-propagates the Hessian factor's column c of all output positions
    together, adding cross-position terms to B ("reduce"; "expand" when positions mix
    after the layer); curvfx follows the formula (test_reduce_with_sequence_outputs_...).
    2. EKFAC "reduce" with singular factors (cnn-ce-reduce: 5 samples, in' = 19): the
    per-sample gradients ``Σ_t g_t ã_tᵀ`` reach the factors' null spaces, so EKFAC depends
    on the eigenvectors ``eigh`` picks there (7–11 % apart here; both are valid EKFACs).
    With "expand" they lie in the factors' ranges and EKFAC is unique.
    """
    curvlinops = pytest.importorskip("curvlinops")
    factory, loss, x, y, approx = CURVLINOPS_CASES[name]
    model = seeded(factory)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    params = [p for p in model.parameters() if p.requires_grad]
    eye = torch.eye(sum(p.numel() for p in params), dtype=DTYPE)
    options = dict(
        fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False, check_deterministic=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = curvlinops.KFACLinearOperator(model, loss, params, data, **options) @ eye
        assert_close_rel(
            kfac(model, loss, data, fisher_type=fisher_type, kfac_approx=approx).to_dense(), theirs
        )
        if approx == "expand" or name.endswith("nonsingular"):
            theirs = curvlinops.EKFACLinearOperator(model, loss, params, data, **options) @ eye
            ours = ekfac(model, loss, data, fisher_type=fisher_type, kfac_approx=approx).to_dense()
            assert_close_rel(ours, theirs, tol=1e-9)


@pytest.mark.parametrize(
    "loss", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce_mean", "mse_sum"]
)
def test_matches_backpack_kflr(loss):
    """BackPACK's KFLR (type-2) factors ``[B, A]`` per parameter are the weight-weight and
    bias-bias sub-blocks of curvfx's joint block: ``B ⊗ A[:in, :in]`` and ``B · A[in, in] = B``.
    """
    pytest.importorskip("backpack")
    from backpack import backpack, extend
    from backpack.extensions import KFLR

    model = seeded(lambda: mlp(nn.Tanh, (4, 5, 3)))
    x = rand(6, 4)
    y = classes(6) if isinstance(loss, nn.CrossEntropyLoss) else rand(6, 3, seed=6)
    K = kfac(model, loss, (x, y))
    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack(KFLR()):
            bp_loss(bp_model(x), y).backward()
    for blk, layer in zip(K.factors.blocks, (bp_model[0], bp_model[2])):
        B_w, A_w = layer.weight.kflr
        (B_b,) = layer.bias.kflr
        size_in = A_w.shape[0]
        assert_close_rel(torch.kron(blk.B, blk.A[:size_in, :size_in]), torch.kron(B_w, A_w))
        assert_close_rel(blk.B * blk.A[size_in, size_in], B_b)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 5),
    hidden=st.integers(1, 5),
    fisher_type=st.sampled_from(["type-2", "empirical", "mc"]),
    approx=st.sampled_from(["expand", "reduce"]),
)
def test_kfac_and_ekfac_are_symmetric_psd(seed, n, hidden, fisher_type, approx):
    """Any small sequence model, Fisher type and approximation: symmetric and ⪰ 0."""
    model = seeded(lambda: mlp(nn.Tanh, (3, hidden, 2)), seed)
    data = (rand(n, 2, 3, seed=seed), rand(n, 2, 2, seed=seed + 1))
    options = dict(fisher_type=fisher_type, kfac_approx=approx, generator=torch.Generator().manual_seed(seed))
    for op in (kfac(model, nn.MSELoss(), data, **options), ekfac(model, nn.MSELoss(), data, **options)):
        D = op.to_dense()
        assert_close_rel(D, D.T, tol=1e-12)
        assert float(torch.linalg.eigvalsh(D).min()) >= -1e-12 * max(1.0, float(D.abs().max()))


@pytest.mark.parametrize("positions", [1, 3, 12])  # T < d: rows copied; T ≥ d: batched product
def test_second_moment_of_each_layout(positions):
    """Σ t tᵀ over all rows, for rows in place and for a convolution's transposed layout."""
    from curvfx.operators._kfac_moments import add_second_moment

    g = torch.Generator().manual_seed(0)
    conv_layout = torch.randn(2, 5, 6, positions, generator=g, dtype=DTYPE).transpose(-1, -2)  # [.., T, d=6]
    row_layout = torch.randn(4, positions, 6, generator=g, dtype=DTYPE)
    for t in (conv_layout, row_layout):
        rows = t.reshape(-1, 6)
        total = torch.full((6, 6), float("nan"), dtype=DTYPE)  # uninitialized: overwritten
        add_second_moment(total, t, keep=0.0, scale=0.5)
        assert_close_rel(total, 0.5 * rows.T @ rows, tol=1e-13)
        add_second_moment(total, t, keep=3.0, scale=2.0)
        assert_close_rel(total, 3.5 * rows.T @ rows, tol=1e-13)


def test_parameter_used_outside_its_layer_is_refused():
    """A block from the layer's calls would leave out a use of its weight elsewhere."""

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.fc(x) + torch.nn.functional.linear(x.sin(), self.fc.weight)))

    model = seeded(Reused)
    x, y = rand(6, 4), classes(6)
    with pytest.raises(ValueError, match=r"'fc\.weight' is used outside"):
        kfac(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    params = {k: v.detach() for k, v in model.named_parameters() if k != "fc.weight"}
    op = kfac(model, nn.CrossEntropyLoss(), (x, y), params=params)  # fc.bias alone: a block of its own
    assert op.to_dense().shape == (sum(v.numel() for v in params.values()),) * 2


def test_a_loss_linear_in_the_outputs_gives_zero_kronecker_blocks():
    """NLL after log_softmax: the output Hessian's factor has no columns, so type-2 KFAC and
    EKFAC are zero, as the GGN is (a linear and a convolution layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Tanh(), nn.Linear(6, 3), nn.LogSoftmax(dim=1)
    ).double()
    x, y = torch.randn(5, 1, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert curvfx.ggn(model, nn.NLLLoss(), (x, y)).to_dense().count_nonzero() == 0
    assert curvfx.kfac(model, nn.NLLLoss(), (x, y)).to_dense().count_nonzero() == 0
    assert curvfx.ekfac(model, nn.NLLLoss(), (x, y)).to_dense().count_nonzero() == 0
