"""Causality and consistency (spec Part II §6, P1-P4) of the reference.

The reference computes each row from exactly the keys it may read, so P1 and P2 hold bit for bit
(``torch.equal``). P3 compares with an independent formulation (`exact` class) and P4 compares
runs of different lengths within the dtype's tolerance class (see its docstring).
"""

from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from nsa_impl.tolerances import EXACT_ATOL
from nsa_ref import NSAConfig

from . import oracles
from .strategies import (
    BRANCH_FIELDS,
    PHIS,
    cotangent,
    examples,
    make_inputs,
    over_dtypes,
    pinned,
    reference,
    reseeded,
    segment,
    splice,
    structures,
    tolerance,
)

AUX_ROWS = ("block_indices", "p_slc", "p_cmp", "o_cmp", "o_sel", "o_win")
CUTS = st.integers(0, 10**6)


def _cut(s, cut: int) -> int:
    """A query position ``t`` in ``0 .. T-2`` (there is a future to perturb)."""
    return cut % (s.T - 1)


def _assert_rows_equal(a, b, rows: slice, what: str) -> None:
    for name in AUX_ROWS:
        x, y = getattr(a[1], name)[:, rows], getattr(b[1], name)[:, rows]
        assert torch.equal(x, y), f"{what}: aux.{name} changed"
    assert torch.equal(a[0][:, rows], b[0][:, rows]), f"{what}: output changed"


@over_dtypes
@examples(0.8)
@given(s=structures(min_T=2, phis=PHIS, branch_kv=(False, True)), cut=CUTS)
@example(s=pinned(T=9, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 3)), cut=4)  # block [2, 6) ends at t+1
@example(s=pinned(T=2, cfg=NSAConfig(1, 1, 1, 1, 0, 1, 1)), cut=0)
def test_p01_outputs_do_not_see_the_future(s, cut, dtype):
    """P1: changing any input at positions ``> t`` leaves the rows ``<= t`` bit-identical."""
    t = _cut(s, cut)
    a = make_inputs(s, dtype)
    b = make_inputs(reseeded(s), dtype)
    future = torch.arange(s.T) > t
    fields = dict.fromkeys(("q", "k", "v", "gates", *BRANCH_FIELDS), future)
    _assert_rows_equal(reference(a), reference(splice(a, b, fields)), slice(0, t + 1), f"t={t}")


@over_dtypes
@examples(0.8)
@given(s=structures(min_T=2, phis=PHIS, branch_kv=(False, True)), cut=CUTS)
@example(s=pinned(T=9, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 3)), cut=4)
def test_p01_gradients_do_not_reach_the_future(s, cut, dtype):
    """P1 (gradient form): ``d o_{<=t} / d x_s == 0`` exactly for every input ``x``, ``s > t``."""
    t = _cut(s, cut)
    x = make_inputs(s, dtype, requires_grad=True)
    o, _ = reference(x)
    (o[:, : t + 1] * cotangent(o, s.seed)[:, : t + 1]).sum().backward()
    for leaf in x.leaves():
        if leaf.grad is not None:
            assert torch.all(leaf.grad[:, t + 1 :] == 0), "gradient leaked to a future position"
            assert torch.isfinite(leaf.grad).all()


@examples()
@given(s=structures(min_T=2, branch_kv=(False, True)), cut=CUTS)
@example(s=pinned(T=12, cfg=NSAConfig(4, 2, 4, 2, 1, 1, 2), regime="ties"), cut=9)
def test_p02_selection_depends_only_on_q_t_and_past_keys(s, cut):
    """P2: ``I_t`` and its scores depend only on ``q_t`` and the compression keys ``k_{<=t}``.

    Values, gates, the other queries, future keys and (with per-branch K/V) the selection and
    window keys are all perturbed; the block indices and scores of row ``t`` must not move.
    """
    t = _cut(s, cut)
    a, b = make_inputs(s), make_inputs(reseeded(s))
    pos = torch.arange(s.T)
    every = torch.ones(s.T, dtype=torch.bool)
    fields = {
        "q": pos != t,
        "k": pos > t,
        "v": every,
        "gates": every,
        "cmp.k": pos > t,
        "cmp.v": every,
        "sel.k": every,
        "sel.v": every,
        "win.k": every,
        "win.v": every,
    }
    (_, aux_a), (_, aux_b) = reference(a), reference(splice(a, b, fields))
    assert torch.equal(aux_a.block_indices[:, t], aux_b.block_indices[:, t])
    assert torch.equal(aux_a.p_slc[:, t], aux_b.p_slc[:, t])


