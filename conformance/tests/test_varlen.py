"""Variable-length batches (spec I.1, P6): cu_seqlens segments are independent sequences."""

from __future__ import annotations

import pytest
import torch

from conformance.checks import TOL, max_err
from conformance.inputs import Case, Inputs

from .cases import CFG_A, CFG_B, fields, fit

SPLITS = {
    "uneven": (0, 5, 22, 23, 60),
    "one-token-first": (0, 1, 40, 41),
    "single": (0, 33),
}


@pytest.mark.clause("NSA-P6-VARLEN-PACKING")
@pytest.mark.parametrize("split", list(SPLITS))
def test_packed_equals_separate(subject, lane, split):
    """Each packed segment equals the same sequence run alone (outputs and indices)."""
    cu = SPLITS[split]
    inp = fit(subject, Case(T=cu[-1], G=2, h=2, seed=90, cu_seqlens=cu)).make()
    cfg = subject.config(CFG_B)
    aux = subject.has("indices")
    o, a = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=aux)
    for s, e in zip(cu, cu[1:], strict=False):
        alone = Inputs(inp.q[:, s:e], inp.k[:, s:e], inp.v[:, s:e], inp.gates[:, s:e])
        o1, a1 = subject.run(alone.to(lane.dtype, subject.device), cfg, aux=aux)
        subject.record(
            f"segment [{s}, {e}) packed vs alone ({lane})",
            max_err(o[:, s:e], o1),
            subject.invariance_tol(lane, alone, cfg),
        )
        if aux:
            scores = subject.scores_of(a1, alone, cfg)
            subject.expect_same_selection(
                a.block_indices[:, s:e], a1.block_indices, scores, cfg, alone, lane
            )


@pytest.mark.clause("NSA-I1-VARLEN-ORACLE")
@pytest.mark.parametrize("split", list(SPLITS))
def test_packed_against_the_oracle(subject, lane, split):
    """Packed outputs, scores, indices and gradients equal the oracle's per-sequence semantics."""
    cu = SPLITS[split]
    inp = fit(subject, Case(T=cu[-1], G=2, h=2, seed=91, cu_seqlens=cu)).make()
    subject.check_parity(
        inp,
        subject.config(CFG_A),
        lane,
        fields=fields(subject),
        indices=subject.has("indices"),
        grads=subject.has("backward"),
    )


@pytest.mark.clause("NSA-I1-VARLEN-ORACLE")
def test_nothing_crosses_a_boundary(subject, lane):
    """Changing one segment leaves every other segment's outputs unchanged."""
    cu = SPLITS["uneven"]
    inp = fit(subject, Case(T=cu[-1], G=1, h=2, seed=92, cu_seqlens=cu)).make()
    s, e = cu[1], cu[2]
    gen = torch.Generator().manual_seed(93)
    k, v = inp.k.clone(), inp.v.clone()
    k[:, s:e] = torch.randn(k[:, s:e].shape, generator=gen, dtype=k.dtype)
    v[:, s:e] = torch.randn(v[:, s:e].shape, generator=gen, dtype=v.dtype)
    cfg = subject.config(CFG_B)
    o1, _ = subject.run(inp.to(lane.dtype, subject.device), cfg)
    o2, _ = subject.run(inp.with_(k=k, v=v).to(lane.dtype, subject.device), cfg)
    keep = torch.ones(cu[-1], dtype=torch.bool)
    keep[s:e] = False
    keep = keep.to(o1.device)
    subject.record(
        f"other segments after changing [{s}, {e}) ({lane})",
        max_err(o2[:, keep], o1[:, keep]),
        0.0
        if subject.caps.exact_causality
        else (TOL.EXACT_ATOL if lane.klass == "exact" else TOL.FP32_OUT_ATOL),
    )
