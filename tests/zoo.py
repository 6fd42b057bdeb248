"""The model zoo of issue #11: small real-world architectures, float64, with dense truths.

Each entry is a :class:`cases.Case` (seeded recipe -> :class:`cases.Problem`), tiny enough
(P <= ~400, N <= 4) that dense P x P matrices are cheap. The dense truths in
:class:`ZooTruth` are built without curvfx: our own ``torch.func.functional_call`` on a
deep copy with fresh buffer copies, a flat parameter vector sliced in the model's
``named_parameters()`` order (trainable ones only, tied ones once; this is curvfx's flat
order, so no permutation is needed), and ``torch.autograd.functional.hessian`` /
``jacobian`` on it. Attention runs with the math SDPA kernel there (the fused CPU kernels
have no double backward).

This module does not import curvfx.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from cases import DTYPE, Case, Problem, classes, randn, slice_batch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

# ---------------------------------------------------------------------------------------
# models


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with GELU."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-style decoder with a tied output embedding; logits [N, V, T] (class dim 1).

    ``lm_head.weight is tok_emb.weight``; the logits are transposed to [N, V, T] so that
    ``nn.CrossEntropyLoss`` takes them with targets [N, T] as they are. Also the model of
    ``benchmarks/bench_gpt.py``.
    """

    def __init__(self, vocab: int, context: int, d: int, heads: int, hidden: int, blocks: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads, hidden) for _ in range(blocks)))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.blocks(self.tok_emb(idx) + self.pos_emb(pos))
        return self.lm_head(self.ln_f(h)).transpose(1, 2)


def TinyGPT(vocab: int = 7, context: int = 5, d: int = 4, heads: int = 2, hidden: int = 6) -> GPT:
    """A 2-block :class:`GPT` with random LayerNorm affines."""
    model = GPT(vocab, context, d, heads, hidden, blocks=2)
    _perturb_norms(model)
    return model


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU, one residual block, global average pool, Linear; input [N, 2, 5, 5]."""

    def __init__(self, c: int = 3, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block = ResBlock(c)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        _perturb_norms(self)
        for m in self.modules():  # non-trivial running statistics (they matter in eval mode)
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.copy_(0.3 * torch.randn(c))
                    m.running_var.copy_(0.5 + torch.rand(c))
                    m.num_batches_tracked.fill_(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))


def groupnorm_cnn() -> nn.Module:
    """Conv2d -> GroupNorm -> ReLU -> Conv2d -> GroupNorm -> ReLU -> AdaptiveAvgPool2d -> Linear."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    _perturb_norms(model)
    return model


class RNNClassifier(nn.Module):
    """LSTM or GRU over [N, T, 3] (batch_first); the last hidden state -> Linear."""

    def __init__(self, cell: type[nn.RNNBase], d_in: int = 3, hidden: int = 4, num_classes: int = 3):
        super().__init__()
        self.rnn = cell(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
        return self.head(h[-1])


class DictInputNet(nn.Module):
    """Hugging Face style ``forward(input_ids, attention_mask)``: masked mean of embeddings."""

    def __init__(self, vocab: int = 6, d: int = 4, num_classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, 5)
        self.out = nn.Linear(5, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(self.emb.weight.dtype).unsqueeze(-1)
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1)
        return self.out(torch.tanh(self.hidden(pooled)))


class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank update ``(alpha/r) B A``."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2, alpha: float = 2.0):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(0.5 * torch.randn(d_out, rank))  # non-zero: generic curvature
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def lora_mlp() -> nn.Module:
    """LoRALinear(5 -> 6) -> Tanh -> LoRALinear(6 -> 3): only the adapters train."""
    return nn.Sequential(LoRALinear(5, 6), nn.Tanh(), LoRALinear(6, 3))


def relu_inplace_mlp() -> nn.Module:
    """Linear -> ReLU(inplace=True) -> Linear -> ReLU(inplace=True) -> Linear."""
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 3),
    )


