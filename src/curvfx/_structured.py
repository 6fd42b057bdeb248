"""Layer-aware exact diagonals and per-sample gradients of known layers, in factored form.

For a layer ``z = W a (+ b)`` (``nn.Linear``; convolutions after unfolding the input into
patches) the gradient of sample n for a cotangent ``s`` at the model outputs is
``G_n = Σ_t g_nt a_ntᵀ`` with ``g = ∂⟨f, s⟩/∂z`` and t the positions (sequence steps,
spatial locations). The diagonal of ``Σ_n Σ_k J_nᵀ s_kn s_knᵀ J_n`` is ``Σ_n Σ_k G_kn ⊙ G_kn``:

* one position, one call of the layer: ``Σ_k Σ_n g_kn² a_nᵀ²`` — no per-sample gradient is
  formed (``einsum("kno,ni->oi", g², a²)``), the cost of K backward passes to the layer
  outputs (done as one batched backward) plus one contraction;
* several positions or calls (sequences, convolutions, a layer used twice): the per-sample
  layer gradients ``G_kn`` are formed for that layer only (K·N·|W| numbers) and squared.

Embeddings and the affine parameters of normalization layers have per-sample gradients
of the same kind (rows of output gradients; ``Σ_t g ⊙ x̂``): :mod:`curvfx._layers`.
Layer inputs and outputs are captured by :mod:`curvfx._capture` (forward hooks removed
before returning, also on error). Parameters of other modules (and of modules
called with options this path does not cover, or whose parameters are also used outside
their calls) take the generic per-sample route (:func:`curvfx._factors.factor_diagonal`)
restricted to those parameters, so every model the generic route accepts works, with the
same numbers. :func:`structured_sample_grads` forms the per-sample gradients ``G_n``
themselves (one cotangent per sample) for :func:`curvfx.per_sample_grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvfx._capture import captured, layer_kind, output_grads, parameter_uses, supported_layers
from curvfx._errors import check_autograd, check_output, inside_transform, needs_graph, sample_row
from curvfx._factors import factor_diagonal
from curvfx._graph import depend_on
from curvfx._layers import layer_grads, layer_squares, reads_per_sample
from curvfx._pytree import leaves, num_params, ravel, tree_map, unravel, unsqueeze_leaves
from curvfx.functional import FunctionalModel

__all__ = [
    "check_backend",
    "features_last_square",
    "not_from_batch",
    "raveled_squares",
    "sample_grads_route",
    "sample_squares",
    "sequence_first",
    "structured_diagonal",
    "structured_sample_grads",
    "tracked_batch",
]

BACKENDS = ("auto", "structured", "generic")
Factor = Tensor | Callable[[Tensor], Tensor]
Chunk = int | None | Callable[[int, int], int | None]  # (K columns, generic numbers) -> samples


def sample_squares(
    fn: Any,
    params: Any,
    x: Any,
    S: Factor,
    chunk_size: Chunk = None,
    per_sample: bool = False,
    backend: str = "auto",
    y: Any = None,
) -> Any:
    """``Σ_n Σ_k (J_nᵀ s_kn)²`` (or per sample) by the route ``backend`` picks.

    ``S`` is the output factor [K, N, *output_shape], or a function of the (detached)
    outputs ``fn(params, x)`` that gives it: the structured route then reuses its own
    forward pass instead of a second one. ``chunk_size`` (samples per vmap call of the
    generic route) may be a function of the number K of factor columns and of the number of
    parameter entries that take the generic route (all of them, or those outside factored
    layers)
    ``backend``: "structured" (layer-aware, needs a module made functional by curvfx, params
    a dict), "generic" (per-sample vmap over all parameters, :func:`factor_diagonal`), or
    "auto" (structured when possible).

    Raises:
        ValueError: For an unknown ``backend``, or "structured" with a pure function.
    """
    if _structured_route(fn, params, backend, (x, y)):
        return structured_diagonal(fn, params, x, S, chunk_size, per_sample)
    return _generic_squares(fn, params, x, S, chunk_size, per_sample, y)


def raveled_squares(
    fn: Any, params: Any, x: Any, S: Factor, chunk_size: Chunk = None, backend: str = "auto", y: Any = None
) -> Tensor:
    """``Σ_n Σ_k (J_nᵀ s_kn)²`` as one vector [P] (:func:`sample_squares`, then raveled).

    On the structured route the layers write their largest results straight into the
    vector (no copy of the diagonal, no second P-sized allocation).
    """
    if not _structured_route(fn, params, backend, (x, y)):
        return ravel(_generic_squares(fn, params, x, S, chunk_size, False, y))
    first = next(iter(params.values()))
    flat = first.new_empty(num_params(params))
    into = unravel(flat, params)
    diag = structured_diagonal(fn, params, x, S, chunk_size, False, out=into)
    for k, d in diag.items():
        if d.data_ptr() != into[k].data_ptr():
            into[k].copy_(d)
    return flat


def _structured_route(fn: Any, params: Any, backend: str, data: Any = None) -> bool:
    """Whether ``backend`` takes the structured route (ValueError if it is impossible).

    The route reads the layers' recorded inputs and output gradients with ``torch.autograd``,
    so its results carry no graph: "auto" leaves it to the generic route inside ``torch.func``
    transforms and when the result must be differentiable (:func:`curvfx._errors.needs_graph`
    of ``params`` and ``data``, the inputs and targets), where "structured" raises.
    """
    check_backend(backend)
    possible = isinstance(fn, FunctionalModel) and isinstance(params, dict)
    if backend == "structured" and not possible:
        raise ValueError("backend: 'structured' needs an nn.Module model (made functional by curvfx)")
    if backend == "generic" or not possible:
        return False
    if inside_transform():
        if backend == "structured":
            raise ValueError("backend: 'structured' cannot run inside a torch.func transform; use 'generic'")
        return False
    if needs_graph((params, data)):
        if backend == "structured":
            raise ValueError(
                "backend: 'structured' gives results without an autograd graph, but the parameters "
                "or inputs require grad; use 'generic' for a differentiable result, or call under "
                "torch.no_grad() for its value"
            )
        return False
    return True


def _generic_squares(
    fn: Any, params: Any, x: Any, S: Factor, chunk_size: Chunk, per_sample: bool, y: Any = None
) -> Any:
    S = _factor_at(fn, params, x, S, y)

    def sample_outputs(p, xn):
        return sample_row(fn(p, unsqueeze_leaves(xn)))

    return factor_diagonal(sample_outputs, params, x, S, _chunk(chunk_size, S, params), per_sample)


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming ``backend`` unless it is one of "auto", "structured", "generic"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto', 'structured' or 'generic', got {backend!r}")


def structured_diagonal(
    fn: FunctionalModel,
    params: dict[str, Tensor],
    x: Any,
    S: Factor,
    chunk_size: Chunk = None,
    per_sample: bool = False,
    out: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``Σ_n Σ_k (J_nᵀ s_kn)²`` per parameter for ``S`` [K, N, *output_shape] (a dict like ``params``).

    ``S`` may be a function of the detached outputs giving the factor (see
    :func:`sample_squares`). With ``per_sample=True``: ``[Σ_k ‖J_nᵀ s_kn‖²]_n`` [N] per
    parameter instead. Known layers (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``,
    the affine parameters of ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and of
    ``nn.BatchNorm1d/2d/3d`` in eval mode; see :mod:`curvfx._capture`) are handled in
    factored form; every other parameter by the generic route. ``out``: tensors shaped
    like ``params`` that factored layers may write their results into (and then return).
    """
    layers = supported_layers(fn.module, params, factored=True)
    diag: dict[str, Tensor] = {}
    if layers:
        S, layer_calls = _layer_pass(fn, params, x, S, layers)
        for module, calls in layer_calls.items():
            diag.update(layer_squares(module, layers[module], calls, per_sample, out))
    else:
        S = _factor_at(fn, params, x, S)
    if S.shape[0] == 0:  # an empty factor (e.g. a loss linear in the outputs)
        return _zeros(params, S, per_sample)
    structured = set(diag)
    generic = {k: v for k, v in params.items() if k not in structured}
    if generic:
        fixed = {k: v for k, v in params.items() if k in structured}

        def sample_outputs(sub, xn):
            return sample_row(fn({**fixed, **sub}, unsqueeze_leaves(xn)))

        chunk = _chunk(chunk_size, S, generic)
        diag.update(factor_diagonal(sample_outputs, generic, x, S, chunk, per_sample))
    return {k: diag[k] for k in params}


