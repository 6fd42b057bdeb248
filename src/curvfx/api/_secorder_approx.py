"""torch-secorder's curvature traces and diagonals: ``hessian_trace`` and ``approximations``.

``hessian_trace`` is a Hutchinson estimate over :func:`curvfx.hvp` products. The GGN and
empirical-Fisher functions build a curvfx operator over the one batch and read its exact
diagonal (:func:`curvfx.diagonal` with ``method="exact"``, factored through the loss's
output Hessian, no P × P matrix) or trace (:func:`curvfx.trace`). The generalized-Fisher
functions get the model's *outputs* rather than its inputs, so they work through the
outputs' autograd graph (:mod:`curvfx.api._recorded_fisher`): the Fisher operator
``Σ_n J_nᵀ F_n J_n`` with J the Jacobian recorded in that graph and F_n from the loss's
Fisher factor (:mod:`curvfx.losses`).

Results are lists over ``model.parameters()``; frozen parameters get zero entries.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._arguments import check_count, check_flag
from curvfx._pytree import num_params, unravel
from curvfx.api._closures import param_list, pure_function
from curvfx.api._recorded_fisher import recorded_fisher
from curvfx.api._secorder_hvp import graph_if
from curvfx.api._vectors import model_parts, model_result
from curvfx.estimators import diagonal, trace
from curvfx.estimators._probes import make_generator, probes
from curvfx.func import hvp
from curvfx.functional import check_independent_samples
from curvfx.losses import MSELoss, get_loss
from curvfx.operators import FunctionOperator, LinearOperator, empirical_fisher, ggn

__all__ = [
    "empirical_fisher_diagonal",
    "empirical_fisher_trace",
    "gauss_newton_matrix_approximation",
    "generalized_fisher_diagonal",
    "generalized_fisher_trace",
    "hessian_trace",
]

SPARSE_DENSITY = 1.0 / 3.0  # fraction of non-zero entries of a sparse probe (Achlioptas 2003)


def hessian_trace(
    func: Callable[[], Tensor],
    params: Iterable[Tensor],
    num_samples: int = 10,
    create_graph: bool = False,
    sparse: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> float:
    """Hutchinson estimate of tr(H), ``H = ∇²_θ func()``: ``(1/m) Σ_i ω_iᵀ H ω_i``.

    m = ``num_samples`` probes with E[ω ωᵀ] = I, so the estimate is unbiased:

    * ``sparse=False``: Rademacher probes (±1), via :func:`curvfx.trace`. Variance per
      probe ``2 Σ_{i≠j} H_ij²`` (exact for a diagonal H);
    * ``sparse=True``: sparse probes ``ω_i = ±√3`` with probability 1/6 each, else 0
      (Achlioptas 2003; a third of the entries non-zero). Variance per probe
      ``2 Σ_{i≠j} H_ij² + 2 Σ_i H_ii²``: larger, the price of sparsity.

    Cost: m HVPs (:func:`curvfx.hvp`), one evaluation of ``func`` each; every evaluation
    replays the random numbers of the first (as in :func:`approximate_hvp`), so with active
    dropout all probes see the Hessian at one mask.

    Differs from torch-secorder in: 1. the sparse probes are scaled so that E[ω ωᵀ] = I
    (unbiased); 2. probes come from ``generator`` (keyword-only, an addition); 3.
    ``create_graph`` is accepted for compatibility but has no effect: the result is a
    Python float; 4. random operations in ``func`` (dropout) draw the same numbers for
    every probe.

    Args:
        func: Closure returning a scalar tensor, reading the tensors in ``params``.
        params: The tensors θ (a list or any iterable).
        num_samples: m, the number of probes (a positive int).
        create_graph: Ignored (see above).
        sparse: Use sparse probes.
        generator: Source of the probes; ``None`` seeds a fresh generator from torch's
            global RNG (reproducible under ``torch.manual_seed``).

    Returns:
        The estimate, a Python float.

    Raises:
        ValueError: If ``num_samples`` is not a positive int, or as :func:`exact_hvp`.
        TypeError: As :func:`exact_hvp`, or if ``generator`` is not a ``torch.Generator``.
    """
    params = param_list(params)
    pure = pure_function(func, params)
    m = check_count(num_samples, "num_samples")
    check_flag(create_graph, "create_graph")
    check_flag(sparse, "sparse")
    first = params[0]
    op = FunctionOperator(
        lambda w: _value_hvp(pure, params, w),
        num_params(params),
        dtype=first.dtype,
        device=first.device,
    )
    if not sparse:
        return float(trace(op, "hutchinson", num_samples=m, generator=generator))
    omega = sparse_probes(op.shape[0], m, generator, first.dtype, first.device)
    return float((omega * op.matmat(omega)).sum(0).mean())  # (1/m) Σ ω_iᵀ H ω_i


def _value_hvp(pure: Callable, params: list[Tensor], w: Tensor) -> Tensor:
    with graph_if(False):
        return hvp(pure, params, w, strategy="autograd")


def sparse_probes(
    size: int, num: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Sparse probes Ω [size, num]: entries ±√3 with probability 1/6 each, else 0; E[ω ωᵀ] = I."""
    g = make_generator(generator, device)
    signs = probes(size, num, "rademacher", g, dtype, device)
    keep = torch.rand(size, num, generator=g, device=g.device) < SPARSE_DENSITY
    return signs * keep.to(device=device, dtype=dtype) / math.sqrt(SPARSE_DENSITY)


