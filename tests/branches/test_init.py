"""nsa_impl.branches (its __init__): row ranges, chunk tables, the shared range attention."""

from __future__ import annotations

import pytest
import torch

from nsa_impl.branches import (
    BYTES_PER_ELEM,
    RangeLayout,
    RowRanges,
    chunk_backward,
    chunk_forward,
    range_attention,
)
from nsa_impl.branches.compressed import CmpLayout
from nsa_impl.branches.sliding import window_ranges
from nsa_impl.tolerances import EXACT_ATOL
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig

from ..helpers import err, inputs


def test_chunks_respect_the_budget_at_long_T():
    """T=8192, paper config, B*H=16: no chunk tile exceeds the budget, window chunks are banded."""
    cfg, T, heads, budget = NSAConfig(), 8192, 16, 8 * 2**20
    layout = PackedLayout.build(T)
    for ranges, band in (
        (window_ranges(cfg, layout), cfg.window - 1),
        (CmpLayout.build(cfg, layout).ranges, None),
    ):
        chunks = ranges.chunks(ranges.chunk_rows(heads, budget)).tolist()
        assert chunks[0][0] == 0 and chunks[-1][1] == T
        for r0, r1, s0, s1 in chunks:
            assert BYTES_PER_ELEM * heads * (r1 - r0) * (s1 - s0) <= budget
            if band is not None:
                assert s1 - s0 <= (r1 - r0) + band
    assert RowRanges(torch.tensor([0, 0]), torch.tensor([0, 1]), 1).chunk_rows(1, 1) == 1


def test_row_ranges_reject_unsupported_shapes():
    with pytest.raises(ValueError, match="non-decreasing"):
        RowRanges(torch.tensor([1, 0]), torch.tensor([2, 2]), 3)
    with pytest.raises(ValueError, match="lo <= hi"):
        RowRanges(torch.tensor([0, 2]), torch.tensor([1, 1]), 3)
    with pytest.raises(ValueError, match="host"):
        RowRanges(torch.tensor([0]), torch.tensor([1, 1]), 3)


def test_range_layout_is_built_once_and_checked_against_the_inputs():
    ranges = window_ranges(NSAConfig(window=3), PackedLayout.build(9))
    lay = RangeLayout.build(ranges, heads=4, device="cpu", budget_bytes=BYTES_PER_ELEM * 4 * 6)
    assert lay.chunks.shape[1] == 4 and lay.chunks.shape[0] > 1 and lay.num_keys == 9
    q, k, v, _ = inputs(1, 9, 1, 4, 4, 4)
    assert torch.equal(range_attention(q, k, v, lay, 0.5), range_attention(q, k, v, ranges, 0.5))
    with pytest.raises(ValueError, match="ranges cover"):
        range_attention(q[:, :8], k, v, lay, 0.5)