def _perturb_norms(model: nn.Module) -> None:
    """Random affine weights/biases for the normalization layers (defaults are 1 and 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))


# ---------------------------------------------------------------------------------------
# recipes


def _case(name, model_factory, loss_factory, x_factory, y_factory, *, seed, mode="train", **flags):
    def build(generator):
        model = model_factory().to(DTYPE)
        model.train(mode == "train")
        return model, None, None, loss_factory(), x_factory(generator), y_factory(generator)

    return Case(name, build, seed=seed, **flags)


def _gpt_targets(g):
    y = classes(g, 7, 3, 5)
    y[0, 0] = y[1, 3] = y[1, 4] = y[2, 1] = -100  # every sample keeps valid positions
    return y


def _dict_inputs(g):
    ids = torch.randint(0, 6, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.int64)
    mask[0, 3:] = mask[2, 1:] = mask[3, 4:] = 0  # padding at the end
    return {"input_ids": ids, "attention_mask": mask}


ZOO: list[Case] = [
    _case(
        "gpt-ce_ignore_mean",
        TinyGPT,
        lambda: nn.CrossEntropyLoss(ignore_index=-100),
        lambda g: torch.randint(0, 7, (3, 5), generator=g),
        _gpt_targets,
        seed=101,
    ),
    _case(
        "resnet_bn_train-ce_mean",
        TinyResNet,
        nn.CrossEntropyLoss,
        lambda g: randn(g, 4, 2, 5, 5),
        lambda g: classes(g, 3, 4),
        seed=102,
        batchnorm_train=True,
    ),
    _case(
        "resnet_bn_eval-ce_mean",
        TinyResNet,
        nn.CrossEntropyLoss,
        lambda g: randn(g, 4, 2, 5, 5),
        lambda g: classes(g, 3, 4),
        seed=103,
        mode="eval",
    ),
    _case(
        "groupnorm_cnn-bce_mean",
        groupnorm_cnn,
        nn.BCEWithLogitsLoss,
        lambda g: randn(g, 4, 2, 5, 5),
        lambda g: torch.randint(0, 2, (4, 3), generator=g).to(DTYPE),
        seed=104,
    ),
    _case(
        "lstm-ce_sum",
        lambda: RNNClassifier(nn.LSTM),
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        lambda g: randn(g, 3, 4, 3),
        lambda g: classes(g, 3, 3),
        seed=105,
    ),
    _case(
        "gru-mse_mean",
        lambda: RNNClassifier(nn.GRU),
        nn.MSELoss,
        lambda g: randn(g, 3, 4, 3),
        lambda g: randn(g, 3, 3),
        seed=106,
        mse=True,
    ),
    _case(
        "dict_input-ce_mean",
        DictInputNet,
        nn.CrossEntropyLoss,
        _dict_inputs,
        lambda g: classes(g, 3, 4),
        seed=107,
    ),
    _case(
        "lora-mse_sum",
        lora_mlp,
        lambda: nn.MSELoss(reduction="sum"),
        lambda g: randn(g, 4, 5),
        lambda g: randn(g, 4, 3),
        seed=108,
        mse=True,
    ),
    _case(
        "relu_inplace-ce_sum",
        relu_inplace_mlp,
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        lambda g: randn(g, 4, 4),
        lambda g: classes(g, 3, 4),
        seed=109,
    ),
]

ZOO_BY_NAME: dict[str, Case] = {case.name: case for case in ZOO}
assert len(ZOO_BY_NAME) == len(ZOO), "zoo names must be unique"


# ---------------------------------------------------------------------------------------
# dense truths, without curvfx


class ZooTruth:
    """Dense matrices of one zoo problem, rows/columns in ``named_parameters()`` order.

    Every Gauss-Newton-type matrix is ``Jᵀ M J`` with J the Jacobian of all outputs on the
    whole batch (so BatchNorm in train mode is handled: J couples the samples) and M an
    output-space matrix: ``∇²_f L`` for the GGN, ``Z blockdiag_n(∇_{f_n} L ∇_{f_n} Lᵀ)``
    for the empirical Fisher at some targets.
    """

    def __init__(self, problem: Problem):
        self.problem = problem
        self.model = copy.deepcopy(problem.model)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.flat = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.num_params = self.flat.numel()
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        with torch.no_grad():
            self.outputs = self.outputs_of_flat(self.flat).detach()

    def params_of_flat(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``flat`` [P] into the named parameters."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            stop = start + shape.numel()
            out[name] = flat[start:stop].reshape(shape)
            start = stop
        return out

    def outputs_of_flat(self, flat: Tensor, x: Any = None) -> Tensor:
        """f(X; θ) on the whole batch, or on ``x`` (fresh buffer copies; math attention kernel)."""
        x = self.problem.x if x is None else x
        fresh = {n: b.clone() for n, b in self.buffers.items()}
        with sdpa_kernel([SDPBackend.MATH]):
            if isinstance(x, dict):
                return functional_call(self.model, (self.params_of_flat(flat), fresh), (), x)
            return functional_call(self.model, (self.params_of_flat(flat), fresh), (x,))

    def loss_of_flat(self, flat: Tensor) -> Tensor:
        """L(θ), the loss as written."""
        return self.problem.loss_fn(self.outputs_of_flat(flat), self.problem.y)

    @functools.cached_property
    def hessian(self) -> Tensor:
        """∇²_θ L [P, P]."""
        return torch.autograd.functional.hessian(self.loss_of_flat, self.flat)

    @functools.cached_property
    def jacobian(self) -> Tensor:
        """J = ∂ vec(f) / ∂θ [N·C, P] (plain autograd, one backward pass per output)."""
        J = torch.autograd.functional.jacobian(self.outputs_of_flat, self.flat)
        return J.reshape(-1, self.num_params)

    @functools.cached_property
    def ggn(self) -> Tensor:
        """Jᵀ (∇²_f L) J [P, P]."""
        y, loss_fn = self.problem.y, self.problem.loss_fn
        M = self.outputs.numel()
        H_f = torch.autograd.functional.hessian(lambda f: loss_fn(f, y), self.outputs).reshape(M, M)
        return self.jacobian.T @ H_f @ self.jacobian

    def empirical_fisher(self, targets: Tensor) -> Tensor:
        """``Z Σ_n ∇_θ L_n ∇_θ L_nᵀ`` at ``targets``, L_n sample n's term of the loss as written.

        ``∇_θ L_n = Jᵀ (∇_f L restricted to sample n)``; Z is torch's own mean denominator
        ``L_sum / L_mean`` (1 for the sum).
        """
        loss_fn = self.problem.loss_fn
        f = self.outputs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(f, targets), f)
        n = f.shape[0]
        J = self.jacobian.reshape(n, -1, self.num_params)
        per_sample = torch.einsum("nc,ncp->np", g.reshape(n, -1), J)  # rows ∇_θ L_n
        if loss_fn.reduction == "mean":
            summed = copy.deepcopy(loss_fn)
            summed.reduction = "sum"
            z = summed(self.outputs, targets) / loss_fn(self.outputs, targets)
        else:
            z = 1.0
        return z * per_sample.T @ per_sample

    @functools.cached_property
    def per_sample_grads(self) -> Tensor:
        """[N, P]: ∇_θ loss_fn(f(x_n), y_n), each sample alone as a batch of one."""
        p, rows = self.problem, []
        for n in range(p.num_samples):
            flat = self.flat.clone().requires_grad_(True)
            outputs = self.outputs_of_flat(flat, slice_batch(p.x, n, n + 1))
            (g,) = torch.autograd.grad(p.loss_fn(outputs, p.y[n : n + 1]), flat)
            rows.append(g)
        return torch.stack(rows)

    @functools.cached_property
    def empirical_fisher_at_data(self) -> Tensor:
        """The empirical Fisher at the data's targets."""
        return self.empirical_fisher(self.problem.y)


@functools.cache
def _zoo_truth(name: str) -> ZooTruth:
    return ZooTruth(ZOO_BY_NAME[name].make())


def zoo_truth(case: Case) -> ZooTruth:
    """Cached :class:`ZooTruth` of ``case`` (built once per session)."""
    return _zoo_truth(case.name)


def describe(case: Case) -> dict[str, Any]:
    """P, N and the output shape of a zoo case (for the docs of the tests)."""
    truth = zoo_truth(case)
    return {"P": truth.num_params, "N": truth.problem.num_samples, "outputs": tuple(truth.outputs.shape)}
