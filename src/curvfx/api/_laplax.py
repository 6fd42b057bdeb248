"""laplax's GGN-vector product factories (``laplax.curv.ggn``) for PyTorch, on :func:`curvfx.ggn_vp`.

Differs from laplax (JAX) in: 1. PyTorch tensors and ``torch.func`` in place of JAX arrays
and ``jax.vmap``/``jax.linearize``; parameters may be any optree pytree. 2. ``vec`` may also
be a flat tensor [P] (the result is then flat). 3. ``data`` may also be an ``(input, target)``
tuple. 4. Targets of the string losses are checked against the outputs (laplax ignores
them), and ``"cross_entropy"`` also works with ``vmap_over_data=False``. The numbers are
laplax's otherwise; ``docs/migration-laplax.md`` lists every difference.

Both factories return ``factor · Σ_n J_nᵀ H_n J_n v`` (a sum over the data points, not a
mean), computed by one :func:`curvfx.ggn_vp` call per product with an output-space loss
whose Hessian is ``blockdiag_n(H_n)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch  # noqa: F401  (used by the doctests)
from torch import Tensor
from torch.func import vmap

from curvfx._arguments import check_count, check_flag, real_number
from curvfx._errors import describe
from curvfx._pytree import as_tree, leaves, ravel, tree_map
from curvfx.func import ggn_vp, hvp
from curvfx.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss, get_loss

__all__ = ["create_ggn_mv", "create_ggn_mv_without_data"]

PyTree = Any
LOSS_STRINGS = ("mse", "cross_entropy", "binary_cross_entropy", "none")  # laplax's LossFn values


def create_ggn_mv_without_data(
    model_fn: Callable[[Any, PyTree], Tensor],
    params: PyTree,
    loss_fn: str | Callable | None,
    factor: float | Tensor,
    *,
    vmap_over_data: bool = True,
    loss_hessian_mv: Callable | None = None,
) -> Callable[[PyTree | Tensor, Any], PyTree | Tensor]:
    """GGN-vector product at ``params`` for any batch: ``ggn_mv(vec, data)``.

        G v = factor · Σ_n J_nᵀ H_n J_n v,   J_n = ∂f_n/∂θ [C, P],   f_n = model_fn(x_n, params)

    summed (not averaged) over the N data points of ``data``; C is the number of outputs of
    one data point. H_n [C, C] is the output-space Hessian of data point n:

    * ``"mse"``: ``H_n = 2 I``, the Hessian of ``Σ_c (f_nc - y_nc)²`` (``MSELoss(reduction="sum")``),
      so ``G = 2 · factor · Σ_n J_nᵀ J_n``: no ``1/N``, no ``1/C``;
    * ``"cross_entropy"``: ``H_n = diag(p_n) - p_n p_nᵀ``, ``p_n = softmax(f_n)``, the Hessian of
      ``F.cross_entropy(f, y, reduction="sum")`` on logits f [N, C] with class-index [N] or
      one-hot [N, C] targets (probability targets t_n scale H_n by ``Σ_c t_nc``, the loss as
      written); outputs with more than two dims are rejected;
    * ``"binary_cross_entropy"``: ``H_n = diag(σ(f_n)(1 - σ(f_n)))``, on *logits* f (as
      ``BCEWithLogitsLoss(reduction="sum")``; not torch's ``binary_cross_entropy`` on
      probabilities), float targets shaped like f;
    * ``"none"``: ``H_n = I``, so ``G = factor · Σ_n J_nᵀ J_n``;
    * a torch loss or any callable ``loss_fn(pred, target) -> scalar``, with
      ``vmap_over_data=True``: ``H_n = ∇²_f loss_fn(f, y_n)`` at ``f = f_n``, the loss applied to
      data point n alone, without a batch dimension, with its own reduction (so
      ``nn.MSELoss()`` gives ``H_n = (2/C) I``); with ``vmap_over_data=False``: the loss as
      written on the whole batch, ``G = factor · Jᵀ ∇²_F loss_fn(F, Y) J`` (``nn.MSELoss()``
      gives ``(2/(N·C)) · factor · JᵀJ``). Both are what laplax computes;
    * ``loss_hessian_mv`` (replaces ``loss_fn``): ``H u`` is
      ``loss_hessian_mv(u, pred=f, target=y)``, called per data point (under
      ``torch.func.vmap``) when ``vmap_over_data`` is True, on the whole batch otherwise.

    ``vmap_over_data=True`` calls ``model_fn`` on single data points (no batch dimension),
    vectorized by ``torch.func.vmap``, as laplax does; ``False`` calls it once on the batch,
    so it must accept batches. Both process the batch in one pass (about the same memory)
    and give the same numbers for the string losses and for sum-reduced losses. Cost: one
    forward pass with Jv and one backward pass per product (:func:`curvfx.ggn_vp`); J is
    never formed.

    Args:
        model_fn: Pure ``model_fn(input, params) -> outputs`` (laplax's order: input first).
        params: Parameter pytree θ (dicts, lists, tuples, nested) at which G is evaluated.
        loss_fn: One of ``"mse"``, ``"cross_entropy"``, ``"binary_cross_entropy"``, ``"none"``,
            a torch loss module or function, or a callable; may be None if
            ``loss_hessian_mv`` is given.
        factor: Real scaling of the result (a number or a 0-dim tensor).
        vmap_over_data: Evaluate ``model_fn`` (and a callable loss) per data point.
        loss_hessian_mv: Optional output-space product ``(jv, pred, target) -> H jv``.

    Returns:
        ``ggn_mv(vec, data)``: ``vec`` is a pytree like ``params`` or a flat tensor [P];
        ``data`` a dict with ``"input"`` and ``"target"`` (leading dimension N) or an
        ``(input, target)`` tuple. It returns ``G vec`` in the form of ``vec``.

    Raises:
        ValueError: On an unknown loss string, ``loss_fn=None`` without
            ``loss_hessian_mv``, or a non-finite ``factor``; from ``ggn_mv``: ``data``
            without ``"input"``/``"target"``, ``vec`` not matching ``params`` (the message
            names the leaf), targets that do not fit the loss, an empty batch.
        TypeError: If ``model_fn`` or ``loss_fn`` is not callable, ``factor`` is not a
            real number, or ``data`` is neither a dict nor a pair.

    Example:
        >>> params = {"w": torch.zeros(2)}
        >>> ggn_mv = create_ggn_mv_without_data(lambda x, p: x @ p["w"], params, "mse", factor=0.5)
        >>> data = {"input": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "target": torch.zeros(2)}
        >>> ggn_mv({"w": torch.tensor([1.0, 1.0])}, data)  # 0.5 · 2 Σ_n x_n x_nᵀ v
        {'w': tensor([1., 4.])}
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn: expected a callable model_fn(input, params), got {describe(model_fn)}")
    check_flag(vmap_over_data, "vmap_over_data")
    scale = real_number(factor, "factor")
    if isinstance(factor, Tensor):  # a tensor factor stays one (0-dim), so gradients reach it
        scale = factor.reshape(())
    loss = _output_loss(loss_fn, loss_hessian_mv, per_datum=vmap_over_data)
    fn = _per_datum(model_fn) if vmap_over_data else lambda p, x: model_fn(x, p)

    def ggn_mv(vec: PyTree | Tensor, data: Any) -> PyTree | Tensor:
        x, y = _unpack(data)
        tree, flat = as_tree(vec, params, "vec")
        gv = ggn_vp(fn, loss, params, x, y, tree)  # Σ_n J_nᵀ H_n J_n v
        out = tree_map(lambda t: scale * t, gv)  # factor · G v
        return ravel(out) if flat else out

    return ggn_mv


def create_ggn_mv(
    model_fn: Callable[[Any, PyTree], Tensor],
    params: PyTree,
    data: Any,
    loss_fn: str | Callable | None = None,
    *,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
    vmap_over_data: bool = True,
    loss_hessian_mv: Callable | None = None,
) -> Callable[[PyTree | Tensor], PyTree | Tensor]:
    """GGN-vector product at ``params`` on the fixed batch ``data``: ``ggn_mv(vec)``.

        G v = (M / S) · Σ_{n=1}^{N} J_nᵀ H_n J_n v,   M = num_total_samples,   S = num_curv_samples

    with J_n and H_n as in :func:`create_ggn_mv_without_data` (``factor = M / S``). ``S``
    defaults to N, the batch size of ``data`` (leading dimension of its input), and ``M`` to
    ``S``: by default the factor is 1 and G is the *sum* over the batch. Setting ``M`` to
    the size of the training set rescales the batch sum to an estimate of the sum over the
    whole training set. Give ``S`` when one data point holds several loss terms (e.g.
    pixel-wise segmentation) and you count terms, not points.

    Args:
        model_fn: Pure ``model_fn(input, params) -> outputs`` (laplax's order: input first).
        params: Parameter pytree θ.
        data: Dict with ``"input"`` and ``"target"`` (leading dimension N), or an
            ``(input, target)`` tuple.
        loss_fn: As in :func:`create_ggn_mv_without_data`; exactly one of ``loss_fn`` and
            ``loss_hessian_mv`` must be given (as laplax requires here).
        num_curv_samples: S, a positive int (default N).
        num_total_samples: M, a positive int (default S).
        vmap_over_data: As in :func:`create_ggn_mv_without_data`.
        loss_hessian_mv: As in :func:`create_ggn_mv_without_data`.

    Returns:
        ``ggn_mv(vec)`` with ``vec`` a pytree like ``params`` or a flat tensor [P];
        it returns ``G vec`` in the form of ``vec``.

    Raises:
        ValueError: If both or neither of ``loss_fn`` and ``loss_hessian_mv`` are given,
            the counts are not positive ints, ``data`` lacks ``"input"``/``"target"``, or as
            :func:`create_ggn_mv_without_data`.
        TypeError: As :func:`create_ggn_mv_without_data`.

    Example:
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> data = {"input": X, "target": torch.zeros(2)}
        >>> ggn_mv = create_ggn_mv(lambda x, p: x @ p["w"], {"w": torch.zeros(2)}, data, "mse")
        >>> ggn_mv(torch.tensor([1.0, 1.0]))  # 2 XᵀX v: a sum over the 2 points
        tensor([2., 8.])
        >>> create_ggn_mv(
        ...     lambda x, p: x @ p["w"], {"w": torch.zeros(2)}, data, "mse", num_total_samples=10
        ... )(torch.tensor([1.0, 1.0]))  # (10 / 2) · 2 XᵀX v
        tensor([10., 40.])
    """
    if loss_fn is None and loss_hessian_mv is None:
        raise ValueError("loss_fn, loss_hessian_mv: give one of them (both are None)")
    if loss_fn is not None and loss_hessian_mv is not None:
        raise ValueError("loss_fn, loss_hessian_mv: give only one of them (laplax rejects both)")
    x, _ = _unpack(data)
    if num_curv_samples is None:
        num_curv_samples = _batch_size(x)
    num_curv_samples = check_count(num_curv_samples, "num_curv_samples")
    if num_total_samples is None:
        num_total_samples = num_curv_samples
    num_total_samples = check_count(num_total_samples, "num_total_samples")
    ggn_mv = create_ggn_mv_without_data(
        model_fn,
        params,
        loss_fn,
        num_total_samples / num_curv_samples,
        vmap_over_data=vmap_over_data,
        loss_hessian_mv=loss_hessian_mv,
    )

    def ggn_mv_on_data(vec: PyTree | Tensor) -> PyTree | Tensor:
        return ggn_mv(vec, data)

    return ggn_mv_on_data


class _OutputHessian(Loss):
    """A sum-reduced curvfx :class:`Loss` known only by its output-space product ``(f, y, u) -> H u``.

    Its value is unknown (``ggn_vp`` never needs it). ``check`` (optional) adds a test of
    the outputs and targets.
    """

    reduction = "sum"

    def __init__(self, name: str, product: Callable, check: Callable | None = None):
        self.name, self.product, self.extra_check = name, product, check

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Not available: only the Hessian product of this loss is known."""
        raise ValueError(f"{self.name}: only the loss's Hessian product is known, not its value")

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Outputs must be a non-empty batch [N, ...]; plus the optional extra check."""
        if not isinstance(outputs, Tensor) or outputs.dim() == 0 or outputs.shape[0] == 0:
            raise ValueError(
                f"outputs: model_fn must return a non-empty batch [N, ...], got {describe(outputs)}"
            )
        if self.extra_check is not None:
            self.extra_check(outputs, targets)

    def normalizer(self, targets: Tensor) -> float:
        """1: a sum over the data points."""
        return 1.0

    def _hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        out = self.product(outputs, targets, v)
        if not isinstance(out, Tensor) or out.shape != v.shape:
            raise ValueError(
                f"{self.name}: must return a tensor shaped like its jv argument {list(v.shape)}, "
                f"got {describe(out)}"
            )
        return out


def _output_loss(loss_fn: Any, loss_hessian_mv: Callable | None, *, per_datum: bool) -> Loss:
    """The sum-reduced curvfx loss whose output Hessian is ``blockdiag_n(H_n)``."""
    if loss_hessian_mv is not None:
        if not callable(loss_hessian_mv):
            raise TypeError(f"loss_hessian_mv: expected a callable, got {describe(loss_hessian_mv)}")
        return _OutputHessian("loss_hessian_mv", _user_product(loss_hessian_mv, per_datum))
    if loss_fn is None:
        raise ValueError("loss_fn: None is only allowed together with loss_hessian_mv")
    if isinstance(loss_fn, str):
        if loss_fn not in LOSS_STRINGS:
            raise ValueError(f"loss_fn: unknown loss {loss_fn!r}; expected one of {LOSS_STRINGS}")
        return _string_loss(str(loss_fn))
    loss = get_loss(loss_fn)  # TypeError for a non-callable
    if not per_datum:
        return loss  # the loss as written on the whole batch
    return _OutputHessian(loss.name, _per_datum_hessian(loss_fn))


def _string_loss(name: str) -> Loss:
    if name == "mse":
        return MSELoss(reduction="sum")  # H_n = 2 I
    if name == "binary_cross_entropy":
        return BCEWithLogitsLoss(reduction="sum")  # H_n = diag(σ(1 - σ))
    if name == "cross_entropy":  # H_n = diag(p_n) - p_n p_nᵀ
        return _OutputHessian("cross_entropy", CrossEntropyLoss(reduction="sum").hessian_vp, _logits_2d)
    return _OutputHessian("none", lambda f, y, u: u)  # H_n = I


def _logits_2d(outputs: Tensor, targets: Tensor) -> None:
    if outputs.dim() != 2:
        raise ValueError(
            f"outputs: loss_fn='cross_entropy' needs logits [N, C] (one vector per data point), got "
            f"{list(outputs.shape)}; for class dim 1 of [N, C, ...] use "
            "nn.CrossEntropyLoss(reduction='sum') with vmap_over_data=False"
        )


def _user_product(loss_hessian_mv: Callable, per_datum: bool) -> Callable:
    """``(f, y, u) -> H u`` from laplax's ``loss_hessian_mv(jv, pred=, target=)``."""

    def call(u, f, y):
        return loss_hessian_mv(u, pred=f, target=y)

    if per_datum:  # one data point at a time, as jax.vmap(loss_hessian_mv)
        return lambda f, y, u: vmap(call, randomness="different")(u, f, y)
    return lambda f, y, u: call(u, f, y)


def _per_datum_hessian(loss_fn: Callable) -> Callable:
    """``(f, y, u) -> [H_n u_n]_n`` with ``H_n = ∇²_f loss_fn(f, y_n)`` at ``f_n`` (no batch dim)."""

    def one(f, y, u):
        return hvp(lambda g: loss_fn(g, y), f, u)  # H_n u_n

    return lambda f, y, u: vmap(one, randomness="different")(f, y, u)


def _per_datum(model_fn: Callable) -> Callable:
    """``fn(params, x)`` evaluating ``model_fn(x_n, params)`` per data point under vmap."""

    def fn(p, x):
        return vmap(lambda xn: model_fn(xn, p), randomness="different")(x)

    return fn


def _unpack(data: Any) -> tuple[Any, Any]:
    if isinstance(data, Mapping):
        missing = [key for key in ("input", "target") if key not in data]
        if missing:
            raise ValueError(
                f"data: missing key(s) {missing}; expected a dict with 'input' and 'target', "
                f"got keys {list(data)}"
            )
        return data["input"], data["target"]
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"data: expected an (input, target) pair, got {len(data)} items")
        return data[0], data[1]
    raise TypeError(
        f"data: expected a dict with 'input' and 'target' or an (input, target) tuple, got {describe(data)}"
    )


def _batch_size(x: Any) -> int:
    x_leaves = [t for t in leaves(x) if isinstance(t, Tensor)]
    if not x_leaves or x_leaves[0].dim() == 0:
        raise ValueError(f"data['input']: expected a batch of tensors [N, ...], got {describe(x)}")
    if x_leaves[0].shape[0] == 0:
        raise ValueError("data['input']: the batch is empty (N = 0)")
    return int(x_leaves[0].shape[0])
