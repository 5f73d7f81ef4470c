"""Fixtures of the gpu_matrix tests. Nothing here imports torch or touches CUDA at import time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: The repository root: subprocesses get it on PYTHONPATH, so they import this checkout.
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda_device():
    """``torch.device("cuda")`` for GPU-lane tests; skips with the reason when there is none."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip(
            f"no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
            "sees none"
        )
    return torch.device("cuda")


@pytest.fixture
def run_python():
    """Run ``python -c CODE`` or ``python -m ...`` in a fresh interpreter on this checkout.

    A fresh process is the only honest way to check what an import does (sys.modules, CUDA).
    ``extra_path`` directories go before the checkout on PYTHONPATH (e.g. a fake broken torch).
    """

    def run(*args: str, extra_path: tuple[str, ...] = (), timeout: float = 120):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [*extra_path, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        return subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
        )

    return run
