"""Row-subset plans (`nsa_impl.plan(..., rows=)`) and `attend_rows` on one process.

The core of context parallelism without collectives: every rank's rows of a problem, computed
with that rank's row-subset plan against the whole row's keys, equal the single-process
`nsa_impl.nsa_attention` (float64: exact class; float32: fp32 class), outputs and gradients. The
gloo tests (``test_gloo.py``) add the collectives around the same computation.
"""

from __future__ import annotations

import pytest
import torch

import nsa_impl
from nsa_impl import dispatch
from nsa_impl.branches import selection
from nsa_impl.parallel import attend_rows
from nsa_ref import NSAConfig
from nsa_ref.reference import branch_pairs

from ..helpers import inputs
from ..test_plan import _SyncDetector, meta_gpu_paths  # noqa: F401  (fixture by name)
from . import cases

CFG = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, sel_init_blocks=1,
                sel_local_blocks=1, window=5)  # fmt: skip
ROWS = torch.tensor([0, 1, 2, 3, 12, 13, 14, 15])  # chunks 0 and 3 of 4: a 2-rank shard


def _problems():
    out = []
    for world in (2, 4):
        out += cases.edge_cases(world) + cases.draw_cases(world, 6, seed=100 + world)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_ranks_rows_equal_the_whole_problem(dtype):
    summary = cases.Summary()
    problems = _problems()
    for case in problems:
        summary.add(case, dtype, cases.compare(case, dtype, cases.rows_on_one_process(case, dtype)))
    assert not summary.failures, "\n".join(summary.failures)
    # the drawn cases cover what the issue names (a draw that lost one would hide it)
    assert any(c.T < 2 * c.world for c in problems) and any(c.separate for c in problems)
    assert any(c.phi for c in problems) and any(c.B == 2 for c in problems)
    assert {c.sel_path for c in problems} >= {None, "masked", "packed", "varlen"}
    assert any(c.layout().chunk % c.cfg.sel_block for c in problems)  # chunks cut blocks


def test_the_comparison_rejects_a_wrong_shard():
    """The check can fail: rank 0's and rank 1's results swapped, or one rank's rows
    computed at another rank's positions, are far off."""
    case = cases.edge_cases(2)[2]  # documents cross ranks
    parts = cases.rows_on_one_process(case, torch.float64)
    swapped = cases.compare(case, torch.float64, parts[::-1])
    assert swapped["o"][0] > 1e-3 and swapped["q"][0] > 1e-3
    shifted = [dict(p) for p in parts]
    shifted[0]["o"] = torch.roll(parts[0]["o"], 1, dims=1)
    assert cases.compare(case, torch.float64, shifted)["o"][0] > 1e-3


def test_a_row_subset_plan_holds_the_rows_layouts():
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    p = nsa_impl.plan((1, 16, 4, 8), CFG, kv_heads=2, cu_seqlens=cu, rows=ROWS)
    assert p.T == 16 and p.T_q == 8 and torch.equal(p.rows, ROWS)
    assert p.route.paths() == {"cmp": "masked", "sel": "packed", "win": "masked"}
    assert p.row_positions.tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    assert p.row_seq_start.tolist() == [0] * 4 + [5] * 4
    assert p.win_masked.lo.numel() == 8 and p.cmp_masked.ranges.lo.numel() == 8
    assert p.win_masked.num_keys == 16 and "rows 8 of T=16" in repr(p)
    assert p.inputs.row_subset
    full = nsa_impl.plan((1, 16, 4, 8), CFG, kv_heads=2, cu_seqlens=cu)
    assert full.row_positions is full.positions and full.T_q == 16 and not full.inputs.row_subset


@pytest.mark.parametrize(
    "rows,error,match",
    [
        (torch.tensor([0, 2, 2]), ValueError, "strictly increasing"),
        (torch.tensor([3, 1]), ValueError, "strictly increasing"),
        (torch.tensor([0, 16]), ValueError, r"\[0, T=16\)"),
        (torch.tensor([], dtype=torch.int64), ValueError, "non-empty"),
        (torch.tensor([0.0, 1.0]), TypeError, "int64"),
        ([0, 1], TypeError, "1-D int64 tensor"),
    ],
)
def test_bad_rows_name_the_argument(rows, error, match):
    with pytest.raises(error, match=match):
        nsa_impl.plan((1, 16, 4, 8), CFG, kv_heads=2, rows=rows)