def gauss_newton_matrix_approximation(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    create_graph: bool = False,
) -> list[Tensor]:
    """Exact diagonal of the GGN ``G = Jᵀ H_f J`` of an MSE loss as written.

    ``H_f = ∇²_f loss_fn``: ``2/(N·C) I`` for ``nn.MSELoss()`` (mean over the N·C entries of
    the outputs [N, C]), ``2 I`` for ``reduction="sum"``, so
    ``diag G = (2/(N·C)) Σ_rows J²`` (column-wise sums of squared Jacobian entries). Computed
    by :func:`curvfx.diagonal` (``method="exact"``) of :func:`curvfx.ggn`, from the loss's
    output-Hessian factor; neither J nor the P × P matrix is formed.

    Differs from torch-secorder in: the loss Hessian is included. torch-secorder returns
    ``diag(JᵀJ)`` whatever the reduction, which is the GGN of ``½ Σ (f - y)²``; curvfx's
    is that of the loss you pass, ``2/(N·C)`` times it for ``nn.MSELoss()``. The
    ``ValueError`` for other losses is kept; the exact GGN diagonal of any supported loss
    is ``curvfx.diagonal(curvfx.ggn(model, loss_fn, (inputs, targets)), method="exact")``.

    Args:
        model: The ``nn.Module`` (its trainable parameters, ``named_parameters()`` order).
        loss_fn: ``nn.MSELoss``, ``F.mse_loss`` (or a ``functools.partial`` of it, or
            :class:`curvfx.losses.MSELoss`).
        inputs: Input batch [N, ...].
        targets: Targets shaped like the outputs [N, C].
        create_graph: If True, the diagonal is differentiable with respect to the
            model's parameters.

    Returns:
        A list over ``model.parameters()``, each tensor shaped like its parameter.

    Raises:
        ValueError: If ``loss_fn`` is not MSE-based, the targets do not fit, or the model
            couples samples (BatchNorm in train mode: call ``model.eval()``).
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    check_flag(create_graph, "create_graph")
    loss = get_loss(loss_fn)
    if not isinstance(loss, MSELoss):
        raise ValueError(
            f"loss_fn: the Gauss-Newton matrix here is defined for MSE losses, got {loss.name}; "
            "curvfx.diagonal(curvfx.ggn(model, loss_fn, (inputs, targets)), method='exact') "
            "gives the exact GGN diagonal of any supported loss"
        )
    fn, params, index = model_parts(model, create_graph)
    _check_independent_samples(
        fn,
        "gauss_newton_matrix_approximation",
        "; or estimate the diagonal with curvfx.diagonal(curvfx.ggn(model, loss_fn, (inputs, targets)), "
        "method='hutchinson')",
    )
    op = ggn(fn, loss, (inputs, targets), params=params)
    d = diagonal(_over_live(op, params) if create_graph else op, method="exact")
    return model_result(unravel(d, params), "list", list(model.parameters()), index)


def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> list[Tensor]:
    """Exact diagonal of the empirical Fisher ``F = Z Σ_n ∇_θ L_n ∇_θ L_nᵀ``, from per-sample gradients.

    L = ``loss_fn(model(inputs), targets)`` = Σ_n L_n with L_n sample n's term, and Z the
    loss's normalizer (``L = (1/Z) Σ ℓ``; Z = N for a mean over samples, N·C for
    ``nn.MSELoss()``, 1 for ``reduction="sum"``). So ``diag F = Z Σ_n (∇_θ L_n)²``; for
    cross-entropy (mean) and single-output MSE (mean) this is the mean over samples of the
    squared per-sample gradients ``(1/N) Σ_n g_n²``, ``g_n = ∇_θ loss_fn(model(x_n), y_n)``
    (for C-output MSE, ``(C/N) Σ_n g_n²``). Computed by :func:`curvfx.diagonal`
    (``method="exact"``) of :func:`curvfx.empirical_fisher`, from the per-sample output
    gradients (never the P × P matrix), after one forward pass without gradients that
    checks the targets. A generic callable ``loss_fn`` is taken as a mean over the N samples.

    Differs from torch-secorder in: torch-secorder squares the batch gradient,
    ``(∇_θ L)² = ((1/N) Σ_n g_n)²``, which is not the diagonal of any Fisher; curvfx uses
    the per-sample gradients (curvlinops' convention for the scaling).

    Args:
        model: The ``nn.Module`` (its trainable parameters, ``named_parameters()`` order;
            no BatchNorm in train mode: samples must be independent).
        loss_fn: A torch loss (module or function) or any ``loss_fn(outputs, targets)``.
        inputs: Input batch [N, ...].
        targets: Targets [N, ...].

    Returns:
        A list over ``model.parameters()``, each tensor shaped like its parameter.

    Raises:
        ValueError: If the batch is empty, the targets do not fit the loss, or the model
            couples samples (BatchNorm in train mode: call ``model.eval()``).
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    op, params, index = _empirical_fisher(model, loss_fn, inputs, targets, "empirical_fisher_diagonal")
    d = diagonal(op, method="exact")  # Z Σ_n (∇_θ L_n)²
    return model_result(unravel(d, params), "list", list(model.parameters()), index)


def empirical_fisher_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    num_samples: int = 1,
) -> Tensor:
    """Trace of the empirical Fisher of :func:`empirical_fisher_diagonal`, ``Z Σ_n ‖∇_θ L_n‖²``, exactly.

    Computed by :func:`curvfx.trace` (``method="exact"``): the sum of the exact diagonal,
    N per-sample gradients; no random probes.

    Differs from torch-secorder in: 1. per-sample gradients, as in
    :func:`empirical_fisher_diagonal` (torch-secorder: ``‖∇_θ L‖²`` of the batch gradient);
    2. ``num_samples`` is validated but unused, as in torch-secorder (the trace is exact).

    Args:
        model: The ``nn.Module``.
        loss_fn: A torch loss (module or function) or any ``loss_fn(outputs, targets)``.
        inputs: Input batch [N, ...].
        targets: Targets [N, ...].
        num_samples: Accepted for compatibility (a positive int); no effect.

    Returns:
        A 0-d tensor.

    Raises:
        ValueError: If ``num_samples`` is not a positive int, or as
            :func:`empirical_fisher_diagonal`.
    """
    check_count(num_samples, "num_samples")
    op, _, _ = _empirical_fisher(model, loss_fn, inputs, targets, "empirical_fisher_trace")
    return trace(op, method="exact")


