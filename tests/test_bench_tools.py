"""CPU checks of the benchmark tools that have a CPU mode (the GPU ones refuse without a GPU)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.triton
pytest.importorskip("triton", reason="triton is not installed")


def test_host_overhead_runs_with_stubbed_kernels_and_restores_them(capsys):
    """`bench/host_overhead.py`: a planned forward+backward with no kernel launched (so no
    interpreter time) is timed and its ops counted; the real kernel loaders come back."""
    from bench import host_overhead
    from nsa_impl.kernels import triton_attn, triton_gate, triton_sel, triton_topn

    mods = (triton_attn, triton_gate, triton_sel, triton_topn)
    before = [m._kernels for m in mods]
    assert host_overhead.main(["--backward", "--reps", "2", "--top", "3", "--ops"]) == 0
    out = capsys.readouterr().out
    assert "forward+backward, planned, kernels stubbed" in out and "torch ops dispatched" in out
    assert "sel_backward" in out  # the kernel ops are still dispatched, their launches stubbed
    assert [m._kernels for m in mods] == before
