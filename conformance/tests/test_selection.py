"""Top-n and selection attention (Eqs. 10-12, spec I.5-I.6)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conformance.inputs import Case, large_negative_logits, one_hot_gates, tied_blocks

from .cases import CFG_A, CFG_B, CFG_ID, expect_full_attention, fit

# Configurations where top-n excludes blocks (b(p)+1 > n) on most rows.
TOPN_CASES = {
    "l<l'": (CFG_A, Case(T=100, G=2, h=2, seed=40)),
    "l=l'": (CFG_B, Case(T=70, G=2, h=2, seed=41)),
    "init2-local1": (
        replace(CFG_B, sel_top_n=5, sel_init_blocks=2, sel_local_blocks=1),
        Case(T=70, G=1, h=3, seed=42),
    ),
    "no-forced": (
        replace(
            CFG_B,
            cmp_block=4,
            cmp_stride=2,
            sel_top_n=2,
            sel_init_blocks=0,
            sel_local_blocks=0,
            window=6,
        ),
        Case(T=60, G=2, h=1, seed=43),
    ),
}


#: The fields each case is about: an adapter that cannot run them skips that case (the others
#: run with the nearest configuration the adapter can run).
TOPN_KEEP = {
    "l<l'": ("cmp_block", "cmp_stride", "sel_block"),
    "l=l'": (),
    "init2-local1": ("sel_init_blocks", "sel_local_blocks"),
    "no-forced": ("sel_init_blocks", "sel_local_blocks"),
}


def _topn_case(subject, name):
    cfg, case = TOPN_CASES[name]
    return subject.config(cfg, keep=TOPN_KEEP[name]), fit(subject, case)


def _aux(subject, lane, name):
    cfg, case = _topn_case(subject, name)
    inp = case.make()
    _, aux = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=True)
    return inp, cfg, aux


@pytest.mark.clause("NSA-EQ11-INDICES")
@pytest.mark.parametrize("name", list(TOPN_CASES))
def test_block_indices_equal_the_oracle(subject, lane, name):
    """block_indices equal the oracle's (near-tie rule in the fp32 class)."""
    cfg, case = _topn_case(subject, name)
    extra = ("o_sel",) if subject.has("aux") else ()
    subject.check_parity(case.make(), cfg, lane, fields=("o", *extra), indices=True)


@pytest.mark.clause("NSA-P14-CARDINALITY")
@pytest.mark.parametrize("name", list(TOPN_CASES))
def test_index_format_and_count(subject, lane, name):
    """int64 [B, T, G, n], ascending, -1 padded at the end, min(n, b(p)+1) blocks <= b(p)."""
    inp, cfg, aux = _aux(subject, lane, name)
    B, T, G = inp.q.shape[0], inp.q.shape[1], inp.shape[2]
    subject.expect(
        tuple(aux.block_indices.shape) == (B, T, G, cfg.sel_top_n),
        f"block_indices shape {list(aux.block_indices.shape)} != [{B}, {T}, {G}, {cfg.sel_top_n}]",
    )
    subject.expect_indices_ok(
        aux.block_indices,
        cfg,
        inp,
        only=("dtype", "shape", "last dim", "below", "above", "padding", "ascending", "count"),
    )


@pytest.mark.clause("NSA-P15-FORCED")
@pytest.mark.parametrize("name", list(TOPN_CASES))
def test_forced_blocks_always_selected(subject, lane, name):
    """Blocks 0..init-1 and b-local+1..b are in every row's selection."""
    inp, cfg, aux = _aux(subject, lane, name)
    subject.expect_indices_ok(aux.block_indices, cfg, inp, only=("forced", "count"))


@pytest.mark.clause("NSA-P16-MAXIMALITY")
@pytest.mark.parametrize("name", list(TOPN_CASES))
def test_selection_is_maximal(subject, lane, name):
    """Every unforced selected block scores >= every unforced unselected candidate."""
    inp, cfg, aux = _aux(subject, lane, name)
    idx, P = aux.block_indices, aux.p_slc.double()
    T, S = P.shape[1], P.shape[-1]
    b = (torch.arange(T, device=P.device) // cfg.sel_block).view(1, T, 1, 1)
    j = torch.arange(S, device=P.device).view(1, 1, 1, -1)
    member = torch.zeros(*idx.shape[:3], S + 1, dtype=torch.bool, device=idx.device)
    member = member.scatter(-1, (idx + 1).clamp(0, S), True)[..., 1:]
    forced = (j < cfg.sel_init_blocks) | (j > b - cfg.sel_local_blocks)
    cand = j <= b
    chosen_min = torch.where(member & ~forced, P, torch.full_like(P, float("inf"))).amin(-1)
    left_max = torch.where(cand & ~member & ~forced, P, torch.full_like(P, float("-inf"))).amax(-1)
    bad = int((chosen_min < left_max).sum())
    subject.expect(bad == 0, f"{bad} rows select a block scoring below an unselected candidate")


@pytest.mark.clause("NSA-P17-TIE-BREAK")
@pytest.mark.parametrize("h", [1, 2])
def test_ties_go_to_the_lower_index(subject, lane, h):
    """Identical blocks tie exactly; the lower block index wins (indices and outputs)."""
    cfg = subject.config(CFG_ID)
    case = fit(subject, Case(T=8 * cfg.sel_block, G=2, h=h, seed=44))
    inp = one_hot_gates(tied_blocks(case, period=cfg.sel_block), "sel")
    if subject.has("indices"):  # exact ties: no near-tie leniency, in any lane
        x = inp.to(lane.dtype, subject.device)
        _, aux = subject.run(x, cfg, aux=True)
        subject.expect_indices_equal(aux.block_indices, subject.dense(x, cfg).block_indices)
    subject.check_parity(inp, cfg, lane)


@pytest.mark.clause("NSA-P18-FEWER-THAN-N")
def test_fewer_blocks_than_n(subject, lane):
    """b(p)+1 <= n: indices are 0..b(p) then -1, and o_sel is full causal attention."""
    cfg = subject.config(CFG_A)
    T = cfg.sel_top_n * cfg.sel_block - 4  # b(p) <= n - 1
    inp = fit(subject, Case(T=T, G=2, h=2, seed=45)).make()
    expect_full_attention(subject, lane, inp, cfg, "sel")
    if subject.has("indices"):
        _, aux = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=True)
        n = cfg.sel_top_n
        b = torch.arange(T).view(T, 1) // cfg.sel_block
        slot = torch.arange(n).view(1, n)
        want = torch.where(slot <= b, slot, torch.full_like(slot, -1)).view(1, T, 1, n)
        subject.expect_indices_equal(aux.block_indices, want.expand_as(aux.block_indices))