def generalized_fisher_diagonal(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    create_graph: bool = False,
) -> list[Tensor]:
    """Exact diagonal of the Fisher of the categorical likelihood of ``outputs``.

        F = Σ_n E_{ỹ ~ p_n}[∇_θ log p_n(ỹ) ∇_θ log p_n(ỹ)ᵀ] = Σ_n J_nᵀ (diag p_n - p_n p_nᵀ) J_n

    ``outputs`` [N, C] (or [N, C, d1, …], positions then count as samples) are what
    ``model`` computed, *with their autograd graph*: logits, or log-probabilities (the
    same F, since ``log_softmax`` of log-probabilities changes nothing). ``p_n =
    softmax(outputs_n)`` and ``J_n = ∂ outputs_n / ∂θ`` are read from that graph. F is a
    sum over samples (the Fisher of the batch's joint likelihood), the GGN of
    ``F.cross_entropy(outputs, targets, reduction="sum")``. ``targets`` (class indices [N])
    only mark positions to leave out (``-100``). The diagonal is ``Σ_{n,k} (J_nᵀ s_kn)²``
    with ``s_kn`` the columns of the cross-entropy Fisher factor, by N·C vector-Jacobian
    products batched through the graph (which is kept: ``outputs`` can be used again).

    Differs from torch-secorder in: torch-secorder returns the squared gradient of the
    summed negative log-likelihood at the given targets, ``(Σ_n ∇_θ ℓ_n)²``; curvfx returns
    the Fisher of the predictive distribution, as documented there ("the expectation of
    the outer product of the gradients of the log-likelihood").

    Args:
        model: The ``nn.Module`` that computed ``outputs`` (its trainable parameters).
        outputs: The model's outputs (logits or log-probabilities) [N, C, ...], attached
            to the autograd graph.
        targets: Class indices [N, ...] (or class probabilities shaped like ``outputs``).
        loss_type: ``"nll"``, the only type torch-secorder documents.
        create_graph: If True, the diagonal is differentiable with respect to the
            parameters (through J and p).

    Returns:
        A list over ``model.parameters()``, each tensor shaped like its parameter.

    Raises:
        ValueError: If ``loss_type`` is not ``"nll"``, ``outputs`` has fewer than two
            dimensions (these two errors are also ``NotImplementedError``, which
            torch-secorder raises there) or no autograd graph, a graph that reaches none
            of ``model``'s trainable parameters (outputs of another model, e.g. a copy), or
            ``targets`` do not fit.
    """
    op, params, index = recorded_fisher(model, outputs, targets, loss_type, create_graph)
    d = diagonal(op, method="exact")  # Σ_{n,k} (J_nᵀ s_kn)²
    return model_result(unravel(d, params), "list", list(model.parameters()), index)


