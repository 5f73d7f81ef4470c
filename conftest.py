"""Repository-wide pytest configuration: the one place where hypothesis profiles live.

Profiles:
- ``dev``: the default on a workstation; random, a few examples per property.
- ``ci``: derandomized (the same examples on every run), no example database; chosen when the
  environment has ``CI=true`` (GitHub Actions sets it).
- ``deep``: many examples, for a long hunt (``HYPOTHESIS_PROFILE=deep pytest properties``).

``HYPOTHESIS_PROFILE`` names a profile explicitly and wins over ``CI``. Property tests scale their
own example counts from the loaded profile (`properties.strategies.examples`), so a profile change
reaches every test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET when it first loads; without a GPU its kernels can only run in the
# interpreter, so a plain `pytest` on a CPU machine gets the same setting nox gives it. Checked
# through the device node, not CUDA, so nothing touches a GPU here.
if "TRITON_INTERPRET" not in os.environ and not Path("/dev/nvidia0").exists():
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, settings


def _one_thread_per_xdist_worker() -> None:
    """Give each pytest-xdist worker one intra-op thread (unless ``OMP_NUM_THREADS`` is set).

    ``-n 2`` already puts one worker on each core; torch's own OpenMP threads on top of that
    oversubscribe the cores and spin: on 2 cores the property tests took 60 s instead of 4 s.
    Set through the environment so that torch, imported later by the tests, starts that way;
    torch itself is not imported here (the gpu_matrix tests must run where torch is broken).
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch = sys.modules.get("torch")  # already imported by a plugin: tell it directly
    if torch is not None:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_one_thread_per_xdist_worker()

# nsa_ref runs one query row at a time: a single example can take a few hundred milliseconds,
# so per-example deadlines would only measure machine load.
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])

settings.register_profile("dev", max_examples=15, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("deep", max_examples=300, **_COMMON)


def _profile_name() -> str:
    """``HYPOTHESIS_PROFILE`` if set, else ``ci`` when ``CI`` is true, else ``dev``."""
    explicit = os.environ.get("HYPOTHESIS_PROFILE")
    if explicit:
        return explicit
    return "ci" if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes") else "dev"


PROFILE = _profile_name()
settings.load_profile(PROFILE)


def pytest_report_header(config) -> str:
    """Print the active hypothesis profile in pytest's header, so a log says how deep it went."""
    return f"hypothesis profile: {PROFILE}"
