"""Decode (spec I.9; Part II §6 P5, P29): the reference cache against the prefill reference."""

from __future__ import annotations

import torch
from hypothesis import example, given

from nsa_ref import NSAConfig, NSARefCache

from . import oracles
from .strategies import (
    PHIS,
    examples,
    make_inputs,
    over_dtypes,
    phi_function,
    pinned,
    reference,
    structures,
    tolerance,
)

DECODE_STRUCTURES = structures(max_T=40, phis=PHIS, branch_kv=(False, True))


def _decode(x):
    """Decode every position of ``x`` with a fresh `NSARefCache`; outputs and per-step reads."""
    phi = phi_function(x.structure.phi)
    cache = NSARefCache(x.structure.cfg, phi_k=phi, phi_v=phi)
    outs, reads = [], []
    for p in range(x.structure.T):
        step_kv = None
        if x.branch_kv is not None:
            step_kv = {n: (k[:, p : p + 1], v[:, p : p + 1]) for n, (k, v) in x.branch_kv.items()}
        outs.append(
            cache.step(
                x.q[:, p : p + 1],
                x.k[:, p : p + 1],
                x.v[:, p : p + 1],
                x.gates[:, p : p + 1],
                branch_kv=step_kv,
            )
        )
        reads.append(dict(cache.reads))
        assert cache.length == p + 1
    return torch.cat(outs, dim=1), reads


@over_dtypes
@examples(0.6)
@given(s=DECODE_STRUCTURES)
@example(s=pinned(T=1, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 4)))
@example(s=pinned(T=13, cfg=NSAConfig(4, 2, 6, 3, 1, 1, 5), phi="weighted"))  # l' != l, d < l
@example(s=pinned(T=11, cfg=NSAConfig(6, 2, 4, 2, 1, 1, 3), phi="weighted", branch_kv=True))
def test_p05_prefill_equals_decode(s, dtype):
    """P5: decoding positions one by one reproduces the prefill output row by row.

    Covers the compressed cache (emission when ``i*d + l == p + 1``, a position-dependent
    ``phi``), the running partial block and per-branch K/V; tolerance class of the dtype.
    """
    x = make_inputs(s, dtype)
    o_prefill, _ = reference(x)
    o_decode, _ = _decode(x)
    err = oracles.max_abs_diff(o_prefill, o_decode)
    assert err <= tolerance(dtype), err


@examples(0.6)
@given(s=DECODE_STRUCTURES)
@example(s=pinned(T=20, cfg=NSAConfig(4, 2, 4, 2, 1, 1, 6)))
def test_p29_decode_reads(s):
    """P29 / spec I.9: per-step reads ``cmp = num_cmp(p)``, ``sel`` = selected keys ``<= p``
    (the most over batch and groups), ``win = min(w, p+1)``, and their sum within
    `NSAConfig.decode_read_bound`."""
    x = make_inputs(s)
    _, aux = reference(x)
    _, reads = _decode(x)
    cfg = s.cfg
    selected = oracles.selected_key_counts(x, cfg, aux.block_indices)  # [B, T, G]
    for p, r in enumerate(reads):
        assert r["cmp"] == cfg.num_cmp(p)
        assert r["win"] == min(cfg.window, p + 1)
        assert r["sel"] == int(selected[:, p].max())
        assert r["sel"] <= cfg.sel_top_n * cfg.sel_block
        assert r["cmp"] + r["sel"] + r["win"] <= cfg.decode_read_bound(p + 1)
