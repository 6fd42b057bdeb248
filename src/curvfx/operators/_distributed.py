"""Data parallelism on ``torch.distributed``: the process group, one all-reduce per product, seeds.

A curvature operator built with ``process_group=`` holds one shard of the data on each rank
of the group. A product computes the rank's share, ``Σ_{b on rank} Z_b A_b v`` and
``Σ_{b on rank} Z_b``, and :func:`summed_over_ranks` sums both over the ranks in a single
all-reduce, so that every rank gets ``Σ_b Z_b A_b v / Σ_b Z_b`` over all batches of all
ranks: the single-process result on the concatenated data.

The same all-reduce carries, in one slot per rank, a failure flag and fingerprints of the
inputs that must agree across ranks (the vector ``v`` and the parameters). A rank whose
share raises still takes part in the exchange, so every rank raises instead of waiting for
the one that failed: the failing rank its own exception, the others a ``RuntimeError``
naming it. Ranks whose ``v`` or parameters differ get a ``ValueError`` on every rank
instead of a silently mixed result. A rank that never reaches the exchange (it died or
raised before the product) is caught by the process group's timeout
(``init_process_group(..., timeout=...)``), which bounds every collective here.

The backend is the group's: gloo (CPU tensors, or CUDA tensors) and nccl (CUDA tensors)
run the same code; the exchanged tensors live on the operator's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from curvfx._errors import inside_transform
from curvfx._pytree import leaves
from curvfx.operators._base import ProductOperator, SumOperator, TransposedOperator

__all__ = [
    "ProcessGroupArg",
    "broadcast_seed",
    "process_group_of",
    "rank_of",
    "rank_stream_seed",
    "resolve_process_group",
    "summed_over_ranks",
    "unwrap_ddp",
]

PyTree = Any
# the operators' ``process_group=`` (torch builds without distributed support: only None)
ProcessGroupArg = dist.ProcessGroup | bool | None if dist.is_available() else Any
_GOLDEN = (math.sqrt(5) - 1) / 2  # fingerprint weights: frac(i · φ⁻¹), a low-discrepancy sequence
_BLOCK = 256


def resolve_process_group(process_group: Any) -> dist.ProcessGroup | None:
    """The ``process_group=`` argument of an operator as a ``ProcessGroup`` or None.

    ``None`` (or ``False``): single process, even when ``torch.distributed`` is initialized
    (data parallelism is an explicit opt-in). ``True``: the default group (WORLD). A
    ``ProcessGroup`` (from ``torch.distributed.new_group``, or a DDP model's
    ``.process_group``): that group.

    Raises:
        ValueError: If a group is asked for but ``torch.distributed`` is not initialized,
            or this rank is not a member of the group.
        TypeError: For any other value.
    """
    if process_group is None or process_group is False:
        return None
    available = dist.is_available()
    if available and process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "process_group: this rank is not a member of the group (new_group returned "
            "NON_GROUP_MEMBER); build the operator only on the group's ranks"
        )
    if process_group is not True and not (available and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            f"process_group: expected None, True or a torch.distributed.ProcessGroup, "
            f"got {type(process_group).__name__}"
        )
    if not (available and dist.is_initialized()):
        raise ValueError(
            "process_group: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) on every rank first, or leave "
            "process_group=None for a single process"
        )
    return dist.group.WORLD if process_group is True else process_group


def process_group_of(op: Any) -> dist.ProcessGroup | None:
    """The process group of ``op``, or of an operator it is built from (``A + λI``, ``A @ B``, ``A.T``)."""
    group = getattr(op, "process_group", None)
    if group is not None:
        return group
    if isinstance(op, SumOperator):
        children = op.ops
    elif isinstance(op, ProductOperator):
        children = [op.a, op.b]
    elif isinstance(op, TransposedOperator):
        children = [op.op]
    else:
        return None
    return next((g for g in map(process_group_of, children) if g is not None), None)


def rank_of(process_group: dist.ProcessGroup | None) -> int:
    """The rank of this process in ``process_group`` (0 for None)."""
    return 0 if process_group is None else process_group.rank()


def unwrap_ddp(model: Any) -> Any:
    """``model.module`` for a ``DistributedDataParallel`` model, else ``model``.

    Curvature products call the wrapped module through ``torch.func.functional_call``: the
    DDP wrapper's forward (buffer broadcast, gradient-bucket bookkeeping) is never run and no
    gradient all-reduce is triggered. Parameter names are the module's (no ``module.``
    prefix).
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_stream_seed(seed: int, process_group: dist.ProcessGroup, device: Any = None) -> int:
    """Rank 0's ``seed`` offset by ``rank·2³²``: one random stream per rank (a collective)."""
    return broadcast_seed(seed, process_group, device) + (rank_of(process_group) << 32)