def structured_sample_grads(
    fn: FunctionalModel, params: dict[str, Tensor], x: Any, residuals: Callable[[Tensor], Tensor]
) -> dict[str, Tensor]:
    """Per-sample gradients ``J_nᵀ r_n`` [N, *shape] of the parameters of known layers.

    ``residuals(outputs)`` gives ``r`` [1, N, *output_shape] from the detached outputs of
    the forward pass made here. Linear layers, convolutions and normalization layers
    (:func:`curvfx._layers.layer_grads`): one forward and one backward pass to the layer
    outputs, then ``G_n = Σ_t g_nt a_ntᵀ`` per layer. Returns only the parameters it
    computed (not embeddings, tied parameters, layers that do not read per sample or
    whose parameters are also used elsewhere); the caller takes the others by the generic
    route.
    """
    layers = {
        m: names
        for m, names in supported_layers(fn.module, params, factored=True).items()
        if layer_kind(m) != "embedding"
    }
    if not layers:
        return {}
    _, layer_calls = _layer_pass(fn, params, x, residuals, layers)
    grads = {}
    with torch.no_grad():  # the recorded layer inputs carry graphs; the results need none
        for module, calls in layer_calls.items():
            for name, G in layer_grads(module, layers[module], calls).items():
                grads[name] = G[0].to(params[name].dtype)  # autocast computes some in 16 bits
    return grads


