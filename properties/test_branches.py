"""Empty rows, gates and the equivalences with full attention (Part II §6 P21-P28, spec I.3,
I.7, I.8)."""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from nsa_impl.tolerances import EXACT_ATOL
from nsa_ref import NSAConfig

from . import oracles
from .strategies import (
    PHIS,
    configs,
    cotangent,
    examples,
    make_inputs,
    over_dtypes,
    pinned,
    reference,
    structures,
)

BRANCH_NAMES = ("cmp", "sel", "win")


@over_dtypes
@examples(0.8)
@given(
    s=structures(
        max_T=24,
        cfgs=configs(cmp_mult=st.integers(2, 6)),
        packed=True,
        phis=PHIS,
        branch_kv=(False, True),
    )
)
@example(s=pinned(T=3, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 8)))  # T < l: every row is empty
@example(s=pinned(T=1, cfg=NSAConfig(2, 1, 2, 1, 1, 0, 1), regime="large"))
def test_p21_empty_compression_rows(s, dtype):
    """P21: rows with no visible compressed block give ``o_cmp = 0`` exactly, ``p_cmp = 0`` and
    zero scores; nothing is NaN/Inf forward or backward (gates on ``cmp`` included). With
    ``l <= l'`` such a row selects block 0 only."""
    x = make_inputs(s, dtype, requires_grad=True)
    o, aux = reference(x)
    assert torch.isfinite(o).all()
    grads = torch.autograd.grad((o * cotangent(o, s.seed)).sum(), x.leaves(), allow_unused=True)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    cfg = s.cfg
    for b, start, end in s.sequences():
        for p in range(min(end - start, cfg.cmp_block - 1)):  # num_cmp(p) == 0 exactly here
            row = start + p
            assert torch.all(aux.o_cmp[b, row] == 0) and torch.all(aux.p_cmp[b, row] == 0)
            assert torch.all(aux.p_slc[b, row] == 0)
            if cfg.cmp_block <= cfg.sel_block:
                assert torch.all(aux.block_indices[b, row, :, 0] == 0)
                assert torch.all(aux.block_indices[b, row, :, 1:] == -1)


@over_dtypes
@examples(0.8)
@given(s=structures(max_T=12, packed=True, phis=PHIS, branch_kv=(False, True)))
@example(s=pinned(T=1, cfg=NSAConfig(1, 1, 1, 1, 0, 1, 1)))  # l = 1: block 0 is visible at once
def test_p22_first_token(s, dtype):
    """P22: at the first position of every sequence ``o_sel = o_win = v_0`` (one key, weight 1)
    and ``o_cmp = 0`` (or ``phi(v_0)`` = ``v_0`` when ``l = 1``)."""
    x = make_inputs(s, dtype)
    _, aux = reference(x)
    h = s.h
    for b, start, _ in s.sequences():
        for branch in BRANCH_NAMES:
            v0 = x.kv(branch)[1][b, start].repeat_interleave(h, dim=0)  # [H, Dv]
            got = getattr(aux, f"o_{branch}")[b, start]
            want = torch.zeros_like(v0) if branch == "cmp" and s.cfg.cmp_block > 1 else v0
            assert torch.equal(got, want), branch


@examples()
@given(
    s=structures(packed=True, branch_kv=(False, True)),
    gate_kind=st.sampled_from(["random", "cmp", "sel", "win", "saturated"]),
)
@example(s=pinned(T=9, cfg=NSAConfig(2, 1, 2, 2, 1, 1, 3)), gate_kind="saturated")
def test_p23_p24_gates_combine_branches_linearly(s, gate_kind):
    """P23 + P24: gates anywhere in ``[0, 1]`` (0 and 1 included) are accepted;
    ``o = g_cmp o_cmp + g_sel o_sel + g_win o_win`` per head; a one-hot gate returns that branch
    bit for bit (branch isolation), and the branch outputs do not depend on the gates."""
    x = make_inputs(s)
    if gate_kind in BRANCH_NAMES:
        gates = torch.zeros_like(x.gates)
        gates[..., BRANCH_NAMES.index(gate_kind)] = 1.0
        x = replace(x, gates=gates)
    elif gate_kind == "saturated":
        x = replace(x, gates=(x.gates > 0.5).to(x.gates.dtype))
    o, aux = reference(x)
    g = x.gates
    combined = g[..., 0:1] * aux.o_cmp + g[..., 1:2] * aux.o_sel + g[..., 2:3] * aux.o_win
    assert oracles.max_abs_diff(o, combined) <= EXACT_ATOL
    if gate_kind in BRANCH_NAMES:
        assert torch.equal(o, getattr(aux, f"o_{gate_kind}"))
    _, aux_other = reference(replace(x, gates=1.0 - x.gates))
    for branch in BRANCH_NAMES:
        assert torch.equal(getattr(aux, f"o_{branch}"), getattr(aux_other, f"o_{branch}"))


