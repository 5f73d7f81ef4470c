"""Block scores, Eq. 9-10 (spec I.4; Part II §6 P7-P10), against counted overlaps."""

from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from nsa_impl.tolerances import EXACT_ATOL
from nsa_ref import NSAConfig, rules

from . import oracles
from .strategies import configs, examples, make_inputs, pinned, reference, structures

IDENTITY_CFGS = configs(cmp_mult=st.just(1), sel_mult=st.just(1))


def _expected_scores(aux, s) -> torch.Tensor:
    """``P[p, g, j] = sum over the group's heads and i of W[j, i] * p_cmp[p, head, i]`` (Eq. 9-10),
    with ``W`` counted independently and restricted to the candidates ``j <= b(p)``."""
    B, T, H, N = aux.p_cmp.shape
    S = aux.p_slc.shape[-1]
    W = oracles.overlap_weights(S, N, s.cfg)
    per_head = torch.einsum("bthi,ji->bthj", aux.p_cmp, W)
    P = per_head.reshape(B, T, s.G, s.h, S).sum(dim=3)
    local = torch.cat([torch.arange(e - a) for _, a, e in s.sequences()])  # positions restart
    candidate = torch.arange(S)[None, :] <= (local // s.cfg.sel_block)[:, None]  # [T, S]
    return P * candidate[None, :, None, :]


@examples()
@given(s=structures(cfgs=IDENTITY_CFGS, packed=True))
@example(s=pinned(T=9, cfg=NSAConfig(3, 3, 3, 2, 1, 1, 4)))
def test_p07_identity_case(s):
    """P7: with ``l = l' = d`` the block scores are the (group-summed) compressed probabilities."""
    _, aux = reference(make_inputs(s))
    B, T, H, N = aux.p_cmp.shape
    summed = aux.p_cmp.reshape(B, T, s.G, s.h, N).sum(dim=3)
    width = min(N, aux.p_slc.shape[-1])
    assert oracles.max_abs_diff(aux.p_slc[..., :width], summed[..., :width]) <= EXACT_ATOL
    # A block whose compressed token is not complete yet (the current block) scores 0.
    assert torch.all(aux.p_slc[..., N:] == 0)


@examples(2)
@given(cfg=configs(), num_sel=st.integers(1, 8), num_cmp=st.integers(0, 24))
@example(cfg=NSAConfig(), num_sel=4, num_cmp=11)
@example(cfg=NSAConfig(8, 2, 4, 3, 1, 1, 8), num_sel=6, num_cmp=9)  # l > l'
def test_p08_overlap_weights(cfg, num_sel, num_cmp):
    """P8: ``rules.overlap_weights`` is ``|C_i ∩ S_j| / d`` (so a one-hot ``p_cmp = e_i`` maps to
    column ``i``); a column sums to ``l/d`` once its block lies within the selection blocks."""
    W = rules.overlap_weights(num_sel, num_cmp, cfg)
    assert torch.equal(W, oracles.overlap_weights(num_sel, num_cmp, cfg))
    for i in range(num_cmp):
        if i * cfg.cmp_stride + cfg.cmp_block <= num_sel * cfg.sel_block:
            assert W[:, i].sum().item() == cfg.cmp_block / cfg.cmp_stride


@examples()
@given(s=structures(packed=True))
@example(s=pinned(T=40, cfg=NSAConfig(8, 4, 8, 3, 1, 2, 8), regime="ties"))
@example(s=pinned(T=17, cfg=NSAConfig(8, 2, 4, 3, 1, 1, 8)))  # l > l'
def test_p08_scores_end_to_end(s):
    """P8 end to end: ``aux.p_slc`` equals counted overlap weights applied to ``aux.p_cmp`` and
    summed over the group's heads (Eq. 10), 0 outside the candidates."""
    _, aux = reference(make_inputs(s))
    assert oracles.max_abs_diff(aux.p_slc, _expected_scores(aux, s)) <= EXACT_ATOL


@examples()
@given(s=structures(packed=True))
@example(s=pinned(T=30, cfg=NSAConfig(4, 2, 8, 3, 1, 2, 8), h=3))
def test_p09_mass_conservation(s):
    """P9: a row with ``M >= 1`` visible blocks has ``sum_j P[p, g, j] = h * l / d``; else 0."""
    _, aux = reference(make_inputs(s))
    cfg = s.cfg
    for b, start, end in s.sequences():
        for p in range(end - start):
            mass = aux.p_slc[b, start + p].sum(dim=-1)
            want = s.h * cfg.cmp_block / cfg.cmp_stride if cfg.num_cmp(p) else 0.0
            assert oracles.max_abs_diff(mass, want) <= EXACT_ATOL * max(1.0, want), (p, mass, want)


@examples()
@given(s=structures(packed=True, regimes=("normal", "large", "ties")))
@example(s=pinned(T=26, cfg=NSAConfig(4, 2, 4, 3, 1, 1, 8), regime="large"))
def test_p10_support_and_sign(s):
    """P10: ``P[p, g, j] >= 0``, and ``> 0`` only if block ``j`` meets a visible compressed block,
    i.e. ``j * l' < (M-1)*d + l``; never past the current block."""
    _, aux = reference(make_inputs(s))
    cfg = s.cfg
    assert torch.all(aux.p_slc >= 0)
    for b, start, end in s.sequences():
        for p in range(end - start):
            M = cfg.num_cmp(p)
            reach = (M - 1) * cfg.cmp_stride + cfg.cmp_block if M else 0  # end of the last block
            row = aux.p_slc[b, start + p]  # [G, S]
            positive = (row > 0).nonzero()[:, 1]
            assert torch.all(positive * cfg.sel_block < reach), f"p={p}: score outside the support"
            assert torch.all(positive <= p // cfg.sel_block)
