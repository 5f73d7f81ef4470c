"""Block scores (Eqs. 9-10, spec I.4): overlap weights, identity case, mass, support, group sum."""

from __future__ import annotations

import pytest
import torch

from conformance import dense
from conformance.checks import max_err
from conformance.inputs import Case

from .cases import CFG_A, CFG_B, CFG_ID, CFG_PAPER, fit

SCORE_CASES = {
    "l<l'": (CFG_A, Case(T=90, G=2, h=2, seed=30)),
    "l=l'": (CFG_B, Case(T=50, G=2, h=2, seed=31)),
    "paper": (CFG_PAPER, Case(T=200, G=1, h=2, seed=32)),
}


def _scores_from_pcmp(p_cmp: torch.Tensor, cfg, num_sel: int, h: int) -> torch.Tensor:
    """Eqs. 9-10 applied to given probabilities: group sums of ``p_cmp @ W^T`` (float64)."""
    W = dense.overlap_matrix(num_sel, p_cmp.shape[-1], cfg).to(p_cmp.device)
    per_head = torch.einsum("bthc,jc->bthj", p_cmp.double(), W)
    B, T, H, S = per_head.shape
    return per_head.reshape(B, T, H // h, h, S).sum(dim=3)


@pytest.mark.clause("NSA-EQ9-OVERLAP")
@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_block_scores_are_overlap_weighted(subject, lane, name):
    """p_slc equals the oracle's overlap-weighted, group-summed scores."""
    cfg, case = SCORE_CASES[name]
    cfg = subject.config(cfg, keep=("cmp_block", "cmp_stride", "sel_block"))
    subject.check_parity(fit(subject, case).make(), cfg, lane, fields=("p_slc",))


@pytest.mark.clause("NSA-P7-EQ9-IDENTITY")
def test_identity_configuration(subject, lane):
    """l = l' = d: p_slc[j] is the group sum of p_cmp[j] (blocks coincide)."""
    subject.require("aux")
    cfg = subject.config(CFG_ID, keep=("cmp_block", "cmp_stride", "sel_block"))
    inp = fit(subject, Case(T=30, G=2, h=2, seed=33)).make()
    par = subject.check_parity(inp, cfg, lane, fields=("p_slc", "p_cmp"))

    def violation(p_cmp, p_slc):
        B, T, H, C = p_cmp.shape
        h = inp.shape[3]
        want = p_cmp.double().reshape(B, T, H // h, h, C).sum(dim=3)
        return max(
            max_err(p_slc[..., :C], want),
            float(p_slc[..., C:].abs().max()) if p_slc.shape[-1] > C else 0.0,
        )

    def naive():
        d = subject.dense(inp.to(lane.dtype, subject.device), cfg)
        return violation(d.p_cmp, d.p_slc)

    subject.record_identity(
        f"p_slc - group sum of p_cmp ({lane})",
        lane,
        violation(par.got["p_cmp"], par.got["p_slc"]),
        naive,
    )


@pytest.mark.clause("NSA-P9-MASS")
@pytest.mark.parametrize("name", ["l<l'", "l=l'"])
def test_score_mass(subject, lane, name):
    """sum_j p_slc[p, g, j] = h*l/d where num_cmp(p) >= 1, else 0."""
    subject.require("aux")
    cfg, case = SCORE_CASES[name]
    cfg = subject.config(cfg)
    inp = fit(subject, case).make()
    _, aux = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=True)
    T, h = inp.q.shape[1], inp.shape[3]
    has_block = torch.tensor(
        [dense.num_cmp(p, cfg) >= 1 for p in range(T)], device=aux.p_slc.device
    )
    want = has_block.double().view(1, T, 1) * (h * cfg.cmp_block / cfg.cmp_stride)

    def violation(p_slc):
        mass = p_slc.double().sum(-1)
        return max_err(mass, want.expand_as(mass))

    def naive():
        return violation(subject.dense(inp.to(lane.dtype, subject.device), cfg).p_slc)

    subject.record_identity(f"sum_j p_slc - h*l/d ({lane})", lane, violation(aux.p_slc), naive)


@pytest.mark.clause("NSA-P10-SUPPORT")
@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_score_support(subject, lane, name):
    """p_slc >= 0, and exactly 0 past the current block or past the last visible compressed key."""
    subject.require("aux")
    cfg, case = SCORE_CASES[name]
    cfg = subject.config(cfg)
    inp = fit(subject, case).make()
    _, aux = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=True)
    P = aux.p_slc
    T, S = P.shape[1], P.shape[-1]
    p = torch.arange(T, device=P.device).view(1, T, 1, 1)
    j = torch.arange(S, device=P.device).view(1, 1, 1, -1)
    M = torch.tensor([dense.num_cmp(t, cfg) for t in range(T)], device=P.device).view(1, T, 1, 1)
    last_key_end = (M - 1) * cfg.cmp_stride + cfg.cmp_block  # end of the last visible block
    zero = (j > p // cfg.sel_block) | (j * cfg.sel_block >= last_key_end) | (M == 0)
    subject.expect(bool((P >= 0).all()), "p_slc has negative entries")
    bad = int((zero.expand_as(P) & (P != 0)).sum())
    subject.expect(bad == 0, f"p_slc is non-zero on {bad} entries outside its support")


@pytest.mark.clause("NSA-EQ10-GROUP-SUM")
def test_group_score_is_the_sum_over_heads(subject, lane):
    """p_slc equals Eqs. 9-10 applied to the implementation's own per-head p_cmp (sum, not mean)."""
    subject.require("aux")
    cfg = subject.config(CFG_A)
    inp = fit(subject, Case(T=70, G=2, h=4, seed=34)).make()
    h = inp.shape[3]
    _, aux = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=True)

    def violation(p_cmp, p_slc):
        return max_err(p_slc, _scores_from_pcmp(p_cmp, cfg, p_slc.shape[-1], h))

    def naive():
        d = subject.dense(inp.to(lane.dtype, subject.device), cfg)
        return violation(d.p_cmp, d.p_slc)

    subject.record_identity(
        f"p_slc - sum_heads(W p_cmp) ({lane})", lane, violation(aux.p_cmp, aux.p_slc), naive
    )
    subject.check_parity(inp, cfg, lane, fields=("p_slc",))
