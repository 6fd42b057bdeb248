"""Sessions: tests, slow, lint, bench, docs. Each installs torch 2.13.0 (CPU build on local disk) first."""

import os
import tempfile

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"
# Installs the peer libraries with pip --no-deps (their requirements would replace torch).
PEERS_SCRIPT = os.path.join("..", "shared", "tools", "install-peers.sh")


def install(session, extras="test"):
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session):
    install(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def slow(session):
    install(session)
    session.run("python", "-m", "pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session):
    """``nox -s bench [-- --quick --json out.json --device cuda ...]``: curvfx against the peers.

    Then the GPT-style decoder benchmark (``benchmarks/bench_gpt.py``, CPU), in ``--quick``
    mode when the arguments ask for it.
    """
    install(session, "bench")
    if os.path.exists(PEERS_SCRIPT):
        session.run("bash", PEERS_SCRIPT, external=True)
    else:
        session.warn(f"{PEERS_SCRIPT} not found: the peers are reported as absent")
    session.run("python", "benchmarks/run.py", *session.posargs)
    session.run("python", "benchmarks/bench_gpt.py", *(["--quick"] if "--quick" in session.posargs else []))


@nox.session
def docs(session):
    """Build the site with warnings as errors, then run the examples of its pages and docstrings."""
    install(session, "test,docs")
    with tempfile.TemporaryDirectory() as site:
        session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})
    session.run("python", "-m", "pytest", "-q", "docs", "src/curvfx", *session.posargs)
