"""nsa_impl.scoring: compression (Eq. 7), the Eq. 9 band, top-n (Eq. 11), the masked cmp path."""

from __future__ import annotations

import pytest
import torch

import nsa_ref
from nsa_impl import scoring
from nsa_impl.branches.compressed import CmpLayout
from nsa_impl.tolerances import EXACT_ATOL, FP32_OUT_ATOL
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig

from .helpers import err, inputs, plan_of


@pytest.mark.parametrize("l,d", [(1, 1), (2, 1), (4, 2), (4, 4), (8, 2)])
@pytest.mark.parametrize("T", [1, 3, 4, 9, 17])
def test_compress_matches_rules(l, d, T):
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=8, sel_top_n=3, window=4)
    x = torch.randn(2, T, 3, 5, dtype=torch.float64)
    cl = CmpLayout.build(cfg, PackedLayout.build(T))
    got = scoring.compress(x, cfg, cl)
    N = cfg.num_cmp(T - 1)
    want = torch.stack([nsa_ref.rules.compress(x[b], N, cfg, None) for b in range(2)])
    assert got.shape == (2, N, 3, 5)
    assert err(got, want) <= EXACT_ATOL


def test_compress_custom_phi_and_varlen_blocks_stay_inside_sequences():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=3)
    weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)

    def phi(blocks):  # [..., l, D] -> [..., D]: a fixed position-weighted sum
        return (blocks * weights[:, None]).sum(-2)

    lengths = [5, 1, 8, 4]
    cu = [0, 5, 6, 14, 18]
    x = torch.randn(1, 18, 2, 3, dtype=torch.float64)
    cl = CmpLayout.build(cfg, PackedLayout.build(18, cu))
    for fn in (phi, None):
        want = torch.cat([
            nsa_ref.rules.compress(x[0, s:e], cfg.num_cmp(e - s - 1), cfg, fn)
            for s, e in zip(cu[:-1], cu[1:], strict=False)
        ])  # fmt: skip
        got = scoring.compress(x, cfg, cl, fn)
        assert got.shape[1] == sum(cfg.num_cmp(n - 1) for n in lengths)
        assert err(got[0], want) <= EXACT_ATOL


def test_overlap_band_paper_weights():
    assert scoring.overlap_band(NSAConfig()) == [1, 2, 2, 2, 1]
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_top_n=3)
    assert scoring.overlap_band(cfg) == [1]


@pytest.mark.parametrize(
    "l,d,ls", [(32, 16, 64), (1, 1, 1), (2, 1, 2), (4, 2, 4), (8, 2, 4), (4, 4, 16), (6, 2, 4)]
)
def test_overlap_scores_equal_dense_overlap_weights(l, d, ls):
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, sel_top_n=3, window=4)
    T = 5 * ls + l
    N, S = cfg.num_cmp(T - 1), cfg.num_sel_blocks(T)
    p = torch.rand(3, 7, N, dtype=torch.float64)
    W = nsa_ref.rules.overlap_weights(S, N, cfg)
    got = scoring.overlap_scores(p, S, cfg)
    assert got.shape == (3, 7, S)
    assert err(got, p @ W.T) <= EXACT_ATOL
    with pytest.raises(ValueError, match="num_sel"):
        scoring.overlap_scores(p, 0, cfg)


@pytest.mark.parametrize("init,local,n", [(1, 2, 4), (0, 1, 2), (2, 0, 3), (1, 2, 3), (0, 0, 1)])
def test_top_n_matches_rules_with_ties(init, local, n):
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=n, sel_init_blocks=init,
                    sel_local_blocks=local)  # fmt: skip
    gen = torch.Generator().manual_seed(n + 10 * init + 100 * local)
    S = 9
    scores = torch.randint(0, 3, (4, S), generator=gen).double()  # many exact ties
    b = torch.tensor([0, 1, 4, 8])
    got = scoring.top_n(scores[None], b, cfg)[0]
    for row in range(4):
        want = nsa_ref.rules.top_n_blocks(scores[row].tolist(), int(b[row]), cfg)
        assert got[row].tolist() == want + [-1] * (n - len(want))


def test_masked_cmp_layout_chunk_sizes():
    """The hook's per-chunk sizes are the widest visible-block count and the columns needed."""
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    layout = PackedLayout.build(26, [0, 5, 6, 19, 26])
    cl = CmpLayout.build(cfg, layout)
    lay = scoring.CmpMaskedLayout.build(cfg, cl, layout, heads=12, device="cpu", budget_bytes=1)
    assert lay.ranges.chunks.shape == (26, 4) and lay.meta.shape == (26, 2)  # one row a chunk
    count = cl.ranges.hi - cl.ranges.lo
    assert lay.meta[:, 0].tolist() == count.tolist()
    assert lay.meta[:, 1].tolist() == (layout.pos // 4 + 1).tolist()


def test_masked_path_returns_aux_only_when_asked():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    q, k, v, gates = inputs(1, 21, 2, 2, 4, 3, seed=8)
    p = plan_of(q, k, v, cfg)
    k_cmp, v_cmp = (scoring.compress(t, cfg, p.cmp) for t in (k, v))
    plain = scoring.compressed_and_select(q, k_cmp, v_cmp, p, 0.5)
    full = scoring.compressed_and_select(q, k_cmp, v_cmp, p, 0.5, want_aux=True)
    assert plain.p_slc is None and plain.p_cmp is None
    assert torch.equal(plain.o_cmp, full.o_cmp) and torch.equal(plain.block_indices,
                                                                 full.block_indices)  # fmt: skip
    _, raux = nsa_ref.nsa_attention(q, k, v, gates, cfg, scale=0.5, return_aux=True)
    assert err(full.p_cmp, raux.p_cmp) < FP32_OUT_ATOL
    assert err(full.o_cmp, raux.o_cmp) < FP32_OUT_ATOL
