"""Group sharing, top-n and selection attention (spec I.4-I.6; Part II §6 P11-P20)."""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from nsa_impl.tolerances import EXACT_ATOL
from nsa_ref import NSAConfig, rules

from . import oracles
from .strategies import (
    BRANCH_FIELDS,
    PHIS,
    configs,
    examples,
    make_inputs,
    pinned,
    reference,
    reseeded,
    splice,
    structures,
)

#: Many blocks per sequence and few selected ones, so that scoring really excludes blocks.
SMALL_BLOCKS = configs(
    strides=st.integers(1, 2), cmp_mult=st.integers(1, 3), sel_mult=st.integers(1, 3)
)
TOPN_STRUCTURES = structures(cfgs=SMALL_BLOCKS, packed=True, max_h=4)
PAPER_SHAPED = NSAConfig(4, 2, 4, 4, 1, 2, 8)  # l=2d, l'=l, n=4 with 3 forced: paper's proportions


def _rows(s, aux):
    """``(p, block_indices row [G, n], scores row [G, S])`` for every local position."""
    for b, start, end in s.sequences():
        for p in range(end - start):
            yield p, aux.block_indices[b, start + p], aux.p_slc[b, start + p]


def _forced(p: int, cfg: NSAConfig) -> set[int]:
    """``F_p``: the first ``sel_init_blocks`` blocks and the ``sel_local_blocks`` ending at
    ``b(p)``, within the candidates (spec I.5); written from the spec, not `rules.forced_blocks`."""
    b = p // cfg.sel_block
    return {j for j in range(b + 1) if j < cfg.sel_init_blocks or b - cfg.sel_local_blocks < j}


def _split(p, idx_row, cfg):
    """Per group: (selected set, forced set, candidates) of row ``p``."""
    b = p // cfg.sel_block
    for g in range(idx_row.shape[0]):
        chosen = [j for j in idx_row[g].tolist() if j >= 0]
        yield g, chosen, _forced(p, cfg), set(range(b + 1))


@examples()
@given(s=structures(cfgs=SMALL_BLOCKS, packed=True, phis=PHIS, branch_kv=(False, True)))
@example(s=pinned(T=21, cfg=NSAConfig(4, 2, 8, 2, 1, 1, 3), h=3))  # current block partly filled
def test_p11_p19_selection_attends_the_group_set_up_to_p(s):
    """P11 + P19: every query head of group ``g`` attends exactly the keys ``s <= p`` of the
    group's blocks ``I(p, g)`` (shared selection; keys after ``p`` in the current block get no
    weight), compared with an independent dense-mask formulation (`exact` class)."""
    x = make_inputs(s)
    _, aux = reference(x)
    want = oracles.branches(x, s.cfg, aux.block_indices)["sel"]
    assert oracles.max_abs_diff(aux.o_sel, want) <= EXACT_ATOL


@examples()
@given(s=structures(packed=True, max_h=4), perm_seed=st.integers(0, 2**16))
@example(s=pinned(T=30, cfg=PAPER_SHAPED, h=3, regime="ties"), perm_seed=1)
def test_p12_head_permutation_within_a_group(s, perm_seed):
    """P12: permuting query heads inside each group permutes their outputs the same way and leaves
    the block indices and (up to summation order) the scores unchanged."""
    x = make_inputs(s)
    gen = torch.Generator().manual_seed(perm_seed)
    order = torch.cat([g * s.h + torch.randperm(s.h, generator=gen) for g in range(s.G)])
    y = replace(x, q=x.q[:, :, order], gates=x.gates[:, :, order])
    (o, aux), (o_perm, aux_perm) = reference(x), reference(y)
    assert torch.equal(aux.block_indices, aux_perm.block_indices)
    assert oracles.max_abs_diff(aux.p_slc, aux_perm.p_slc) <= EXACT_ATOL
    assert torch.equal(o[:, :, order], o_perm)


@examples()
@given(
    s=structures(packed=True, min_G=2, max_G=3, branch_kv=(False, True)),
    group_seed=st.integers(0, 2**16),
)
@example(s=pinned(T=24, cfg=PAPER_SHAPED, G=3), group_seed=0)
def test_p13_groups_are_independent(s, group_seed):
    """P13: changing the queries, keys, values and gates of one group leaves the selection, scores
    and outputs of every other group bit-identical."""
    g_changed = group_seed % s.G
    groups = torch.arange(s.G) == g_changed
    every = torch.ones(s.T, dtype=torch.bool)
    fields = dict.fromkeys(("q", "k", "v", "gates", *BRANCH_FIELDS), every)
    x = make_inputs(s)
    y = splice(x, make_inputs(reseeded(s)), fields, groups)
    (o, aux), (o2, aux2) = reference(x), reference(y)
    kept = ~groups
    heads = kept.repeat_interleave(s.h)
    assert torch.equal(aux.block_indices[:, :, kept], aux2.block_indices[:, :, kept])
    assert torch.equal(aux.p_slc[:, :, kept], aux2.p_slc[:, :, kept])
    assert torch.equal(o[:, :, heads], o2[:, :, heads])


@examples()
@given(s=TOPN_STRUCTURES)
@example(s=pinned(T=1, cfg=PAPER_SHAPED))
@example(s=pinned(T=40, cfg=NSAConfig(2, 1, 2, 1, 0, 1, 4)))
def test_p14_cardinality(s):
    """P14: ``|I_p| = min(n, b(p)+1)`` distinct indices in ``[0, b(p)]``, ascending, then ``-1``."""
    _, aux = reference(make_inputs(s))
    cfg = s.cfg
    for p, idx_row, _ in _rows(s, aux):
        b = p // cfg.sel_block
        for g in range(s.G):
            row = idx_row[g].tolist()
            count = min(cfg.sel_top_n, b + 1)
            chosen, pad = row[:count], row[count:]
            assert all(j == -1 for j in pad), f"p={p}: {row}"
            assert chosen == sorted(set(chosen)), f"p={p}: not ascending/distinct {row}"
            assert all(0 <= j <= b for j in chosen), f"p={p}: {row} outside 0..{b}"


