"""Configurations and input structures shared by the clause tests (tiny, so the suite is fast)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import assume
from hypothesis import strategies as st

from conformance import dense
from conformance.checks import VARIED_FIELDS
from conformance.inputs import Case, Inputs, one_hot_gates
from nsa_ref import NSAConfig

#: One initial and two local blocks forced unless a test says otherwise (the paper's choice).
#: l < l' (Eq. 9 weights 1,2,2,2,1 as in the paper), top-n excludes blocks once T > 64.
CFG_A = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=4, window=12)
#: l = l' (weights 1,2,1), short blocks: top-n excludes blocks once T > 32.
CFG_B = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=12)
#: l = l' = d: Eq. 9 is the identity (P7).
CFG_ID = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=4, window=4)
#: The paper's configuration (§4.1).
CFG_PAPER = NSAConfig()

ALL_FIELDS = ("o", "o_cmp", "o_sel", "o_win", "p_cmp", "p_slc")


def fields(subject) -> tuple[str, ...]:
    """Every output field the adapter exposes (branch outputs and scores need ``aux``)."""
    return ALL_FIELDS if subject.has("aux") else ("o",)


def fit(subject, case: Case, vary: tuple[str, ...] = VARIED_FIELDS) -> Case:
    """``case`` (drawn: seed, batch, head dims, see `Subject.vary`) with head dims and group
    size moved into the adapter's declared range.

    ``vary`` names what a drawn case may change (``("seed",)`` keeps a shape that is the point
    of the test). Keeps ``Dk != Dv`` when the case had it, so kernels with a minimum head dim
    (e.g. 16) still run the edge cases instead of skipping them.
    """
    case = subject.vary(case, vary)
    caps = subject.caps
    lo = caps.min_head_dim
    Dk, Dv = max(case.Dk, lo), max(case.Dv, lo)
    if caps.pow2_head_dims:
        Dk, Dv = _next_pow2(Dk), _next_pow2(Dv)
    if case.Dk != case.Dv and Dk == Dv:
        Dv = 2 * Dv if caps.pow2_head_dims else Dv + 8
    if caps.max_head_dim is not None:
        Dk, Dv = min(Dk, caps.max_head_dim), min(Dv, caps.max_head_dim)
    if caps.same_head_dims:
        Dv = Dk
    h = max(case.h, caps.min_group_size)
    if caps.pow2_group_size:
        h = _next_pow2(h)
    if caps.max_group_size is not None:
        h = min(h, caps.max_group_size)
    return replace(case, Dk=Dk, Dv=Dv, h=h)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@st.composite
def structures(draw, subject):
    """A random (Case, NSAConfig) pair: sizes, a valid configuration and a seed.

    The configuration is moved to the nearest one the adapter can run (`ConfigLimits.adapt`);
    drawings with none are rejected.
    """
    d = draw(st.sampled_from([1, 2, 4]))
    l = d * draw(st.integers(1, 3))
    ls = d * draw(st.integers(1, 4))
    init, local = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    n = max(1, init + local + draw(st.integers(0, 3)))
    cfg = NSAConfig(
        cmp_block=l,
        cmp_stride=d,
        sel_block=ls,
        sel_top_n=n,
        sel_init_blocks=init,
        sel_local_blocks=local,
        window=draw(st.integers(1, 24)),
    )
    cfg = subject.caps.adapt_config(cfg)
    assume(cfg is not None)
    case = Case(
        B=draw(st.integers(1, 2)),
        T=draw(st.integers(1, 48)),
        G=draw(st.sampled_from([1, 2])),
        h=draw(st.sampled_from([1, 2, 3])),
        Dk=draw(st.sampled_from([4, 8])),
        Dv=draw(st.sampled_from([4, 6])),
        seed=draw(st.integers(0, 2**16)),
    )
    return fit(subject, case), cfg


def expect_full_attention(subject, lane, inp: Inputs, cfg, branch: str):
    """With one-hot gates on ``branch``, the output must be full causal attention (P25/26/28).

    Returns the implementation's output.
    """
    x = one_hot_gates(inp, branch)
    o, _ = subject.run(x.to(lane.dtype, subject.device), cfg)
    subject.compare_to(
        f"o_{branch} vs full attention ({lane})",
        o,
        x,
        lane,
        lambda y: dense.causal_attention(y.q, y.k, y.v),
    )
    return o
