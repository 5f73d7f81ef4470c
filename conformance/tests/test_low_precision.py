"""Low precision (spec I.10): float16 with logits whose unscaled product overflows float16."""

from __future__ import annotations

import pytest
import torch

from conformance import dense
from conformance.checks import TOL, max_err
from conformance.inputs import Case

from .cases import CFG_B, fit


def _large_logits(subject) -> tuple:
    """Inputs with ``|q.k|`` about 9e4 (> 65504, the float16 maximum) and a scale of 4e-5, so
    the scaled logits are moderate (about 3.6, varying by a few units)."""
    case = fit(subject, Case(T=40, G=2, h=2, Dk=16, Dv=16, seed=95))
    inp = case.make()
    gen = torch.Generator().manual_seed(96)
    u = torch.randn(case.Dk, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    q = 300.0 * (u + 0.1 * torch.randn(inp.q.shape, generator=gen, dtype=torch.float64))
    k = 300.0 * (u + 0.1 * torch.randn(inp.k.shape, generator=gen, dtype=torch.float64))
    return inp.with_(q=q, k=k, gates=torch.full_like(inp.gates, 1.0 / 3)), 4e-5


@pytest.mark.clause("NSA-LOWP-LARGE-LOGITS")
def test_float16_large_unscaled_logits(subject):
    """The implementation in float16 against the dense formulation in float32 on the same
    rounded inputs; bound: twice the error of the dense formulation in float16 with q scaled
    before the product (a same-dtype computation that does not overflow), plus 1e-5."""
    if torch.float16 not in subject.caps.dtypes:
        pytest.skip(f"{subject.adapter.name} does not declare float16")
    inp, scale = _large_logits(subject)
    raw = (inp.q.to(torch.float16).float() @ inp.k.to(torch.float16).float().transpose(-1, -2))
    assert raw.abs().max() > 65504  # the unscaled products do overflow float16
    x = inp.to(torch.float16, subject.device)
    cfg = subject.config(CFG_B)
    o, aux = subject.run(x, cfg, aux=subject.has("aux"), scale=scale)
    subject.expect(bool(torch.isfinite(o).all()), "float16 output with large logits is finite")
    idx = None if aux is None else aux.block_indices  # the oracle uses the same selection
    ref = dense.nsa_dense(*(t.float() for t in (x.q, x.k, x.v, x.gates)), cfg, scale=scale,
                          block_indices=idx).o  # fmt: skip
    q_scaled = (x.q.float() * scale).to(torch.float16)
    naive = dense.nsa_dense(q_scaled, x.k, x.v, x.gates, cfg, scale=1.0, block_indices=idx).o
    subject.record("o, float16 with |q.k| > 65504 (low-precision)", max_err(o, ref),
                   TOL.lowp_bound(max_err(naive, ref)))  # fmt: skip
