"""Whole-output parity: the implementation against the oracle of its lane (spec I.1-I.8, I.10)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from conformance.checks import max_err
from conformance.inputs import BRANCHES, Case, one_hot_gates

from .cases import CFG_A, CFG_B, fields, fit, structures


@pytest.mark.clause("NSA-DENSE-CROSSCHECK")
@pytest.mark.draws_own_cases
def test_equals_dense_formulation_on_random_structures(subject, lane):
    """Random (B, G, h, T, Dk, Dv, configuration, seed): every field and the indices agree."""
    aux = subject.has("indices")

    @given(structures(subject))
    @subject.hypothesis_settings(max_examples=4 * subject.examples)
    def check(structure):
        case, cfg = structure
        subject.count_case()
        subject.check_parity(case.make(), cfg, lane, fields=fields(subject), indices=aux)

    check()


EDGE_SHAPES = {
    "T1": Case(B=1, T=1, G=1, h=1, Dk=4, Dv=4, seed=1),
    "T-below-l": Case(B=2, T=7, G=1, h=2, Dk=8, Dv=4, seed=2),
    "T-not-multiple": Case(B=1, T=37, G=2, h=2, Dk=8, Dv=6, seed=3),
    "h4-DkneDv-topn": Case(B=1, T=70, G=1, h=4, Dk=16, Dv=8, seed=4),
    "h1-B2-odd-dims": Case(B=2, T=45, G=2, h=1, Dk=5, Dv=7, seed=5),
}


@pytest.mark.clause("NSA-EQ5-SHAPES")
@pytest.mark.parametrize("shape", list(EDGE_SHAPES))
def test_edge_shapes(subject, lane, shape):
    """T=1, T<l, T not a multiple of d or l', Dk != Dv, h in {1, 2, 4}, B=2."""
    case = fit(subject, EDGE_SHAPES[shape], vary=("seed",))  # the shape is the point
    subject.check_parity(
        case.make(),
        subject.config(CFG_A),
        lane,
        fields=fields(subject),
        indices=subject.has("indices"),
    )


@pytest.mark.clause("NSA-EQ5-GATE-LINEARITY")
def test_output_is_linear_in_the_gates(subject, lane):
    """o(g) = sum_c g_c o(e_c), and each one-hot output is that branch of the oracle."""
    case = fit(subject, Case(T=40, G=2, h=2, seed=6))
    inp = case.make()
    cfg = subject.config(CFG_B)
    parts = {b: subject.check_parity(one_hot_gates(inp, b), cfg, lane).got["o"] for b in BRANCHES}
    o = subject.run(inp.to(lane.dtype, subject.device), cfg)[0]
    g = inp.gates.to(lane.dtype).to(subject.device).double()  # the gates the lane really used
    combo = sum(g[..., i : i + 1] * parts[b].double() for i, b in enumerate(BRANCHES))

    def naive_err():  # the same identity evaluated on the naive low-dtype formulation
        low = inp.to(lane.dtype, subject.device)
        naive = {b: subject.dense(one_hot_gates(low, b), cfg).o for b in BRANCHES}
        ncombo = sum(g[..., i : i + 1] * naive[b].double() for i, b in enumerate(BRANCHES))
        return max_err(subject.dense(low, cfg).o, ncombo)

    subject.record_identity(f"o(g) - sum_c g_c o(e_c) ({lane})", lane, max_err(o, combo), naive_err)


@pytest.mark.clause("NSA-P23-GATE-RANGE")
def test_gate_endpoints_accepted_and_out_of_range_rejected(subject):
    """Gates of exactly 0 and 1 run; 1.5, -0.1 and NaN raise ValueError naming the gates."""
    dtype = (
        torch.float64
        if torch.float64 in subject.caps.dtypes
        else sorted(subject.caps.dtypes, key=str)[0]
    )
    case = fit(subject, Case(T=20, G=1, h=2, seed=7))
    inp = case.make()
    cfg = subject.config(CFG_A)
    gen = torch.Generator().manual_seed(7)
    ends = (torch.rand(inp.gates.shape, generator=gen) > 0.5).to(torch.float64)
    o = subject.run(inp.with_(gates=ends).to(dtype, subject.device), cfg)[0]
    subject.expect(bool(torch.isfinite(o).all()), "gates of exactly 0/1 gave a non-finite output")
    for bad in (1.5, -0.1, float("nan")):
        gates = inp.gates.clone()
        gates[0, 3, 1, 2] = bad
        x = inp.with_(gates=gates).to(dtype, subject.device)
        with pytest.raises(ValueError, match="gates"):
            subject.run(x, cfg)


@pytest.mark.clause("NSA-I1-SCALE")
@pytest.mark.parametrize("scale", [0.2, 0.5])
def test_given_scale_is_used_everywhere(subject, lane, scale):
    """A non-default scale changes every branch and the Eq. 8 scores exactly as the oracle does."""
    subject.require("scale")
    case = fit(subject, Case(T=70, G=2, h=2, seed=8))
    subject.check_parity(
        case.make(),
        subject.config(CFG_B),
        lane,
        fields=fields(subject),
        indices=subject.has("indices"),
        scale=scale,
    )


@pytest.mark.clause("NSA-I8-BRANCH-KV")
def test_independent_branch_kv(subject, lane):
    """Each branch reads its own (k, v); scores come from the compressed pair."""
    case = fit(subject, Case(T=70, G=2, h=2, seed=9, branch_kv=True))
    subject.check_parity(
        case.make(),
        subject.config(CFG_B),
        lane,
        fields=fields(subject),
        indices=subject.has("indices"),
    )


def _phi_k(x: torch.Tensor) -> torch.Tensor:
    """A fixed linear phi: position-weighted sum over the block (weights 1..l, normalised)."""
    l = x.shape[-2]
    w = torch.arange(1, l + 1, dtype=x.dtype, device=x.device)
    return (x * (w / w.sum())[:, None]).sum(dim=-2)


def _phi_v(x: torch.Tensor) -> torch.Tensor:
    """A nonlinear phi: half the first key plus the block maximum."""
    return 0.5 * x[..., 0, :] + x.amax(dim=-2)


@pytest.mark.clause("NSA-I3-PHI")
def test_custom_phi(subject, lane):
    """phi_k / phi_v replace the mean pooling of Eq. 7 block by block."""
    case = fit(subject, Case(T=60, G=2, h=2, seed=10))
    subject.check_parity(
        case.make(),
        subject.config(CFG_A),
        lane,
        fields=fields(subject),
        indices=subject.has("indices"),
        phi_k=_phi_k,
        phi_v=_phi_v,
    )
