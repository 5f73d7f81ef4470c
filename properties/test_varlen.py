"""Variable-length packing (spec I.1; Part II §6 P6): packed equals separate, bit for bit."""

from __future__ import annotations

import torch
from hypothesis import example, given

from nsa_ref import NSAConfig

from .strategies import (
    PHIS,
    cotangent,
    examples,
    make_inputs,
    pinned,
    reference,
    segment,
    structures,
)

AUX_FIELDS = ("block_indices", "p_slc", "p_cmp", "o_cmp", "o_sel", "o_win")


@examples()
@given(s=structures(packed=True, max_seqs=4, phis=PHIS, branch_kv=(False, True)))
@example(s=pinned(T=7, cfg=NSAConfig(2, 1, 2, 2, 1, 1, 3), seqlens=(1, 1, 5)))
@example(s=pinned(T=19, cfg=NSAConfig(4, 2, 4, 3, 1, 2, 8), seqlens=(9, 10), phi="weighted"))
def test_p06_packed_equals_separate(s):
    """P6: with ``cu_seqlens``, every output, index and score equals running each sequence alone.

    Nothing (block, compressed token, selection, window) crosses a boundary, and positions restart
    at each boundary. Gradients of the packed run equal those of the separate runs.
    """
    x = make_inputs(s, requires_grad=True)
    o, aux = reference(x)
    weights = cotangent(o, s.seed)
    packed_grads = torch.autograd.grad((o * weights).sum(), x.leaves(), allow_unused=True)
    for _, start, end in s.sequences():
        part = segment(x, start, end)
        o_part, aux_part = reference(part)
        assert torch.equal(o[:, start:end], o_part)
        for name in AUX_FIELDS:
            packed, alone = getattr(aux, name)[:, start:end], getattr(aux_part, name)
            width = alone.shape[-1]
            assert torch.equal(packed[..., :width], alone), f"aux.{name} of [{start}, {end})"
            if name != "block_indices":
                assert torch.all(packed[..., width:] == 0), f"aux.{name} past the sequence"
        part_grads = torch.autograd.grad(
            (o_part * weights[:, start:end]).sum(), part.leaves(), allow_unused=True
        )
        for full_g, part_g in zip(packed_grads, part_grads, strict=True):
            if full_g is None:
                assert part_g is None
                continue
            # A short sequence may not use an input at all (no compressed block): zero gradient.
            want = torch.zeros_like(full_g[:, start:end]) if part_g is None else part_g
            assert torch.equal(full_g[:, start:end], want)