def generalized_fisher_trace(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    num_samples: int = 1,
    create_graph: bool = False,
) -> Tensor:
    """Exact trace of the Fisher of :func:`generalized_fisher_diagonal`, ``Σ_{n,k} ‖J_nᵀ s_kn‖²``.

    Computed by :func:`curvfx.trace` (``method="exact"``): the sum of the exact diagonal.

    Differs from torch-secorder in: 1. the Fisher of the predictive, as in
    :func:`generalized_fisher_diagonal` (torch-secorder: ``‖Σ_n ∇_θ ℓ_n‖²``); 2.
    ``num_samples`` is validated but unused, as in torch-secorder (the trace is exact).

    Args:
        model: The ``nn.Module`` that computed ``outputs``.
        outputs: The model's outputs [N, C, ...], attached to the autograd graph.
        targets: Class indices [N, ...].
        loss_type: ``"nll"``.
        num_samples: Accepted for compatibility (a positive int); no effect.
        create_graph: If True, the trace is differentiable with respect to the parameters.

    Returns:
        A 0-d tensor.

    Raises:
        ValueError: If ``num_samples`` is not a positive int, or as
            :func:`generalized_fisher_diagonal`.
    """
    check_count(num_samples, "num_samples")
    op, _, _ = recorded_fisher(model, outputs, targets, loss_type, create_graph)
    return trace(op, method="exact")


def _empirical_fisher(
    model: nn.Module, loss_fn: Any, inputs: Any, targets: Any, caller: str
) -> tuple[Any, dict, dict]:
    """The empirical-Fisher operator on the batch, its parameters and their names.

    The targets are checked against the outputs of one forward pass without gradients
    first (the factored diagonal does not check them). ``caller`` names the seed function
    in errors.
    """
    fn, params, index = model_parts(model, False)
    _check_independent_samples(fn, caller)
    loss = get_loss(loss_fn)
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets: {caller} expected a tensor, got {type(targets).__name__}")
    with torch.no_grad():
        loss.check(fn(params, inputs), targets)
    return empirical_fisher(fn, loss, (inputs, targets), params=params), params, index


def _check_independent_samples(fn: Callable, caller: str, alternative: str = "") -> None:
    """Raise if the model made pure couples the samples of a batch (BatchNorm on batch statistics).

    The exact diagonals ``Σ_n Σ_k (J_nᵀ s_kn)²`` of the seed functions are sums over
    per-sample Jacobians J_n (per-sample gradients for the empirical Fisher), which such a
    model does not have. The message names ``caller`` and gives advice that applies to it
    (the core's message names ``method=``, an argument the seed functions lack), then
    ``alternative``.
    """
    check_independent_samples(
        fn,
        f"model: {caller}",
        f"call model.eval() before {caller} (a BatchNorm with track_running_stats=True then "
        f"uses its running statistics){alternative}",
    )


def _over_live(op: LinearOperator, params: dict[str, Tensor]) -> LinearOperator:
    """``op`` over the live ``params`` instead of its detached copies (for ``create_graph``).

    Operators hold detached parameters (a fixed matrix); over live ones the exact diagonal
    takes the generic per-sample ``vmap`` route, which is differentiable in them.
    """
    live = copy.copy(op)
    live.params = params
    return live