def sample_grads_route(fn: Any, params: Any, data: Any, backend: str) -> bool:
    """Whether :func:`curvfx.per_sample_grad` takes the structured route: for "structured" only.

    "auto" keeps ``vmap(grad)``, which composes with every transform. The structured route
    gives results without an autograd graph and cannot run inside a ``torch.func``
    transform; measured against ``vmap(grad)`` it took 0.83–0.90 of the
    time on the benchmark MLP 784-256-256-10 (N = 128) and 1.06–1.14 on the benchmark CNN.

    Raises:
        ValueError: For "structured" with a pure function, inside a ``torch.func`` transform,
            or when the result must carry an autograd graph.
    """
    check_backend(backend)
    return backend == "structured" and _structured_route(fn, params, backend, data)


def _layer_pass(
    fn: FunctionalModel, params: dict[str, Tensor], x: Any, S: Factor, layers: dict[nn.Module, dict[str, str]]
) -> tuple[Tensor, dict[nn.Module, list[tuple[Tensor, list[Tensor]]]]]:
    """One forward pass recording the calls of ``layers``, then the gradients at their outputs.

    Returns ``S`` (evaluated at the detached outputs when it is a function) and, for each
    layer whose calls read per sample, are batch-first (:func:`sequence_first`), take
    inputs computed from the batch (:func:`not_from_batch`) and whose parameters are used
    by those calls only (:func:`curvfx._capture.parameter_uses`), its
    calls as ``(input, blocks)`` with the column blocks of ``∂⟨f, s_k⟩/∂z`` from
    :func:`curvfx._capture.output_grads` (none when ``S`` has no columns).
    """
    check_autograd()
    records: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
    inputs, batch = tracked_batch(x)  # the batch's float tensors, followed through the graph
    raw: dict[int, Any] = {}  # id(z) -> the call's input, with its graph
    with torch.enable_grad(), captured(records, raw):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        outputs = check_output(fn(p, inputs))
    if callable(S):
        with torch.no_grad():  # this route's results carry no graph (see _structured_route)
            S = S(outputs.detach())
    if S.shape[0] == 0:
        return S, {}
    n = S.shape[1]
    records = {m: calls for m, calls in records.items() if reads_per_sample(m, calls, n)}
    names = [(m, name) for m in records for name in layers[m].values()]
    uses = parameter_uses(outputs, [p[name] for _, name in names])
    misread = {m for (m, _), count in zip(names, uses) if count != len(records[m])}
    misread |= sequence_first(outputs, records, n) | not_from_batch(batch, records, raw)
    records = {m: calls for m, calls in records.items() if m not in misread}  # those: generic
    zs = [z for calls in records.values() for _, z in calls]
    grads = iter(output_grads(outputs, zs, S) if zs else ())  # in the order of zs
    return S, {m: [(a, next(grads)) for a, _ in calls] for m, calls in records.items()}


def sequence_first(
    outputs: Tensor, records: dict[nn.Module, list[tuple[Tensor, Tensor]]], n: int
) -> set[nn.Module]:
    """Layers called on a sequence-first input [T, N, ...] with T = N, which shapes cannot tell apart.

    Only features-last layers (linear, layer and RMS norm: input [N, N, ..., D]; embedding:
    ids [N, N, ...]) are ambiguous; for them backward passes of the first and of the last
    sample's outputs decide: a batch-first layer's output gradient for sample k lies in
    row k. One sample would not do: a sequence-first layer read at one position t only
    (a CLS token, t = 0, or the last token) has sample k's gradient in row t, which is row
    k for k = t. The outputs are projected on fixed random weights (:func:`_projection`):
    their plain sum has a zero gradient wherever a sample's outputs sum to a constant
    (softmax probabilities, centered logits), which let sequence-first layers pass as
    batch-first.
    """
    ambiguous = [(m, z) for m, calls in records.items() for a, z in calls if features_last_square(m, a, n)]
    if not ambiguous or not outputs.requires_grad:
        return set()
    zs = [z for _, z in ambiguous]
    first = torch.autograd.grad(_projection(outputs[0]), zs, retain_graph=True, allow_unused=True)
    last = torch.autograd.grad(_projection(outputs[-1]), zs, retain_graph=True, allow_unused=True)
    return {
        m
        for (m, _), g0, g1 in zip(ambiguous, first, last)
        if (g0 is not None and bool(g0[1:].any())) or (g1 is not None and bool(g1[:-1].any()))
    }


