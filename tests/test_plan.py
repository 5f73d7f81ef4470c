"""nsa_impl.plan: built once (route, layouts, max_seqlen, cu_seqlens checked once), reused
without host work or device syncs.

The zero-sync property is checked twice: on a GPU under ``torch.cuda.set_sync_debug_mode
("error")`` (marked ``gpu``), and on any machine by a proxy that runs the planned CUDA route
(flash / triton / flash) on the ``meta`` device under a dispatch mode that fails on every
operation that would synchronise a GPU: a read of a device value (``item``, ``bool``,
``tolist``: ``aten._local_scalar_dense``), an operation whose output size depends on data
(``nonzero``, ``bincount``, ``unique``, ``masked_select``, ``repeat_interleave`` without
``output_size``), or a host tensor copied to or mixed with device tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nsa_impl
import nsa_ref
from nsa_impl import NSAAttention, branches, dispatch, nsa_attention, scoring
from nsa_impl.branches import selection
from nsa_impl.tolerances import FP32_OUT_ATOL
from nsa_ref import NSAConfig

from .helpers import err, inputs, plan_of, requires_cuda

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=12)


def test_plan_holds_route_layouts_and_max_seqlen():
    cu = torch.tensor([0, 5, 30, 41], dtype=torch.int32)
    p = nsa_impl.plan((1, 41, 4, 16), CFG, kv_heads=2, v_head_dim=8, cu_seqlens=cu)
    assert p.route.paths() == {"cmp": "masked", "sel": "packed", "win": "masked"}
    assert p.max_seqlen == 25 and p.bounds == (0, 5, 30, 41) and p.varlen
    assert "cmp_masked" in vars(p) and "win_masked" in vars(p)  # built eagerly for the route
    assert "cmp_flash" not in vars(p)  # not on the route: never built
    assert p.positions.tolist()[:7] == [0, 1, 2, 3, 4, 0, 1]
    assert p.cu_seqlens.dtype == torch.int32 and "masked" in repr(p)
    assert isinstance(p, nsa_impl.Plan)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(q_shape=(1, 8, 4)), ValueError, "q_shape"),
        (dict(q_shape=(1, 8, 4, 0)), ValueError, r"q_shape\[3\]"),
        (dict(kv_heads=3), ValueError, "kv_heads"),
        (dict(cfg="paper"), TypeError, "cfg"),
        (dict(cu_seqlens=torch.tensor([0, 5, 4, 8], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 8]), q_shape=(2, 8, 4, 16)), ValueError, "B == 1"),
        (dict(max_seqlen=7), ValueError, "max_seqlen"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
    ],
)
def test_bad_plan_arguments_name_the_argument(kwargs, error, match):
    args = dict(q_shape=(1, 8, 4, 16), cfg=CFG, kv_heads=2)
    args.update(kwargs)
    q_shape, cfg = args.pop("q_shape"), args.pop("cfg")
    with pytest.raises(error, match=match):
        nsa_impl.plan(q_shape, cfg, **args)


def test_max_seqlen_is_checked_against_cu_seqlens():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert nsa_impl.plan((1, 8, 4, 16), CFG, kv_heads=2, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="longest sequence is 5"):
        nsa_impl.plan((1, 8, 4, 16), CFG, kv_heads=2, cu_seqlens=cu, max_seqlen=8)


def test_a_reused_plan_gives_the_same_result_for_new_inputs():
    cu = torch.tensor([0, 19, 40], dtype=torch.int32)
    p = plan_of(*inputs(1, 40, 2, 2, 16, 8)[:3], CFG, cu)
    for seed in (1, 2):
        q, k, v, gates = inputs(1, 40, 2, 2, 16, 8, seed=seed)
        o_plan = nsa_attention(q, k, v, gates, CFG, plan=p)  # cu_seqlens from the plan
        o_same = nsa_attention(q, k, v, gates, CFG, plan=p, cu_seqlens=cu)
        o_fresh = nsa_attention(q, k, v, gates, CFG, cu_seqlens=cu)
        assert torch.equal(o_plan, o_fresh) and torch.equal(o_same, o_fresh)
        want = nsa_ref.nsa_attention(q, k, v, gates, CFG, cu_seqlens=cu)
        assert err(o_plan, want) < FP32_OUT_ATOL


def test_calls_that_do_not_fit_the_plan_are_rejected():
    q, k, v, gates = inputs(1, 40, 2, 2, 16, 8)
    cu = torch.tensor([0, 19, 40], dtype=torch.int32)
    p = plan_of(q, k, v, CFG, cu, backward=False)
    with pytest.raises(ValueError, match="plan's shape"):
        nsa_attention(q[:, :39], k[:, :39], v[:, :39], gates[:, :39], CFG, plan=p)
    with pytest.raises(ValueError, match="very tensor"):
        nsa_attention(q, k, v, gates, CFG, plan=p, cu_seqlens=cu.clone())
    with pytest.raises(TypeError, match="plan's"):
        nsa_attention(*(t.double() for t in (q, k, v, gates)), CFG, plan=p)
    with pytest.raises(ValueError, match="Dv=8"):
        nsa_attention(q, k, torch.cat([v, v], -1), gates, CFG, plan=p)
    with pytest.raises(ValueError, match="cfg"):
        nsa_attention(q, k, v, gates, dataclasses.replace(CFG, window=5), plan=p)
    with pytest.raises(ValueError, match="backward=False"):
        nsa_attention(q.requires_grad_(), k, v, gates, CFG, plan=p)
    with pytest.raises(TypeError, match="plan must be"):
        nsa_attention(q, k, v, gates, CFG, plan="plan")


def test_validate_false_skips_only_the_value_checks():
    q, k, v, gates = inputs(1, 20, 2, 2, 16, 8)
    bad = gates.clone()
    bad[0, 3, 0, 0] = 1.5
    with pytest.raises(ValueError, match="gates"):
        nsa_attention(q, k, v, bad, CFG)
    nsa_attention(q, k, v, bad, CFG, validate=False)  # values not read
    with pytest.raises(ValueError, match="gates must have shape"):
        nsa_attention(q, k, v, bad[..., :2], CFG, validate=False)  # shapes always checked


def test_selection_entry_point_takes_a_plan():
    q, k, v, _ = inputs(1, 33, 2, 2, 16, 8)
    gates = torch.zeros(1, 33, 4, 3)
    gates[..., 1] = 1.0
    _, aux = nsa_ref.nsa_attention(q, k, v, gates, CFG, return_aux=True)
    p = plan_of(q, k, v, CFG)
    o = nsa_impl.api.selection_attention(q, k, v, aux.block_indices, CFG, plan=p)
    assert err(o, aux.o_sel) < FP32_OUT_ATOL


# ------------------------------------------------------------------------------------------
# No host sync on the CUDA route


class _SyncDetector(TorchDispatchMode):
    """Fails on operations that would synchronise a GPU (module docstring)."""

    DATA_DEPENDENT = {
        "aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::unique_dim",
        "aten::_unique2", "aten::unique_consecutive", "aten::masked_select",
    }  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self.DATA_DEPENDENT:
            raise AssertionError(f"host sync: {name}")
        if name == "aten::repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor"):
            if kwargs.get("output_size") is None:
                raise AssertionError("host sync: repeat_interleave without output_size")
        tensors = [a for a in _flat(args, kwargs) if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors if t.dim() > 0}
        # nsa:: custom ops take host chunk tables by design: read on the host, never copied
        if "cpu" in devices and "meta" in devices and not name.startswith("nsa::"):
            raise AssertionError(f"host tensor mixed with device tensors in {name}")
        out = func(*args, **kwargs)
        copy = name in ("aten::_to_copy", "aten::copy_")
        if copy and tensors and tensors[0].device.type == "cpu":
            outs = out if isinstance(out, tuple | list) else [out]
            if any(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in outs):
                raise AssertionError(f"host-to-device copy in {name}")
        return out


def _flat(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, tuple | list):
            yield from a
        else:
            yield a


@pytest.fixture
def meta_gpu_paths(monkeypatch):
    """The CUDA paths declared for the ``meta`` device (kernels' own checks are CUDA's)."""
    for name in ("flash", "triton", "masked"):
        decl = dispatch.PATHS[name]
        monkeypatch.setitem(dispatch.PATHS, name, dataclasses.replace(
            decl, devices=decl.devices | {"meta"}, probe=None, supports={},
        ))  # fmt: skip
    pytest.importorskip("triton", reason="triton is not installed")


def test_detector_catches_syncs():
    x = torch.zeros(4, device="meta")
    with pytest.raises((AssertionError, RuntimeError, NotImplementedError)):
        with _SyncDetector():
            bool(x.sum() > 0)
    with pytest.raises(AssertionError, match="host"):
        with _SyncDetector():
            x + torch.ones(4)
    with pytest.raises(AssertionError, match="repeat_interleave"):
        with _SyncDetector():
            torch.repeat_interleave(torch.arange(3, device="meta"), torch.ones(3, device="meta",
                                                                               dtype=torch.long))


@pytest.mark.parametrize("cu", [None, [0, 700, 1100]])
def test_planned_cuda_route_has_no_host_sync_proxy(meta_gpu_paths, cu):
    """flash cmp packing, Triton selection index set-up and the FA-2 window: forward and
    backward with a prebuilt plan, on the meta device, under `_SyncDetector`."""
    T, cfg = 1100, NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_top_n=4, window=64)
    B = 1 if cu else 2
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    with dispatch.force_path(cmp="flash", sel="triton", win="flash"):
        p = nsa_impl.plan((B, T, 8, 32), cfg, kv_heads=2, cu_seqlens=cu_t, device="meta",
                          dtype=torch.bfloat16)  # fmt: skip
    assert p.route.paths() == {"cmp": "flash", "sel": "triton", "win": "flash"}
    q, k, v, gates = (torch.empty(s, device="meta", dtype=torch.bfloat16, requires_grad=True)
                      for s in ((B, T, 8, 32), (B, T, 2, 32), (B, T, 2, 32), (B, T, 8, 3)))
    with _SyncDetector():
        o = nsa_attention(q, k, v, gates, cfg, plan=p, validate=False)
        o.sum().backward()
    assert o.shape == (B, T, 8, 32) and q.grad.shape == q.shape and gates.grad is not None


def test_masked_route_has_no_host_sync_proxy(meta_gpu_paths):
    """The "masked" paths (cmp, sel, win) with a plan: sync-free as well, the insides of their
    custom ops included (run here directly; plan-held chunk tables are read on the host)."""
    T = 70
    with dispatch.force_path("masked"):
        p = nsa_impl.plan((1, T, 4, 16), CFG, kv_heads=2, device="meta", dtype=torch.float32)
    tensors = [torch.empty(s, device="meta", requires_grad=True)
               for s in ((1, T, 4, 16), (1, T, 2, 16), (1, T, 2, 16), (1, T, 4, 3))]  # fmt: skip
    q, k, v = (t.detach() for t in tensors[:3])
    lay, sizes = p.cmp_masked, [8, 4, 16, 3, 1, 2]
    kc, vc = k[:, : p.cmp.num_blocks], v[:, : p.cmp.num_blocks]
    blocks = torch.zeros(1, T, 2, 3, dtype=torch.long, device="meta")
    with _SyncDetector():
        nsa_attention(*tensors, CFG, plan=p, validate=False).sum().backward()
        o, *_ = scoring._cmp_select._init_fn(q, kc, vc, lay.ranges.lo, lay.ranges.hi,
                                             lay.ranges.chunks, lay.meta, lay.block, 0.25,
                                             sizes, True, False)  # fmt: skip
        win = p.win_masked
        branches.chunk_backward(o, q, k, v, o, win.lo, win.hi, win.chunks.tolist(), 0.25)
        selection._sel_chunked._init_fn(q, k, v, blocks, p.positions, p.seq_start,
                                        p.bounds_tensor, "masked", [16, 1 << 18, 64], 0.25,
                                        False)  # fmt: skip


#: The CUDA kernel routes a planned call can take: the router's (on sm90 every branch on
#: "triton"), and FlashAttention-2 for the compressed and window branches.
CUDA_ROUTES = {"router": {}, "flash": {"cmp": "flash", "win": "flash"}}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("route", sorted(CUDA_ROUTES))
@pytest.mark.parametrize("cu", [None, [0, 1500, 4096]])
def test_planned_forward_backward_performs_zero_host_syncs(cu, route):
    """On CUDA, with a prebuilt plan and validate=False: zero syncs, forward and backward, on
    each CUDA kernel route (`CUDA_ROUTES`); no branch on a torch path."""
    pytest.importorskip("triton", reason="triton is not installed")
    cfg = NSAConfig()  # paper configuration
    B, T = (1 if cu else 2), 4096
    q, k, v, gates = inputs(B, T, 2, 8, 128, 128, dtype=torch.bfloat16, grad=True, device="cuda")
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    with dispatch.force_path(**CUDA_ROUTES[route]):
        p = plan_of(q, k, v, cfg, cu_t)
    assert set(p.route.paths().values()) <= {"triton", "flash"}, p.route
    nsa_attention(q, k, v, gates, cfg, plan=p, validate=False).sum().backward()  # compile once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = nsa_attention(q, k, v, gates, cfg, plan=p, validate=False)
        o.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all()


@pytest.mark.gpu
@requires_cuda
def test_planned_call_replays_from_cuda_graphs_bit_identically():
    """A planned call captures into CUDA graphs (no sync, static shapes): the forward with
    ``torch.cuda.graph``, forward+backward with ``make_graphed_callables``; replays equal eager
    bit for bit (same kernels, deterministic backward). `bench/graphed_bench.py` times it."""
    pytest.importorskip("triton", reason="triton is not installed")
    cfg = NSAConfig()
    q, k, v, gates = inputs(1, 2048, 2, 8, 128, 128, dtype=torch.bfloat16, grad=True,
                            device="cuda")  # fmt: skip
    do = torch.randn_like(q)
    p_fwd, p_bwd = plan_of(q, k, v, cfg, backward=False), plan_of(q, k, v, cfg)
    call = lambda plan, *xs: nsa_attention(*xs, cfg, plan=plan, validate=False)  # noqa: E731
    with torch.no_grad():
        eager = call(p_fwd, q, k, v, gates)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(p_fwd, q, k, v, gates)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = call(p_fwd, q, k, v, gates)
        graph.replay()
    assert torch.equal(static_out, eager)
    want = torch.autograd.grad(call(p_bwd, q, k, v, gates), (q, k, v, gates), do)
    graphed = torch.cuda.make_graphed_callables(lambda *xs: call(p_bwd, *xs), (q, k, v, gates))
    for _ in range(2):  # replays, not a one-off
        got = torch.autograd.grad(graphed(q, k, v, gates), (q, k, v, gates), do)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@requires_cuda
def test_module_forward_backward_with_a_plan_performs_zero_host_syncs():
    pytest.importorskip("triton", reason="triton is not installed")
    layer = NSAAttention(1024, 16, 2, 64, NSAConfig(), rope=True).cuda().bfloat16()
    x = torch.randn(1, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p = layer.plan_for(x)
    layer(x, plan=p).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x, plan=p).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_plan_free_calls_reuse_one_plan_until_the_routing_state_changes():
    """`cached_plan`: the same shapes give the very same plan; any key field (T, dtype, backward,
    a forced path, reloaded flags, a tuning override) gives another one, and the cache is
    bounded. Plan-free results equal planned ones."""
    import sys

    from nsa_impl import routing
    from nsa_impl.kernels import tuning

    plan_mod = sys.modules["nsa_impl.plan"]  # the package exports the function `plan` as well

    def cached(T=24, dtype=torch.float32, backward=False):
        return plan_mod.cached_plan((1, T, 4, 8), CFG, kv_heads=2, v_head_dim=8, device="cpu",
                                    dtype=dtype, backward=backward)  # fmt: skip

    first = cached()
    assert cached() is first
    assert cached(T=32) is not first and cached(dtype=torch.float64) is not first
    assert cached(backward=True) is not first
    with dispatch.force_path("masked"):
        forced = cached()
        assert forced is not first and cached() is forced
        assert {d.path for d in forced.route.values()} == {"masked"}
    assert cached() is first
    with tuning.use_profile(dataclasses.replace(tuning.load_profile("cpu"), note="test")):
        assert cached() is not first
    routing.reload_settings({})
    try:
        assert cached() is not first
    finally:
        routing.reload_settings()
    for T in range(40, 40 + 2 * plan_mod.PLAN_CACHE_SIZE):
        cached(T=T)
    assert len(plan_mod._PLAN_CACHE) == plan_mod.PLAN_CACHE_SIZE
    last = cached(T=40 + 2 * plan_mod.PLAN_CACHE_SIZE - 1)
    dispatch.clear_caches()
    assert cached(T=40 + 2 * plan_mod.PLAN_CACHE_SIZE - 1) is not last
    plan_mod.clear_plan_cache()
    assert not plan_mod._PLAN_CACHE

    q, k, v, gates = inputs(1, 24, 2, 2, 8, 8, seed=3)[:4]
    free = nsa_impl.nsa_attention(q, k, v, gates, CFG)
    again = nsa_impl.nsa_attention(q, k, v, gates, CFG)
    p = nsa_impl.plan(tuple(q.shape), CFG, kv_heads=2, device="cpu", dtype=q.dtype,
                      backward=False)  # fmt: skip
    assert torch.equal(free, again)
    assert torch.equal(free, nsa_impl.nsa_attention(q, k, v, gates, CFG, plan=p))
