"""Factories for ``python -m curvfx report --model ... --data ...`` (the contract, by example).

    python -m curvfx report --model examples/report_factories.py:make_model \
                            --data examples/report_factories.py:make_data --steps 200

``make_model()`` returns the ``nn.Module``; ``make_data()`` returns ``(X, y)``, a list of
``(X, y)`` batches, or a dict ``{"data": ..., "loss": loss_fn}`` as here. ``--steps`` trains
the model first (Adam); without it the model is analysed as returned.
"""

import torch
from torch import nn


def make_model() -> nn.Module:
    """A small CNN for 1×12×12 inputs and 4 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 4),
    )


def make_data() -> dict:
    """Two batches of 64 images (class = brightest quadrant) with a cross-entropy loss."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(128, 1, 12, 12, generator=g)
    quadrants = x.unfold(2, 6, 6).unfold(3, 6, 6).sum((-1, -2)).reshape(128, 4)
    y = quadrants.argmax(1)
    return {"data": list(zip(x.split(64), y.split(64))), "loss": nn.CrossEntropyLoss()}
