"""The peer adapters' own pieces: reference backends, index layout, config limits, grading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conformance import adapters, dense, grading, peers
from conformance.inputs import Case, one_hot_gates
from nsa_ref import NSAConfig

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=5)


@pytest.mark.parametrize("w", [1, 5, 40])
def test_reference_flash_attn_window_left_counts_left_plus_one_keys(w):
    """window_size=(w-1, 0), causal: exactly the spec's window of w keys (GQA, B=2)."""
    inp = one_hot_gates(Case(B=2, T=23, G=2, h=2, seed=3).make(), "win")
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=w)
    got = peers.reference_flash_attn_func(inp.q, inp.k, inp.v, causal=True, window_size=(w - 1, 0))
    want = dense.nsa_dense(inp.q, inp.k, inp.v, inp.gates, cfg).o
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_reference_flash_attn_varlen_restarts_positions():
    inp = Case(B=1, T=20, G=1, h=2, seed=4).make()
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    q, k, v = inp.q[0], inp.k[0], inp.v[0]
    got = peers.reference_flash_attn_varlen_func(q, k, v, cu, cu, 13, 13, causal=True)
    for s, e in ((0, 7), (7, 20)):
        alone = peers.reference_flash_attn_func(
            inp.q[:, s:e], inp.k[:, s:e], inp.v[:, s:e], causal=True
        )[0]
        assert torch.allclose(got[s:e], alone, atol=1e-12, rtol=0)


def test_reference_mean_pooling_partial_last_chunk_and_varlen():
    x = torch.arange(2 * 7 * 1 * 1, dtype=torch.float64).view(2, 7, 1, 1)
    out = peers.reference_mean_pooling(x, 3)
    assert out.shape == (2, 3, 1, 1)
    assert out[0, :, 0, 0].tolist() == [1.0, 4.0, 6.0]  # means of 0..2, 3..5, 6
    packed = x[:1]
    cu = torch.tensor([0, 4, 7])
    out = peers.reference_mean_pooling(packed, 3, cu)
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 5.0]  # [0,1,2] [3] | [4,5,6]


def test_ascending_indices_reorders_rows_and_keeps_padding_last():
    idx = torch.tensor([[[[3, -1, 0, 2]], [[-1, -1, 1, 0]]]])
    assert peers.ascending_indices(idx).tolist() == [[[[0, 2, 3, -1]], [[0, 1, -1, -1]]]]


def test_gate_logits_round_trip_and_finite_gradient_at_the_endpoints():
    g = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    back = torch.sigmoid(peers.gate_logits(g))
    assert back.tolist() == [0.0, 0.25, 1.0]
    (grad,) = torch.autograd.grad(back.sum(), g)
    assert torch.isfinite(grad).all() and abs(float(grad[1]) - 1.0) < 1e-12


def test_fla_limits():
    naive = peers.FlaLimits("naive")
    assert "one block size" in naive.reason(CFG)
    near = naive.adapt(CFG)
    assert (near.cmp_block, near.cmp_stride, near.sel_block) == (8, 8, 8)
    assert (near.sel_init_blocks, near.sel_local_blocks) == (1, 2)
    assert naive.adapt(CFG, keep=("cmp_stride",)) is None  # d = 4 cannot be kept
    ok = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=4, window=3)
    assert naive.reason(ok) is None and naive.adapt(ok, keep=("cmp_block",)) is ok
    par = peers.FlaLimits("parallel").adapt(CFG)
    assert par.sel_block == 16 and par.cmp_block == par.cmp_stride == 16


def test_lucidrains_and_flash_nsa_limits():
    luc = peers.LucidrainsLimits().adapt(CFG)
    assert (luc.sel_init_blocks, luc.sel_local_blocks) == (0, 1) and luc.cmp_block == 8
    assert peers.LucidrainsLimits().adapt(CFG, keep=("sel_init_blocks",)) is None
    fn = peers.FlashNsaLimits().adapt(CFG)
    assert (fn.cmp_block, fn.cmp_stride, fn.sel_block) == (16, 16, 16)


