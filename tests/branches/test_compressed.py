"""nsa_impl.branches.compressed: the compressed-block geometry and the "flash" path's wiring."""

from __future__ import annotations

import pytest
import torch

import nsa_ref
from nsa_impl import dispatch, nsa_attention
from nsa_impl.branches.compressed import CmpLayout, num_cmp
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig

from ..helpers import err, inputs, plan_of

PAPER_LIKE = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)


def test_num_cmp_vectorised():
    cfg = NSAConfig(cmp_block=32, cmp_stride=16)
    pos = torch.arange(200)
    assert num_cmp(pos, cfg).tolist() == [cfg.num_cmp(p) for p in range(200)]


def test_layout_blocks_stay_inside_their_sequences():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=3)
    bounds = [0, 5, 6, 14, 18]
    layout = PackedLayout.build(18, bounds)
    cl = CmpLayout.build(cfg, layout)
    expected = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        expected += [a + i * 2 for i in range(cfg.num_cmp(b - a - 1))]
    assert cl.starts.tolist() == expected and not cl.single
    assert torch.equal(cl.device_starts, cl.starts)
    for r in range(18):  # each row sees its own sequence's first num_cmp(p) blocks
        p = int(layout.pos[r])
        lo, hi = int(cl.ranges.lo[r]), int(cl.ranges.hi[r])
        assert hi - lo == cfg.num_cmp(p)
        assert all(layout.seq_id[cl.starts[i]] == layout.seq_id[r] for i in range(lo, hi))


@pytest.mark.parametrize("cu", [None, [0, 30, 70]])
def test_flash_path_matches_reference(cpu_gpu_paths, cu):
    """cmp on "flash" (Triton scores in the interpreter, FlashAttention's function in dense
    PyTorch on CPU tensors) through nsa_attention, against nsa_ref, with gradients."""
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, gates = inputs(1, 70, 2, 2, 16, 16, seed=5, grad=True)
    with dispatch.force_path(cmp="flash"):
        p = plan_of(q, k, v, PAPER_LIKE, cu_t)
    assert p.route["cmp"].path == "flash"
    o, aux = nsa_attention(q, k, v, gates, PAPER_LIKE, plan=p, return_aux=True)
    ref_o, ref = nsa_ref.nsa_attention(q, k, v, gates, PAPER_LIKE, cu_seqlens=cu_t,
                                       return_aux=True)  # fmt: skip
    assert torch.equal(aux.block_indices, ref.block_indices)
    for name in ("o_cmp", "p_cmp"):
        assert err(getattr(aux, name), getattr(ref, name)) <= FP32_OUT_ATOL, name
    assert err(aux.p_slc, ref.p_slc) <= 1e-5 * max(1.0, float(ref.p_slc.abs().max()))
    assert err(o, ref_o) <= FP32_OUT_ATOL
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v, gates), do),
                    torch.autograd.grad(ref_o, (q, k, v, gates), do), strict=True):  # fmt: skip
        assert err(a, b) <= FP32_GRAD_ATOL
    empty = PAPER_LIKE.cmp_block - 1  # positions 0..l-2 see no compressed block: exact zeros
    assert torch.equal(aux.o_cmp[:, :empty], torch.zeros_like(aux.o_cmp[:, :empty]))
