"""Gradient parity (spec I.10): autograd of the implementation against the oracle's."""

from __future__ import annotations

import pytest

from conformance.inputs import Case

from .cases import CFG_A, CFG_B, fit

GRAD_CASES = {
    "l<l'-topn": (CFG_A, Case(T=75, G=2, h=2, Dk=8, Dv=6, seed=80)),
    "l=l'-B2": (CFG_B, Case(B=2, T=40, G=1, h=3, seed=81)),
    "T-below-l": (CFG_A, Case(T=6, G=1, h=2, seed=82)),
}


@pytest.mark.clause("NSA-GRAD-PARITY")
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_the_oracle(subject, lane, name):
    """d sum(o * w) / d (q, k, v, gates) equal the oracle's."""
    cfg, case = GRAD_CASES[name]
    subject.check_parity(fit(subject, case).make(), subject.config(cfg), lane, grads=True)


@pytest.mark.clause("NSA-GRAD-PARITY", "NSA-I8-BRANCH-KV")
def test_gradients_with_branch_kv(subject, lane):
    """Each branch's own (k, v) receives its own gradient."""
    subject.require("branch_kv")
    subject.check_parity(
        fit(subject, Case(T=40, G=2, h=2, seed=83, branch_kv=True)).make(),
        subject.config(CFG_B),
        lane,
        grads=True,
    )
