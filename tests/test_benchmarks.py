"""The benchmark runner (benchmarks/run.py) on one small op: tables, JSON, absent peers, limits."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _peers  # noqa: E402
import run  # noqa: E402


def test_time_ops_reports_failures_timeouts_results_and_memory():
    import torch

    x = torch.randn(256, 256)

    def fails():
        raise RuntimeError("no double backward; use the math kernel")

    def sleeps():
        while True:
            time.sleep(0.01)

    results, memory = {}, {}
    times = _common.time_ops(
        {"ok": lambda: x @ x, "fails": fails, "sleeps": sleeps},
        2,
        "cpu",
        results=results,
        memory=memory,
        timeout=0.5,
    )
    assert isinstance(times["ok"], float) and times["ok"] > 0
    assert times["fails"] == "n/a (RuntimeError: no double backward)"
    assert times["sleeps"].startswith("> 0.5 s")
    assert torch.equal(results["ok"], x @ x) and set(results) == {"ok"}
    assert memory["ok"] == pytest.approx(256 * 256 * 4 / 2**20, rel=0.01)  # the result's storage


def test_runner_prints_tables_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(_peers.PEERS, "nonexistent-peer", ("curvfx_no_such_peer", "no-such-dist"))
    path = tmp_path / "bench.json"
    argv = ["--quick", "--threads", "1", "--case", "CNN", "--op", "GGN-vp", "--json", str(path)]
    results = run.main(argv)
    out = capsys.readouterr().out
    assert "### CNN 2conv+linear N=64 CE" in out and "| GGN-vp | curvfx |" in out
    assert "| GGN-vp | plain torch autograd |" in out and "### Targets" in out
    assert "nonexistent-peer absent (ModuleNotFoundError" in out
    saved = json.loads(path.read_text())
    assert saved["cases"].keys() == results["cases"].keys() == {"CNN 2conv+linear N=64 CE"}
    rows = saved["cases"]["CNN 2conv+linear N=64 CE"]["ops"]["GGN-vp"]["rows"]
    assert rows["curvfx"]["rel_diff"] == 0.0
    assert rows["plain torch autograd"]["rel_diff"] < 1e-4  # float32, a different engine
    assert all(r["peak_mib"] > 0 for r in rows.values() if "ratio" in r)


def test_update_docs_replaces_the_marked_block(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\noutro\n")
    run.update_docs(str(page), "new table")
    assert page.read_text() == "intro\n<!-- bench:begin -->\nnew table\n<!-- bench:end -->\noutro\n"
