"""One registry of small named problems (model or pure function, loss, data, seed), in float64.

Every problem is tiny (P <= ~150, N <= 8) so that dense P x P truths are cheap. This
module does not import curvfx: the dense truths in ``dense.py`` are built from it
without going through the library under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

DTYPE = torch.float64


@dataclass(frozen=True)
class Problem:
    """A built case: either ``model`` (an nn.Module) or ``pure_fn`` with ``pure_params``."""

    name: str
    model: nn.Module | None
    pure_fn: Callable[[Any, Any], Tensor] | None
    pure_params: Any
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    x: Any
    y: Tensor

    @property
    def num_samples(self) -> int:
        """N, the batch size."""
        return len(self.y)


@dataclass(frozen=True)
class Case:
    """A named, seeded recipe for a :class:`Problem`.

    Attributes:
        name: Readable id, ``<model>-<loss>``.
        build: ``build(generator)`` -> ``(model_or_None, pure_fn_or_None, pure_params,
            loss_fn, x, y)``; module parameters are initialised from the global RNG,
            which :meth:`make` seeds inside ``torch.random.fork_rng``.
        seed: Seed of both the parameter initialisation and the data.
        linear: The model output is linear in the parameters (then GGN == Hessian).
        batchnorm_train: The model has BatchNorm in train mode (samples are coupled).
        mse: The loss is an MSE loss.
        pure: The case is a pure function over a nested pytree, not an nn.Module.
    """

    name: str
    build: Callable[[torch.Generator], tuple]
    seed: int = 0
    linear: bool = False
    batchnorm_train: bool = False
    mse: bool = False
    pure: bool = False

    def make(self) -> Problem:
        """Build a fresh problem (new model, new tensors) from the seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            generator = torch.Generator().manual_seed(self.seed)
            model, pure_fn, pure_params, loss_fn, x, y = self.build(generator)
        return Problem(self.name, model, pure_fn, pure_params, loss_fn, x, y)


# ---------------------------------------------------------------------------------------
# models


def mlp(activation: type[nn.Module], d_in: int = 4, d_hidden: int = 5, d_out: int = 3):
    """Linear -> activation -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), activation(), nn.Linear(d_hidden, d_out))


def small_cnn() -> nn.Module:
    """Conv2d(1->2, 3x3) -> ReLU -> flatten -> Linear(32 -> 3), input [N, 1, 6, 6]."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def batchnorm_mlp() -> nn.Module:
    """Linear -> BatchNorm1d -> Tanh -> Linear, left in train mode."""
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).train()


def frozen_mlp() -> nn.Module:
    """MLP whose first layer has ``requires_grad=False``."""
    model = mlp(nn.Tanh)
    model[0].requires_grad_(False)
    return model


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight (``b.weight is a.weight``), then a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TwoInputNet(nn.Module):
    """``forward(a, b)`` with a: [N, 4], b: [N, 2]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3, bias=False)
        self.out = nn.Linear(3, 3)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(a) + self.b(b)))


class PaddedBagNet(nn.Module):
    """Embedding with a padding row (ids [N, 3], some 0 = padding), summed over positions, then a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3, padding_idx=0)
        self.out = nn.Linear(3, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(ids)).sum(1))


def sequence_net() -> nn.Module:
    """Pointwise Conv1d net: [N, 2, 5] -> [N, 3, 5] (logits with a sequence dimension)."""
    return nn.Sequential(nn.Conv1d(2, 4, 1), nn.Tanh(), nn.Conv1d(4, 3, 2, padding=1))


