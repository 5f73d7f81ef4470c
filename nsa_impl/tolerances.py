"""Tolerance classes of spec I.10: the one definition used by tests, conformance and benchmarks."""

from __future__ import annotations

#: `exact`: the reference in float64 against an independent float64 formulation.
EXACT_ATOL = 1e-12
#: `fp32`: a float32 fast path against the reference run in float32, outputs.
FP32_OUT_ATOL = 1e-6
#: `fp32`: the same, gradients.
FP32_GRAD_ATOL = 1e-5
#: Relative gap under which two candidate block scores count as a near-tie (indices may differ).
NEAR_TIE_RTOL = 1e-6
#: `low-precision`: ``max|out - ref| <= FACTOR * max|naive_lowp - ref| + SLACK``.
LOWP_OUT_FACTOR = 2.0
LOWP_GRAD_FACTOR = 3.0
LOWP_SLACK = 1e-5


def lowp_bound(naive_err: float, kind: str = "out") -> float:
    """Allowed error of a low-precision kernel given the error of a naive same-dtype version.

    ``kind`` is ``"out"`` (factor 2) or ``"grad"`` (factor 3), spec I.10.
    """
    if kind not in ("out", "grad"):
        raise ValueError(f"kind must be 'out' or 'grad', got {kind!r}")
    factor = LOWP_OUT_FACTOR if kind == "out" else LOWP_GRAD_FACTOR
    return factor * float(naive_err) + LOWP_SLACK


def fp_class_atol(dtype_name: str, kind: str = "out") -> float:
    """Absolute tolerance of the `exact` (float64) or `fp32` (float32) class."""
    if dtype_name == "float64":
        return EXACT_ATOL
    if dtype_name == "float32":
        return FP32_OUT_ATOL if kind == "out" else FP32_GRAD_ATOL
    raise ValueError(f"no absolute tolerance class for {dtype_name}; use lowp_bound")
