"""Sessions: tests, slow, lint, bench, docs. Each installs torch 2.13.0 (CPU build on local disk) first."""

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"


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
    install(session, "test,bench")
    session.run("python", "benchmarks/bench_core.py", *session.posargs)


@nox.session
def docs(session):
    install(session, "test,docs")
    session.run("python", "-m", "curvfx")
    session.run("python", "-m", "pytest", "-q", "docs")