@examples()
@given(s=structures(packed=True, branch_kv=(False, True)))
@example(s=pinned(T=20, cfg=NSAConfig(2, 1, 2, 2, 1, 1, 5)))
@example(s=pinned(T=3, cfg=NSAConfig(2, 1, 2, 2, 1, 1, 7)))  # w > T
def test_window_branch_reads_the_last_w_keys(s):
    """Spec I.7: ``o_win[p]`` is attention over exactly ``p - w < s <= p`` (``min(w, p+1)`` keys),
    against an independent dense-mask formulation (`exact` class)."""
    x = make_inputs(s)
    _, aux = reference(x)
    want = oracles.branches(x, s.cfg, aux.block_indices)["win"]
    assert oracles.max_abs_diff(aux.o_win, want) <= EXACT_ATOL


def _covering(s):
    """``s`` with ``n`` at least the number of selection blocks and ``w >= T`` (P25, P26)."""
    longest = max(e - a for _, a, e in s.sequences())
    n = max(s.cfg.sel_top_n, s.cfg.num_sel_blocks(longest))
    return s.with_cfg(sel_top_n=n, window=max(s.cfg.window, longest))


@examples()
@given(s=structures(packed=True), g_sel=st.floats(0, 1))
@example(s=pinned(T=33, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 4)), g_sel=0.25)
def test_p25_p26_p27_full_attention_limit(s, g_sel):
    """P25-P27: with ``n >= b(p)+1`` selection sees every key ``<= p``; with ``w >= p+1`` so does
    the window; then ``o = g_cmp o_cmp + (g_sel + g_win) o_full``, which is full causal attention
    when ``g_cmp = 0`` and ``g_sel + g_win = 1``."""
    s = _covering(s)
    x = make_inputs(s)
    gates = x.gates.clone()
    gates[..., 0], gates[..., 1], gates[..., 2] = 0.0, g_sel, 1.0 - g_sel
    x = replace(x, gates=gates)
    o, aux = reference(x)
    full = oracles.branches(x, s.cfg, aux.block_indices)["full"]
    for branch in ("sel", "win"):
        assert oracles.max_abs_diff(getattr(aux, f"o_{branch}"), full) <= EXACT_ATOL, branch
    assert oracles.max_abs_diff(o, full) <= EXACT_ATOL


@examples()
@given(
    s=structures(cfgs=configs(strides=st.just(1), cmp_mult=st.just(1)), packed=True),
    explicit_identity=st.booleans(),
)
@example(s=pinned(T=17, cfg=NSAConfig(1, 1, 4, 2, 1, 1, 4)), explicit_identity=True)
def test_p28_degenerate_compression_is_full_attention(s, explicit_identity):
    """P28: with ``l = d = 1`` and ``phi`` the identity, every key is its own compressed token and
    ``o_cmp`` is full causal attention."""
    x = make_inputs(s)

    def identity(blocks):
        return blocks[..., 0, :]

    phi = dict(phi_k=identity, phi_v=identity) if explicit_identity else {}
    _, aux = reference(x, **phi)
    full = oracles.branches(x, s.cfg, aux.block_indices)["full"]
    assert oracles.max_abs_diff(aux.o_cmp, full) <= EXACT_ATOL