def broadcast_seed(seed: int, process_group: dist.ProcessGroup | None, device: Any = None) -> int:
    """Rank 0's ``seed`` on every rank of ``process_group`` (``seed`` itself for None).

    A collective: every rank of the group must call it. The seed travels as an int64
    tensor on ``device`` (default: the current CUDA device for nccl, else the CPU).
    """
    if process_group is None:
        return int(seed)
    t = torch.tensor([int(seed)], dtype=torch.int64, device=_device(process_group, device))
    dist.broadcast(t, group=process_group, group_src=0)
    return int(t.item())


def summed_over_ranks(
    local: Callable[[], tuple[Tensor, Tensor | float]],
    shape: tuple[int, ...],
    process_group: dist.ProcessGroup,
    *,
    dtype: torch.dtype,
    device: torch.device,
    agree: Mapping[str, PyTree],
    who: str,
) -> tuple[Tensor, Tensor]:
    """``(Σ_r total_r, Σ_r z_r)`` over the ranks r of the group, where ``(total_r, z_r) = local()`` on rank r.

    One all-reduce (sum) of the buffer ``[total (numel of shape), z, failed [W], (value,
    scale) [W] per entry of agree]``, W the group size; each rank writes only its own slots,
    so after the sum every rank holds every rank's flag and fingerprints. Cost: one
    all-reduce of ``numel + 1 + W · (1 + 2·len(agree))`` numbers, one of four numbers
    before it (the ranks' buffers must agree in size and dtype), plus O(size) work per
    entry of ``agree`` for its fingerprint.

    Args:
        local: This rank's share; it is called inside ``try``: an exception is reported to
            all ranks through the flag.
        shape: Shape of ``total``, the same on every rank ([P] or [P, K]).
        process_group: The group.
        dtype: The operator's dtype (exchanged as float32 if it is a 16-bit type).
        device: Device of the exchanged buffer (the operator's; CUDA for nccl).
        agree: Tensors or pytrees (``{"v": v, "params": params}``) that must be equal on all
            ranks; compared up to √ε of their scale (ranks may round differently).
        who: Operator name for the messages.

    Returns:
        ``(total [shape], z [])``, identical on every rank, in the exchange dtype (float32
        for a 16-bit ``dtype``: the caller divides before casting back).

    Raises:
        Exception: On a rank whose ``local()`` raised, that exception.
        RuntimeError: On the other ranks, naming the ranks that failed.
        ValueError: On every rank, if an entry of ``agree`` is not the same on all ranks, the
            ranks' products differ in shape or dtype, or when called inside a ``torch.func``
            transform (a collective cannot be vmapped).
    """
    if inside_transform():
        raise ValueError(
            f"{who}: an operator with a process group cannot be applied inside torch.func "
            "transforms (vmap/grad): its all-reduce is not batched; use A @ V with a matrix V"
        )
    W, rank = process_group.size(), process_group.rank()
    numel = math.prod(shape)
    exchange_dtype = dtype if torch.finfo(dtype).bits >= 32 else torch.float32  # Σ Z exact in half
    buf = torch.zeros(numel + 1 + W * (1 + 2 * len(agree)), dtype=exchange_dtype, device=device)
    _check_same_buffers(buf, process_group, who)
    slots = buf[numel + 1 :].view(1 + 2 * len(agree), W)  # failed; (value, scale) per entry
    error = None
    try:
        for i, tree in enumerate(agree.values()):
            slots[1 + 2 * i, rank], slots[2 + 2 * i, rank] = _fingerprint(tree)
        total, z = local()
        if tuple(total.shape) != tuple(shape):
            raise RuntimeError(f"{who}: this rank's share has shape {list(total.shape)}, not {list(shape)}")
        buf[:numel] = total.reshape(-1)
        buf[numel] = z
    except Exception as err:  # reported to every rank by the flag, raised below
        error = err
        buf[: numel + 1] = 0
        slots[0, rank] = 1
    dist.all_reduce(buf, group=process_group)
    failed = slots[0].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"{who}: rank(s) {failed} of the process group raised while computing their share of "
            "the product; their error is reported on those ranks"
        )
    for i, name in enumerate(agree):
        values, scales = slots[1 + 2 * i].double(), slots[2 + 2 * i].double()
        tol = math.sqrt(torch.finfo(exchange_dtype).eps) * float(scales.max())
        spread = float((values - values[0]).abs().max())
        if math.isfinite(spread) and spread > tol:  # non-finite inputs: left to the finite check
            raise ValueError(
                f"{who}: mismatch across the ranks of the process group in {name} (fingerprints "
                f"per rank {[round(float(c), 6) for c in values]}); every rank must apply the "
                "operator to the same vector at the same parameters: seed probe generators "
                "identically on every rank, and keep the model replicas in sync (e.g. with "
                "DistributedDataParallel)"
            )
    return buf[:numel].reshape(shape), buf[numel]  # float32 for a 16-bit dtype: Σ Z would overflow


