"""Fixtures shared by the unit tests (see `tests.helpers`)."""

from tests.helpers import cpu_gpu_paths  # noqa: F401  (pytest finds fixtures by name)
