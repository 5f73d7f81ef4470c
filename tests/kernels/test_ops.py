"""nsa_impl.kernels.ops: the custom-op helper (every kernel call is a registered op with a fake
impl), the containment helpers, and the explicit tuning object."""

from __future__ import annotations

import functools

import pytest
import torch

import nsa_impl  # noqa: F401  (registers every nsa:: op)
from nsa_impl.kernels import ops
from nsa_impl.kernels.ops import finite_rows, nan_to_zero, poison, tuning

#: Every op the library registers: the Triton and FlashAttention launches (forward and
#: backward) and the torch paths' chunk loops.
OPS = (
    "flash_forward", "flash_backward", "sel_forward", "sel_backward", "cmp_scores", "top_n",
    "range_attention", "range_attention_backward", "cmp_select", "sel_chunked",
    "sel_chunked_backward", "triton_range_forward", "triton_range_backward",
    "triton_select_blocks", "triton_gate_forward", "triton_gate_backward", "decode_rows",
)  # fmt: skip


def test_every_kernel_call_is_a_custom_op_with_a_fake():
    from torch._library.custom_ops import OPDEFS

    for name in OPS:
        assert f"nsa::{name}" in OPDEFS, name
        assert OPDEFS[f"nsa::{name}"]._abstract_fn is not None, f"{name} has no register_fake"
        assert hasattr(torch.ops.nsa, name)


@functools.cache
def _probe_op():
    """A `KernelOp` over ``2 * x`` (registered once per process)."""

    def fake(x):
        return torch.empty_like(x)

    @ops.kernel_op("test_kernel_op_probe", fake)
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    return probe


def test_kernel_ops_skip_the_custom_op_dispatch_only_in_plain_eager_calls():
    """`KernelOp`: eager calls under no_grad on plain tensors run the function itself; grad
    mode, a dispatch mode, the profiler, a tensor subclass and torch.compile tracing go through
    the custom op. Both give the function's result."""
    probe = _probe_op()
    op, through_op = probe.op, []

    def counted(*args):
        through_op.append(1)
        return op(*args)

    probe.op = counted  # counts the calls that go through the custom op
    try:
        _check_probe_paths(probe, through_op)
    finally:
        probe.op = op
    assert probe._opoverload is torch.ops.nsa.test_kernel_op_probe.default  # the op's attributes


def _check_probe_paths(probe, through_op):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.arange(4.0)
    with torch.no_grad():
        assert torch.equal(probe(x), 2 * x) and not through_op  # direct
    assert torch.equal(probe(x), 2 * x) and len(through_op) == 1  # grad mode on

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Passthrough():
        probe(x)
    with torch.no_grad(), torch.profiler.profile():
        probe(x)
    with torch.no_grad(), FakeTensorMode() as mode:
        assert probe(mode.from_tensor(x)).shape == x.shape
    assert len(through_op) == 4
    compiled = torch.compile(lambda t: probe(t) + 1, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), 2 * x + 1)
    assert len(through_op) == 5  # traced as the custom op


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_of_the_torch_path_ops():
    from nsa_impl.branches import range_attention_backward
    from nsa_impl.branches.selection import _sel_chunked, _sel_chunked_backward

    q = torch.randn(1, 9, 4, 8)
    k = torch.randn(1, 2, 9, 8).transpose(1, 2)  # non-contiguous: outputs must still match
    v = torch.randn(1, 9, 2, 6)
    lo, hi = torch.clamp(torch.arange(9) - 3, min=0), torch.arange(1, 10)
    chunks = torch.tensor([[0, 5, 0, 5], [5, 9, 2, 9]])
    _opcheck(torch.ops.nsa.range_attention.default, (q, k, v, lo, hi, chunks, 0.5))
    o = torch.ops.nsa.range_attention(q, k, v, lo, hi, chunks, 0.5)
    _opcheck(range_attention_backward._opoverload, (torch.randn_like(o), q, k, v, o, lo, hi,
                                                    chunks, 0.5))  # fmt: skip
    blocks = torch.randint(-1, 3, (1, 9, 2, 2))
    bounds = torch.tensor([0, 9])
    for kind in ("masked", "packed", "varlen"):
        args = (q, k, v, blocks, torch.arange(9), torch.zeros(9, dtype=torch.long), bounds, kind,
                [4, 64, 2], 0.5)  # fmt: skip
        _opcheck(_sel_chunked._opoverload, (*args, False))
        _opcheck(_sel_chunked_backward._opoverload, (torch.randn_like(o), q, k, v, o, *args[3:]))


