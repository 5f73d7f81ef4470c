"""`nsa_impl.observe`: what the collector reports, that it is off by default, timing, labels.

Statistics are checked against values computed here from `nsa_attention`'s own aux outputs and
a per-row loop (selected keys read), not against the collector's formulas.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import nsa_impl
from conformance.inputs import Case
from nsa_impl import NSAConfig, dispatch, nsa_attention, observe, routing
from nsa_impl.dispatch import Decision, Route
from nsa_impl.model import NSAToyLM

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=3, window=12)


def inputs(seed=0, cu=(0, 17, 40)):
    x = Case(T=40, G=2, h=2, Dk=8, Dv=8, seed=seed, cu_seqlens=cu).make()
    return x.to(torch.float32, "cpu")


def test_off_by_default_and_no_side_effects():
    assert observe.ACTIVE is None
    x = inputs()
    plain = nsa_attention(x.q, x.k, x.v, x.gates, CFG, cu_seqlens=x.cu_seqlens)
    with observe.Collector() as c:
        assert observe.ACTIVE is c
        seen = nsa_attention(x.q, x.k, x.v, x.gates, CFG, cu_seqlens=x.cu_seqlens)
    assert observe.ACTIVE is None
    assert torch.equal(plain, seen)
    assert c.layers == ["nsa_attention"]


def test_statistics_match_the_aux_outputs():
    x = inputs()
    g = torch.tensor([0.2, 0.5, 0.8]).expand_as(x.gates).clone()
    g[0, :5, 0, 1] = 0.9  # a spread in the sel gate: std > 0
    with observe.Collector() as c:
        o, aux = nsa_attention(x.q, x.k, x.v, g, CFG, cu_seqlens=x.cu_seqlens, return_aux=True)
    stats = c.summary()
    for i, (branch, out) in enumerate(zip(observe.BRANCHES, (aux.o_cmp, aux.o_sel, aux.o_win),
                                          strict=True)):  # fmt: skip
        gi = g[..., i].double()
        key = f"nsa_attention/{branch}"
        assert stats[f"{key}/gate_mean"] == pytest.approx(float(gi.mean()), rel=1e-6)
        assert stats[f"{key}/gate_std"] == pytest.approx(
            float(gi.std(unbiased=False)), rel=1e-5, abs=1e-7
        )
        contrib = (g[..., i : i + 1].double() * out.double()).abs().mean()
        assert stats[f"{key}/contrib"] == pytest.approx(float(contrib), rel=1e-5)
        hist = stats[f"{key}/gate_hist"]
        assert len(hist) == observe.GATE_BINS and sum(hist) == gi.numel()
        assert stats[f"{key}/path/{dispatch.explain(x.q, k=x.k, v=x.v)[branch].path}"] == 1.0
        assert stats[f"{key}/fallbacks"] == 0.0
    # Selected keys <= p per (query, group), by a loop over rows.
    bounds = x.cu_seqlens.tolist()
    reads = []
    for t in range(40):
        start = max(b for b in bounds[:-1] if b <= t)
        p = t - start
        for grp in range(aux.block_indices.shape[2]):
            blocks = [int(j) for j in aux.block_indices[0, t, grp] if j >= 0]
            reads.append(sum(1 for j in blocks for s in range(j * 8, j * 8 + 8) if s <= p))
    assert stats["nsa_attention/sel/reads"] == pytest.approx(sum(reads) / len(reads))


def test_sums_accumulate_until_reset():
    x = inputs()
    c = observe.Collector()
    with c:
        for _ in range(3):
            nsa_attention(x.q, x.k, x.v, x.gates, CFG, cu_seqlens=x.cu_seqlens)
    stats = c.summary()
    assert stats["nsa_attention/sel/path/" + dispatch.explain(x.q)["sel"].path] == 3.0
    c.reset()
    assert c.summary() == {}


def test_layers_are_labelled_by_module_name():
    lm = NSAToyLM(64, 16, 2, 1, 8, CFG, num_layers=2)
    c = observe.Collector()
    handles = c.attach(lm)
    assert len(handles) == 2
    with c:
        lm(torch.randint(0, 64, (1, 40)))
    assert c.layers == ["blocks.0.attn", "blocks.1.attn"]
    for h in handles:
        h.remove()


def test_nesting_inner_collector_records():
    x = inputs()
    outer, inner = observe.Collector(), observe.Collector()
    with outer:
        with inner:
            nsa_attention(x.q, x.k, x.v, x.gates, CFG, cu_seqlens=x.cu_seqlens)
        assert observe.ACTIVE is outer
    assert inner.summary() and not outer.summary()


def test_timing_per_branch_on_the_cpu():
    x = inputs()
    with observe.Collector(timing=True) as c:
        nsa_attention(x.q, x.k, x.v, x.gates, CFG, cu_seqlens=x.cu_seqlens)
    stats = c.summary()
    for branch in observe.BRANCHES:
        assert stats[f"nsa_attention/{branch}/time_ms"] > 0
    with observe.Collector(timing=False) as c:
        nsa_attention(x.q, x.k, x.v, x.gates, CFG, cu_seqlens=x.cu_seqlens)
    assert not any(k.endswith("time_ms") for k in c.summary())


def test_debug_timing_flag_is_known_and_read():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unknown NSA_* flag would warn
            s = routing.reload_settings({"NSA_DEBUG_TIMING": "1"})
        assert s.debug_timing and observe.Collector().timing
        assert not routing.reload_settings({}).debug_timing
    finally:
        routing.reload_settings()  # back to os.environ


def test_fallbacks_count_only_paths_of_this_device():
    c = observe.Collector()
    g = torch.full((1, 4, 2, 3), 0.5)
    o = torch.zeros(1, 4, 2, 8)
    idx = torch.zeros(1, 4, 1, 1, dtype=torch.long)
    route = Route(
        cmp=Decision("cmp", "masked", "r", skipped=(("flash", "device cpu not in ['cuda']"),)),
        sel=Decision("sel", "masked", "r", skipped=(("packed", "kernel declines: test"),)),
        win=Decision("win", "masked", "r"),
    )
    with c:
        c.record(o_cmp=o, o_sel=o, o_win=o, gates=g, block_indices=idx, sel_block=8,
                 positions=torch.arange(4), route=route)  # fmt: skip
    stats = c.summary()
    assert stats["nsa_attention/cmp/fallbacks"] == 0.0  # flash serves CUDA only: not a fallback
    assert stats["nsa_attention/sel/fallbacks"] == 1.0  # packed runs here and was passed over
    assert stats["nsa_attention/win/fallbacks"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_record_makes_no_host_sync_cuda():
    x = inputs().to(torch.float32, "cuda")
    _, aux = nsa_attention(x.q, x.k, x.v, x.gates, CFG, cu_seqlens=x.cu_seqlens, return_aux=True)
    plan = nsa_impl.plan(x.q.shape, CFG, kv_heads=x.k.shape[2], v_head_dim=x.v.shape[-1],
                         cu_seqlens=x.cu_seqlens, device=x.q.device, dtype=x.q.dtype)
    c = observe.Collector(timing=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with c:
            for _ in range(2):
                observe.mark("begin", x.q)
                for b in observe.BRANCHES:
                    observe.mark(b, x.q)
                c.record(o_cmp=aux.o_cmp, o_sel=aux.o_sel, o_win=aux.o_win, gates=x.gates,
                         block_indices=aux.block_indices, sel_block=CFG.sel_block,
                         positions=plan.positions, route=plan.route)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = c.summary()
    assert math.isfinite(stats["nsa_attention/sel/time_ms"])
