"""Parameter subsets (``op.restrict``, ``params=`` subsets, LoRA-style frozen weights),
per-layer curvature (``curvfx.layer_curvature``) and ``batch_size_fn`` with dict inputs.

Truths: ``torch.autograd.functional.hessian`` / ``jacrev`` over the flat vector of *all*
named parameters (frozen ones included) through our own ``functional_call``; blocks are
taken by index from these full matrices.
"""

from __future__ import annotations

import pytest
import torch
from dense import assert_close_rel
from operator_checks import assert_matches_dense
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader

import curvfx

CE = nn.CrossEntropyLoss()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    return [(X[:5], y[:5]), (X[5:], y[5:])]


def full_truth(model, data, kind, loss_fn=CE, call=lambda m, p, x: functional_call(m, p, (x,))):
    """Hessian or GGN over all named parameters (frozen included), and the names' index ranges."""
    named = dict(model.named_parameters())
    sizes = {k: p.numel() for k, p in named.items()}
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def as_dict(theta):
        out, i = {}, 0
        for k, p in named.items():
            out[k] = theta[i : i + sizes[k]].reshape(p.shape)
            i += sizes[k]
        return out

    total, n = 0.0, 0
    for x, y in data:
        if kind == "hessian":
            loss = lambda t, x=x, y=y: loss_fn(call(model, as_dict(t), x), y)  # noqa: E731
            A = torch.autograd.functional.hessian(loss, flat)
        else:
            f = call(model, as_dict(flat), x).detach()
            J = jacrev(lambda t, x=x: call(model, as_dict(t), x).reshape(-1))(flat)
            out_loss = lambda o, y=y, s=f.shape: loss_fn(o.reshape(s), y)  # noqa: E731
            H = torch.autograd.functional.hessian(out_loss, f.reshape(-1))
            A = J.T @ H @ J
        total, n = total + len(y) * A, n + len(y)
    starts = torch.tensor([0, *sizes.values()]).cumsum(0).tolist()
    ranges = {k: range(starts[i], starts[i + 1]) for i, k in enumerate(named)}
    return total / n, ranges


def block(M, ranges, names):
    idx = torch.tensor([i for name in names for i in ranges[name]])
    return M[idx][:, idx]


CONSTRUCTORS = {
    "hessian": (curvfx.hessian, "hessian"),
    "ggn": (curvfx.ggn, "ggn"),
    "fisher_exact": (lambda *a, **k: curvfx.fisher(*a, kind="exact", **k), "ggn"),  # = GGN for CE
}


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_restrict_is_the_diagonal_block(name):
    constructor, kind = CONSTRUCTORS[name]
    model, data = mlp(), batches()
    truth, ranges = full_truth(model, data, kind)
    op = constructor(model, CE, data)
    sub = op.restrict(["2", "4.bias"])
    assert type(sub) is type(op) and list(sub.params) == ["2.weight", "2.bias", "4.bias"]
    assert_matches_dense(sub, block(truth, ranges, ["2.weight", "2.bias", "4.bias"]))
    assert_matches_dense(op.restrict("0.weight"), block(truth, ranges, ["0.weight"]))
    assert op.shape[0] == sum(len(r) for r in ranges.values())  # the original is unchanged


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_restrict_holds_the_others_at_the_operators_params(name):
    """An operator at params= other than the module's: its restriction (and the exact
    diagonal, trace and layer curvature read from it) is the block at those params, the
    parameters left out held at the operator's values, not the module's."""
    constructor, kind = CONSTRUCTORS[name]
    model, data = mlp(), batches()
    moved = {k: v.detach() + 0.3 for k, v in model.named_parameters()}
    twin = mlp()
    with torch.no_grad():
        for k, p in twin.named_parameters():
            p.copy_(moved[k])
    truth, ranges = full_truth(twin, data, kind)
    op = constructor(model, CE, data, params=moved)
    expected = block(truth, ranges, ["2.weight", "2.bias"])
    sub = op.restrict("2")
    assert_matches_dense(sub, expected)
    if kind == "ggn":
        assert_close_rel(curvfx.diagonal(sub, "exact"), expected.diagonal(), tol=1e-10)
    assert_close_rel(curvfx.layer_curvature(op, ["2"])["2"].trace, expected.trace(), tol=1e-10)


