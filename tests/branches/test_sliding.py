"""nsa_impl.branches.sliding: the window's row ranges and its "masked" / "flash" paths."""

from __future__ import annotations

import pytest
import torch

import nsa_ref
from nsa_impl import dispatch, nsa_attention
from nsa_impl.branches import sliding
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig

from ..helpers import err, inputs, plan_of


def test_window_ranges_hold_exactly_min_w_p_plus_1_keys_of_the_sequence():
    cfg = NSAConfig(window=3)
    layout = PackedLayout.build(12, [0, 2, 12])
    r = sliding.window_ranges(cfg, layout)
    for t in range(12):
        p = int(layout.pos[t])
        assert int(r.hi[t] - r.lo[t]) == min(3, p + 1) and int(r.hi[t]) == t + 1
        assert int(r.lo[t]) >= int(layout.seq_start[t])


@pytest.mark.parametrize(
    "B,T,G,h,Dk,Dv,window,cu",
    [
        (2, 23, 2, 2, 24, 16, 5, None),  # Dk != Dv: padded to 24
        (1, 30, 1, 3, 16, 20, 1, [0, 7, 30]),  # w = 1: the diagonal only; Dv padded to 24
        (1, 19, 2, 1, 8, 8, 40, None),  # w > T: plain causal (left = -1)
    ],
)
@pytest.mark.parametrize("path", ["masked", "flash"])
def test_paths_match_the_reference_window(cpu_gpu_paths, path, B, T, G, h, Dk, Dv, window, cu):
    """The window branch alone (gates (0, 0, 1)) against nsa_ref, forward and backward."""
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_top_n=3, window=window)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, _ = inputs(B, T, G, h, Dk, Dv, seed=T, grad=True)
    gates = torch.zeros(B, T, G * h, 3)
    gates[..., 2] = 1.0
    with dispatch.force_path(win=path):
        p = plan_of(q, k, v, cfg, cu_t)
    o = nsa_attention(q, k, v, gates, cfg, scale=0.4, plan=p)
    ref = nsa_ref.nsa_attention(q, k, v, gates, cfg, scale=0.4, cu_seqlens=cu_t)
    assert err(o, ref) <= FP32_OUT_ATOL
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do),
                    torch.autograd.grad(ref, (q, k, v), do), strict=True):  # fmt: skip
        assert err(a, b) <= FP32_GRAD_ATOL
