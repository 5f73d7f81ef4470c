"""The comparison helpers, adapters registry and report folding."""

from __future__ import annotations

import math
import types

import pytest
import torch

from conformance import adapters, checks, report
from conformance.clauses import BY_ID
from conformance.inputs import Case, large_negative_logits, local_positions, tied_blocks
from nsa_ref import NSAConfig

CFG = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=3, sel_local_blocks=1, window=4)


def _good_indices(T: int) -> torch.Tensor:
    rows = []
    for p in range(T):
        b = p // 4
        chosen = sorted({0, b} | ({1} if b >= 2 else set()))[:3]
        rows.append(chosen + [-1] * (3 - len(chosen)))
    return torch.tensor(rows).view(1, T, 1, 3)


def test_tolerances_come_from_nsa_impl():
    assert checks.TOL.EXACT_ATOL == 1e-12 and checks.TOL.FP32_OUT_ATOL == 1e-6
    assert checks.TOL.lowp_bound(0.01) == pytest.approx(0.02 + 1e-5)


def test_max_err_nan_and_shape_mismatch_never_pass():
    a = torch.zeros(3)
    assert checks.max_err(a, a) == 0
    assert checks.max_err(torch.tensor([0.0, math.nan, 0.0]), a) == math.inf
    assert checks.max_err(torch.zeros(2), a) == math.inf


def test_index_problems_accepts_well_formed_and_names_each_violation():
    T = 12
    good = _good_indices(T)
    pos = torch.arange(T)
    assert checks.index_problems(good, CFG, pos) == {}
    cases = {
        "index above b(p)": lambda x: x.index_put_(
            (torch.tensor([0]), torch.tensor([5]), torch.tensor([0]), torch.tensor([2])),
            torch.tensor(9),
        ),
        "not strictly ascending": lambda x: x.__setitem__((0, 11, 0), torch.tensor([0, 2, 2])),
        "-1 padding before a block": lambda x: x.__setitem__((0, 4, 0), torch.tensor([-1, 0, 1])),
        "forced block missing": lambda x: x.__setitem__((0, 11, 0), torch.tensor([1, 2, -1])),
    }
    for problem, edit in cases.items():
        bad = good.clone()
        edit(bad)
        assert problem in checks.index_problems(bad, CFG, pos), problem
    assert "dtype" in next(iter(checks.index_problems(good.int(), CFG, pos)))


def test_near_tie_rule():
    want = torch.tensor([[[[0, 1, 3]]]])
    got = torch.tensor([[[[0, 2, 3]]]])
    pos = torch.tensor([15])  # b = 3: forced {0, 3}, one block by score among {1, 2}
    tie = torch.tensor([[[[0.5, 0.3, 0.3 + 1e-9, 0.2]]]], dtype=torch.float64)
    gap = torch.tensor([[[[0.5, 0.3, 0.1, 0.2]]]], dtype=torch.float64)
    assert checks.near_tie_mismatches(got, want, tie, CFG, pos, 1e-6) == []
    assert len(checks.near_tie_mismatches(got, want, gap, CFG, pos, 1e-6)) == 1
    # Dropping a forced block is never excused, even at equal scores.
    assert (
        len(checks.near_tie_mismatches(torch.tensor([[[[1, 2, 3]]]]), want, tie, CFG, pos, 1e-6))
        == 1
    )


def test_selection_slack():
    # p = 15, l' = 4: b = 3, forced {0, 3} (init 1, local 1); blocks 1, 2 compete for one slot.
    scores = torch.tensor([[[[0.9, 0.2, 0.5, 0.1]]]])
    pos = torch.tensor([15])
    assert checks.selection_slack(torch.tensor([[[[0, 2, 3]]]]), scores, CFG, pos) == 0.0
    assert checks.selection_slack(torch.tensor([[[[0, 1, 3]]]]), scores, CFG, pos) == pytest.approx(
        0.3
    )


def test_lanes():
    caps = adapters.Capabilities()
    assert [str(x) for x in checks.lanes_for(caps, "cpu")] == [
        "float64[exact]",
        "float32[fp32]",
        "bfloat16[low-precision]",
    ]
    assert [str(x) for x in checks.lanes_for(caps, "cuda")] == [
        "float64[exact]",
        "float32[fp32]",
        "bfloat16[low-precision]",
        "float16[low-precision]",
    ]
    assert [str(x) for x in checks.lanes_for(caps, "cpu", ["float64"])] == ["float64[exact]"]
    f32 = adapters.Capabilities(dtypes=frozenset({torch.float32, torch.bfloat16}))
    assert [str(x) for x in checks.lanes_for(f32, "cuda")] == [
        "float32[fp32]",
        "bfloat16[low-precision]",
    ]


def test_adversarial_inputs():
    inp = large_negative_logits(Case(T=16, G=1, h=2, Dk=16, Dv=4))
    dots = torch.einsum("bthd,bsd->bths", inp.q, inp.k[:, :, 0])
    assert float(dots.max()) * 0.25 < -1e4  # every logit (scale 1/sqrt(16)) below -1e4
    assert float(dots.min()) > -65504  # q.k fits float16
    assert torch.equal(dots, dots.round())  # exact integers
    assert torch.equal(dots, dots[..., :1].expand_as(dots))  # one logit per row: uniform softmax
    tied = tied_blocks(Case(T=10, G=1, h=1), period=4)
    assert torch.equal(tied.k[:, 0:4], tied.k[:, 4:8])