@pytest.mark.clause("NSA-P11-SHARED-SELECTION")
def test_heads_of_a_group_share_one_selection(subject, lane):
    """h = 4 with top-n excluding blocks: each head attends to its group's block_indices."""
    cfg = subject.config(CFG_A)
    inp = one_hot_gates(fit(subject, Case(T=100, G=2, h=4, seed=46)).make(), "sel")
    x = inp.to(lane.dtype, subject.device)
    o, aux = subject.run(x, cfg, aux=subject.has("indices"))
    if aux is not None:  # every head against the group's reported selection
        subject.compare_to(
            f"o_sel vs the group's blocks ({lane})",
            o,
            inp,
            lane,
            lambda y: subject.dense(y, cfg, block_indices=aux.block_indices).o,
        )
    subject.check_parity(inp, cfg, lane, indices=subject.has("indices"))


@pytest.mark.clause("NSA-P19-SEL-TOKEN-CAUSAL")
@pytest.mark.parametrize("cfg", [CFG_A, CFG_B], ids=["l'=16", "l'=8"])
def test_selection_reads_only_keys_up_to_p(subject, lane, cfg):
    """o_sel[p] is attention over the selected blocks' keys s <= p (partial current block)."""
    cfg = subject.config(cfg, keep=("sel_block",))
    inp = one_hot_gates(fit(subject, Case(T=50, G=2, h=2, seed=47)).make(), "sel")
    o, aux = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=subject.has("indices"))
    if aux is not None:  # Eq. 12 alone: the implementation's own blocks, keys <= p
        subject.compare_to(
            f"o_sel given its blocks ({lane})",
            o,
            inp,
            lane,
            lambda y: subject.dense(y, cfg, block_indices=aux.block_indices).o,
        )
    subject.check_parity(inp, cfg, lane)


@pytest.mark.clause("NSA-P20-DUPLICATES")
def test_duplicate_and_padding_indices_are_ignored(subject, lane):
    """Selection given indices with duplicates and -1 equals the deduplicated set's result."""
    subject.require("selection")
    cfg = subject.config(CFG_B, keep=("sel_block",))
    inp = fit(subject, Case(T=40, G=2, h=2, seed=48)).make()
    B, T, G = inp.q.shape[0], inp.q.shape[1], inp.shape[2]
    gen = torch.Generator().manual_seed(48)
    b = torch.arange(T).view(1, T, 1, 1) // cfg.sel_block
    raw = (torch.rand(B, T, G, 6, generator=gen) * (b + 1)).long()  # blocks in [0, b]
    raw[..., 1] = raw[..., 0]  # a duplicate in every row
    raw[..., 5] = -1  # and padding
    scale = 1.0 / inp.q.shape[-1] ** 0.5
    x = inp.to(lane.dtype, subject.device)
    o = subject.adapter.selection(x.q, x.k, x.v, raw.to(subject.device), cfg, scale)
    subject.compare_to(
        f"o_sel with duplicates ({lane})",
        o,
        inp,
        lane,
        lambda y: subject.dense(y, cfg, block_indices=raw).o_sel,
    )


@pytest.mark.clause("NSA-P25-SEL-COVERS-ALL")
def test_selection_covering_every_block_is_full_attention(subject, lane):
    """n >= ceil(T/l'): the selection branch is full causal attention."""
    cfg = subject.config(replace(CFG_B, sel_top_n=8))
    T = min(60, cfg.sel_top_n * cfg.sel_block)
    expect_full_attention(
        subject, lane, fit(subject, Case(T=T, G=2, h=2, seed=49)).make(), cfg, "sel"
    )


@pytest.mark.clause("NSA-I6-EXACT-EXCLUSION")
@pytest.mark.parametrize("branch", ["cmp", "sel", "win"])
def test_masked_keys_get_exactly_zero_weight(subject, lane, branch):
    """Every allowed logit equal and below -1e4: the branch is the plain mean of exactly its keys.

    l = l' = d keeps the (all tied) block scores exact, so the tie-break decides the selection.
    """
    cfg = subject.config(replace(CFG_ID, window=6))
    case = fit(subject, Case(T=48, G=2, h=2, Dk=16, Dv=8, seed=50))
    inp = one_hot_gates(large_negative_logits(case), branch)
    subject.check_parity(inp, cfg, lane, indices=subject.has("indices"))