def _projection(row: Tensor) -> Tensor:
    """``⟨row, w⟩`` with fixed standard normal weights w (drawn from a seeded generator of their own)."""
    generator = torch.Generator(row.device).manual_seed(0)
    weights = torch.randn(row.shape, generator=generator, device=row.device, dtype=torch.float64)
    return (row * weights.to(row.dtype)).sum()


def tracked_batch(x: Any) -> tuple[Any, list[Tensor]]:
    """``x`` with each float tensor replaced by a copy of a new leaf requiring grad, and the leaves.

    The copies are what the model reads (it may write them in place); the leaves are what
    :func:`not_from_batch` looks for in the graph. The batch's integer tensors (token ids)
    are listed as they are (they cannot require grad): :func:`not_from_batch` recognizes
    them by their storage.
    """
    found: list[Tensor] = []

    def track(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if not t.is_floating_point():
            found.append(t)
            return t
        found.append(t.detach().requires_grad_())
        return found[-1].clone()

    with torch.enable_grad():  # the copies' graph (callers may run under no_grad)
        return tree_map(track, x), found


def not_from_batch(
    batch: list[Tensor], records: dict[nn.Module, list[tuple[Tensor, Tensor]]], raw: dict[int, Any]
) -> set[nn.Module]:
    """Layers with a call whose input has N rows but is not computed from the batch.

    E.g. a positional embedding ``pos(arange(T))`` with T = N, ``txt(class_embeddings)``
    with a learned [M, D] table of M = N classes, or a projection of a learned query: their
    rows are not the samples. ``batch``: the tensors of :func:`tracked_batch`. An
    embedding's ids come from the batch when they share storage with one of its integer
    tensors (the ids themselves or a view, e.g. ``ids[:, :-1]``; ids computed from them,
    ``ids + 1``, count as not from the batch); the outputs of those calls then count as
    batch tensors. Any other layer's input must have an autograd graph that reaches the
    batch's float tensors or those outputs. ``raw``: each call's input with its graph, by
    ``id`` of its output (:func:`curvfx._capture.captured`). An input without a graph
    (computed under ``torch.no_grad``, detached, or a constant such as a buffer) cannot be
    told apart and is taken as read per sample. One memoized walk over the graph
    (:func:`curvfx._graph.depend_on`).
    """
    ids = {t.untyped_storage().data_ptr() for t in batch if not t.is_floating_point()}
    embedded, misread = [], set()
    for m, calls in records.items():
        if layer_kind(m) != "embedding":
            continue
        for _, z in calls:
            a = raw.get(id(z))
            if isinstance(a, Tensor) and a.untyped_storage().data_ptr() in ids:
                embedded.append(z)
            else:
                misread.add(m)
    sources = [t for t in batch if t.is_floating_point()] + embedded
    checked = [
        (m, raw[id(z)])
        for m, calls in records.items()
        if layer_kind(m) != "embedding"
        for _, z in calls
        if isinstance(raw.get(id(z)), Tensor) and raw[id(z)].requires_grad
    ]
    if not sources or not checked:
        return misread
    found = depend_on([a for _, a in checked], sources)
    return misread | {m for (m, _), ok in zip(checked, found) if not ok}


def features_last_square(module: nn.Module, a: Tensor, n: int) -> bool:
    least = 2 if layer_kind(module) == "embedding" else 3
    features_last = layer_kind(module) in ("linear", "embedding") or isinstance(
        module, (nn.LayerNorm, nn.RMSNorm)
    )
    return features_last and a.dim() >= least and a.shape[1] == n


def _factor_at(fn: Any, params: Any, x: Any, S: Factor, y: Any = None) -> Tensor:
    """``S``, or ``S(outputs)`` after a forward pass when it is a function.

    The pass records no graph unless the result is differentiated (inside a ``torch.func``
    transform, or :func:`curvfx._errors.needs_graph`): S then depends on the parameters,
    inputs and targets ``y`` too (the residuals of per-sample gradient norms).
    """
    if not callable(S):
        return S
    if inside_transform() or needs_graph((params, x, y)):
        return S(fn(params, x))
    with torch.no_grad():
        return S(fn(params, x))


def _chunk(chunk_size: Chunk, S: Tensor, generic: Any) -> int | None:
    if not callable(chunk_size):
        return chunk_size
    return chunk_size(S.shape[0], sum(leaf.numel() for leaf in leaves(generic)))


def _zeros(params: dict[str, Tensor], S: Tensor, per_sample: bool) -> dict[str, Tensor]:
    return {k: S.new_zeros(S.shape[1]) if per_sample else torch.zeros_like(v) for k, v in params.items()}
