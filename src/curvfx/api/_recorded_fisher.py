"""The Fisher of a categorical likelihood at outputs already computed, through their autograd graph."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._arguments import check_flag
from curvfx._engines import jv_by_transposition
from curvfx._errors import UnsupportedInputError, check_autograd, describe
from curvfx._factors import factor_product
from curvfx._graph import leaf_inputs
from curvfx._pytree import num_params, ravel, unravel
from curvfx.api._vectors import model_parts
from curvfx.losses import CrossEntropyLoss, Loss
from curvfx.operators import LinearOperator

LOSS_TYPES = ("nll",)  # generalized_fisher_*'s loss_type values
_MAX_BATCHED = 2**24  # numbers held by one batched backward pass of RecordedFisher


class RecordedFisher(LinearOperator):
    """Fisher ``F = Σ_n J_nᵀ (Σ_k s_kn s_knᵀ) J_n`` [P, P] at outputs already computed.

    J is the Jacobian of ``outputs`` with respect to ``params`` recorded in the outputs'
    autograd graph; ``S = loss.fisher_factor(outputs, targets)`` [K, N, ...]. Products:
    Jv by double backprop through the graph, then ``Jᵀ (F_out Jv)``. Exact diagonal:
    ``Σ_{n,k} (J_nᵀ s_kn)²`` by batched backward passes, one row per (k, n).
    """

    symmetric = True

    def __init__(
        self, outputs: Tensor, targets: Tensor, loss: Loss, params: list[Tensor], create_graph: bool
    ):
        self.outputs, self.targets, self.loss = outputs, targets, loss
        self.params, self.create_graph = params, create_graph
        self.in_like = self.out_like = params
        p = num_params(params)
        self.shape, self.dtype, self.device = (p, p), outputs.dtype, outputs.device

    def _factor(self) -> Tensor:
        """S [K, *outputs.shape]; attached to the graph when ``create_graph``."""
        f = self.outputs if self.create_graph else self.outputs.detach()
        return self.loss.fisher_factor(f, self.targets)

    def _vjp(self, u: Tensor, batched: bool = False) -> list[Tensor]:
        """Jᵀ u (rows of u when ``batched``), zeros for parameters the outputs do not use."""
        grads = torch.autograd.grad(
            self.outputs,
            self.params,
            u,
            retain_graph=True,
            create_graph=self.create_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
        lead = (u.shape[0],) if batched else ()
        return [g if g is not None else p.new_zeros(*lead, *p.shape) for p, g in zip(self.params, grads)]

    def _matvec(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            jv = jv_by_transposition(self.outputs, self.params)(unravel(v, self.params))  # Jv
            out = self._vjp(factor_product(self._factor().detach(), jv))  # Jᵀ F_out Jv
        return ravel([g.detach() for g in out])

    def _exact_diagonal(self) -> Tensor:
        S = self._factor()
        K, N = S.shape[:2]
        eye = torch.eye(N, dtype=S.dtype, device=S.device).reshape(N, N, *[1] * (S.dim() - 2))
        per_sample = max(1, _MAX_BATCHED // max(1, K * max(self.outputs.numel(), self.shape[0])))
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with torch.set_grad_enabled(self.create_graph):
            for start in range(0, N, per_sample):
                stop = min(start + per_sample, N)
                # row (k, n): s_kn at sample n, zero elsewhere
                rows = (S[:, start:stop].unsqueeze(2) * eye[start:stop]).reshape(-1, *self.outputs.shape)
                jt_rows = self._vjp(rows, batched=True)  # J_nᵀ s_kn
                total = total + torch.cat([(g**2).sum(0).reshape(-1) for g in jt_rows])
        return total


def recorded_fisher(
    model: nn.Module, outputs: Any, targets: Any, loss_type: Any, create_graph: Any
) -> tuple[RecordedFisher, dict[str, Tensor], dict[int, str]]:
    """Validate the generalized-Fisher arguments; the operator, its parameters and their names."""
    check_flag(create_graph, "create_graph")
    check_autograd()
    if not isinstance(loss_type, str) or loss_type.lower() not in LOSS_TYPES:  # any case, as torch-secorder
        raise UnsupportedInputError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(outputs, Tensor) or outputs.dim() < 2:
        raise UnsupportedInputError(
            f"outputs: expected the model's outputs [N, C, ...] (logits or log-probabilities), "
            f"got {describe(outputs)}"
        )
    if outputs.grad_fn is None:
        raise ValueError(
            "outputs: has no autograd graph; pass outputs = model(inputs) computed with "
            "gradients enabled (not detached, not under torch.no_grad)"
        )
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets: expected a tensor of class indices, got {describe(targets)}")
    _, params, index = model_parts(model, True)
    _check_reaches(outputs, params.values())
    loss = CrossEntropyLoss(reduction="sum")
    loss.check(outputs, targets)
    return RecordedFisher(outputs, targets, loss, list(params.values()), create_graph), params, index


def _check_reaches(outputs: Tensor, params: Iterable[Tensor]) -> None:
    """Raise if the autograd graph of ``outputs`` reaches none of ``params`` (then J = 0, F = 0)."""
    ids = {id(p) for p in params}
    if not any(id(leaf) in ids for leaf in leaf_inputs(outputs)):
        raise ValueError(
            "outputs: their autograd graph reaches none of model's trainable parameters, so they "
            "were not computed by model (a copy of it, or detached parameters?); pass "
            "outputs = model(inputs)"
        )
