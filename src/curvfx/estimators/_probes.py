"""Random probe vectors for the stochastic estimators, drawn from an explicit generator."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from curvfx._arguments import check_count
from curvfx._engines import draw_seed
from curvfx._errors import check_generator
from curvfx.operators._distributed import broadcast_seed, resolve_process_group

__all__ = ["DISTRIBUTIONS", "check_distribution", "make_generator", "probes"]

DISTRIBUTIONS = ("rademacher", "normal")


def probes(
    size: int,
    num: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``num`` independent probe vectors as the columns of a matrix Ω [size, num].

    Each column is contiguous in memory (Ω is the transpose of a [num, size] tensor), so
    products that take one column at a time read it without striding.

    Entries are i.i.d. with E[ω] = 0 and E[ω ωᵀ] = I:

        "rademacher":  ω_i = ±1 with probability 1/2 each (ω ⊙ ω = 1 exactly)
        "normal":      ω_i ~ N(0, 1)

    Args:
        size: P, the length of each probe.
        num: K, the number of probes.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Source of randomness. The values are drawn on the generator's device
            and moved to ``device``, so one seed gives the same probes on every device.
            ``None`` draws from :func:`make_generator` (one draw of torch's global RNG).
        dtype: dtype of Ω; torch's default dtype if ``None``.
        device: device of Ω; the generator's device if ``None``.

    Returns:
        Ω [size, num].

    Raises:
        ValueError: If ``distribution`` is unknown, ``size``/``num`` is not a positive int,
            or ``device`` is not a device.
        TypeError: If ``dtype`` is not a floating ``torch.dtype`` (or None), or
            ``generator`` is not a ``torch.Generator`` (or None).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> V = probes(4, 2, generator=g, dtype=torch.float64)
        >>> V.shape, bool((V.abs() == 1).all())
        (torch.Size([4, 2]), True)
    """
    check_distribution(distribution)
    size, num = check_count(size, "size"), check_count(num, "num")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype (e.g. torch.float64) or None, got {dtype!r}")
    if device is not None:
        device = _as_device(device)
    dtype = dtype or torch.get_default_dtype()
    generator = make_generator(generator, device)
    where = generator.device
    if distribution == "rademacher":  # each random byte gives 8 signs: 8× fewer draws than randint(0, 2)
        count = size * num
        draws = torch.randint(0, 256, ((count + 7) // 8,), generator=generator, device=where)
        bits = (torch.arange(256, device=where).unsqueeze(1) >> torch.arange(8, device=where)) & 1
        signs = (2 * bits - 1).to(dtype)  # [256, 8]: the signs of each byte's bits, low bit first
        omega = F.embedding(draws, signs).reshape(-1)[:count].reshape(num, size)  # one pass writes Ω
    else:
        omega = torch.randn(num, size, generator=generator, device=where, dtype=dtype)
    return omega.to(device if device is not None else where).T


def make_generator(
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    process_group: Any = None,
) -> torch.Generator:
    """``generator`` itself, or (if ``None``) a fresh generator on ``device``.

    The fresh generator is seeded by one ``torch.randint`` draw from torch's global RNG,
    so ``torch.manual_seed`` makes a call without a generator reproducible; that draw
    advances the global RNG stream by one step.

    With a ``process_group`` (that of a data-parallel operator, e.g. from
    ``curvfx.operators._distributed.process_group_of(op)``), the fresh generator is seeded
    with rank 0's draw on every rank (a broadcast: every rank must call this), so that all
    ranks draw identical probes and stay in lockstep. A ``generator`` given by the user is
    returned as is: it must be seeded identically on every rank (a mismatch is caught by
    the operator's next product, which raises on every rank).
    """
    if check_generator(generator) is not None:
        return generator
    seed = draw_seed(None)
    group = resolve_process_group(process_group)
    if group is not None:
        seed = broadcast_seed(seed, group, device)
    return torch.Generator(device=device or "cpu").manual_seed(seed)


def check_distribution(distribution: str) -> str:
    """``distribution`` if it is one of :data:`DISTRIBUTIONS`; ValueError naming it otherwise."""
    if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution: expected one of {', '.join(map(repr, DISTRIBUTIONS))}, got {distribution!r}"
        )
    return distribution


def _as_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; ValueError naming it if torch does not know it."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device: expected a torch.device or a device string such as 'cpu', got {device!r}"
        ) from err
