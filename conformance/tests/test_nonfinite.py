"""Non-finite values stay where they are read (spec I.3, I.6, I.7; NaN containment).

A NaN placed at one token is read by exactly the rows whose key set holds it: the window rows
``j <= p < j + w``, the rows whose selected blocks hold it, and the rows that see a compressed
block containing it. Those rows must not be finite; everything else must be bit-identical to a
clean run (``torch.equal``), forward and backward: an implementation whose masked keys are
multiplied by zero instead of selected fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from conformance.inputs import Case, output_weights

from .cases import CFG_A, CFG_B, fit

_FIELDS = ("o_cmp", "o_sel", "o_win", "block_indices")


def _inject(inp, which: str, b: int, tokens, value=float("nan")):
    """A copy of ``inp`` with ``value`` in ``which`` (q, k or v) at every head/group and dim of
    the given tokens of batch row ``b``."""
    t = getattr(inp, which).clone()
    t[b, list(tokens)] = value
    return inp.with_(**{which: t})


def _run(subject, inp, lane, cfg):
    """``{field: tensor}``: the output, the aux fields (when declared) and the gradients of
    ``sum(o * w)`` (when backward is declared), all detached."""
    grads = subject.has("backward")
    x = inp.to(lane.dtype, subject.device, requires_grad=grads)
    o, aux = subject.run(x, cfg, aux=subject.has("aux"))
    out = {"o": o.detach()}
    if aux is not None:
        out.update({f: getattr(aux, f).detach() for f in _FIELDS})
    if grads:
        w = output_weights(inp).to(o.dtype).to(o.device)
        leaves = x.leaves()
        gs = torch.autograd.grad((o * w).sum(), list(leaves.values()), allow_unused=True)
        for name, g in zip(leaves, gs, strict=True):
            out[f"grad.{name}"] = torch.zeros_like(leaves[name]) if g is None else g
    return out


def _readers(j: int, T: int, cfg, block_indices) -> dict[str, torch.Tensor]:
    """Bool ``[T]`` per branch: the rows of one sequence that read token ``j`` (local).

    ``block_indices [T, G, n]`` is that sequence's selection (any group counts).
    """
    p = torch.arange(T)
    l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    win = (p >= j) & (p - cfg.window < j)
    first_block = max(0, math.ceil((j - l + 1) / d))  # the first compressed block holding j
    cmp = p >= first_block * d + l - 1
    sel = (block_indices.cpu() == j // ls).flatten(1).any(-1) & (p >= j)
    return {"win": win, "cmp": cmp, "sel": sel}


@pytest.mark.clause("NSA-NAN-ROWS")
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_a_nan_changes_only_the_rows_that_read_it(subject, lane, which):
    """NaN at token 21 of batch row 0: batch row 1 is untouched, row 0's non-readers too."""
    cfg, j, T = subject.config(CFG_B), 21, 48
    inp = fit(subject, Case(B=2, T=T, G=2, h=2, seed=90)).make()
    clean = _run(subject, inp, lane, cfg)
    dirty = _run(subject, _inject(inp, which, 0, [j]), lane, cfg)
    for name, t in clean.items():  # another batch row is another sequence
        subject.expect(torch.equal(dirty[name][1], t[1]), f"{name} of batch row 1 changed")
    if "block_indices" in clean:
        idx = clean["block_indices"][0]
    else:  # the reference's selection (exact on these inputs)
        import nsa_ref

        x = inp.to(torch.float64, "cpu")
        idx = nsa_ref.nsa_attention(x.q, x.k, x.v, x.gates, cfg, return_aux=True)[1]
        idx = idx.block_indices[0]
    r = _readers(j, T, cfg, idx)
    if which == "q":  # only row j reads its own query
        only = torch.arange(T) == j
        r = dict.fromkeys(r, only)
    elif which == "k":  # rows that see a block holding j re-select: their o_sel may change
        r["sel"] = r["sel"] | r["cmp"]
    readers = r["win"] | r["cmp"] | r["sel"]
    rows = ~readers
    subject.expect(torch.equal(dirty["o"][0, rows], clean["o"][0, rows]), "o of non-readers")
    for field, branch in (("o_win", "win"), ("o_cmp", "cmp"), ("o_sel", "sel")):
        if field in clean:
            keep = ~r[branch]
            same = torch.equal(dirty[field][0, keep], clean[field][0, keep])
            subject.expect(same, f"{field} of rows that do not read token {j} in that branch")
    if "block_indices" in clean:
        # scores read k only: a NaN in v changes no selection, one in q or k only the readers'
        keep = torch.ones(T, dtype=torch.bool) if which == "v" else ~r["cmp"]
        if which == "q":
            keep = torch.arange(T) != j
        got, want = dirty["block_indices"][0, keep], clean["block_indices"][0, keep]
        subject.expect(torch.equal(got, want), "selections that do not depend on token j")
    for name in ("grad.q", "grad.gates"):
        if name in clean:
            subject.expect(torch.equal(dirty[name][0, rows], clean[name][0, rows]),
                           f"{name} of non-readers")  # fmt: skip
    last = int(torch.nonzero(readers).max())  # keys after the last reader are read by nobody
    for name in ("grad.k", "grad.v"):
        if name in clean:
            subject.expect(torch.equal(dirty[name][0, last + 1 :], clean[name][0, last + 1 :]),
                           f"{name} of keys no reader reads")  # fmt: skip
    loud = (~torch.isfinite(dirty["o"][0, readers])).flatten(1).any(-1).all()
    subject.expect(bool(loud), "every row that reads the NaN is non-finite (never silently)")