def test_restrict_a_pure_function_with_dict_params():
    """A pure function keeps receiving the whole dict, in its order: the block, not a KeyError."""
    g = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 2, generator=g, dtype=torch.float64),
    )
    params = {
        "w": torch.randn(4, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(2, generator=g, dtype=torch.float64),
    }
    seen = []

    def fn(p, x):
        seen.append(list(p))
        return torch.tanh(x @ p["w"] + p["b"])

    op = curvfx.hessian(fn, nn.MSELoss(), (x, y), params=params)
    assert_matches_dense(op.restrict("b"), op.to_dense()[-2:, -2:])
    assert_matches_dense(op.restrict("w"), op.to_dense()[:8, :8])
    assert all(keys == ["w", "b"] for keys in seen)


def test_restrict_keeps_mc_and_empirical_draws():
    model, data = mlp(), batches()
    for op in (curvfx.fisher(model, CE, data, kind="mc"), curvfx.empirical_fisher(model, CE, data)):
        idx = torch.arange(24 + 6, 24 + 6 + 30 + 5)  # "2.weight", "2.bias" after "0.*" (24 + 6)
        sub = op.restrict("2")
        assert sub.seed == op.seed
        assert_close_rel(sub.to_dense(), op.to_dense()[idx][:, idx], tol=1e-10)


def test_constructor_params_subset_holds_the_rest_fixed():
    model, data = mlp(), batches()
    truth, ranges = full_truth(model, data, "hessian")
    params = {k: p.detach() for k, p in model.named_parameters() if k.startswith("4.")}
    op = curvfx.hessian(model, CE, data, params=params)
    assert_matches_dense(op, block(truth, ranges, ["4.weight", "4.bias"]))
    assert all(p.grad is None for p in model.parameters())


def test_lora_style_frozen_base():
    class LoRALinear(nn.Module):
        def __init__(self, d_in, d_out, rank):
            super().__init__()
            self.base = nn.Linear(d_in, d_out).requires_grad_(False)
            self.a = nn.Parameter(0.1 * torch.randn(rank, d_in))
            self.b = nn.Parameter(0.1 * torch.randn(d_out, rank))

        def forward(self, x):
            return self.base(x) + x @ self.a.T @ self.b.T

    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(4, 6, 2), nn.Tanh(), nn.Linear(6, 3).requires_grad_(False)).double()
    data = batches()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    for constructor, kind in (CONSTRUCTORS["hessian"], CONSTRUCTORS["ggn"]):
        truth, ranges = full_truth(model, data, kind)
        op = constructor(model, CE, data)
        assert op.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 + 6 * 2
        assert_matches_dense(op, block(truth, ranges, trainable))


def test_restrict_errors():
    model, data = mlp(), batches()
    op = curvfx.ggn(model, CE, data)
    with pytest.raises(ValueError, match="names: '1'"):
        op.restrict("1")  # Tanh owns no parameters
    with pytest.raises(ValueError, match=r"names: '0\.w'"):
        op.restrict(["0", "0.w"])  # a prefix must end at a dot
    with pytest.raises(ValueError, match="names"):
        op.restrict([])
    x = data[0][0]
    pure = curvfx.ggn(lambda p, x: x @ p[0], nn.MSELoss(), (x, x[:, :2]), params=[torch.ones(4, 2).double()])
    with pytest.raises(ValueError, match="names"):
        pure.restrict("0")


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_layer_curvature_matches_dense_blocks(name):
    constructor, kind = CONSTRUCTORS[name]
    model, data = mlp(), batches()
    truth, ranges = full_truth(model, data, kind)
    g = torch.Generator().manual_seed(0)
    result = curvfx.layer_curvature(constructor(model, CE, data), k=2, generator=g)
    assert list(result) == ["0", "2", "4"]
    for layer, info in result.items():
        B = block(truth, ranges, [f"{layer}.weight", f"{layer}.bias"])
        assert info.num_params == B.shape[0]
        assert_close_rel(info.trace, B.trace(), tol=1e-10)
        assert_close_rel(info.eigenvalues, torch.linalg.eigvalsh(B).flip(0)[:2], tol=1e-8, atol=1e-10)


def test_layer_curvature_arguments():
    model, data = mlp(), batches()
    op = curvfx.ggn(model, CE, data)
    g = torch.Generator().manual_seed(0)
    result = curvfx.layer_curvature(op, ["4.bias"], k=5, trace_method="hutchinson", generator=g)
    assert result["4.bias"].eigenvalues.shape == (3,)  # k capped at P_l = 3
    with pytest.raises(TypeError, match="A"):
        curvfx.layer_curvature(torch.eye(3))
    with pytest.raises(ValueError, match="k"):
        curvfx.layer_curvature(op, k=0)
    with pytest.raises(ValueError, match="layers"):
        curvfx.layer_curvature(op, "0")


class DictNet(nn.Module):
    """Hugging Face style inputs: ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(torch.tanh(h.sum(1) / attention_mask.sum(1, keepdim=True)))


def test_batch_size_fn_with_dict_inputs_through_a_dataloader():
    torch.manual_seed(0)
    model = DictNet().double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 10, (7, 5), generator=g)
    mask = (torch.rand(7, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    y = torch.randint(0, 3, (7,), generator=g)
    samples = [({"input_ids": ids[i], "attention_mask": mask[i]}, y[i]) for i in range(7)]

    def collate(items):
        xs, ys = zip(*items)
        return {k: torch.stack([x[k] for x in xs]) for k in xs[0]}, torch.stack(ys)

    loader = DataLoader(samples, batch_size=3, collate_fn=collate)  # batches of 3, 3, 1
    call = lambda m, p, x: functional_call(m, p, (), x)  # noqa: E731
    whole = [({"input_ids": ids, "attention_mask": mask}, y)]
    for constructor, kind in (CONSTRUCTORS["hessian"], CONSTRUCTORS["ggn"]):
        truth, _ = full_truth(model, whole, kind, call=call)
        op = constructor(model, CE, loader, batch_size_fn=lambda x, t: x["input_ids"].shape[0])
        assert_matches_dense(op, truth)

    bad = [({"input_ids": ids[:3], "attention_mask": mask[:2]}, y[:3])]
    op = curvfx.ggn(model, CE, bad, batch_size_fn=lambda x, t: x["input_ids"].shape[0])
    with pytest.raises(ValueError, match=r"batch 0: X\['attention_mask'\]"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64)
    with pytest.raises(TypeError, match="batch_size_fn"):
        curvfx.ggn(model, CE, bad, batch_size_fn=3)
