"""nsa_impl.kernels.triton_topn: the fused selection scores + top-n (spec I.4-I.5, Eqs. 9-11).

On CPU tensors in Triton's interpreter. The kernel's indices equal `nsa_impl.scoring.top_n`
applied to the kernel's own float32 scores, exactly (ties included: all-zero queries make every
interior block tie), and the reference's indices where the scores are exact. Its scores against
the reference: tests/kernels/test_triton_attn.py (through the "triton" compressed path).
"""

from __future__ import annotations

import math

import pytest
import torch

from nsa_impl import scoring
from nsa_impl.kernels import ops, tuning
from nsa_ref import NSAConfig
from nsa_ref import nsa_attention as ref_nsa_attention

from ..helpers import plan_of

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

from nsa_impl.kernels import triton_attn, triton_topn  # noqa: E402

pytestmark = pytest.mark.triton

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)
#: l = d = l': one halo-free band per block, two initial blocks forced.
FLAT = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=5, window=4,
                 sel_init_blocks=2, sel_local_blocks=1)  # fmt: skip
SMALL = tuning.AttnTuning(fwd=tuning.Launch(rows=16, block_n=16))
SMALL_TOPN = tuning.TopNTuning(positions=16, block_n=16)


def _inputs(T, H, G, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, 16, generator=gen).to(dtype)
    k = torch.randn(1, T, G, 16, generator=gen).to(dtype)
    return q, k


def _kernel_selection(q, k, cfg, cu=None):
    """``(block_indices, float32 scores, plan)`` of the fused kernel on ``q`` and compressed
    ``k``. The float32 scores are the ones the kernel ranked (``Scores.p_slc`` is rounded to q's
    dtype, which can tie scores the kernel told apart)."""
    B, T, H, D = q.shape
    p = plan_of(q, k, k, cfg, cu)
    kc = scoring.compress(k, cfg, p.cmp)
    lay = p.cmp_triton
    q3, k3 = q.reshape(B * T, H, D), kc.reshape(-1, kc.shape[2], D)
    with ops.tuning(poison_outputs=True):
        _, lse = triton_attn.cmp_attention(q3, k3, k3, lay.qstart, lay.kstart, lay.max_len,
                                           cfg.cmp_block, cfg.cmp_stride, tuning=SMALL)
        idx, sc = triton_topn.select_blocks(
            q3, k3, lse, lay.qstart, lay.kstart, lay.max_len, cmp_block=cfg.cmp_block,
            cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block, top_n=cfg.sel_top_n,
            init_blocks=cfg.sel_init_blocks, local_blocks=cfg.sel_local_blocks,
            num_scores=cfg.num_sel_blocks(T), tuning=SMALL_TOPN,
        )  # fmt: skip
    G = k.shape[2]
    return idx.reshape(B, T, G, -1), sc.reshape(B, T, G, -1), p


def _own_rule(scores, p, cfg):
    """`nsa_impl.scoring.top_n` applied to ``scores [B, T, G, S]``, as ``[B, T, G, n]``."""
    block = (p.layout.pos // cfg.sel_block).to(scores.device)
    return scoring.top_n(scores.permute(0, 2, 1, 3), block, cfg).permute(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cfg", "T", "G", "h", "cu"), [
    (CFG, 120, 2, 4, None), (FLAT, 60, 1, 1, None), (CFG, 100, 1, 16, [0, 37, 100]),
])  # fmt: skip
def test_top_n_is_the_scoring_rule_on_its_own_scores(cfg, T, G, h, cu, dtype):
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k = _inputs(T, G * h, G, seed=h, dtype=dtype)
    idx, sc, p = _kernel_selection(q, k, cfg, cu)
    assert torch.equal(idx, _own_rule(sc, p, cfg))


@pytest.mark.parametrize("cfg", [CFG, FLAT])
def test_top_n_ties_go_to_the_lower_index(cfg):
    """Zero queries: every visible compressed block is equally likely, interior blocks tie."""
    T, G, h = 100, 1, 2
    _, k = _inputs(T, G * h, G, seed=3)
    gen = torch.Generator().manual_seed(4)
    v, gates = torch.randn(1, T, G, 16, generator=gen), torch.rand(1, T, G * h, 3, generator=gen)
    q = torch.zeros(1, T, G * h, 16)
    idx, sc, p = _kernel_selection(q, k, cfg)
    _, ref = ref_nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(idx, ref.block_indices)
    assert torch.equal(idx, _own_rule(sc, p, cfg))


def test_a_nan_key_changes_only_the_selections_of_rows_that_see_it():
    """A NaN compressed key (block 3 of sequence 0) reaches the scores of the rows that see that
    block only: the other sequence and the earlier rows keep their selections bit for bit."""
    cfg, T = CFG, 80
    cu = torch.tensor([0, 50, 80], dtype=torch.int32)
    q, k = _inputs(T, 4, 2, seed=9)
    clean, _, p = _kernel_selection(q, k, cfg, cu)
    bad = k.clone()
    bad[0, 13] = float("nan")  # raw token 13 is in compressed blocks 2 and 3 (l = 8, d = 4)
    dirty, sc, _ = _kernel_selection(q, bad, cfg, cu)
    first_reader = 2 * cfg.cmp_stride + cfg.cmp_block - 1  # block 2 becomes visible at p = 15
    assert torch.equal(dirty[0, :first_reader], clean[0, :first_reader])
    assert torch.equal(dirty[0, 50:], clean[0, 50:])  # the other packed sequence
    assert torch.isfinite(sc[0, 50:]).all() and torch.isfinite(sc[0, :first_reader]).all()


def test_bad_inputs_raise():
    q = torch.randn(10, 4, 16)
    k = torch.randn(3, 2, 16)
    starts = torch.tensor([0, 10])
    with pytest.raises(ValueError, match="lse"):
        triton_topn.select_blocks(q, k, torch.zeros(10, 4, dtype=torch.float64), starts,
                                  torch.tensor([0, 3]), 10, cmp_block=4, cmp_stride=4,
                                  sel_block=4, top_n=2, init_blocks=1, local_blocks=1)
    with pytest.raises(ValueError, match="divide"):
        triton_topn.select_blocks(q, k, torch.zeros(10, 4), starts, torch.tensor([0, 3]), 10,
                                  cmp_block=6, cmp_stride=4, sel_block=4, top_n=2, init_blocks=1,
                                  local_blocks=1)  # fmt: skip


def test_band_covers_a_selection_block_and_its_halo():
    for l, d, ls, n in ((32, 16, 64, 16), (8, 4, 16, 3), (4, 4, 4, 40)):
        bn, bs, bsp = triton_topn.band(l, d, ls, 16, n)
        R, M = ls // d, l // d
        assert bs >= 1 and bs * R + M - 1 <= bn and bsp >= bs and bsp >= n
        assert math.log2(bsp).is_integer()
