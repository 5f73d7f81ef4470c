"""Fixtures shared by the unit tests (see `tests.helpers`)."""

import pytest

from tests.helpers import cpu_gpu_paths  # noqa: F401  (pytest finds fixtures by name)


@pytest.fixture(autouse=True)
def _fresh_plan_cache():
    """Each test starts without the plans of earlier plan-free calls: some tests patch the
    path table (`nsa_impl.dispatch.PATHS`), which the cache's key does not see."""
    from nsa_impl.plan import clear_plan_cache

    clear_plan_cache()
    yield