def test_calls_that_do_not_fit_a_row_subset_plan_are_rejected():
    p = nsa_impl.plan((1, 16, 4, 8), CFG, kv_heads=2, rows=ROWS, dtype=torch.float64)
    q, k, v, gates = inputs(1, 16, 2, 2, 8, 8, dtype=torch.float64)
    kv = branch_pairs(k, v, None)
    assert attend_rows(q[:, ROWS], kv, gates[:, ROWS], CFG, p).shape == (1, 8, 4, 8)
    with pytest.raises(ValueError, match="plan's shape"):
        attend_rows(q, kv, gates, CFG, p)  # q of all 16 rows
    with pytest.raises(ValueError, match="all T=16 keys"):
        attend_rows(q[:, ROWS], branch_pairs(k[:, ROWS], v[:, ROWS], None), gates[:, ROWS],
                    CFG, p)  # fmt: skip
    with pytest.raises(ValueError, match="gates"):
        attend_rows(q[:, ROWS], kv, gates, CFG, p)
    whole = nsa_impl.plan((1, 16, 4, 8), CFG, kv_heads=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="row-subset plan"):
        attend_rows(q, kv, gates, CFG, whole)
    with pytest.raises(ValueError, match="backward=False"):
        nograd = nsa_impl.plan((1, 16, 4, 8), CFG, kv_heads=2, rows=ROWS, dtype=torch.float64,
                               backward=False)  # fmt: skip
        attend_rows(q[:, ROWS].requires_grad_(), kv, gates[:, ROWS], CFG, nograd)


@pytest.mark.parametrize("forced", [dict(cmp="flash"), dict(win="flash"), dict(sel="triton"),
                                    dict(sel="reference")])  # fmt: skip
def test_kernels_without_row_subsets_are_skipped_and_forcing_them_fails(cpu_gpu_paths, forced):
    """With the FlashAttention and Triton paths declared for CPU tensors (stand-ins), a row-subset
    plan still routes to the torch paths, and forcing a kernel path names the reason."""
    shape = (1, 16, 4, 16)
    with dispatch.force_path(**forced):
        nsa_impl.plan(shape, CFG, kv_heads=2)  # the whole problem: the forced path can run
        with pytest.raises(RuntimeError, match="no row-subset support"):
            nsa_impl.plan(shape, CFG, kv_heads=2, rows=ROWS)
    route = nsa_impl.plan(shape, CFG, kv_heads=2, rows=ROWS).route
    assert {d.path for d in route.values()} <= {"masked", "packed", "varlen"}
    table = str(nsa_impl.explain(torch.zeros(shape), CFG, row_subset=True))
    assert "row-subset" in table


def test_row_subset_masked_route_has_no_host_sync_proxy(meta_gpu_paths):  # noqa: F811
    """A row-subset plan on the masked paths runs without host syncs (meta device, like the
    whole problem's test in test_plan.py), the selection op's insides included."""
    T, rows = 70, torch.cat([torch.arange(0, 18), torch.arange(52, 70)])
    with dispatch.force_path("masked"):
        p = nsa_impl.plan((1, T, 4, 16), CFG, kv_heads=2, device="meta", dtype=torch.float32,
                          rows=rows)  # fmt: skip
    q, gates = (torch.empty(s, device="meta", requires_grad=True)
                for s in ((1, 36, 4, 16), (1, 36, 4, 3)))  # fmt: skip
    k, v = (torch.empty(1, T, 2, 16, device="meta", requires_grad=True) for _ in range(2))
    blocks = torch.zeros(1, 36, 2, 3, dtype=torch.long, device="meta")
    with _SyncDetector():
        attend_rows(q, branch_pairs(k, v, None), gates, CFG, p, validate=False).sum().backward()
        selection._sel_chunked._init_fn(q.detach(), k.detach(), v.detach(), blocks,
                                        p.row_positions, p.row_seq_start, p.bounds_tensor,
                                        "masked", [4, 1 << 18, 64], 0.25, False)  # fmt: skip
    assert k.grad.shape == k.shape