def test_opcheck_of_the_flash_ops_on_their_cpu_implementation():
    from nsa_impl.kernels import flash

    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    _opcheck(flash.flash_forward._opoverload, (q, k, v, cu, 7, 2, 0.3))
    o, lse = flash.flash_forward(q, k, v, cu, 7, 2, 0.3)
    assert lse.shape == (4, 12) and lse.dtype == torch.float32
    _opcheck(flash.flash_backward._opoverload, (torch.randn_like(o), q, k, v, o, lse, cu, 7, 2,
                                                0.3))  # fmt: skip


@pytest.mark.triton
def test_opcheck_of_the_triton_ops_in_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    from nsa_impl.kernels import flash_cmp, triton_sel

    scores = torch.rand(1, 2, 5, 7)
    _opcheck(flash_cmp.top_n._opoverload, (scores, torch.tensor([0, 2, 3, 6, 6]), 3, 1, 1))
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 1, 16), torch.randn(1, 20, 1, 16)
    idx = torch.randint(-1, 2, (1, 20, 1, 2))
    o = triton_sel.selection_attention(q, k, v, idx, 16, 0.25)
    assert o.shape == (1, 20, 2, 16)


@pytest.mark.triton
def test_opcheck_of_the_prefill_triton_ops_in_the_interpreter():
    """The row-range attention (both modes, forward and backward), the fused top-n and the
    fused gate: schema and fake tensors against the real (interpreted) kernels."""
    pytest.importorskip("triton", reason="triton is not installed")
    from nsa_impl.kernels import triton_attn, triton_gate, triton_topn, tuning

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(20, 4, 16, generator=gen)
    kc, vc = torch.randn(7, 2, 16, generator=gen), torch.randn(7, 2, 8, generator=gen)
    qs, ks = torch.tensor([0, 20]), torch.tensor([0, 7])
    launch = tuning.AttnTuning(fwd=tuning.Launch(rows=16, block_n=16)).as_list()
    sizes = [20, 7, triton_attn.MODE_CMP, 4, 2, 1]  # max_len, max_keys, mode, l, d, window
    _opcheck(triton_attn.range_forward._opoverload, (q, kc, vc, qs, ks, sizes, 0.25, launch))
    o, lse = triton_attn.range_forward(q, kc, vc, qs, ks, sizes, 0.25, launch)
    _opcheck(triton_attn.range_backward._opoverload,
             (torch.randn_like(o), q, kc, vc, o, lse, qs, ks, sizes, 0.25, launch))  # fmt: skip
    k, v = torch.randn(20, 2, 16, generator=gen), torch.randn(20, 2, 8, generator=gen)
    win = [20, 20, triton_attn.MODE_WIN, 1, 1, 5]
    _opcheck(triton_attn.range_forward._opoverload, (q, k, v, qs, qs, win, 0.25, launch))
    select = [20, 4, 2, 8, 2, 1, 1, 3]  # max_len, l, d, l', n, init, local, num_scores
    topn = tuning.TopNTuning(positions=16, block_n=16).as_list()
    _opcheck(triton_topn.select_op._opoverload, (q, kc, lse, qs, ks, select, 0.25, topn))
    xs = [torch.randn(2, 5, 4, 8, generator=gen) for _ in range(3)]
    g = torch.rand(2, 5, 4, 3, generator=gen)
    _opcheck(triton_gate.gate_forward._opoverload, (*xs, g, [16, 4]))
    _opcheck(triton_gate.gate_backward._opoverload, (torch.randn_like(xs[0]), *xs, g, [16, 4]))


def test_containment_helpers():
    x = torch.tensor([[1.0, float("nan")], [2.0, 3.0], [float("-inf"), 0.0]])
    assert finite_rows(x).tolist() == [False, True, False]
    assert nan_to_zero(x).tolist() == [[1.0, 0.0], [2.0, 3.0], [0.0, 0.0]]
    y = poison(torch.ones(3, 2), torch.tensor([False, True, False]))
    assert torch.isnan(y[1]).all() and torch.equal(y[[0, 2]], torch.ones(2, 2))


def test_tuning_object_sets_and_restores_fields():
    before = dict(ops.TUNING.score)
    with tuning(score={"block_m": 16}, poison_outputs=True, launches={}) as t:
        assert t is ops.TUNING and t.score["block_m"] == 16 and t.score["block_n"] == 64
        assert torch.isnan(ops.new_output(2, 3, like=torch.zeros(1))).all()
        ops.record_launch("fwd", "handle")
        assert t.launches == {"fwd": "handle"}
    assert ops.TUNING.score == before and not ops.TUNING.poison_outputs
    assert ops.TUNING.launches is None
    with pytest.raises(ValueError, match="unknown tuning fields"):
        with tuning(warps=8):
            pass