def test_gradcheck_float64():
    cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=3, window=3)
    layout = PackedLayout.build(7, [0, 3, 7])
    q, k, v, _ = inputs(1, 7, 2, 2, 3, 2, dtype=torch.float64, grad=True)
    win = window_ranges(cfg, layout)
    cl = CmpLayout.build(cfg, layout)  # includes empty rows (p = 0 of each sequence)
    kc = torch.randn(1, cl.num_blocks, 2, 3, dtype=torch.float64, requires_grad=True)
    vc = torch.randn(1, cl.num_blocks, 2, 2, dtype=torch.float64, requires_grad=True)
    for budget in (1, None):
        for ranges, args in ((win, (q, k, v)), (cl.ranges, (q, kc, vc))):

            def f(q, k, v, ranges=ranges, budget=budget):
                return range_attention(q, k, v, ranges, 0.7, budget_bytes=budget)

            assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("which", ["q", "k", "v", "do"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_changes_only_the_rows_that_read_it(which, bad):
    """One non-finite value at token j (or in dO at row j): outputs of rows whose range misses j
    and gradients of everything not read through such a row are bit-identical to a clean run;
    the rows that read it are NaN (never silently finite)."""
    T, j = 24, 13
    ranges = window_ranges(NSAConfig(window=4), PackedLayout.build(T, [0, 11, 24]))
    lo, hi = ranges.lo, ranges.hi
    chunks = RowRanges(lo, hi, T).chunks(5).tolist()  # chunks straddle j and the boundary
    q, k, v, _ = inputs(1, T, 2, 2, 4, 4, dtype=torch.float64, seed=3)
    do = torch.randn(1, T, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    clean = [q, k, v, do]
    dirty = [t.clone() for t in clean]
    dirty["qkvd".index(which[0])][0, j, 0, 0] = bad

    def run(q, k, v, do):
        o = chunk_forward(q, k, v, lo, hi, chunks, 0.5)
        return (o, *chunk_backward(do, q, k, v, o, lo, hi, chunks, 0.5))

    o0, dq0, dk0, dv0 = run(*clean)
    o1, dq1, dk1, dv1 = run(*dirty)
    rows = torch.arange(T)
    if which in ("q", "do"):
        readers = rows == j  # only the row itself (its q or its dO)
    else:
        readers = (lo <= j) & (j < hi)  # rows whose key range holds j
    read = torch.zeros(T, dtype=torch.bool)  # keys read by a reader
    for r in rows[readers].tolist():
        read[lo[r] : hi[r]] = True
    assert torch.equal(o1[:, ~readers], o0[:, ~readers])
    hit = slice(0, 1) if which == "q" else slice(0, 2)  # head 0 / the heads of group 0
    if which != "do":
        assert torch.equal(o1[:, readers, 2:], o0[:, readers, 2:])  # group 1 reads no j
    assert torch.equal(dq1[:, ~readers], dq0[:, ~readers])
    assert torch.equal(dk1[:, ~read], dk0[:, ~read]) and torch.equal(dv1[:, ~read], dv0[:, ~read])
    if bad != bad:  # NaN is loud: the readers' outputs and gradients are NaN, never finite
        if which != "do":
            assert torch.isnan(o1[:, readers, hit]).all()
        assert not torch.isfinite(dq1[:, readers]).all()


def test_empty_rows_are_exact_zeros_and_stay_so_next_to_nan():
    lo = torch.tensor([0, 0, 1, 2])
    hi = torch.tensor([0, 1, 2, 2])  # rows 0 and 3 read nothing
    q, k, v, _ = inputs(1, 4, 1, 2, 4, 4, dtype=torch.float64)
    v = v.clone()
    v[0, :] = float("nan")  # every value is NaN
    o = chunk_forward(q, k, v, lo, hi, [(0, 4, 0, 2)], 0.5)
    assert torch.equal(o[0, [0, 3]], torch.zeros_like(o[0, [0, 3]]))
    assert torch.isnan(o[0, [1, 2]]).all()


def test_a_row_subset_is_chunked_per_run_and_attends_like_the_whole():
    """`RowRanges.subset` (a context-parallel shard: two runs of a longer row) cuts chunks at the
    run boundary, so no chunk spans the gap, and each row attends exactly as in the whole."""
    T = 20
    whole = window_ranges(NSAConfig(window=4), PackedLayout.build(T, [0, 7, 20]))
    rows = torch.cat([torch.arange(2, 6), torch.arange(13, 19)])
    sub = whole.subset(rows)
    assert sub.breaks == (4,) and sub.num_keys == T
    assert torch.equal(sub.lo, whole.lo[rows]) and torch.equal(sub.hi, whole.hi[rows])
    chunks = sub.chunks(3).tolist()
    assert [c[:2] for c in chunks] == [[0, 3], [3, 4], [4, 7], [7, 10]]  # none crosses row 4
    assert all(s1 - s0 <= (r1 - r0) + 3 for r0, r1, s0, s1 in chunks)  # still banded
    q, k, v, _ = inputs(1, T, 2, 2, 4, 3, dtype=torch.float64)
    full = range_attention(q, k, v, whole, 0.5)
    part = range_attention(q[:, rows], k, v, sub, 0.5, budget_bytes=1)  # one-row chunks too
    assert err(part, full[:, rows]) <= EXACT_ATOL
    assert whole.subset(torch.arange(T)).breaks == ()
    assert sub.subset(torch.tensor([0, 1, 4, 5])).breaks == (2,)  # a break kept, a gap added


def test_row_ranges_check_their_breaks_and_subsets():
    lo, hi = torch.tensor([0, 0, 5, 5]), torch.tensor([1, 2, 7, 8])
    RowRanges(lo, hi, 8, breaks=(2,))  # hi jumps by 5 at the break: allowed there only
    with pytest.raises(ValueError, match="growing"):
        RowRanges(lo, hi, 8)
    with pytest.raises(ValueError, match="breaks"):
        RowRanges(lo, hi, 8, breaks=(0,))
    with pytest.raises(ValueError, match="breaks"):
        RowRanges(lo, hi, 8, breaks=(3, 2))
    ranges = RowRanges(lo, hi, 8, breaks=(2,))
    with pytest.raises(ValueError, match="strictly increasing"):
        ranges.subset(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="strictly increasing"):
        ranges.subset(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="int64"):
        ranges.subset(torch.tensor([0.0]))