def _check_same_buffers(buf: Tensor, process_group: dist.ProcessGroup, who: str) -> None:
    """Raise ``ValueError`` on every rank unless all ranks exchange buffers of one size and dtype.

    An all-reduce of buffers that differ (a product with another number of columns, another
    dtype, a diagonal on one rank and a product on another) aborts the process (gloo) or
    hangs (nccl): one all-reduce (max) of ``[size, -size, dtype, -dtype]`` first.
    """
    code = float(list(_DTYPE_CODES).index(buf.dtype)) if buf.dtype in _DTYPE_CODES else -1.0
    header = torch.tensor([buf.numel(), -buf.numel(), code, -code], dtype=torch.float64, device=buf.device)
    dist.all_reduce(header, op=dist.ReduceOp.MAX, group=process_group)
    if header[0] != -header[1] or header[2] != -header[3]:
        raise ValueError(
            f"{who}: the ranks of the process group apply it to different shapes or dtypes "
            f"(buffer sizes {int(-header[1])}..{int(header[0])}); every rank must make the same "
            "product (the same number of columns, the same dtype, a diagonal on every rank)"
        )


_DTYPE_CODES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _fingerprint(tree: PyTree) -> tuple[Tensor, Tensor]:
    """``(Σ_i w_i t_i, Σ_i |t_i|)`` [float64 0-d] over the entries t_i of all leaves of ``tree``.

    The weights w_i ∈ [1, 8) are generic (products of golden-ratio sequences over the
    position in a block of ``_BLOCK`` entries, the block, and the leaf), so two different
    inputs have equal fingerprints only by coincidence. Cost: one matrix-vector product over
    each leaf, without copies (a few passes of O(P) memory traffic in all, no sync).
    """
    tensors = [tree] if isinstance(tree, Tensor) else leaves(tree)
    value = scale = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for k, leaf in enumerate(tensors):
        t = leaf.detach().reshape(-1)
        m = t.numel() // _BLOCK
        w = _weights(_BLOCK, 1 + k, t)
        rows = t[: m * _BLOCK].view(m, _BLOCK) @ w  # [m]: Σ_j w_j t_(i, j)
        tail = t[m * _BLOCK :] @ w[: t.numel() - m * _BLOCK]
        value = value + (1 + (k * _GOLDEN) % 1) * (
            rows.double() @ _weights(m, 0, rows.double()) + tail.double()
        )
        scale = scale + torch.linalg.vector_norm(t, 1).double()
    return value, scale


def _weights(n: int, shift: int, like: Tensor) -> Tensor:
    """``1 + frac((i + shift) · φ⁻¹)`` for i < n, in ``like``'s dtype and device."""
    i = torch.arange(shift, shift + n, dtype=torch.float64, device=like.device)
    return (1 + torch.frac(i * _GOLDEN)).to(like.dtype)


def _device(process_group: dist.ProcessGroup, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
