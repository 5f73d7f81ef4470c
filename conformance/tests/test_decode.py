"""Decoding with a cache (spec I.9, P5, P29): prefill equivalence, emission, read counters."""

from __future__ import annotations

import pytest
import torch

from conformance import dense
from conformance.checks import TOL, max_err
from conformance.inputs import Case

from .cases import CFG_B, CFG_PAPER, fit

T_DECODE = 40


def _decode(subject, lane, cfg, seed):
    """Decode every position one by one; return inputs, outputs [B, T, H, Dv], reads, lengths."""
    inp = fit(subject, Case(B=2, T=T_DECODE, G=2, h=2, seed=seed)).make()
    x = inp.to(lane.dtype, subject.device)
    cache = subject.adapter.new_cache(cfg)
    outs, reads, lengths = [], [], []
    for p in range(T_DECODE):
        t = slice(p, p + 1)
        outs.append(cache.step(x.q[:, t], x.k[:, t], x.v[:, t], x.gates[:, t]))
        reads.append(dict(cache.reads))
        lengths.append(cache.length)
    return inp, torch.cat(outs, dim=1), reads, lengths


@pytest.mark.clause("NSA-P5-DECODE-PREFILL")
@pytest.mark.parametrize("scale", [None, 0.7])
def test_decode_reproduces_prefill(subject, lane, scale):
    """Row p of the decode equals row p of the prefill, for every p."""
    cfg = CFG_B
    inp = fit(subject, Case(B=2, T=T_DECODE, G=2, h=2, seed=100)).make()
    x = inp.to(lane.dtype, subject.device)
    kwargs = {} if scale is None else {"scale": scale}
    cache = subject.adapter.new_cache(cfg, **kwargs)
    rows = [
        cache.step(x.q[:, p : p + 1], x.k[:, p : p + 1], x.v[:, p : p + 1], x.gates[:, p : p + 1])
        for p in range(T_DECODE)
    ]
    decoded = torch.cat(rows, dim=1)
    prefill, aux = subject.run(x, cfg, aux=subject.has("aux"), **kwargs)
    if lane.klass == "low-precision":  # two different low-precision paths: judge both by I.10
        idx = None if aux is None else aux.block_indices
        subject.compare_to(
            f"decode vs oracle ({lane})",
            decoded,
            inp,
            lane,
            lambda y: subject.dense(y, cfg, block_indices=idx, **kwargs).o,
        )
    else:
        subject.record(
            f"decode vs prefill ({lane})",
            max_err(decoded, prefill),
            TOL.EXACT_ATOL if lane.klass == "exact" else TOL.FP32_OUT_ATOL,
        )


@pytest.mark.clause("NSA-I9-CMP-EMIT")
def test_compressed_blocks_are_emitted_on_time(subject, lane):
    """At step p the cache holds num_cmp(p) compressed blocks and length p + 1."""
    _, _, reads, lengths = _decode(subject, lane, CFG_B, 101)
    got = [r["cmp"] for r in reads]
    want = [dense.num_cmp(p, CFG_B) for p in range(T_DECODE)]
    subject.expect(got == want, f"reads['cmp'] per step {got} != num_cmp(p) {want}")
    subject.expect(lengths == list(range(1, T_DECODE + 1)), f"cache.length per step {lengths}")


@pytest.mark.clause("NSA-I9-READS")
def test_read_counters(subject, lane):
    """sel = selected keys <= p (max over batch and groups), win = min(w, p+1)."""
    inp, _, reads, _ = _decode(subject, lane, CFG_B, 102)
    oracle = subject.dense(inp.to(torch.float64, subject.device), CFG_B)
    want_sel = oracle.reads_sel.amax(dim=(0, 2)).tolist()
    want_win = [min(CFG_B.window, p + 1) for p in range(T_DECODE)]
    got_sel, got_win = [r["sel"] for r in reads], [r["win"] for r in reads]
    subject.expect(got_sel == want_sel, f"reads['sel'] {got_sel} != {want_sel}")
    subject.expect(got_win == want_win, f"reads['win'] {got_win} != {want_win}")


@pytest.mark.clause("NSA-P29-READ-BOUND")
def test_read_bound(subject, lane):
    """reads(S) <= num_cmp(S-1) + n*l' + min(w, S) at every step; 5631 at S=65536 (paper)."""
    _, _, reads, _ = _decode(subject, lane, CFG_B, 103)
    over = [(p, r) for p, r in enumerate(reads) if sum(r.values()) > dense.read_bound(p + 1, CFG_B)]
    subject.expect(not over, f"steps over the I.9 bound: {over[:3]}")
    subject.expect(
        dense.read_bound(65536, CFG_PAPER) == 5631 == CFG_PAPER.decode_read_bound(65536),
        "the paper configuration's bound at S=65536 is not 5631",
    )
    table4 = {8192: 2048, 16384: 2560, 32768: 3584, 65536: 5632}  # s/16 + 1536 (paper Table 4)
    subject.expect(
        all(dense.read_bound(s, CFG_PAPER) <= v for s, v in table4.items()),
        "the I.9 bound exceeds the paper's Table 4",
    )
