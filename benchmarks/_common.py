"""Shared pieces of the benchmarks: the models, the data and a median timer."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def mlp(widths=(784, 256, 256, 10)) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def cases(device):
    g = torch.Generator().manual_seed(0)
    x_mlp = torch.randn(128, 784, generator=g)
    y_cls = torch.randint(0, 10, (128,), generator=g)
    x_cnn = torch.randn(64, 3, 32, 32, generator=g)
    y_cnn = torch.randint(0, 10, (64,), generator=g)
    y_reg = torch.randn(128, 10, generator=g)
    return {
        "MLP 784-256-256-10 N=128 CE": (mlp(), nn.CrossEntropyLoss(), x_mlp, y_cls),
        "MLP 784-256-256-10 N=128 MSE": (mlp(), nn.MSELoss(), x_mlp, y_reg),
        "CNN 2conv+linear N=64 CE": (cnn(), nn.CrossEntropyLoss(), x_cnn, y_cnn),
    }


def time_ops(ops: dict, repeats: int, device) -> dict:
    """Median seconds of each op in ``ops``, timed round-robin so that machine noise hits all alike.

    An op that raises ``ValueError`` (e.g. an unsupported strategy) is reported by its message.
    """
    times, failed = {name: [] for name in ops}, {}
    for name, op in ops.items():  # warm-up
        try:
            op()
        except ValueError as err:
            failed[name] = f"n/a ({str(err).split(';')[0]})"
    for _ in range(repeats):
        for name, op in ops.items():
            if name in failed:
                continue
            _sync(device)
            start = time.perf_counter()
            op()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: failed.get(name) or statistics.median(times[name]) for name in ops}


def print_table(title: str, rows: dict, baseline: str = "gradient") -> None:
    """A markdown table of median times and ratios to ``rows[baseline]``."""
    base = rows[baseline]
    print(f"## {title}\n\n| op | median ms | ratio to gradient |\n|---|---:|---:|")
    for name, t in rows.items():
        if isinstance(t, float):
            print(f"| {name} | {1e3 * t:.2f} | {t / base:.2f}× |")
        else:
            print(f"| {name} | {t} | — |")
    print()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