def test_peers_are_registered_and_declare_a_profile():
    for name in adapters.PEERS:
        assert name in adapters.REGISTRY.names()
        adapter = adapters.REGISTRY.create(name)
        assert adapter.name == name
        assert {"gates", "window", "blocks", "forced blocks"} <= set(adapter.profile)
        assert adapter.capabilities.summary()


def test_every_clause_is_in_one_summary_group():
    grading._check_groups()


def _doc(statuses: dict[str, str], **extra) -> dict:
    return {
        "implementation": "x",
        "environment": {"device": "cpu"},
        "clauses": [{"id": cid, "status": st} for cid, st in statuses.items()],
        "collection_errors": [],
        "summary": {s: list(statuses.values()).count(s) for s in ("pass", "fail", "skip")},
        **extra,
    }


def test_summary_table_counts_per_group(tmp_path):
    doc = _doc(
        {"NSA-I7-WINDOW-KEYS": "fail", "NSA-P26-WIN-COVERS-ALL": "pass", "NSA-I2-CONFIG": "skip"},
        adapter={"version": "9.9"},
    )
    path = tmp_path / "conformance.json"
    path.write_text(json.dumps(doc))
    table = grading.summary_table([path])
    row = table.splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert cells[head.index("window")] == "1/1/0"
    assert cells[head.index("errors")] == "0/0/1"
    assert cells[head.index("version")] == "9.9" and cells[-1] == "1/1/1"


def test_peer_exit_code():
    graded = _doc({"NSA-I7-WINDOW-KEYS": "fail"}, adapter={"runs_here": True})
    assert grading.peer_exit_code(graded, 1)[0] == 0  # failed clauses are the peer's table
    assert grading.peer_exit_code({**graded, "adapter_crashes": ["t: boom"]}, 1)[0] == 1
    assert grading.peer_exit_code({**graded, "collection_errors": ["x"]}, 1)[0] == 1
    skipped = _doc({"NSA-I7-WINDOW-KEYS": "skip"}, adapter={"runs_here": True})
    assert grading.peer_exit_code(skipped, 0)[0] == 1  # nothing graded
    gone = _doc({"NSA-I7-WINDOW-KEYS": "skip"}, adapter={"runs_here": False, "unavailable": "x"})
    assert grading.peer_exit_code(gone, 0)[0] == 1


class _BrokenAdapter(adapters.Adapter):
    name = "broken"

    def attention(self, q, *args, **kwargs):
        return q.no_such_method()


def _interact(collector, adapter_call, clause):
    with pytest.raises(Exception) as info:
        adapter_call()
    mark = SimpleNamespace(args=(clause,))
    node = SimpleNamespace(nodeid=f"t[{clause}]", iter_markers=lambda name: [mark])
    call = SimpleNamespace(excinfo=info)
    collector.pytest_exception_interact(node, call, None)


def test_crash_collector_blames_only_the_adapters_own_frames():
    adapter = _BrokenAdapter()
    col = grading.CrashCollector(adapter)
    _interact(col, lambda: adapter.attention(torch.zeros(1)), "NSA-I7-WINDOW-KEYS")
    assert len(col.crashes) == 1 and "AttributeError" in col.crashes[0]
    _interact(col, lambda: adapter.attention(torch.zeros(1)), "NSA-I11-BAD-INPUT")  # on purpose
    _interact(col, lambda: NSAConfig(cmp_block=-1), "NSA-I7-WINDOW-KEYS")  # raised elsewhere
    assert len(col.crashes) == 1


def test_fla_naive_runs_on_the_cpu_when_installed():
    """End to end on one window-only case (skips where fla-core is not installed)."""
    pytest.importorskip("fla.ops.nsa.naive")
    adapter = adapters.REGISTRY.create("fla:naive")
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_top_n=4, window=5)
    inp = one_hot_gates(Case(T=20, G=1, h=16, seed=5).make(), "win").to(torch.float32, "cpu")
    o, aux = adapter.attention(inp.q, inp.k, inp.v, inp.gates, cfg, return_aux=True)
    want = dense.nsa_dense(inp.q, inp.k, inp.v, inp.gates, cfg).o
    assert torch.allclose(o, want, atol=1e-6, rtol=0)
    assert aux.block_indices.shape == (1, 20, 1, 4)