def log_softmax_mlp() -> nn.Module:
    """MLP ending in LogSoftmax(dim=1), for NLLLoss."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(dim=1))


def log_cosh_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """A convex loss curvfx does not know (generic autograd fallback): mean log cosh(f - y)."""
    return torch.log(torch.cosh(outputs - targets)).mean()


def pytree_fn(params: dict, x: Tensor) -> Tensor:
    """Pure function over nested params ``{"layer": [w, b], "out": (w2,)}``."""
    w, b = params["layer"]
    (w2,) = params["out"]
    return torch.tanh(x @ w.T + b) @ w2.T


def pytree_params(generator: torch.Generator) -> dict:
    """Nested params for :func:`pytree_fn` (plain tensors, ``requires_grad=False``)."""
    return {
        "layer": [randn(generator, 5, 4) * 0.7, randn(generator, 5) * 0.3],
        "out": (randn(generator, 3, 5) * 0.7,),
    }


# ---------------------------------------------------------------------------------------
# data


def randn(generator: torch.Generator, *shape: int) -> Tensor:
    """Standard normal float64 tensor from ``generator``."""
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


def classes(generator: torch.Generator, num_classes: int, *shape: int) -> Tensor:
    """Class indices (int64) in [0, num_classes)."""
    return torch.randint(0, num_classes, shape, generator=generator)


def binary(generator: torch.Generator, *shape: int) -> Tensor:
    """Float64 {0, 1} targets."""
    return torch.randint(0, 2, shape, generator=generator).to(DTYPE)


# ---------------------------------------------------------------------------------------
# recipes


def _module_case(model_factory, loss_factory, x_factory, y_factory):
    def build(generator):
        model = model_factory().to(DTYPE)
        x = x_factory(generator)
        y = y_factory(generator)
        return model, None, None, loss_factory(), x, y

    return build


def _pure_case(loss_factory, y_factory, n=6):
    def build(generator):
        params = pytree_params(generator)
        x = randn(generator, n, 4)
        return None, pytree_fn, params, loss_factory(), x, y_factory(generator)

    return build


N = 6


def _x_vec(generator):
    return randn(generator, N, 4)


def _y_reg(generator):
    return randn(generator, N, 3)


def _y_cls(generator):
    return classes(generator, 3, N)


def _y_bin(generator):
    return binary(generator, N, 3)


def _y_ignore(generator, ignore_index):
    y = classes(generator, 3, N)
    y[[1, 4]] = ignore_index
    return y


def _y_seq(generator):
    return classes(generator, 3, 4, 6)


def _y_seq_ignore(generator):
    y = _y_seq(generator)
    y[0, 1] = y[2, 0] = y[2, 5] = y[3, 3] = -100  # every sample keeps valid positions
    return y


def _y_probs(generator):
    return torch.softmax(randn(generator, N, 3), dim=1)


def _y_soft_binary(generator):
    return torch.rand(N, 3, generator=generator, dtype=DTYPE)


def _x_two(generator):
    return (randn(generator, N, 4), randn(generator, N, 2))


def _x_two_dict(generator):
    a, b = _x_two(generator)
    return {"b": b, "a": a}


_CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.25], dtype=DTYPE)

CASES: list[Case] = [
    Case(
        "mlp_tanh-mse_mean",
        _module_case(lambda: mlp(nn.Tanh), nn.MSELoss, _x_vec, _y_reg),
        seed=1,
        mse=True,
    ),
    Case(
        "mlp_tanh-mse_sum",
        _module_case(lambda: mlp(nn.Tanh), lambda: nn.MSELoss(reduction="sum"), _x_vec, _y_reg),
        seed=2,
        mse=True,
    ),
    Case(
        "mlp_relu-ce_mean",
        _module_case(lambda: mlp(nn.ReLU), nn.CrossEntropyLoss, _x_vec, _y_cls),
        seed=3,
    ),
    Case(
        "mlp_relu-ce_sum",
        _module_case(lambda: mlp(nn.ReLU), lambda: nn.CrossEntropyLoss(reduction="sum"), _x_vec, _y_cls),
        seed=4,
    ),
    Case(
        "cnn-ce_mean",
        _module_case(
            small_cnn, nn.CrossEntropyLoss, lambda g: randn(g, 4, 1, 6, 6), lambda g: classes(g, 3, 4)
        ),
        seed=5,
    ),
    Case(
        "cnn-mse_sum",
        _module_case(
            small_cnn,
            lambda: nn.MSELoss(reduction="sum"),
            lambda g: randn(g, 4, 1, 6, 6),
            lambda g: randn(g, 4, 3),
        ),
        seed=6,
        mse=True,
    ),
    Case(
        "batchnorm_train-ce_mean",
        _module_case(batchnorm_mlp, nn.CrossEntropyLoss, _x_vec, _y_cls),
        seed=7,
        batchnorm_train=True,
    ),
    Case(
        "batchnorm_train-mse_mean",
        _module_case(batchnorm_mlp, nn.MSELoss, _x_vec, _y_reg),
        seed=8,
        batchnorm_train=True,
        mse=True,
    ),
    Case(
        "frozen-mse_mean",
        _module_case(frozen_mlp, nn.MSELoss, _x_vec, _y_reg),
        seed=9,
        mse=True,
    ),
    Case(
        "tied-ce_mean",
        _module_case(TiedNet, nn.CrossEntropyLoss, _x_vec, _y_cls),
        seed=10,
    ),
    Case(
        "tied-mse_sum",
        _module_case(TiedNet, lambda: nn.MSELoss(reduction="sum"), _x_vec, _y_reg),
        seed=11,
        mse=True,
    ),
    Case(
        "pytree_fn-mse_sum",
        _pure_case(lambda: nn.MSELoss(reduction="sum"), _y_reg),
        seed=12,
        mse=True,
        pure=True,
    ),
    Case("pytree_fn-bce_mean", _pure_case(nn.BCEWithLogitsLoss, _y_bin), seed=13, pure=True),
    Case(
        "two_inputs-ce_sum",
        _module_case(TwoInputNet, lambda: nn.CrossEntropyLoss(reduction="sum"), _x_two, _y_cls),
        seed=14,
    ),
    Case(
        "two_inputs-mse_mean",
        _module_case(TwoInputNet, nn.MSELoss, _x_two, _y_reg),
        seed=15,
        mse=True,
    ),
    Case(
        "two_inputs_dict-ce_mean",
        _module_case(TwoInputNet, nn.CrossEntropyLoss, _x_two_dict, _y_cls),
        seed=29,
    ),
    Case(
        "sequence-ce_mean",
        _module_case(sequence_net, nn.CrossEntropyLoss, lambda g: randn(g, 4, 2, 5), _y_seq),
        seed=16,
    ),
    Case(
        "sequence-ce_ignore_mean",
        _module_case(sequence_net, nn.CrossEntropyLoss, lambda g: randn(g, 4, 2, 5), _y_seq_ignore),
        seed=17,
    ),
    Case(
        "mlp_tanh-ce_ignore_sum",
        _module_case(
            lambda: mlp(nn.Tanh),
            lambda: nn.CrossEntropyLoss(reduction="sum", ignore_index=-1),
            _x_vec,
            lambda g: _y_ignore(g, -1),
        ),
        seed=18,
    ),
    Case(
        "mlp_tanh-ce_weight_mean",
        _module_case(
            lambda: mlp(nn.Tanh),
            lambda: nn.CrossEntropyLoss(weight=_CLASS_WEIGHT.clone()),
            _x_vec,
            _y_cls,
        ),
        seed=19,
    ),
    Case(
        "mlp_tanh-ce_weight_sum",
        _module_case(
            lambda: mlp(nn.Tanh),
            lambda: nn.CrossEntropyLoss(weight=_CLASS_WEIGHT.clone(), reduction="sum"),
            _x_vec,
            _y_cls,
        ),
        seed=20,
    ),
    Case(
        "mlp_tanh-ce_label_smoothing_mean",
        _module_case(lambda: mlp(nn.Tanh), lambda: nn.CrossEntropyLoss(label_smoothing=0.2), _x_vec, _y_cls),
        seed=21,
    ),
    Case(
        "mlp_tanh-ce_probs_mean",
        _module_case(lambda: mlp(nn.Tanh), nn.CrossEntropyLoss, _x_vec, _y_probs),
        seed=22,
    ),
    Case(
        "mlp_tanh-bce_mean",
        _module_case(lambda: mlp(nn.Tanh), nn.BCEWithLogitsLoss, _x_vec, _y_bin),
        seed=23,
    ),
    Case(
        "mlp_tanh-bce_weight_mean",
        _module_case(
            lambda: mlp(nn.Tanh), lambda: nn.BCEWithLogitsLoss(weight=_CLASS_WEIGHT.clone()), _x_vec, _y_bin
        ),
        seed=32,
    ),
    Case(
        "mlp_tanh-bce_soft_sum",
        _module_case(
            lambda: mlp(nn.Tanh),
            lambda: nn.BCEWithLogitsLoss(reduction="sum"),
            _x_vec,
            _y_soft_binary,
        ),
        seed=24,
    ),
    Case(
        "log_softmax-nll_mean",
        _module_case(log_softmax_mlp, nn.NLLLoss, _x_vec, _y_cls),
        seed=25,
    ),
    Case(
        "log_softmax-nll_sum",
        _module_case(log_softmax_mlp, lambda: nn.NLLLoss(reduction="sum"), _x_vec, _y_cls),
        seed=26,
    ),
    Case(
        "embedding_padded-ce_mean",
        _module_case(PaddedBagNet, nn.CrossEntropyLoss, lambda g: classes(g, 7, N, 3), _y_cls),
        seed=31,
    ),
    Case(
        "linear-mse_mean",
        _module_case(lambda: nn.Linear(4, 3), nn.MSELoss, _x_vec, _y_reg),
        seed=27,
        linear=True,
        mse=True,
    ),
    Case(
        "linear-ce_sum",
        _module_case(lambda: nn.Linear(4, 3), lambda: nn.CrossEntropyLoss(reduction="sum"), _x_vec, _y_cls),
        seed=28,
        linear=True,
    ),
]

# Losses curvfx does not know (generic autograd fallback). Kept out of CASES: operators
# that need a factor or a reduction (exact diagonals, empirical Fisher) refuse them.
GENERIC_LOSS_CASES: list[Case] = [
    Case(
        "mlp_tanh-log_cosh_custom",
        _module_case(lambda: mlp(nn.Tanh), lambda: log_cosh_loss, _x_vec, _y_reg),
        seed=30,
    ),
]

CASES_BY_NAME: dict[str, Case] = {case.name: case for case in CASES + GENERIC_LOSS_CASES}
assert len(CASES_BY_NAME) == len(CASES) + len(GENERIC_LOSS_CASES), "case names must be unique"


def call_model(model: nn.Module, x: Any) -> Tensor:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, tuple/list or dict input."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def slice_batch(x: Any, start: int, stop: int) -> Any:
    """``x[start:stop]`` for a tensor, or for every tensor of a tuple/list/dict input."""
    if isinstance(x, dict):
        return {k: v[start:stop] for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(v[start:stop] for v in x)
    return x[start:stop]
