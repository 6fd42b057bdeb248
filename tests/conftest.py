"""Fixtures: the case registry as parametrized, readable-id cases (float64 throughout)."""

from __future__ import annotations

import pytest
from cases import CASES
from dense import dense_truth


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
