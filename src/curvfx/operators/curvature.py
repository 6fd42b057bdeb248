"""Curvature operators over data: Hessian, GGN, Fisher (exact / MC / empirical).

Built by the constructors of :mod:`curvfx.operators.constructors`.

Each operator is a thin object over a transform of :mod:`curvfx.func`; the base class
combines batches exactly. With ``L = loss_fn`` on the concatenation of all batches and
``Z_b`` the loss's normalizer of batch b (``L_b = (1/Z_b) Σ_{i∈b} ℓ_i`` for the mean, e.g.
Z_b = N_b for cross-entropy, N_b·C for MSE):

    A = factor · Σ_b Z_b A_b / Σ_b Z_b   (a mean reduction),   A = factor · Σ_b A_b   ("sum")

so a product over several batches equals the product over their concatenation, with
unequal batch sizes handled exactly. ``factor`` rescales (e.g. to the size of a full
dataset when ``data`` is a subset, as laplax's ``factor``).

Data parallel (``process_group=``, see :mod:`curvfx.operators._distributed`): each rank of
the group holds its own batches; both sums above run over the batches of all ranks (one
all-reduce per product), so every rank gets the single-process result on the
concatenation of all ranks' data.

Model state: the model is evaluated in the mode it is in (train/eval); BatchNorm running
statistics are never updated (see :func:`curvfx.make_functional`). Dropout and other random
operations follow ``randomness`` (:mod:`curvfx.operators._randomness`): "fixed" (default)
replays the same masks in every product (batch b under ``fork_rng`` seeded with
``seed + b``), so the operator is one fixed symmetric matrix and the global RNG is left as
it was; "off" switches the dropout modules to eval during products; "sample" draws anew
in every product (the columns of a matmat share one draw).

Parameter subsets: ``op.restrict(names)`` is the same operator over the parameters
``names`` selects (names or module prefixes), the others held fixed: the diagonal block
``A[S, S]`` (:mod:`curvfx.operators._restrict`).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvfx._arguments import check_chunk_size, real_number
from curvfx._chunking import SAMPLE_NUMBERS, columns_per_call
from curvfx._engines import draw_seed, kept_rng
from curvfx._errors import check_batch, inside_transform
from curvfx._factors import check_reduction_at, output_factor
from curvfx._memory import fitting_chunk
from curvfx._pytree import batch_size, num_params, ravel, unravel
from curvfx._structured import check_backend, raveled_squares
from curvfx.func import check_fisher_kind, fisher_vp, ggn_vp, hvp
from curvfx.functional import check_independent_samples, holding
from curvfx.losses import AutogradLoss, Loss, get_loss
from curvfx.operators._base import PARAMS_DEVICE, PARAMS_DTYPE, LinearOperator, apply_columns, fixed_params
from curvfx.operators._compile import CompiledProduct, compile_options
from curvfx.operators._data import Batches
from curvfx.operators._distributed import rank_stream_seed, resolve_process_group, summed_over_ranks
from curvfx.operators._randomness import (
    batch_randomness,
    check_diagonal_masks,
    check_randomness,
    fixed_seed,
    replay_batch_seed,
)
from curvfx.operators._restrict import selected_params

__all__ = [
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
]

PyTree = Any


class CurvatureOperator(LinearOperator):
    """Base of the P × P curvature operators: batch weighting, formats, exact diagonals.

    ``__init__`` sets the fields every operator has; subclasses implement
    ``_product(b, x, y, v)`` (the curvature of batch b's loss as written, times the
    params-shaped ``v``).
    """

    symmetric = True
    model_fn: Callable
    params: PyTree
    loss: Loss
    data: Batches
    factor: float
    process_group: Any = None  # a torch.distributed ProcessGroup: data parallel over its ranks
    randomness: str = "fixed"  # random operations in the model, see curvfx.operators._randomness
    model_seed: int | None = None  # the seed of randomness="fixed"

    def __init__(
        self,
        model_fn,
        loss_fn,
        params,
        data,
        *,
        factor=1.0,
        chunk_size=None,
        compile=False,
        process_group=None,
        randomness="fixed",
        batch_size_fn=None,
    ):
        """The fields every curvature operator has (validated; the ``"fixed"`` seed drawn).

        Raises:
            TypeError: If ``factor`` is not a real number (int, float or one-element tensor;
                a bool or a string is not).
            ValueError: If ``factor`` is not finite, or ``chunk_size`` is neither None nor
                an int ≥ 1 (a bool is not).
        """
        self.model_fn, self.params = model_fn, fixed_params(params)
        self.loss, self.data = get_loss(loss_fn), Batches(data, batch_size_fn)
        # a callable's reduction curvfx took (not an AutogradLoss the user declared): checked per batch
        self._guessed_reduction = isinstance(self.loss, AutogradLoss) and not isinstance(loss_fn, Loss)
        self.factor, self.chunk_size = real_number(factor, "factor"), check_chunk_size(chunk_size)
        self.process_group = resolve_process_group(process_group)
        self.randomness = check_randomness(randomness, model_fn)
        self.model_seed = fixed_seed(randomness, self.process_group, self.device)
        self.compile_options = compile_options(compile, model_fn)

    def restrict(self, names: str | list[str]) -> CurvatureOperator:
        """The operator over the parameters ``names`` selects, the others held fixed at their values.

        ``names``: a parameter name or a module prefix (``"encoder.layer.0"`` selects every
        parameter whose name starts with ``"encoder.layer.0."``), or a list of them. The
        result, of the same class with the same loss, data, factor, options and seeds (the
        same dropout masks and Monte-Carlo targets), is the diagonal block ``A[S, S]`` of
        this operator for the selected set S, in the order of ``params``.

        Raises:
            ValueError: If a name selects nothing, or ``params`` is not a dict with string
                keys (a pure function's other pytrees); names ``names``.
        """
        op = copy.copy(self)
        op.params = selected_params(self.params, names)
        others = {k: v for k, v in self.params.items() if k not in op.params}
        op.model_fn = holding(self.model_fn, others, list(self.params))
        op._compiled, op._measured_columns = None, None
        return op

    @property
    def shape(self) -> tuple[int, int]:
        """(P, P)."""
        p = num_params(self.params)
        return (p, p)

    dtype, device = PARAMS_DTYPE, PARAMS_DEVICE

    @property
    def in_like(self) -> PyTree:
        """The parameters: pytree inputs and outputs are shaped like them."""
        return self.params

    out_like = in_like

    compile_options: dict | None = None
    compiled_strategy = "auto"  # the torch.func engine a compiled product traces
    _compiled: CompiledProduct | None = None

    def _product(self, b: int, x: Any, y: Tensor, v: PyTree, strategy: str) -> PyTree:
        raise NotImplementedError(f"{type(self).__name__} is abstract")

    def _flat_product(self, b: int, x: Any, y: Tensor, v: Tensor, strategy: str = "auto") -> Tensor:
        return ravel(self._product(b, x, y, unravel(v, self.params), strategy))

    def _compiled_product(self) -> CompiledProduct | None:
        """The compiled product (made on first use) when the operator was built with ``compile``."""
        if self.compile_options is not None and self._compiled is None:

            def product(x: Any, y: Tensor, v: Tensor) -> Tensor:
                if self.randomness == "fixed" and not torch.compiler.is_compiling():
                    replay_batch_seed(self.device)  # the eager check sees the compiled call's draws
                return self._flat_product(0, x, y, v, self.compiled_strategy)

            self._compiled = CompiledProduct(product, type(self).__name__, self.compile_options)
        return self._compiled

    def _matvec(self, v: Tensor) -> Tensor:
        compiled = self._compiled_product()
        if compiled is not None:
            return self._over_batches(lambda b, x, y: compiled("matvec", x, y, v), v)
        return self._over_batches(lambda b, x, y: self._flat_product(b, x, y, v), v)

    def _matmat(self, V: Tensor) -> Tensor:
        compiled = self._compiled_product()
        if compiled is not None:
            return self._over_batches(lambda b, x, y: compiled("matmat", x, y, V), V)
        name = type(self).__name__

        def per_batch(b: int, x: Any, y: Tensor) -> Tensor:
            shared = self.shares_graph or V.shape[1] > self._columns_per_call(x)
            if self.chunk_size is None and V.shape[1] > 1 and shared:
                return self._product(b, x, y, V, "auto")  # a loop over columns of one forward pass
            return apply_columns(lambda v: self._flat_product(b, x, y, v), V, self.chunk_size, name)

        return self._over_batches(per_batch, V)

    _measured_columns: int | None = None
    shares_graph = False  # True: matmats always loop over the columns of one shared graph

    def _columns_per_call(self, x: Any) -> int:
        """Columns one vmap call may batch (:func:`columns_per_call`, measured on the first batch)."""
        if inside_transform():  # the products vmap over columns anyway
            return sys.maxsize
        if self._measured_columns is None:
            self._measured_columns = columns_per_call(self.model_fn, self.params, x)
        return self._measured_columns

    def _over_batches(
        self, per_batch: Callable[[int, Any, Tensor], Tensor], v: Tensor | None = None
    ) -> Tensor:
        """``factor · Σ_b w_b per_batch(b)`` with the weights of the module docstring.

        With a ``process_group``, ``Σ_b Z_b per_batch(b)`` and ``Σ_b Z_b`` over this rank's
        batches are summed over the ranks in one all-reduce. ``v`` is the vector [P] or
        matrix [P, K] being multiplied (the result's shape; it must agree across ranks),
        None for a diagonal [P].
        """
        mean = self.loss.reduction != "sum"
        per_batch = self._with_randomness(per_batch)
        accumulated = torch.promote_types(self.dtype, torch.float32)  # Z_b · term overflows 16 bits

        shape = (self.shape[0],) if v is None else tuple(v.shape)

        def local() -> tuple[Tensor, Any]:
            total, z_total = None, 0.0
            for b, (x, y) in enumerate(self.data):
                self._check_reduction(b, x, y)
                z = self.loss.normalizer(y) if mean else 1.0
                if mean and bool(z == 0):
                    _check_all_ignored(self.loss, y)
                    continue  # every position ignored: Z_b = 0 weighs out its (0/0 = nan) mean loss
                term = per_batch(b, x, y).to(accumulated) * z
                total = term if total is None else total + term
                z_total = z_total + z
            if total is None:  # no batch counted (an error below unless other ranks count some)
                total = torch.zeros(shape, dtype=accumulated, device=self.device)
            return total, z_total

        if self.process_group is None:
            batches = iter(self.data)
            first = next(batches, None)
            if first is not None and next(batches, None) is None:  # one batch: no weighting
                x, y = first
                if mean and bool(self.loss.normalizer(y) == 0):
                    _check_all_ignored(self.loss, y)
                    raise ValueError("data: every target position is ignored (the mean's normalizer is 0)")
                out = per_batch(0, x, y)
                return out if self.factor == 1.0 else self.factor * out
            total, z_total = local()
        else:
            agree = {"the parameters": self.params} if v is None else {"v": v, "the parameters": self.params}
            total, z_total = summed_over_ranks(
                local,
                shape,
                self.process_group,
                dtype=self.dtype,
                device=self.device,
                agree=agree,
                who=type(self).__name__,
            )
        if mean and bool(z_total == 0):
            raise ValueError("data: every target position is ignored (the mean's normalizer is 0)")
        return (self.factor * (total / z_total if mean else total)).to(self.dtype)

    _checked_reductions: frozenset[int] = frozenset()

    def _check_reduction(self, b: int, x: Any, y: Tensor) -> None:
        """A callable loss's declared reduction against batch ``b`` (:meth:`AutogradLoss.check_reduction`).

        Batches are weighted by the normalizer ``Z_b`` of the reduction curvfx took for a
        callable (a lambda: "batchmean"); one that normalizes by its targets
        (``ignore_index``, class weights) or sums contradicts it, and the weighted sum would
        silently differ from the concatenated batch's curvature. Checked once per batch
        index, on the outputs of one forward pass (one random state for it, as for the
        products); a :class:`~curvfx.losses.AutogradLoss` the user built declares its
        reduction and is not checked (a loss that couples the samples can only be declared).
        """
        if not self._guessed_reduction or inside_transform() or b in self._checked_reductions:
            return
        with (
            torch.enable_grad(),  # a forward pass may differentiate (forces as -dE/dx)
            kept_rng(self.device),
            batch_randomness(self.randomness, self.model_seed, b, self.model_fn, self.device),
        ):
            outputs = self.model_fn(self.params, x)
        if isinstance(outputs, Tensor):  # other outputs are the callable's own business
            check_reduction_at(self.loss, outputs.detach(), y)
        self._checked_reductions = self._checked_reductions | {b}

    def _with_randomness(
        self, per_batch: Callable[[int, Any, Tensor], Tensor]
    ) -> Callable[[int, Any, Tensor], Tensor]:
        """``per_batch`` run under the operator's ``randomness`` for its batch b."""

        def run(b: int, x: Any, y: Tensor) -> Tensor:
            with batch_randomness(self.randomness, self.model_seed, b, self.model_fn, self.device):
                return per_batch(b, x, y)

        return run


class HessianOperator(CurvatureOperator):
    """Hessian of the loss as written, ``H = ∇²_θ L(θ)``, over all batches of ``data``.

    Cost per product: one HVP per batch (:func:`curvfx.hvp`, about 2–3 gradients).

    Raises:
        ValueError: In a product, for an empty batch, and, for a loss curvfx knows, outputs
            that are not one tensor or targets the loss does not accept (shape, class range),
            with :func:`curvfx.ggn_vp`'s messages. A callable loss gets its outputs as the
            model returns them (a tuple with an auxiliary term, say) and ``y`` as given.
    """

    compiled_strategy = "rev-rev"
    # one forward and first backward pass shared by all columns beat vmap on every model
    # measured (CNN 0.6×, 784-1024-1024-10 MLP 0.8×, 784-256-256-10 MLP 1.05× of vmap's time)
    shares_graph = True

    def _product(self, b, x, y, v, strategy):
        check_batch(x, None)
        return hvp(
            lambda p: self.loss.checked_call(self.model_fn(p, x), y), self.params, v, strategy=strategy
        )


class GGNOperator(CurvatureOperator):
    """Generalized Gauss-Newton ``G = Jᵀ H_f J`` of the loss as written (:func:`curvfx.ggn_vp`).

    ``H_f = ∇²_f L`` keeps the reduction: ``MSELoss()`` gives ``(2/(N·C)) JᵀJ``. Cost per
    product: about two gradients per batch. Exact diagonal: from the loss's Hessian factor.
    """

    compiled_strategy = "func-vjp"

    def _product(self, b, x, y, v, strategy):
        return ggn_vp(self.model_fn, self.loss, self.params, x, y, v, strategy=strategy)

    def _exact_diagonal(self, backend: str = "auto") -> Tensor:
        return _factored_diagonal(self, "ggn", 1, lambda b: None, backend)


class FisherOperator(CurvatureOperator):
    """Fisher of the loss as written: ``kind`` "exact", "mc" or "empirical" (:func:`curvfx.fisher_vp`).

    * "exact": ``Σ_n J_nᵀ E_{ỹ~p(·|f_n)}[∇_f ℓ ∇_f ℓᵀ] J_n``, scaled as the loss (equals
      the GGN for MSE, cross-entropy, BCE with logits);
    * "mc": the same expectation estimated with ``num_samples`` draws per sample. The draws
      come from a generator re-seeded for each batch from one seed taken at construction
      (from ``generator``, else one draw of torch's global RNG), so the operator is one
      fixed symmetric matrix when the data is iterated in the same order. With a process
      group, rank 0's seed is broadcast at construction (a collective) and rank r's batch b
      uses ``seed + r·2³² + b``: every rank draws independent targets for its own samples,
      so the result equals the single-process one in distribution, not digit for digit;
    * "empirical": ``Z Σ_n ∇_θ L_n ∇_θ L_nᵀ`` at the data's targets (per-sample gradients
      of the loss terms, never the squared batch gradient; for the mean
      ``(1/Z) Σ_n ∇ℓ_n ∇ℓ_nᵀ``).

    Cost per product: about two gradients per batch (per-sample gradients are not
    materialized). Exact diagonal: from the output factor of the kind.
    """

    def __init__(
        self,
        model_fn,
        loss_fn,
        params,
        data,
        *,
        kind="mc",
        num_samples=1,
        generator=None,
        factor=1.0,
        chunk_size=None,
        compile=False,
        process_group=None,
        randomness="fixed",
        batch_size_fn=None,
    ):
        check_fisher_kind(kind, num_samples)
        super().__init__(
            model_fn,
            loss_fn,
            params,
            data,
            factor=factor,
            chunk_size=chunk_size,
            compile=compile,
            process_group=process_group,
            randomness=randomness,
            batch_size_fn=batch_size_fn,
        )
        self.kind, self.num_samples = kind, num_samples
        self.seed = draw_seed(generator) if kind == "mc" else 0
        if kind == "mc" and self.process_group is not None:  # rank 0's seed; a stream per rank
            self.seed = rank_stream_seed(self.seed, self.process_group, self.device)
        if self.compile_options is not None and kind == "mc":
            raise ValueError("compile: not supported for kind='mc' (its per-batch generators do not trace)")

    def _generator(self, b: int) -> torch.Generator | None:
        if self.kind != "mc":
            return None
        return torch.Generator(self.device).manual_seed(self.seed + b)

    compiled_strategy = "func-vjp"

    def _product(self, b, x, y, v, strategy):
        return fisher_vp(
            self.model_fn,
            self.loss,
            self.params,
            x,
            y,
            v,
            kind=self.kind,
            num_samples=self.num_samples,
            generator=self._generator(b),
            strategy=strategy,
        )

    def _exact_diagonal(self, backend: str = "auto") -> Tensor:
        return _factored_diagonal(self, self.kind, self.num_samples, self._generator, backend)


def _check_all_ignored(loss: Loss, y: Tensor) -> None:
    """Raise ``ValueError`` for a batch whose mean normalizer Z is 0 although positions count.

    Z = 0 with every position ignored is a batch without loss (skipped); class weights that
    cancel (Z = Σ w_y = 0 over counted positions) make torch's weighted mean 0/0 = nan.
    """
    if y.numel() == 0:
        raise ValueError(f"data: a batch has no targets (y of shape {list(y.shape)})")
    ignored = getattr(loss, "ignore_index", None)
    if ignored is None or y.is_floating_point() or not bool((y == ignored).all()):
        raise ValueError(
            "data: a batch's weighted normalizer Σ w_y is 0 (class weights cancel): its mean loss is "
            "not defined (torch gives nan)"
        )


def _factored_diagonal(op, kind: str, num_samples: int, generator_for, backend: str) -> Tensor:
    """Exact diagonal ``Σ_n Σ_k (J_nᵀ s_kn)²`` from the output factor of ``kind``, over all batches.

    ``backend``: "structured" (layer-aware, :mod:`curvfx._structured`; needs a module made
    functional), "generic" (per-sample vmap over all parameters), or "auto" (structured when
    possible). The generic route processes ``op.chunk_size`` samples at a time (default: as
    many as keep the per-sample gradients of the K factor columns, K·P_g numbers per sample
    for the P_g entries on that route, under 2²⁴ numbers per call and within the memory
    budget of :mod:`curvfx._memory`).
    """
    check_backend(backend)  # before any work
    check_diagonal_masks(op.model_fn, op.params, op.randomness, backend)
    check_independent_samples(
        op.model_fn,
        "the exact diagonal",
        "call model.eval() with running statistics, or estimate it with "
        "curvfx.diagonal(op, method='hutchinson')",
    )

    def per_batch(b, x, y):
        def factor(outputs):  # S from the outputs of the forward pass sample_squares makes
            op.loss.check(outputs, y)
            return output_factor(op.loss, outputs, y, kind, num_samples, generator_for(b))

        def chunk(k, size):  # samples per generic vmap call: K factor columns, `size` generic entries
            if op.chunk_size is not None:
                return op.chunk_size
            what = f"the exact diagonal's per-sample gradients of one sample (K·P = {k}·{size})"
            n = batch_size(x)
            fitting = fitting_chunk(what, k * size, n, op.dtype, "use method='hutchinson'")
            return min(fitting, max(1, SAMPLE_NUMBERS // max(1, k * size)))

        return raveled_squares(op.model_fn, op.params, x, factor, chunk, backend=backend)

    return op._over_batches(per_batch)
