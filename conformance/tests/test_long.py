"""Long context on a GPU (T = 65536): causality and index bounds at the paper configuration."""

from __future__ import annotations

import pytest
import torch

from conformance.checks import TOL, index_problems, max_err, near_tie_mismatches
from conformance.inputs import Case, output_weights

from .cases import CFG_PAPER, fit

T_LONG = 65536
CUT = 40_000  # perturb everything after this row
ROWS = [0, 1, 31, 63, 64, 1023, 1024, 1025, 4095, 30_000, CUT, T_LONG - 1]


def _long_inputs(subject, lane):
    if lane.klass == "exact":  # the fast paths people run at 64k are float32/bf16/fp16
        pytest.skip("long-context clauses run in the kernels' precisions, not float64")
    return fit(subject, Case(T=T_LONG, G=1, h=4, Dk=64, Dv=64, seed=120)).make()


@pytest.mark.clause("NSA-LONG-CAUSAL-64K")
def test_long_causality(subject, lane):
    """Outputs, indices and gradients at rows <= CUT ignore everything after CUT."""
    inp = _long_inputs(subject, lane)
    cfg = subject.config(CFG_PAPER)  # the paper's, or the nearest the subject runs
    aux_ok = subject.has("aux")
    o1, a1 = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=aux_ok)
    gen = torch.Generator().manual_seed(121)
    moved = inp.with_(
        **{
            n: torch.cat(
                [
                    getattr(inp, n)[:, : CUT + 1],
                    torch.rand(
                        getattr(inp, n)[:, CUT + 1 :].shape, generator=gen, dtype=torch.float64
                    ),
                ],
                dim=1,
            )
            for n in ("q", "k", "v", "gates")
        }
    )
    o2, a2 = subject.run(moved.to(lane.dtype, subject.device), cfg, aux=aux_ok)
    tol = (
        0.0
        if subject.caps.exact_causality
        else (TOL.EXACT_ATOL if lane.klass == "exact" else TOL.FP32_OUT_ATOL)
    )
    subject.record(
        f"o[:CUT+1] change at T=65536 ({lane})", max_err(o2[:, : CUT + 1], o1[:, : CUT + 1]), tol
    )
    if aux_ok:
        subject.expect_indices_equal(a2.block_indices[:, : CUT + 1], a1.block_indices[:, : CUT + 1])
    del o1, o2, a1, a2
    if subject.has("backward"):
        x = inp.to(lane.dtype, subject.device, requires_grad=True)
        o, _ = subject.run(x, cfg)
        w = output_weights(inp)[:, : CUT + 1].to(o.dtype).to(o.device)
        leaves = x.leaves()
        grads = torch.autograd.grad(
            (o[:, : CUT + 1] * w).sum(), list(leaves.values()), allow_unused=True
        )
        for name, g in zip(leaves, grads, strict=False):
            if g is not None:
                subject.record(
                    f"|d o[:CUT+1] / d {name}[CUT+1:]| ({lane})",
                    float(g[:, CUT + 1 :].abs().max()),
                    0.0,
                )


@pytest.mark.clause("NSA-LONG-INDEX-BOUNDS-64K")
def test_long_index_bounds(subject, lane):
    """Every row's indices are well formed; sampled rows match the oracle (indices and outputs)."""
    inp = _long_inputs(subject, lane)
    cfg = subject.config(CFG_PAPER)  # the paper's, or the nearest the subject runs
    x = inp.to(lane.dtype, subject.device)
    o, aux = subject.run(x, cfg, aux=True)
    problems = index_problems(aux.block_indices, cfg, torch.arange(T_LONG))
    subject.expect(not problems, f"block_indices violate spec I.5 at T=65536: {problems}")
    rows = torch.tensor(ROWS)
    idx_rows = aux.block_indices[:, rows]
    oracle_dtype = torch.float64 if lane.klass == "exact" else torch.float32
    if lane.klass == "low-precision":
        subject.record_selection_slack(idx_rows, inp, cfg, lane, positions=rows)
    else:
        ref = subject.dense(x.to(oracle_dtype, subject.device), cfg, positions=rows)
    if lane.klass == "fp32":
        bad = near_tie_mismatches(
            idx_rows.cpu(),
            ref.block_indices.cpu(),
            ref.p_slc.cpu(),
            cfg,
            rows,
            TOL.NEAR_TIE_RTOL,
        )
        subject.expect(not bad, f"sampled rows' indices differ beyond near-ties: {bad[:3]}")
    elif lane.klass == "exact":
        subject.expect_indices_equal(idx_rows, ref.block_indices)
    # Outputs of the sampled rows, given the implementation's own blocks.
    given = subject.dense(
        x.to(oracle_dtype, subject.device),
        cfg,
        positions=rows,
        block_indices=aux.block_indices,
    )
    got = o[:, rows]
    if lane.klass == "low-precision":
        naive_o = subject.dense(x, cfg, positions=rows, block_indices=aux.block_indices).o
        tol = TOL.lowp_bound(max_err(naive_o, given.o))
    else:
        tol = TOL.EXACT_ATOL if lane.klass == "exact" else TOL.FP32_OUT_ATOL
    subject.record(f"sampled rows' outputs at T=65536 ({lane})", max_err(got, given.o), tol)
