"""Compression branch (Eqs. 7-8, spec I.3): outputs, visibility, probabilities, empty rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conformance.inputs import Case, one_hot_gates, output_weights

from .cases import CFG_A, CFG_B, CFG_ID, expect_full_attention, fit


@pytest.mark.clause("NSA-EQ7-CMP-OUTPUT")
@pytest.mark.parametrize("cfg", [CFG_A, CFG_B], ids=["l<l'", "l=l'"])
def test_compressed_branch_output(subject, lane, cfg):
    """With gates (1, 0, 0) the output is attention over the visible compressed blocks."""
    inp = fit(subject, Case(T=50, G=2, h=2, seed=20)).make()
    extra = ("o_cmp",) if subject.has("aux") else ()
    subject.check_parity(
        one_hot_gates(inp, "cmp"), subject.config(cfg), lane, fields=("o", *extra)
    )


@pytest.mark.clause("NSA-P3-CMP-VISIBILITY")
def test_visibility_boundary(subject, lane):
    """Block i joins exactly at p = i*d + l - 1: outputs on the boundary rows, p_cmp's support."""
    cfg = subject.config(CFG_A)
    l, d = cfg.cmp_block, cfg.cmp_stride
    inp = fit(subject, Case(T=5 * d + l, G=1, h=2, seed=21)).make()
    # Every row is compared, the boundary rows p = i*d + l - 1 (block i just visible) and
    # p = i*d + l - 2 (not yet) included: T = 5d + l holds six of each.
    subject.check_parity(one_hot_gates(inp, "cmp"), cfg, lane)
    if subject.has("aux"):
        _, aux = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=True)
        T = inp.q.shape[1]
        p = torch.arange(T, device=aux.p_cmp.device).view(1, T, 1, 1)
        i = torch.arange(aux.p_cmp.shape[-1], device=aux.p_cmp.device).view(1, 1, 1, -1)
        visible = i * d + l <= p + 1
        support = aux.p_cmp != 0
        subject.expect(
            bool((support == visible.expand_as(support)).all()),
            "p_cmp is non-zero exactly on the visible blocks (i*d + l <= p + 1)",
        )


@pytest.mark.clause("NSA-EQ8-PCMP")
@pytest.mark.parametrize("scale", [None, 0.6])
def test_compressed_probabilities(subject, lane, scale):
    """p_cmp is the scaled softmax over the visible compressed keys, per head, 0 elsewhere."""
    if scale is not None:
        subject.require("scale")
    inp = fit(subject, Case(T=45, G=2, h=2, seed=22)).make()
    kwargs = {} if scale is None else {"scale": scale}
    subject.check_parity(inp, subject.config(CFG_A), lane, fields=("p_cmp",), **kwargs)


@pytest.mark.clause("NSA-P21-EMPTY-CMP")
def test_empty_compressed_rows_are_exact_zeros(subject, lane):
    """T < l with gates (1, 0, 0): output exactly 0, gradients exactly 0, nothing non-finite."""
    cfg = subject.config(CFG_A)
    T = cfg.cmp_block - 1
    inp = one_hot_gates(fit(subject, Case(B=2, T=T, G=2, h=2, seed=23)).make(), "cmp")
    grads = subject.has("backward")
    x = inp.to(lane.dtype, subject.device, requires_grad=grads)
    o, _ = subject.run(x, cfg)
    subject.record(
        f"|o| with no visible compressed block ({lane})", float(o.detach().abs().max()), 0.0
    )
    if grads:
        w = output_weights(inp).to(o.dtype).to(o.device)
        leaves = x.leaves()
        gs = torch.autograd.grad((o * w).sum(), list(leaves.values()), allow_unused=True)
        for name, g in zip(leaves, gs, strict=False):
            if g is None:
                continue
            if name == "gates":  # only the compressed gate multiplies the (zero) compressed output
                g = g[..., 0]
            subject.record(f"|d o / d {name}| on empty rows ({lane})", float(g.abs().max()), 0.0)


@pytest.mark.clause("NSA-P21-EMPTY-CMP")
def test_rows_before_the_first_block_mixed_with_full_rows(subject, lane):
    """T > l: the leading rows' o_cmp is exactly 0 and the rest matches; no NaN in gradients."""
    subject.require("aux")
    cfg = subject.config(CFG_A)
    inp = fit(subject, Case(T=20, G=1, h=2, seed=24)).make()
    par = subject.check_parity(
        inp, cfg, lane, fields=("o", "o_cmp"), grads=subject.has("backward")
    )
    lead = par.got["o_cmp"][:, : cfg.cmp_block - 1]
    subject.record(f"|o_cmp| on rows p < l-1 ({lane})", float(lead.detach().abs().max()), 0.0)


@pytest.mark.clause("NSA-P28-DEGENERATE-CMP")
def test_l_equals_d_equals_one_is_full_attention(subject, lane):
    """l = d = 1 with mean pooling: every key is its own block, o_cmp = full causal attention."""
    degenerate = replace(CFG_ID, cmp_block=1, cmp_stride=1)
    cfg = subject.config(degenerate, keep=("cmp_block", "cmp_stride"))
    expect_full_attention(
        subject, lane, fit(subject, Case(T=30, G=2, h=2, seed=25)).make(), cfg, "cmp"
    )
