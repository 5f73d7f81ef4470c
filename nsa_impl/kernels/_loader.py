"""Load a Triton kernel file once per execution mode (compiled for CUDA, interpreted for CPU).

``triton.jit`` decides between compiled and interpreted code when a function is decorated (it
reads ``TRITON_INTERPRET``, through ``triton.knobs`` where that exists), so a kernel file is
executed as a separate module per mode, with the switch set only while it executes. CUDA tensors
then get compiled kernels and CPU tensors (under ``TRITON_INTERPRET=1``) interpreted ones, in
one process, whatever was imported first.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

_MODULES: dict[tuple[str, bool], object] = {}
#: Re-entrant: a kernel file may load a helper file (in its own mode) while it executes.
_LOCK = threading.RLock()
#: Modes of the kernel files being executed right now (innermost last).
_EXECUTING: list[bool] = []


def executing_mode() -> bool:
    """The mode (``True``: interpreted) of the kernel file that `load_kernel_module` is executing.

    A kernel file calls ``load_kernel_module("_helpers.py", executing_mode())`` to get shared
    ``triton.jit`` helpers decorated in its own mode. A kernel file imported directly (outside
    a load: ``import nsa_impl.kernels._range_kernels``) was decorated in the mode
    ``TRITON_INTERPRET`` sets, so that is the mode then.
    """
    if not _EXECUTING:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _EXECUTING[-1]


def load_kernel_module(filename: str, interpret: bool):
    """The kernel file ``filename`` (next to this one) executed in the given mode, cached."""
    key = (filename, interpret)
    with _LOCK:
        if key not in _MODULES:
            import triton

            stem = Path(filename).stem
            name = f"nsa_impl.kernels.{stem}_{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
            mod = importlib.util.module_from_spec(spec)
            old_env = os.environ.get("TRITON_INTERPRET")
            knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
            old_knob = knobs.__dict__.pop("interpret", None) if knobs is not None else None
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
            _EXECUTING.append(interpret)
            try:
                spec.loader.exec_module(mod)
            finally:
                _EXECUTING.pop()
                if old_env is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = old_env
                if knobs is not None and old_knob is not None:
                    knobs.__dict__["interpret"] = old_knob
            _MODULES[key] = mod
        return _MODULES[key]
