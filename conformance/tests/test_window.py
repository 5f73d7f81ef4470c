"""Sliding window and the full-attention limits (spec I.7, P22, P26, P27)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conformance import dense
from conformance.inputs import Case, one_hot_gates

from .cases import CFG_B, expect_full_attention, fit


def _cfg(subject, window: int, top_n: int = 4):
    """CFG_B with this window and n, moved into the adapter's limits (the window is kept)."""
    return subject.config(replace(CFG_B, window=window, sel_top_n=top_n), keep=("window",))


@pytest.mark.clause("NSA-I7-WINDOW-KEYS")
@pytest.mark.parametrize("window", [1, 5, 16])
def test_window_has_exactly_w_keys(subject, lane, window):
    """o_win[p] is attention over keys p-w < s <= p (w=1: the token itself)."""
    inp = one_hot_gates(fit(subject, Case(T=40, G=2, h=2, seed=60)).make(), "win")
    subject.check_parity(inp, _cfg(subject, window), lane)


@pytest.mark.clause("NSA-P26-WIN-COVERS-ALL")
def test_window_covering_the_sequence_is_full_attention(subject, lane):
    """w >= T: the window branch is full causal attention."""
    expect_full_attention(
        subject,
        lane,
        fit(subject, Case(T=40, G=2, h=2, seed=61)).make(),
        _cfg(subject, window=40),
        "win",
    )


@pytest.mark.clause("NSA-P27-FULL-LIMIT")
def test_full_attention_limit(subject, lane):
    """Selection and window cover every key, gates (0, a, 1-a): the output is full attention."""
    inp = fit(subject, Case(T=40, G=2, h=2, seed=62)).make()
    a = torch.rand(
        inp.gates.shape[:-1], generator=torch.Generator().manual_seed(62), dtype=torch.float64
    )
    inp = inp.with_(gates=torch.stack([torch.zeros_like(a), a, 1 - a], dim=-1))
    cfg = _cfg(subject, window=64, top_n=5)
    subject.expect(
        cfg.sel_top_n * cfg.sel_block >= 40, f"{cfg} does not cover T=40 (test setup)"
    )
    o, _ = subject.run(inp.to(lane.dtype, subject.device), cfg)

    def full(x):  # the gates the lane used, applied to full attention
        g = x.gates
        return (g[..., 1:2] + g[..., 2:3]) * dense.causal_attention(x.q, x.k, x.v)

    subject.compare_to(f"o vs full attention ({lane})", o, inp, lane, full)


@pytest.mark.clause("NSA-P22-FIRST-TOKEN")
def test_first_token(subject, lane):
    """p = 0: o_sel = o_win = v_0 of the head's group and o_cmp = 0 (T = 1 and row 0 of T = 9)."""
    for T in (1, 9):
        base = fit(subject, Case(B=2, T=T, G=2, h=2, seed=63)).make()
        h = base.shape[3]
        for branch in ("sel", "win"):
            inp = one_hot_gates(base, branch)
            o, _ = subject.run(inp.to(lane.dtype, subject.device), _cfg(subject, window=4))
            subject.compare_to(
                f"o_{branch}[0] vs v_0 (T={T}, {lane})",
                o[:, :1],
                inp,
                lane,
                lambda x, h=h: x.v[:, :1].repeat_interleave(h, dim=2),
            )
        o, _ = subject.run(
            one_hot_gates(base, "cmp").to(lane.dtype, subject.device), _cfg(subject, window=4)
        )
        subject.record(f"|o_cmp[0]| (T={T}, {lane})", float(o[:, 0].abs().max()), 0.0)
