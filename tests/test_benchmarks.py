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


def test_gpt_benchmark_runs_on_a_tiny_decoder(tmp_path, capsys, monkeypatch):
    import bench_gpt

    for name, value in {"VOCAB": 11, "CONTEXT": 4, "WIDTH": 8, "BLOCKS": 2, "HEADS": 2, "BATCH": 3}.items():
        monkeypatch.setattr(bench_gpt, name, value)
    path = tmp_path / "gpt.json"
    results = bench_gpt.main(["--quick", "--threads", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert "#### full batch (N=3, T=4)" in out and "| GGN-vp | curvfx ggn_vp |" in out
    assert json.loads(path.read_text())["P"] == results["P"]
    rows = results["tables"]["full batch (N=3, T=4)"]
    assert all("ratio" in rows[k] for k in ("curvfx hvp", "curvfx ggn_vp", "curvfx MC diag GGN (1 sample)"))
    assert next(r for k, r in rows.items() if k.startswith("curvfx eigsh per block"))["ratio"] > 0
    assert 0 < rows["curvfx MC diag GGN (1 sample)"]["rel_diff"] < 2  # another seed, another draw
    diag = results["tables"]["exact diag GGN (N=3, T=1)"]
    assert "ratio" in diag["curvfx exact diag GGN T=1 (structured)"]
    if "curvlinops GGNLinearOperator @ v, math SDPA kernel" in rows:  # the peer is installed
        assert rows["curvlinops GGNLinearOperator @ v, math SDPA kernel"]["rel_diff"] < 1e-4