@examples()
@given(s=TOPN_STRUCTURES)
@example(s=pinned(T=40, cfg=PAPER_SHAPED))
@example(s=pinned(T=40, cfg=NSAConfig(2, 1, 2, 4, 2, 2, 4)))
def test_p15_forced_blocks(s):
    """P15: the initial and local blocks are always selected; exactly
    ``min(n, b+1) - |F_p|`` further blocks are chosen by score."""
    _, aux = reference(make_inputs(s))
    for p, idx_row, _ in _rows(s, aux):
        for g, chosen, forced, cand in _split(p, idx_row, s.cfg):
            assert forced <= set(chosen), f"p={p} g={g}: forced {forced} not in {chosen}"
            assert len(set(chosen) - forced) == min(s.cfg.sel_top_n, len(cand)) - len(forced)


@examples()
@given(s=TOPN_STRUCTURES)
@example(s=pinned(T=48, cfg=PAPER_SHAPED, regime="large"))
def test_p16_maximality(s):
    """P16: every unforced selected block scores at least as high as every unselected candidate."""
    _, aux = reference(make_inputs(s))
    for p, idx_row, scores in _rows(s, aux):
        for g, chosen, forced, cand in _split(p, idx_row, s.cfg):
            picked = set(chosen) - forced
            left = cand - set(chosen)
            if picked and left:
                assert min(scores[g, j] for j in picked) >= max(scores[g, j] for j in left), p


@examples()
@given(s=TOPN_STRUCTURES)
@example(s=pinned(T=48, cfg=PAPER_SHAPED, regime="ties"))
def test_p17_ties_go_to_the_lower_block(s):
    """P17: the selection is a deterministic function of the inputs, and an unforced block loses
    to an equally scored unforced block only if it has the higher index."""
    x = make_inputs(s)
    _, aux = reference(x)
    _, again = reference(x)
    assert torch.equal(aux.block_indices, again.block_indices)
    for p, idx_row, scores in _rows(s, aux):
        for g, chosen, forced, cand in _split(p, idx_row, s.cfg):
            for j in set(chosen) - forced:
                for j2 in cand - set(chosen):
                    if scores[g, j] == scores[g, j2]:
                        assert j < j2, f"p={p} g={g}: tie between {j} and {j2} went up"


@examples()
@given(
    s=structures(
        cfgs=configs(cmp_mult=st.just(1), sel_mult=st.just(1)), min_T=2, regimes=("ties",), max_G=1
    )
)
@example(s=pinned(T=44, cfg=NSAConfig(4, 4, 4, 5, 1, 2, 4), G=1, regime="ties"))
def test_p17_exact_ties_select_the_lowest_blocks(s):
    """P17 with exact ties: equal keys and ``l = l' = d`` give every complete block the score
    ``h / M`` (the partial block 0), so the scored picks are the lowest unforced blocks."""
    _, aux = reference(make_inputs(s))
    cfg = s.cfg
    for p, idx_row, scores in _rows(s, aux):
        M = cfg.num_cmp(p)
        complete = scores[0, :M]
        if M:
            assert torch.all(complete == complete[0]), f"p={p}: no exact tie: {complete}"
            assert abs(complete[0].item() - s.h / M) <= EXACT_ATOL
        for _, chosen, forced, cand in _split(p, idx_row, cfg):
            budget = min(cfg.sel_top_n, len(cand)) - len(forced)
            want = forced | set(sorted(cand - forced)[:budget])
            assert set(chosen) == want, f"p={p}: {chosen} != {sorted(want)}"


@examples()
@given(s=structures(cfgs=configs(extra_n=st.integers(0, 6)), packed=True))
@example(s=pinned(T=16, cfg=NSAConfig(2, 1, 4, 4, 0, 0, 4)))  # no forced block at all
def test_p18_fewer_candidates_than_n(s):
    """P18: when ``b(p)+1 <= n`` every candidate ``0..b(p)`` is selected and the rest is padding."""
    _, aux = reference(make_inputs(s))
    for p, idx_row, _ in _rows(s, aux):
        b = p // s.cfg.sel_block
        if b + 1 <= s.cfg.sel_top_n:
            for g in range(s.G):
                row = idx_row[g].tolist()
                assert row == list(range(b + 1)) + [-1] * (s.cfg.sel_top_n - b - 1), (p, row)


@examples(5)
@given(cfg=configs(), p=st.integers(0, 80), listed=st.lists(st.integers(-1, 40), max_size=12))
@example(cfg=NSAConfig(4, 2, 4, 3, 1, 2, 8), p=5, listed=[1, -1, 0, 1, -1, 0])
def test_p20_duplicates_and_padding_are_ignored(cfg, p, listed):
    """P20: duplicated or ``-1`` indices, in any order, never change the selected key set
    (`rules.selected_keys`): it is exactly the keys ``s <= p`` of the distinct listed blocks."""
    noisy = [j for j in listed if j <= p // cfg.sel_block]
    distinct = sorted({j for j in noisy if j >= 0})
    want = [t for t in range(p + 1) if t // cfg.sel_block in distinct]
    assert rules.selected_keys(noisy, p, cfg) == want
    assert rules.selected_keys(distinct, p, cfg) == want
