"""Shared pieces of the benchmarks: the models, the data, a round-robin median timer, peak memory."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import signal
import statistics
import threading
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


def cases(device, include_large: bool = False):
    """Named ``(model, loss_fn, x, y)`` cases on the CPU (callers move them to ``device``).

    ``include_large`` adds a ~1.9M-parameter MLP 784-1024-1024-10 (cross-entropy, N=64: its
    per-sample gradients alone take N·P·4 bytes = 477 MB).
    """
    torch.manual_seed(0)  # the models' initial weights
    g = torch.Generator().manual_seed(0)
    x_mlp = torch.randn(128, 784, generator=g)
    y_cls = torch.randint(0, 10, (128,), generator=g)
    x_cnn = torch.randn(64, 3, 32, 32, generator=g)
    y_cnn = torch.randint(0, 10, (64,), generator=g)
    y_reg = torch.randn(128, 10, generator=g)
    out = {
        "MLP 784-256-256-10 N=128 MSE": (mlp(), nn.MSELoss(), x_mlp, y_reg),
        "MLP 784-256-256-10 N=128 CE": (mlp(), nn.CrossEntropyLoss(), x_mlp, y_cls),
        "CNN 2conv+linear N=64 CE": (cnn(), nn.CrossEntropyLoss(), x_cnn, y_cnn),
    }
    if include_large:
        out["MLP 784-1024-1024-10 N=64 CE"] = (
            mlp((784, 1024, 1024, 10)),
            nn.CrossEntropyLoss(),
            x_mlp[:64],
            y_cls[:64],
        )
    return out


def time_ops(
    ops: dict,
    repeats: int,
    device,
    *,
    results: dict | None = None,
    memory: dict | None = None,
    max_seconds: float | None = None,
    slow_seconds: float | None = None,
    timeout: float | None = None,
) -> dict:
    """Median seconds of each op in ``ops``, timed round-robin so that machine noise hits all alike.

    Each op runs once untimed (warm-up), then ``repeats`` rounds each time every op once, in
    an order shuffled anew each round (seeded): the op run right after another pays for the
    other's freed memory and cold caches, so a fixed order favoured some ops by ~5 %. An
    op that raises in the warm-up is reported by the first clause of its message ("n/a (…)").

    Options (all off by default):

    * ``results``: a dict that receives each op's warm-up return value.
    * ``memory``: a dict that receives each op's peak memory in MiB, measured on the warm-up
      call (:func:`peak_memory`; the warm-up is untimed, so the profiler costs nothing).
    * ``max_seconds``: an op whose timed runs add up to this many seconds leaves the later
      rounds (it keeps at least one timed run).
    * ``slow_seconds``: an op whose warm-up took longer is timed by its warm-up alone (a
      first call, under the memory profiler if ``memory`` is asked for) and skips the rounds.
    * ``timeout``: an op whose warm-up runs past this many seconds is stopped (SIGALRM,
      checked between Python bytecodes; main thread only) and reported as "> timeout s".
    """
    times, failed, slow = {name: [] for name in ops}, {}, set()
    with _MemoryTracker(device, enabled=memory is not None) as tracker:
        for name, op in ops.items():  # warm-up
            start = time.perf_counter()
            try:
                with _time_limit(timeout), tracker.track(name):
                    value = op()
            except _Timeout:
                failed[name] = f"> {timeout:g} s (stopped by the per-call limit)"
                continue
            except Exception as err:  # any failure is reported, not fatal
                failed[name] = f"n/a ({type(err).__name__}: {_first_clause(err)})"
                continue
            if results is not None:
                results[name] = value
            del value
            elapsed = time.perf_counter() - start
            if slow_seconds is not None and elapsed > slow_seconds:
                slow.add(name)
                times[name].append(elapsed)
    if memory is not None:
        memory.update(tracker.peaks)
    order = random.Random(0)
    for _ in range(repeats):
        for name, op in order.sample(list(ops.items()), len(ops)):  # a new order each round
            if name in failed or name in slow:
                continue
            if max_seconds is not None and times[name] and sum(times[name]) > max_seconds:
                continue
            times[name].append(_timed(op, device))
    return {name: failed.get(name) or statistics.median(times[name]) for name in ops}


def peak_memory(op, device) -> float:
    """Peak tensor memory (MiB) allocated while ``op()`` runs, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start. CPU:
    the allocation and free events of torch's CPU allocator recorded by ``torch.profiler``
    (``profile_memory=True``) while ``op`` runs, summed in time order, maximum of the running
    sum. Both count tensor storage only (not Python objects, not allocator caches), including
    the result.
    """
    with _MemoryTracker(device) as tracker, tracker.track("op"):
        op()
    return tracker.peaks["op"]


class _MemoryTracker:
    """Peak memory of several calls (:func:`peak_memory`) under one profiler session.

    A CPU profiler session costs about half a second to start and stop, so one session
    covers all calls; each call is marked with ``record_function`` and its allocation
    events are those between the mark's start and end.
    """

    def __init__(self, device, enabled: bool = True):
        self.device, self.enabled, self.peaks = torch.device(device), enabled, {}
        self.cpu = enabled and self.device.type != "cuda"
        self.prof = self.quiet = None

    def __enter__(self):
        if self.cpu:
            from torch.profiler import ProfilerActivity, profile

            self.quiet = _quiet_stderr()
            self.quiet.__enter__()
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    @contextlib.contextmanager
    def track(self, name: str):
        if not self.enabled:
            yield
        elif self.cpu:
            with torch.profiler.record_function(f"_bench::{name}"):
                yield
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peaks[name] = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def __exit__(self, *exc):
        if not self.cpu:
            return False
        try:
            self.prof.__exit__(*exc)
        finally:
            self.quiet.__exit__(None, None, None)
        events = list(self.prof.profiler.kineto_results.events())
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        for e in events:
            if e.name().startswith("_bench::"):
                running = peak = 0
                for t, nbytes in memory:
                    if e.start_ns() <= t <= e.end_ns():
                        running += nbytes
                        peak = max(peak, running)
                self.peaks[e.name()[len("_bench::") :]] = peak / 2**20
        return False


def _timed(op, device) -> float:
    _sync(device)
    start = time.perf_counter()
    op()
    _sync(device)
    return time.perf_counter() - start


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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


def machine(device, threads: int) -> str:
    """One line naming the CPU (or GPU), the thread count, the torch version and THP allocation.

    ``THP_MEM_ALLOC_ENABLE=1`` (read by torch's CPU allocator at start-up) puts large
    tensors on transparent huge pages, which cuts the first-touch cost of fresh large
    buffers several-fold and so moves the ratios of memory-heavy ops: the line says
    whether it was set.
    """
    device = torch.device(device)
    cpu = _cpu_name()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    thp = "on" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "off"
    return (
        f"{where} ({cpu}, {os.cpu_count()} cores), {threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.system()}, THP_MEM_ALLOC_ENABLE {thp}"
    )


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _first_clause(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(";")[0]
    return text if len(text) <= 90 else text[:87] + "..."


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's start/stop lines, which the C++ side writes to file descriptor 2."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
