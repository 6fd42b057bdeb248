"""The ``curvfx`` command: ``python -m curvfx [report] [options]`` prints a curvature report.

With no options it trains a built-in small MLP for a few seconds on synthetic data made
here (no downloads) and reports on it. With ``--model module:factory`` and
``--data module:factory`` it reports on your model:

* ``--model pkg.mod:make_model`` (or ``path/to/file.py:make_model``): ``make_model()``
  returns the ``nn.Module`` to analyse (trained or not).
* ``--data pkg.mod:make_data``: ``make_data()`` returns ``(X, y)`` (two tensors, one
  batch), a list of ``(X, y)`` batches, or a dict ``{"data": <one of those>, "loss": loss_fn}``.
  The loss is, in this order: the dict's ``"loss"``, ``--loss``, or
  ``CrossEntropyLoss()`` for integer targets and ``MSELoss()`` for floating targets.

The current directory is importable, as with ``python -m``. The report goes to stdout,
progress to stderr. Exit status: 0, or 2 for a bad command line (unloadable ``--model`` or
``--data``, a factory returning the wrong thing), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce_with_logits": nn.BCEWithLogitsLoss}


class UsageError(Exception):
    """A bad command line; its message is printed and the exit status is 2."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        argv = argv[1:]
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _report(args)
    except UsageError as err:
        print(f"curvfx report: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as err:  # the model, data and loss disagree
        print(f"curvfx report: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def builtin_problem(num_samples: int = 2048, batch_size: int = 512, seed: int = 0):
    """A 3-class problem on 20 features made by a random teacher network, and a student MLP.

    X ~ N(0, I) [N, 20]; y = argmax of a random tanh network's 3 outputs, 10% of labels
    resampled uniformly. The student is MLP 20-64-64-3 (tanh), 5,699 parameters, float64.

    Returns:
        ``(model, batches, loss_fn)`` with ``batches`` a list of ``(X, y)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 20, generator=g, dtype=torch.float64)
    w1 = torch.randn(20, 32, generator=g, dtype=torch.float64) / 20**0.5
    w2 = torch.randn(32, 3, generator=g, dtype=torch.float64) / 32**0.5
    y = (torch.tanh(3 * x @ w1) @ w2).argmax(1)
    flip = torch.rand(num_samples, generator=g) < 0.1
    y[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=g)  # label noise: loss stays > 0
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    return model.double(), batches, nn.CrossEntropyLoss()


def train(model: nn.Module, loss_fn: Any, batches: list, steps: int, lr: float = 3e-3) -> list[float]:
    """``steps`` Adam steps cycling over ``batches``; returns the loss of each step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    return losses


def load_factory(spec: str, what: str):
    """The callable named by ``module:attribute`` or ``path/to/file.py:attribute``.

    Raises:
        UsageError: If ``spec`` has no ``:``, the module cannot be imported, or it has no
            such callable; the message names which.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--{what} {spec!r}: expected 'module:factory' or 'path/to/file.py:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UsageError(f"--{what} {spec!r}: no file {module_name!r}")
            loader_spec = importlib.util.spec_from_file_location(f"_curvfx_{what}", module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(
            f"--{what} {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--{what} {spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def user_problem(args) -> tuple[nn.Module, list, Any]:
    """The model, batches and loss named by ``--model``, ``--data`` and ``--loss``."""
    model_factory = load_factory(args.model, "model")  # a bad --model is reported first
    if not args.data:
        raise UsageError("--model needs --data module:factory (the data to measure curvature on)")
    model = _call(model_factory, "model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {args.model!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    data = _call(load_factory(args.data, "data"), "data")
    loss_fn = None
    if isinstance(data, dict):
        if "data" not in data:
            raise UsageError(f"--data {args.data!r}: a dict must have the key 'data' (and optionally 'loss')")
        data, loss_fn = data["data"], data.get("loss")
    if _is_batch(data):
        batches = [tuple(data)]
    elif isinstance(data, list | tuple) and data and all(_is_batch(b) for b in data):
        batches = [tuple(b) for b in data]
    else:
        raise UsageError(
            f"--data {args.data!r}: expected (X, y) tensors, a list of (X, y) batches, or a dict "
            f"{{'data': ..., 'loss': ...}}; got {type(data).__name__}"
        )
    if loss_fn is None:
        name = args.loss or ("mse" if batches[0][1].is_floating_point() else "cross_entropy")
        loss_fn = LOSSES[name]()
    return model, batches, loss_fn


def _report(args) -> int:
    from curvfx.report import SECTIONS, curvature_report, format_report, plot_report

    if args.top_k < 1 or args.probes < 2:
        raise UsageError(f"--top-k must be >= 1 and --probes >= 2, got {args.top_k} and {args.probes}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'curvfx[plot]' (or pip install matplotlib)")
    torch.manual_seed(args.seed)
    threads = args.threads if args.threads is not None else (0 if args.model else 1)
    if threads:  # the built-in model is too small to gain from intra-op threads (and loses on a busy machine)
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    if args.model:
        model, batches, loss_fn = user_problem(args)
        steps = args.steps if args.steps is not None else 0
    else:
        if args.data:
            raise UsageError("--data needs --model module:factory")
        model, batches, loss_fn = builtin_problem(args.samples, args.batch_size, args.seed)
        steps = args.steps if args.steps is not None else 300
    model = model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    bar = _Progress(
        len(SECTIONS) + (1 if steps else 0) + (1 if args.plot else 0), enabled=not args.no_progress
    )
    if steps:
        bar.next(f"training ({steps} Adam steps)")
        start = time.perf_counter()
        losses = train(model, loss_fn, batches, steps)
        seconds = time.perf_counter() - start
        trained = f"trained {steps} Adam steps in {seconds:.1f} s, loss {losses[0]:.4g} → {losses[-1]:.4g}"
    else:
        trained = "not trained here (as returned by the factory)"
    model.eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    results = curvature_report(
        model,
        loss_fn,
        batches,
        top_k=args.top_k,
        num_probes=args.probes,
        generator=generator,
        progress=bar.next,
    )
    if args.plot:
        bar.next(f"plot → {args.plot}")
        plot_report(results, args.plot)
    bar.close()
    print(format_report(results))
    print(f"\nmodel {trained}; device {device}; {sum(results['seconds'].values()):.1f} s of curvature work")
    if args.plot:
        print(f"figure: {args.plot}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in results.items()},
                fh,
                indent=2,
            )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvfx",
        description="Curvature report of a model: loss, gradient norm, top Hessian and GGN eigenvalues, "
        "traces, the Hessian's spectral density and per-layer diagonal GGN. "
        "Usage: curvfx [report] [options].",
        epilog="--model/--data contract: see docs/report.md, or help(curvfx.__main__) in Python.",
    )
    parser.add_argument("--model", help="module:factory (or file.py:factory); factory() returns an nn.Module")
    parser.add_argument(
        "--data",
        help="module:factory; factory() returns (X, y), a list of (X, y), or {'data': ..., 'loss': ...}",
    )
    parser.add_argument("--loss", choices=sorted(LOSSES), help="loss when the data factory gives none")
    parser.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--plot", metavar="OUT.png", help="save the spectral density and per-layer curvature")
    parser.add_argument("--json", metavar="OUT.json", help="also write the numbers as JSON")
    parser.add_argument("--top-k", type=int, default=5, help="eigenvalues of H and GGN to report (5)")
    parser.add_argument("--probes", type=int, default=30, help="Hutchinson probes for tr(H) (30)")
    parser.add_argument(
        "--steps", type=_int_at_least(0), help="training steps (built-in model: 300; yours: 0)"
    )
    parser.add_argument(
        "--samples", type=_int_at_least(1), default=2048, help="built-in data: samples (2048)"
    )
    parser.add_argument(
        "--batch-size", type=_int_at_least(1), default=512, help="built-in data: batch size (512)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the probes")
    parser.add_argument(
        "--threads",
        type=_int_at_least(1),
        help="torch threads (default: 1 for the built-in model, torch's choice for yours)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    return parser


class _Progress:
    """A tqdm bar over the report's sections on a terminal with tqdm installed, else one line per section."""

    def __init__(self, total: int, enabled: bool):
        self.enabled, self.count, self.total, self.bar = enabled, 0, total, None
        if enabled and sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="section", file=sys.stderr, leave=False)

    def next(self, name: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if self.count:
                self.bar.update(1)
            self.bar.set_description_str(name)
        else:
            print(f"[{self.count + 1}/{self.total}] {name} ...", file=sys.stderr, flush=True)
        self.count += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def _int_at_least(low: int):
    """An argparse ``type``: an int ≥ ``low`` (argparse names the option in its usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _device(text: str) -> torch.device:
    """An argparse ``type``: a ``torch.device`` (cpu, cuda, cuda:1, ...)."""
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:1, got {text!r}"
        ) from None


def _call(factory, what: str):
    try:
        return factory()
    except Exception as err:
        raise UsageError(f"--{what}: the factory raised {type(err).__name__}: {err}") from err


def _is_batch(obj) -> bool:
    return isinstance(obj, tuple | list) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)


if __name__ == "__main__":
    sys.exit(main())