@pytest.mark.clause("NSA-NAN-VARLEN-ISOLATION")
@pytest.mark.parametrize("seq", [0, 1])
def test_a_nan_in_one_packed_sequence_leaves_the_other_bit_identical(subject, lane, seq):
    """cu_seqlens (0, 29, 64): NaN in v at one token of sequence ``seq``: the other sequence's
    outputs, branch outputs, indices and gradients are bit-identical to a clean run."""
    subject.require("varlen")
    bounds = (0, 29, 64)
    inp = fit(subject, Case(T=64, G=2, h=2, seed=91, cu_seqlens=bounds)).make()
    token = (10, 40)[seq]
    cfg = subject.config(CFG_A)
    clean = _run(subject, inp, lane, cfg)
    dirty = _run(subject, _inject(inp, "v", 0, [token]), lane, cfg)
    other = slice(bounds[1], bounds[2]) if seq == 0 else slice(bounds[0], bounds[1])
    for name, t in clean.items():
        subject.expect(torch.equal(dirty[name][0, other], t[0, other]),
                       f"{name} of the other sequence changed")  # fmt: skip
    mine = slice(bounds[seq], bounds[seq + 1])
    subject.expect(not bool(torch.isfinite(dirty["o"][0, mine]).all()),
                   "the NaN is visible in its own sequence")  # fmt: skip


@pytest.mark.clause("NSA-NAN-EMPTY-CMP")
def test_empty_compressed_rows_stay_zero_next_to_nan(subject, lane):
    """NaN in q, k and v at tokens of both sequences (inside and after the rows that see no
    compressed block): those rows' o_cmp stays exactly 0, and so does its gradient in q."""
    subject.require("aux")
    cfg = subject.config(CFG_A, keep=("cmp_block",))  # l = 8: local rows 0..6 see no block
    if subject.has("varlen"):
        inp = fit(subject, Case(T=40, G=2, h=2, seed=92, cu_seqlens=(0, 21, 40))).make()
        starts, b_of = (0, 21), lambda s: 0
    else:
        inp = fit(subject, Case(B=2, T=20, G=2, h=2, seed=92)).make()
        starts, b_of = (0, 0), lambda s: s
    for which, local in (("v", 3), ("k", 5), ("q", 2), ("v", 12)):
        for s, a in enumerate(starts):
            inp = _inject(inp, which, b_of(s), [a + local])
    grads = subject.has("backward")
    x = inp.to(lane.dtype, subject.device, requires_grad=grads)
    _, aux = subject.run(x, cfg, aux=True)
    empty = torch.zeros(inp.q.shape[:2], dtype=torch.bool)
    for s, a in enumerate(starts):
        empty[b_of(s), a : a + cfg.cmp_block - 1] = True
    empty = empty.to(aux.o_cmp.device)
    subject.record(f"|o_cmp| on empty rows next to NaN ({lane})",
                   float(aux.o_cmp.detach()[empty].abs().max()), 0.0)  # fmt: skip
    if grads:
        w = output_weights(inp).to(aux.o_cmp.dtype).to(aux.o_cmp.device)
        (gq,) = torch.autograd.grad((aux.o_cmp * w).sum(), [x.q], allow_unused=True)
        if gq is not None:
            subject.record(f"|d o_cmp / d q| on empty rows ({lane})",
                           float(gq[empty].abs().max()), 0.0)  # fmt: skip
