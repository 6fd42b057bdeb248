"""The curvature report: its numbers against dense truths, the command line, the figure, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import curvfx
import curvfx.__main__ as cli
from curvfx.report import SECTIONS, curvature_report, format_report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "report_factories.py"
SMALL = ["--steps", "20", "--samples", "256", "--batch-size", "128", "--top-k", "2", "--probes", "4"]
HEADERS = [
    "== loss and gradient ==",
    "== Hessian eigenvalues",
    "== GGN eigenvalues",
    "== traces ==",
    "== spectral density of the Hessian",
    "== diagonal GGN per layer",
]


def test_headers_cover_the_sections():
    assert len(HEADERS) == len(SECTIONS)


def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, nn.CrossEntropyLoss(), x, y


def test_numbers_match_dense_truths():
    model, loss_fn, x, y = tiny_problem()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]  # uneven batches: weights 10/24, 14/24
    g = torch.Generator().manual_seed(0)
    r = curvature_report(model, loss_fn, batches, top_k=3, num_probes=200, slq_steps=10, generator=g)
    H = curvfx.hessian(model, loss_fn, (x, y)).to_dense()
    G = curvfx.ggn(model, loss_fn, (x, y)).to_dense()
    params = list(model.parameters())
    loss = loss_fn(model(x), y)
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
    assert r["P"] == sum(p.numel() for p in params) and r["N"] == 24 and r["num_batches"] == 2
    assert r["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert r["grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-10)
    h_top = torch.linalg.eigvalsh(H)[-3:].flip(0)
    g_top = torch.linalg.eigvalsh(G)[-3:].flip(0)
    assert torch.allclose(torch.tensor(r["hessian_eigenvalues"], dtype=H.dtype), h_top, rtol=1e-6)
    assert torch.allclose(torch.tensor(r["ggn_eigenvalues"], dtype=G.dtype), g_top, rtol=1e-6)
    assert r["ggn_trace"] == pytest.approx(float(torch.trace(G)), rel=1e-10)
    assert abs(r["hessian_trace"] - float(torch.trace(H))) < 4 * r["hessian_trace_se"]
    per_layer = {layer["name"]: layer for layer in r["layers"]}
    assert sum(layer["share"] for layer in r["layers"]) == pytest.approx(1.0)
    d = torch.diagonal(G)[: 5 * 4]  # 0.weight comes first
    assert per_layer["0.weight"]["mean"] == pytest.approx(float(d.mean()), rel=1e-10)
    assert per_layer["0.weight"]["max"] == pytest.approx(float(d.max()), rel=1e-10)
    text = format_report(r)
    assert all(header in text for header in HEADERS)


def test_report_prints_all_sections(capsys):
    assert cli.main(["report", *SMALL, "--no-progress"]) == 0
    out = capsys.readouterr().out
    for header in HEADERS:
        assert header in out
    assert "P = 5,699 parameters" in out and "tr(Hessian)" in out and "± " in out
    assert "0.weight" in out and "4.bias" in out


def test_no_subcommand_runs_the_report_and_writes_json(capsys, tmp_path):
    path = tmp_path / "r.json"
    assert cli.main([*SMALL, "--no-progress", "--json", str(path)]) == 0
    assert "== traces ==" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert len(data["hessian_eigenvalues"]) == 2 and data["P"] == 5699


def test_plain_text_progress_without_tqdm(capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name: None if name == "tqdm" else find_spec(name)
    )
    assert cli.main([*SMALL, "--steps", "0"]) == 0
    err = capsys.readouterr().err
    assert f"[1/{len(SECTIONS)}] loss and gradient ..." in err
    assert f"[{len(SECTIONS)}/{len(SECTIONS)}] diagonal GGN per layer ..." in err


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "report.png"
    assert cli.main(["report", *SMALL, "--no-progress", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert f"figure: {path}" in capsys.readouterr().out


def test_user_model_and_data_from_a_file(capsys):
    spec = f"{EXAMPLE}:make_model"
    assert cli.main(["report", "--model", spec, "--data", f"{EXAMPLE}:make_data", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "P = 448 parameters" in out and "N = 128 samples in 2 batch(es)" in out
    assert all(header in out for header in HEADERS)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def model():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

            def one_batch():
                return torch.randn(16, 3), torch.randn(16, 2)

            def batches():
                return [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]

            def no_data_key():
                return {"loss": nn.MSELoss()}

            def not_a_model():
                return 42

            def raises():
                raise RuntimeError("no GPU here")
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("data", "loss"),
    [("my_factories:one_batch", "MSELoss"), ("my_factories:batches", "CrossEntropyLoss")],
)
def test_data_contract_and_default_loss(factories, capsys, data, loss):
    assert cli.main(["--model", "my_factories:model", "--data", data, "--top-k", "2", "--no-progress"]) == 0
    assert f"loss {loss}(reduction='mean')" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
        (["--model", "my_factories"], "expected 'module:factory'"),
        (["--model", "missing.py:make"], "no file 'missing.py'"),
        (["--model", "my_factories:nothing", "--data", "my_factories:batches"], "no callable 'nothing'"),
        (
            ["--model", "my_factories:not_a_model", "--data", "my_factories:batches"],
            "returned int, not an nn.Module",
        ),
        (
            ["--model", "my_factories:raises", "--data", "my_factories:batches"],
            "raised RuntimeError: no GPU here",
        ),
        (["--model", "my_factories:model"], "--model needs --data"),
        (["--model", "my_factories:nothing"], "no callable 'nothing'"),
        (["--model", "my_factories:model", "--data", "my_factories:no_data_key"], "must have the key 'data'"),
        (["--model", "my_factories:model", "--data", "my_factories:model"], "expected (X, y) tensors"),
        (["--data", "my_factories:batches"], "--data needs --model"),
        (["--top-k", "0"], "--top-k must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_a_message(factories, capsys, argv, message):
    assert cli.main(["report", *argv, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("curvfx report: error: ") and message in captured.err


def test_model_and_data_that_disagree_exit_1_with_a_message(factories, capsys):
    argv = ["--model", "my_factories:model", "--data", "my_factories:one_batch", "--loss", "cross_entropy"]
    assert cli.main(["report", *argv, "--no-progress"]) == 1  # real-valued targets for cross-entropy
    err = capsys.readouterr().err
    assert err.startswith("curvfx report: error: ") and "Traceback" not in err


def test_bad_model_path_from_the_shell(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "curvfx", "report", "--model", "does.not.exist:factory", "--data", "x:y"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        "curvfx report: error: --model 'does.not.exist:factory': cannot import 'does.not.exist'"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_negative_mass_is_the_slq_weight_below_zero_and_matches_the_dense_spectrum():
    """negative_mass = (1/B) Σ_l Σ_{θ_li < 0} τ_li of the returned nodes and weights, and, with a
    full Krylov space (slq_steps = P), an estimate of the share of negative eigenvalues of the
    dense Hessian: per probe it is Σ_{λ_j < 0} (qᵀu_j)², whose mean over a uniform unit vector
    q is k/P with variance 2k(P − k)/(P²(P + 2)) (k negative eigenvalues); B = 10 probes, 4
    standard errors. The Hessian has exact zero eigenvalues (softmax's shift invariance), whose
    node may fall on either side of 0: k ranges from the count below −tol to that below +tol.
    """
    model, loss_fn, x, y = tiny_problem()
    H = curvfx.hessian(model, loss_fn, (x, y)).to_dense()
    P, B = H.shape[0], 10
    g = torch.Generator().manual_seed(3)
    r = curvature_report(
        model, loss_fn, (x, y), top_k=1, num_probes=4, slq_probes=B, slq_steps=P, generator=g
    )
    nodes, weights = r["slq_nodes"], r["slq_weights"]
    assert nodes.shape == weights.shape == (B, P)
    torch.testing.assert_close(weights.sum(1), torch.ones(B, dtype=weights.dtype))
    below = float(weights[nodes < 0].sum()) / B
    assert r["negative_mass"] == pytest.approx(below, rel=1e-12, abs=1e-15)
    eigenvalues = torch.linalg.eigvalsh(H)
    tol = 1e-8 * float(eigenvalues.abs().max())
    assert (
        float(nodes.min()) >= float(eigenvalues[0]) - tol
        and float(nodes.max()) <= float(eigenvalues[-1]) + tol
    )
    k_low, k_high = int((eigenvalues < -tol).sum()), int((eigenvalues < tol).sum())
    assert 0 < k_low and k_high < P  # the Hessian is indefinite: the check is not trivial
    se = max(math.sqrt(2 * k * (P - k) / (P**2 * (P + 2)) / B) for k in (k_low, k_high))
    assert k_low / P - 4 * se <= r["negative_mass"] <= k_high / P + 4 * se
