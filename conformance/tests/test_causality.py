"""Causality and consistency (P1, P2, P4, P12, P13)."""

from __future__ import annotations

import pytest
import torch

from conformance.checks import TOL, max_err
from conformance.inputs import Case, Inputs, output_weights

from .cases import CFG_A, CFG_B, fit

CUTS = [14, 31]  # p = i*d + l - 2 inside a selection block (l = 8, d = 4, l' = 8), and a block end


def _row_tol(subject, lane) -> float:
    """Rows before a change must not move: bit-identical for the reference (P1), else the
    lane's absolute output tolerance (fp32's for low precision: only rounding may differ)."""
    if subject.caps.exact_causality:
        return 0.0
    return TOL.EXACT_ATOL if lane.klass == "exact" else TOL.FP32_OUT_ATOL


def _perturb_after(inp: Inputs, t: int, seed: int) -> Inputs:
    """New random q, k, v and gates at every position > t (same shapes and dtypes)."""
    gen = torch.Generator().manual_seed(seed)

    def redraw(x, rand=torch.randn):
        y = x.clone()
        y[:, t + 1 :] = rand(y[:, t + 1 :].shape, generator=gen, dtype=y.dtype) * (
            1 if rand is torch.rand else 3
        )
        return y

    return inp.with_(
        q=redraw(inp.q), k=redraw(inp.k), v=redraw(inp.v), gates=redraw(inp.gates, torch.rand)
    )


@pytest.mark.clause("NSA-P1-CAUSAL-OUTPUT")
@pytest.mark.parametrize("t", CUTS)
def test_outputs_ignore_the_future(subject, lane, t):
    """Changing everything after t leaves o[:t+1] unchanged."""
    cfg = subject.config(CFG_B)
    inp = fit(subject, Case(T=48, G=2, h=2, seed=70)).make()
    o1, _ = subject.run(inp.to(lane.dtype, subject.device), cfg)
    o2, _ = subject.run(_perturb_after(inp, t, 71).to(lane.dtype, subject.device), cfg)
    subject.record(
        f"o[:t+1] change (t={t}, {lane})",
        max_err(o2[:, : t + 1], o1[:, : t + 1]),
        _row_tol(subject, lane),
    )


@pytest.mark.clause("NSA-P1-CAUSAL-GRAD")
@pytest.mark.parametrize("t", CUTS)
def test_gradients_ignore_the_future(subject, lane, t):
    """d o[:t+1] / d (q, k, v, gates)[s] is exactly 0 for every s > t."""
    inp = fit(subject, Case(T=48, G=2, h=2, seed=72)).make()
    x = inp.to(lane.dtype, subject.device, requires_grad=True)
    o, _ = subject.run(x, subject.config(CFG_B))
    w = output_weights(inp).to(o.dtype).to(o.device)
    loss = (o[:, : t + 1] * w[:, : t + 1]).sum()
    leaves = x.leaves()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    for name, g in zip(leaves, grads, strict=False):
        if g is not None:
            subject.record(
                f"|d o[:t+1] / d {name}[t+1:]| (t={t}, {lane})",
                float(g[:, t + 1 :].abs().max()),
                0.0,
            )


@pytest.mark.clause("NSA-P2-SELECTION-CAUSAL")
@pytest.mark.parametrize("t", CUTS)
def test_selection_ignores_the_future(subject, lane, t):
    """block_indices[:t+1] are unchanged when inputs after t change."""
    cfg = subject.config(CFG_B)
    inp = fit(subject, Case(T=48, G=2, h=2, seed=73)).make()
    _, a1 = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=True)
    _, a2 = subject.run(_perturb_after(inp, t, 74).to(lane.dtype, subject.device), cfg, aux=True)
    subject.expect_indices_equal(a2.block_indices[:, : t + 1], a1.block_indices[:, : t + 1])


@pytest.mark.clause("NSA-P4-PREFIX")
@pytest.mark.parametrize("prefix", [1, 23, 37])
def test_prefix_invariance(subject, lane, prefix):
    """Outputs and indices of a prefix do not depend on how much input follows."""
    inp = fit(subject, Case(T=60, G=2, h=2, seed=75)).make()
    cut = Inputs(inp.q[:, :prefix], inp.k[:, :prefix], inp.v[:, :prefix], inp.gates[:, :prefix])
    cfg = subject.config(CFG_A)
    aux = subject.has("indices")
    o1, a1 = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=aux)
    o2, a2 = subject.run(cut.to(lane.dtype, subject.device), cfg, aux=aux)
    subject.record(
        f"o[:{prefix}] long vs short ({lane})",
        max_err(o2, o1[:, :prefix]),
        subject.invariance_tol(lane, inp, cfg),
    )
    if aux:
        scores = subject.scores_of(a1, inp, cfg)[:, :prefix]
        subject.expect_same_selection(
            a2.block_indices, a1.block_indices[:, :prefix], scores, cfg, inp, lane
        )


@pytest.mark.clause("NSA-P12-HEAD-PERMUTATION")
def test_permuting_heads_within_a_group(subject, lane):
    """Heads permuted inside their groups: outputs permute alike, block_indices unchanged."""
    inp = fit(subject, Case(T=70, G=2, h=4, seed=76)).make()
    h = inp.shape[3]
    perm = torch.cat([g * h + torch.roll(torch.arange(h), 1) for g in range(inp.shape[2])])
    moved = inp.with_(q=inp.q[:, :, perm], gates=inp.gates[:, :, perm])
    cfg = subject.config(CFG_B)
    aux = subject.has("indices")
    o1, a1 = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=aux)
    o2, a2 = subject.run(moved.to(lane.dtype, subject.device), cfg, aux=aux)
    subject.record(
        f"o(permuted heads) vs permuted o ({lane})",
        max_err(o2, o1[:, :, perm.to(o1.device)]),
        subject.invariance_tol(lane, inp, cfg),
    )
    if aux:
        subject.expect_same_selection(
            a2.block_indices, a1.block_indices, subject.scores_of(a1, inp, cfg), cfg, inp, lane
        )


@pytest.mark.clause("NSA-P13-GROUP-INDEPENDENCE")
def test_groups_are_independent(subject, lane):
    """Changing group 1's queries, keys and values leaves group 0's outputs and indices alone."""
    inp = fit(subject, Case(T=70, G=2, h=2, seed=77)).make()
    h = inp.shape[3]
    gen = torch.Generator().manual_seed(78)
    q, k, v = inp.q.clone(), inp.k.clone(), inp.v.clone()
    q[:, :, h:] = torch.randn(q[:, :, h:].shape, generator=gen, dtype=q.dtype)
    k[:, :, 1:] = torch.randn(k[:, :, 1:].shape, generator=gen, dtype=k.dtype)
    v[:, :, 1:] = torch.randn(v[:, :, 1:].shape, generator=gen, dtype=v.dtype)
    cfg = subject.config(CFG_B)
    aux = subject.has("indices")
    o1, a1 = subject.run(inp.to(lane.dtype, subject.device), cfg, aux=aux)
    o2, a2 = subject.run(inp.with_(q=q, k=k, v=v).to(lane.dtype, subject.device), cfg, aux=aux)
    subject.record(
        f"group 0 outputs ({lane})", max_err(o2[:, :, :h], o1[:, :, :h]), _row_tol(subject, lane)
    )
    if aux:
        subject.expect_indices_equal(a2.block_indices[..., 0, :], a1.block_indices[..., 0, :])