def test_local_positions_restart_at_boundaries():
    pos = local_positions(7, torch.tensor([0, 2, 7], dtype=torch.int32))
    assert pos.tolist() == [0, 1, 0, 1, 2, 3, 4]


def test_registry_builtins_and_unknown_name():
    names = adapters.REGISTRY.names()
    for name in ("nsa_ref", "nsa_impl", *(f"nsa_impl:{p}" for p in adapters.IMPL_PATHS)):
        assert name in names
    with pytest.raises(ValueError, match="nsa_ref"):
        adapters.get_adapter("no-such-impl")


def test_entry_point_adapters(monkeypatch):
    made = adapters.NsaRefAdapter()
    fake = types.SimpleNamespace(name="thirdparty", load=lambda: lambda: made)
    monkeypatch.setattr(adapters, "_entry_points", lambda: {"thirdparty": fake})
    assert "thirdparty" in adapters.REGISTRY.names()
    assert adapters.get_adapter("thirdparty") is made


def test_nsa_impl_adapters_read_the_path_declarations():
    impl, why = adapters._import_impl()
    if impl is None:
        pytest.skip(why)
    for path in adapters.IMPL_PATHS:
        a = adapters.get_adapter(f"nsa_impl:{path}")
        decl = impl.dispatch.PATHS[path]  # one name per path: adapter suffix == dispatcher name
        # served_devices: "cpu" joins a path CPU tensors may run interpreted when forced.
        assert a.capabilities.devices == decl.served_devices()
        assert a.capabilities.dtypes == decl.dtypes
        ok, reason = a.available()
        assert ok == decl.available()[0] and (ok or reason)
    for alias, path in adapters.PATH_ALIASES.items():
        assert adapters.get_adapter(f"nsa_impl:{alias}").name == f"nsa_impl:{path}"


def test_device_reason():
    a = adapters.NsaRefAdapter()
    assert adapters.device_reason(a, "cpu") is None
    if not torch.cuda.is_available():
        assert "cuda" in adapters.device_reason(a, "cuda")


def _result(nodeid, cid, outcome, err=None, tol=None, reason=None):
    return report.TestResult(nodeid, (cid,), outcome, reason, None, err, tol)


def test_summarize_folds_tests_into_clauses():
    col = report.Collector()
    a, b, c = "NSA-EQ9-OVERLAP", "NSA-P9-MASS", "NSA-I6-EXACT-EXCLUSION"
    col.tests = {
        "t1": _result("t1", a, "pass", 1e-16, 1e-12),
        "t2": _result("t2", a, "fail", 1e-3, 1e-12),
        "t3": _result("t3", b, "skip", reason=f"{b}: no aux"),
        "t4": _result("t4", b, "skip", reason="x"),
        "t5": _result("t5", c, "pass", 0.0, 0.0),
        "t6": _result("t6", c, "skip", reason="y"),
    }
    rows = {r.clause.id: r for r in report.summarize(col, {a, b, c})}
    assert rows[a].status == "fail" and rows[a].worst_error == 1e-3 and rows[a].tests == 2
    assert rows[b].status == "skip" and rows[b].reason == "no aux; x"
    assert rows[c].status == "pass"
    full = report.summarize(report.Collector())
    assert len(full) == len(BY_ID) and all(r.status == "fail" for r in full)  # nothing ran


def test_report_documents():
    col = report.Collector()
    col.tests = {"t": _result("t", "NSA-EQ9-OVERLAP", "pass", 2e-16, 1e-12)}
    rows = report.summarize(col, {"NSA-EQ9-OVERLAP"})
    mut = [
        {
            "name": "m",
            "description": "d",
            "killed": False,
            "by": [],
            "expected": ["NSA-EQ9-OVERLAP"],
        }
    ]
    doc = report.build("nsa_ref", "ref", report.environment("cpu"), rows, mut, [], 1.0)
    assert set(doc) >= {"implementation", "environment", "clauses", "mutants", "summary"}
    assert doc["clauses"][0]["id"] == "NSA-EQ9-OVERLAP" and doc["summary"]["pass"] == 1
    md = report.markdown(doc)
    assert "| `NSA-EQ9-OVERLAP`" in md and "**NO**" in md
    assert "SURVIVED: m" in report.table(doc)


def test_vary_draws_seed_batch_and_dims_only_while_drawing():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    subject = checks.Subject(adapters.NsaRefAdapter(), "cpu")
    base = Case(B=1, T=33, G=2, h=3, Dk=5, Dv=7, seed=1)
    assert subject.vary(base) is base  # the test's own case
    seen = []

    @settings(max_examples=20, derandomize=True, database=None)
    @given(st.data())
    def run(data):
        with subject.drawing(data):
            got = subject.vary(base)
            kept = subject.vary(base, ("seed",))
        assert (got.T, got.G, got.h) == (33, 2, 3) and got.Dk in (4, 8, 16)
        assert (kept.B, kept.Dk, kept.Dv) == (1, 5, 7)
        seen.append((got.seed, got.B))

    run()
    assert len({s for s, _ in seen}) > 5 and {b for _, b in seen} == {1, 2}
    assert subject.vary(base) is base  # nothing left behind