@examples()
@given(s=structures(phis=PHIS, packed=True, branch_kv=(False, True)))
@example(s=pinned(T=10, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 8)))  # T = i*d + l for i = 3
@example(s=pinned(T=9, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 8)))  # the last block is one token short
@example(s=pinned(T=3, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 8)))  # T < l: no compressed block at all
@example(s=pinned(T=12, cfg=NSAConfig(4, 4, 4, 3, 1, 2, 8), phi="weighted"))  # l = d = l'
def test_p03_compression_sees_exactly_the_complete_blocks(s):
    """P3: ``o_cmp[p]`` is attention over the blocks with ``i*d + l <= p + 1`` and no others.

    Compared with an independent unfold + dense-mask formulation (`exact` class); ``p_cmp`` is 0
    on invisible blocks and sums to 1 over the visible ones (or is all 0 when there are none).
    """
    x = make_inputs(s)
    _, aux = reference(x)
    want = oracles.branches(x, s.cfg, aux.block_indices)["cmp"]
    assert oracles.max_abs_diff(aux.o_cmp, want) <= EXACT_ATOL
    for b, start, end in s.sequences():
        for p in range(end - start):
            M = s.cfg.num_cmp(p)
            row = aux.p_cmp[b, start + p]
            assert torch.all(row[:, M:] == 0), f"p={p}: invisible compressed block has weight"
            total = row[:, :M].sum(dim=-1)
            assert oracles.max_abs_diff(total, float(M > 0)) <= EXACT_ATOL


@over_dtypes
@examples(0.8)
@given(s=structures(min_T=2, phis=PHIS, branch_kv=(False, True)), cut=CUTS)
@example(s=pinned(T=11, cfg=NSAConfig(4, 2, 6, 2, 1, 1, 3)), cut=6)  # T not a multiple of d, l'
@example(s=pinned(T=40, G=2, h=1, Dk=1, Dv=2, cfg=NSAConfig(6, 2, 2, 1, 0, 0, 1), seed=0), cut=5)
def test_p04_prefix_invariance(s, cut, dtype):
    """P4: rows ``0..t-1`` are the same whether the input has length ``t`` or ``T > t``.

    Block indices must be equal. Values are compared within the dtype's tolerance class, not bit
    for bit: the reference pools all compressed blocks of a sequence in one reduction, and torch
    may round a float32 mean differently for a different block count (seen: 3e-8 at T=40 vs 6,
    the second example). P1 compares equal shapes and stays bit-exact.
    """
    t = _cut(s, cut) + 1
    x = make_inputs(s, dtype)
    atol = tolerance(dtype)
    full = reference(x)
    o_short, aux_short = reference(segment(x, 0, t))
    assert oracles.max_abs_diff(full[0][:, :t], o_short) <= atol
    for name in AUX_ROWS:
        long_rows, short_rows = getattr(full[1], name)[:, :t], getattr(aux_short, name)
        width = short_rows.shape[-1]
        if name == "block_indices":
            assert torch.equal(long_rows, short_rows), "block indices differ"
        else:
            err = oracles.max_abs_diff(long_rows[..., :width], short_rows)
            assert err <= atol, f"aux.{name} differs by {err}"
        assert torch.all(long_rows[..., width:] == 0), f"aux.{name} has entries past the prefix"
