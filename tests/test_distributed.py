"""Data-parallel operators on torch.distributed: W gloo processes on 127.0.0.1 vs one process on all data.

One spawn per world size runs every scenario (``_worker``) and saves each rank's results;
the tests compare them with the single-process results on the concatenated data, built
here by the same code in float64. Shards are uneven, and one rank holds two batches.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvfx
from curvfx.estimators._probes import make_generator
from curvfx.operators._distributed import process_group_of, resolve_process_group, unwrap_ddp

SPLITS = {2: [[8], [6, 9]], 3: [[4], [5, 7], [7]]}  # batch sizes per rank: 23 samples, uneven
N, D_IN, C = 23, 4, 3
TOL = 1e-10
GROUP_TIMEOUT = 20  # seconds: a collective that waits longer raises
SHORT_TIMEOUT = 2  # seconds: the group of the "a rank never arrives" scenario
SPAWN_TIMEOUT = 120  # seconds for the whole spawn; beyond it the test fails (no hang)


# -- the problem, built identically in the workers and here ------------------------------------
def make_problem():
    """Model (float64, P = 51), inputs X [23, 4], class targets [23], regression targets [23, 3]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y_cls = torch.randint(0, C, (N,), generator=g)
    y_reg = torch.randn(N, C, generator=g, dtype=torch.float64)
    P = curvfx.ravel(dict(model.named_parameters())).numel()
    v = torch.randn(P, generator=g, dtype=torch.float64)
    V = torch.randn(P, 5, generator=g, dtype=torch.float64)
    return model, X, y_cls, y_reg, v, V


def shard(world: int, rank: int, *tensors: torch.Tensor) -> list[tuple]:
    """This rank's batches: consecutive slices of the data, sizes from ``SPLITS``."""
    sizes = [n for per_rank in SPLITS[world] for n in per_rank]
    assert sum(sizes) == N
    start = sum(n for per_rank in SPLITS[world][:rank] for n in per_rank)
    batches = []
    for n in SPLITS[world][rank]:
        batches.append(tuple(t[start : start + n] for t in tensors))
        start += n
    return batches


def products(model, X, y_cls, y_reg, v, V, data, group=True) -> dict[str, torch.Tensor]:
    """Every checked quantity; ``data(*targets)`` gives the batches, ``group`` the process group."""
    ce, mse, mse_sum = nn.CrossEntropyLoss(), nn.MSELoss(), nn.MSELoss(reduction="sum")
    G = curvfx.ggn(model, ce, data(X, y_cls), process_group=group)
    params = dict(model.named_parameters())
    out = {
        "hvp CE": curvfx.hessian(model, ce, data(X, y_cls), process_group=group) @ v,
        "hvp MSE sum": curvfx.hessian(model, mse_sum, data(X, y_reg), process_group=group) @ v,
        "ggn-vp MSE": curvfx.ggn(model, mse, data(X, y_reg), process_group=group) @ v,
        "ggn-vp CE": G @ v,
        "ggn-vp CE pytree": curvfx.ravel(G @ curvfx.unravel(v, params)),
        "ggn matmat CE": G @ V,
        "empirical fisher CE": curvfx.empirical_fisher(model, ce, data(X, y_cls), process_group=group) @ v,
        "exact fisher matmat CE": curvfx.fisher(model, ce, data(X, y_cls), kind="exact", process_group=group)
        @ V,
        "exact diag GGN CE": curvfx.diagonal(G),
        "exact diag GGN MSE": curvfx.diagonal(curvfx.ggn(model, mse, data(X, y_reg), process_group=group)),
        "Hutchinson trace": curvfx.trace(G, "hutchinson", num_samples=20, generator=_gen(7)),
        "XTrace": curvfx.trace(G, "xtrace", num_samples=10, generator=_gen(8)),
        "Hutchinson diagonal": curvfx.diagonal(G, "hutchinson", num_samples=10, generator=_gen(9)),
        "top eigenvalue": curvfx.eigsh(G, k=1, generator=_gen(10), return_eigenvectors=False),
        "SLQ nodes": curvfx.spectral_density(G, num_probes=2, num_steps=8, generator=_gen(11))[0],
        "CG solve (G + 0.1 I)": curvfx.cg(G, v, damping=0.1, tol=1e-12)[0],
    }
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# -- the workers -------------------------------------------------------------------------------
def _loopback() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS): gloo then stays on 127.0.0.1."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    if _loopback():
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT),
    )
    results: dict = {}
    try:
        _scenarios(rank, world, results)
    except Exception:  # report rather than hang the others: the parent shows it
        results["worker error"] = traceback.format_exc()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _outcome(fn) -> tuple:
    """("ok", value) or ("raised", type name, message)."""
    try:
        return ("ok", fn())
    except Exception as err:
        return ("raised", type(err).__name__, str(err))


