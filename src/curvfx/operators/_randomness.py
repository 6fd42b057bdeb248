"""Randomness in the model (dropout) for curvature operators: one fixed matrix, none, or a draw per product.

An operator's ``randomness`` says what random operations inside the model (dropout
masks, any draw from torch's global RNG during the forward pass) do across products:

* ``"fixed"`` (default): one seed is taken at construction (the value torch's global RNG
  would draw next, without advancing it; with a process group rank 0's seed, offset by
  ``rank·2³²``). Batch b of every product — matvec, matmat, exact diagonal — runs under
  ``torch.random.fork_rng`` seeded with ``seed + b``, so every product sees the same
  masks: the operator is one fixed symmetric matrix for its lifetime, and your global
  RNG state is left as it was;
* ``"off"``: the model's dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``,
  ``AlphaDropout``, ``FeatureAlphaDropout``) are switched to eval for each product and
  restored afterwards (BatchNorm and other modules keep their mode); needs an
  ``nn.Module``;
* ``"sample"``: nothing is done: each product draws from the global RNG (a new mask per
  product; not a fixed matrix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from curvfx._capture import supported_layers
from curvfx._engines import draw_seed, kept_rng
from curvfx.functional import FunctionalModel
from curvfx.operators._distributed import rank_stream_seed

__all__ = [
    "RANDOMNESS",
    "active_dropout",
    "batch_randomness",
    "check_diagonal_masks",
    "check_randomness",
    "fixed_seed",
    "replay_batch_seed",
]

RANDOMNESS = ("fixed", "off", "sample")


def check_randomness(randomness: str, model_fn: Callable) -> str:
    """Validate ``randomness`` ("off" needs a module made functional by curvfx); returns it."""
    if randomness not in RANDOMNESS:
        raise ValueError(f"randomness: expected one of {RANDOMNESS}, got {randomness!r}")
    if randomness == "off" and not isinstance(model_fn, FunctionalModel):
        raise ValueError(
            "randomness: 'off' switches the model's dropout modules to eval and needs an "
            "nn.Module, got a pure function; use 'fixed' or 'sample'"
        )
    return randomness


def fixed_seed(randomness: str, process_group, device: torch.device) -> int | None:
    """The seed of ``"fixed"`` (None otherwise), read from torch's global RNG without advancing it."""
    if randomness != "fixed":
        return None
    with torch.random.fork_rng(devices=[]):
        seed = draw_seed(None)
    return seed if process_group is None else rank_stream_seed(seed, process_group, device)


@contextlib.contextmanager
def batch_randomness(
    randomness: str, seed: int | None, b: int, model_fn: Callable, device: torch.device
) -> Iterator[None]:
    """The randomness of batch ``b`` for the duration of one product (see the module docstring)."""
    if randomness == "fixed":
        with kept_rng(device):
            for generator in _generators(device):
                generator.manual_seed(seed + b)
            yield
    elif randomness == "off":
        switched = active_dropout(model_fn.module)
        for m in switched:
            m.train(False)
        try:
            yield
        finally:
            for m in switched:
                m.train(True)
    else:
        yield


def replay_batch_seed(device: torch.device) -> None:
    """Inside :func:`batch_randomness` ("fixed"): re-seed with the batch's seed, so draws start over.

    Used before the eager self-check of a compiled product, which must see the draws the
    compiled call saw.
    """
    for generator in _generators(device):
        generator.manual_seed(generator.initial_seed())


def active_dropout(module: nn.Module) -> list[nn.Module]:
    """The dropout modules of ``module`` in train mode with p > 0 (p = 0 draws nothing)."""
    dropout = (nn.modules.dropout._DropoutNd,)
    return [m for m in module.modules() if isinstance(m, dropout) and m.training and m.p > 0]


def check_diagonal_masks(model_fn: Callable, params, randomness: str, backend: str) -> None:
    """Raise ``ValueError`` if an exact diagonal under ``"fixed"`` could not use the products' masks.

    The layer-aware route (:mod:`curvfx._structured`) reads the dropout masks of one batched
    forward pass, those of the products; the generic per-sample route draws its own mask per
    sample. With active dropout every parameter must therefore be in a layer the
    layer-aware route factors.
    """
    if randomness != "fixed" or not isinstance(model_fn, FunctionalModel):
        return
    if not active_dropout(model_fn.module):
        return
    layers = supported_layers(model_fn.module, params, factored=True) if isinstance(params, dict) else {}
    covered = {name for names in layers.values() for name in names.values()}
    if backend == "generic" or not isinstance(params, dict) or set(params) - covered:
        raise ValueError(
            "randomness: with active dropout and randomness='fixed' the exact diagonal needs every "
            "parameter in a layer curvfx factors (Linear, Conv, Embedding, normalization layers; "
            "backend 'auto' or 'structured'); use randomness='off', model.eval(), or "
            "method='hutchinson'"
        )


def _generators(device: torch.device) -> list[torch.Generator]:
    """Torch's default generators that the model's random operations on ``device`` draw from."""
    if device.type != "cuda":
        return [torch.default_generator]
    index = torch.cuda.current_device() if device.index is None else device.index
    return [torch.default_generator, torch.cuda.default_generators[index]]
