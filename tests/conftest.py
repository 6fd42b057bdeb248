"""Fixtures: the case registry as parametrized, readable-id cases (float64 throughout)."""

from __future__ import annotations

import os

import pytest
import torch
from cases import CASES
from dense import dense_truth

# The problems are tiny; intra-op threads only add synchronisation. On a busy 2-core machine
# (load ~6) torch's default of 2 threads made test_func/test_losses/test_errors/
# test_properties take 110 s instead of 14 s with one thread.
torch.set_num_threads(int(os.environ.get("CURVFX_TEST_THREADS", "1")))


def _ids(cases):
    return [case.name for case in cases]


MODULE_CASES = [c for c in CASES if not c.pure]
INDEPENDENT_CASES = [c for c in CASES if not c.batchnorm_train]


@pytest.fixture(params=CASES, ids=_ids(CASES))
def case(request):
    """Every case of the registry."""
    return request.param


@pytest.fixture(params=MODULE_CASES, ids=_ids(MODULE_CASES))
def module_case(request):
    """Cases whose model is an nn.Module."""
    return request.param


@pytest.fixture(params=INDEPENDENT_CASES, ids=_ids(INDEPENDENT_CASES))
def independent_case(request):
    """Cases whose samples are independent (no BatchNorm in train mode)."""
    return request.param


@pytest.fixture
def problem(case):
    """A freshly built problem for ``case``."""
    return case.make()


@pytest.fixture
def dense(case):
    """The cached dense truth of ``case``."""
    return dense_truth(case)