def _scenarios(rank: int, world: int, results: dict) -> None:
    model, X, y_cls, y_reg, v, V = make_problem()
    group = dist.group.WORLD

    def data(*tensors):
        return shard(world, rank, *tensors)

    results["products"] = products(model, X, y_cls, y_reg, v, V, data)

    # probes without a generator: rank 0's seed everywhere, whatever each rank's global RNG
    torch.manual_seed(100 + rank)
    results["make_generator"] = torch.randn(4, generator=make_generator(None, process_group=group))
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), data(X, y_cls), process_group=True)
    damped = G + 0.1 * curvfx.identity(G.shape[0])
    results["group of damped"] = process_group_of(damped) is group
    results["trace, no generator"] = _outcome(lambda: curvfx.trace(damped, "hutchinson", num_samples=8))

    # MC Fisher: one seed for the group, an independent stream per rank
    torch.manual_seed(200 + rank)
    F = curvfx.fisher(
        model, nn.CrossEntropyLoss(), data(X, y_cls), kind="mc", num_samples=400, process_group=True
    )
    results["mc seed"] = F.seed
    results["mc fisher"] = F @ v

    # a DistributedDataParallel model: its module is used, no gradient all-reduce runs
    ddp = nn.parallel.DistributedDataParallel(model)
    calls = []

    def count_hook(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, count_hook)
    G_ddp = curvfx.ggn(ddp, nn.CrossEntropyLoss(), data(X, y_cls), process_group=ddp.process_group)
    H_ddp = curvfx.hessian(ddp, nn.CrossEntropyLoss(), data(X, y_cls), process_group=True)
    results["ddp"] = {"ggn-vp": G_ddp @ v, "hvp": H_ddp @ v, "diag": curvfx.diagonal(G_ddp)}
    results["ddp comm hook calls"] = len(calls)
    results["ddp grads"] = [p.grad for p in model.parameters()]
    results["ddp optimizer"] = _outcome(
        lambda: (
            type(
                curvfx.optim.HessianFree(ddp.parameters(), model=ddp, loss_fn=nn.CrossEntropyLoss())
            ).__name__
        )
    )

    # a rank whose share raises: every rank raises, and the group stays usable
    last = world - 1
    bad = [(x, y[:, :2] if rank == last else y) for x, y in data(X, y_reg)]
    G_bad = curvfx.ggn(model, nn.MSELoss(), bad, process_group=True)
    results["failing rank"] = _outcome(lambda: G_bad @ v)
    results["after failure"] = G @ v

    # ranks that disagree on v or on the parameters: every rank raises ValueError
    w = v + (rank == last) * 1e-3
    results["v differs"] = _outcome(lambda: G @ w)
    other = make_problem()[0]
    if rank == last:
        with torch.no_grad():
            other[0].weight[0, 0] += 0.5
    G_other = curvfx.ggn(other, nn.CrossEntropyLoss(), data(X, y_cls), process_group=True)
    results["params differ"] = _outcome(lambda: G_other @ v)

    # ranks that make products of different shapes: ValueError everywhere (not a gloo abort)
    results["shapes differ"] = _outcome(lambda: G @ V[:, : 3 + (rank == last)])
    # float16 with Σ Z = N·C beyond its range: the exchange and the division stay in float32
    half = curvfx.ggn(
        copy.deepcopy(model).half(),
        nn.MSELoss(),
        [(x.half().repeat(1000, 1), y.half().repeat(1000, 1)) for x, y in data(X, y_reg)],
        process_group=True,
    )
    results["half ggn-vp MSE"] = (half @ v.half()).double()

    # a rank that never reaches the all-reduce: the others raise after the group's timeout
    short = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT))
    G_short = curvfx.ggn(model, nn.CrossEntropyLoss(), data(X, y_cls), process_group=short)
    if rank != last:  # the last rank stays alive but does not take part
        start = time.perf_counter()
        results["rank never arrives"] = _outcome(lambda: G_short @ v)
        results["waited"] = time.perf_counter() - start
    dist.barrier()  # on the default group, after the others timed out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out_dir: Path) -> list[dict]:
    ctx = mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {SPAWN_TIMEOUT} s (a hang)")
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "worker error" not in res, f"rank {r}:\n{res['worker error']}"
    return results


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=lambda w: f"{w}proc")
def runs(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """(W, each rank's results) of one spawn of W gloo processes."""
    world = request.param
    return world, _spawn(world, tmp_path_factory.mktemp(f"dist{world}"))


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process results on the concatenated data (one batch)."""
    model, X, y_cls, y_reg, v, V = make_problem()
    return products(model, X, y_cls, y_reg, v, V, lambda *t: t, group=None)


# -- tests --------------------------------------------------------------------------------------
def test_products_and_estimators_match_single_process(runs, reference):
    """HVP, GGN-vp, matmat, exact diagonals, trace, eigenvalue, SLQ, CG: relerr < 1e-10 on every rank."""
    world, results = runs
    for r, res in enumerate(results):
        assert res["products"].keys() == reference.keys()
        errors = {name: relerr(res["products"][name], ref) for name, ref in reference.items()}
        bad = {name: e for name, e in errors.items() if not e < TOL}
        assert not bad, f"rank {r} of {world}: relative errors above {TOL}: {bad}"


def test_ranks_get_identical_results(runs):
    world, results = runs
    for name, value in results[0]["products"].items():
        for r in range(1, world):
            assert torch.equal(results[r]["products"][name], value), f"{name}: rank {r} differs from rank 0"


def test_probe_seed_is_broadcast_from_rank_0(runs):
    world, results = runs
    for r in range(1, world):
        assert torch.equal(results[r]["make_generator"], results[0]["make_generator"])
    assert all(res["group of damped"] for res in results)


def test_estimator_without_generator_stays_in_lockstep(runs):
    """trace(G + λI) with generator=None and rank-dependent global RNGs."""
    _world, results = runs
    outcomes = [res["trace, no generator"] for res in results]
    assert all(o[0] == "ok" for o in outcomes), outcomes
    assert all(torch.equal(o[1], outcomes[0][1]) for o in outcomes)


def test_mc_fisher_one_seed_per_group_and_correct_in_distribution(runs, reference):
    """Rank r's seed is rank 0's + r·2³²; the draws differ, the result matches the exact Fisher."""
    _world, results = runs
    seeds = [res["mc seed"] for res in results]
    assert all(s - seeds[0] == r << 32 for r, s in enumerate(seeds))
    model, X, y_cls, _, v, _ = make_problem()
    exact = curvfx.fisher(model, nn.CrossEntropyLoss(), (X, y_cls), kind="exact") @ v
    for res in results:
        assert torch.equal(res["mc fisher"], results[0]["mc fisher"])
    assert relerr(results[0]["mc fisher"], exact) < 0.1  # 400 draws per sample, fixed seed


def test_ddp_model_uses_its_module_without_gradient_allreduce(runs, reference):
    _world, results = runs
    truth = {
        "ggn-vp": reference["ggn-vp CE"],
        "hvp": reference["hvp CE"],
        "diag": reference["exact diag GGN CE"],
    }
    for res in results:
        for name, ref in truth.items():
            assert relerr(res["ddp"][name], ref) < TOL, name
        assert res["ddp comm hook calls"] == 0
        assert all(g is None for g in res["ddp grads"])
        outcome, error, message = res["ddp optimizer"]  # single-process optimizers refuse DDP
        assert outcome == "raised" and error == "ValueError" and "single-process" in message, message
    model = make_problem()[0]
    assert unwrap_ddp(model) is model


def test_failing_rank_raises_on_every_rank(runs, reference):
    """The failing rank raises its own error; the others a RuntimeError naming it; the group survives."""
    world, results = runs
    last = world - 1
    own = results[last]["failing rank"]
    assert own[0] == "raised" and own[1] == "ValueError", own
    for res in results[:last]:
        outcome = res["failing rank"]
        assert outcome[0] == "raised" and outcome[1] == "RuntimeError", outcome
        assert f"rank(s) [{last}]" in outcome[2]
    for res in results:
        assert relerr(res["after failure"], reference["ggn-vp CE"]) < TOL


def test_products_of_different_shapes_raise_everywhere(runs):
    _world, results = runs
    for res in results:
        outcome = res["shapes differ"]
        assert outcome[0] == "raised" and outcome[1] == "ValueError", outcome
        assert "different shapes or dtypes" in outcome[2]


def test_half_precision_normalizers_beyond_float16_range(runs, reference):
    """Σ Z = 23000·3 > 65504: a float16 operator still matches float64 (repeated data: same mean)."""
    _world, results = runs
    for res in results:
        assert relerr(res["half ggn-vp MSE"], reference["ggn-vp MSE"]) < 2e-2


@pytest.mark.parametrize("scenario", ["v differs", "params differ"])
def test_inputs_that_differ_across_ranks_raise_everywhere(runs, scenario):
    _world, results = runs
    for res in results:
        outcome = res[scenario]
        assert outcome[0] == "raised" and outcome[1] == "ValueError", outcome
        assert "mismatch across the ranks" in outcome[2]


def test_rank_that_never_arrives_times_out_instead_of_hanging(runs):
    world, results = runs
    for res in results[: world - 1]:
        outcome = res["rank never arrives"]
        assert outcome[0] == "raised" and "timed out" in outcome[2].lower(), outcome
        assert SHORT_TIMEOUT - 0.5 < res["waited"] < SHORT_TIMEOUT + 10


# -- single process --------------------------------------------------------------------------
def test_process_group_is_an_explicit_opt_in():
    model, X, y_cls, _, _v, _ = make_problem()
    G = curvfx.ggn(model, nn.CrossEntropyLoss(), (X, y_cls))
    assert G.process_group is None and resolve_process_group(None) is None
    assert resolve_process_group(False) is None
    with pytest.raises(ValueError, match="not initialized"):
        curvfx.ggn(model, nn.CrossEntropyLoss(), (X, y_cls), process_group=True)
    with pytest.raises(TypeError, match="process_group"):
        curvfx.hessian(model, nn.CrossEntropyLoss(), (X, y_cls), process_group="world")


@pytest.mark.slow
def test_example_runs_under_torchrun():
    """examples/distributed_ggn.py under ``torchrun --nproc_per_node=2`` (it checks itself on rank 0)."""
    script = Path(__file__).parents[1] / "examples" / "distributed_ggn.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if _loopback():
        env["GLOO_SOCKET_IFNAME"] = _loopback()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("relative error to one process") == 4, done.stdout
