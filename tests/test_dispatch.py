"""nsa_impl.dispatch: the capability table, the router, force_path, explain, the fallbacks."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest
import torch

import nsa_ref
from nsa_impl import dispatch, nsa_attention, routing
from nsa_impl.kernels.ops import Inputs
from nsa_impl.tolerances import FP32_OUT_ATOL
from nsa_ref import NSAConfig

from .helpers import err, inputs, plan_of

CFG = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)


@pytest.fixture(autouse=True)
def _restore_settings():
    """Each test may reload the flags from a patched environment; put the real ones back."""
    real = dict(os.environ)
    yield
    routing.reload_settings(real)


def _inp(dtype=torch.float32, device="cpu", T=13, Dk=16, backward=False, varlen=False):
    return Inputs(torch.device(device), dtype, 1, T, 4, 2, Dk, Dk, T, varlen, backward, CFG)


def _paths(env: dict, **kw) -> dict:
    routing.reload_settings(env)
    return dispatch.choose(_inp(**kw)).paths()


# ------------------------------------------------------------------------------------------
# Declarations


def test_declarations_have_the_shared_fields():
    assert set(dispatch.PATHS) == {"reference", "masked", "packed", "varlen", "triton", "flash"}
    for name, decl in dispatch.PATHS.items():
        assert decl.name == name
        assert decl.branches <= {"cmp", "sel", "win"} and decl.branches
        assert decl.devices <= {"cpu", "cuda"} and decl.dtypes
        assert isinstance(decl.backward, bool) and isinstance(decl.varlen, bool)
        assert decl.min_head_dim >= 1
        assert name == "reference" or set(decl.impls) == decl.branches  # one function per branch
        assert set(decl.supports) <= decl.branches
        ok, why = decl.available()
        assert isinstance(ok, bool) and isinstance(why, str) and why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without a GPU")
def test_gpu_paths_unavailable_without_gpu_say_why():
    routing.reload_settings({})
    ok, why = dispatch.PATHS["flash"].available()
    assert not ok and why
    ok, why = dispatch.PATHS["triton"].available()
    assert not ok and ("CUDA" in why or "triton" in why)


def test_a_new_path_is_one_declaration(monkeypatch):
    """A path declared with an implementation, a kernel check and a layout builder for the
    window (here: the masked window with a spy) is chosen when forced, gets its layout built
    once with the plan, is run by the dispatcher and is named by explain."""
    calls = []
    monkeypatch.setattr(_Spy, "calls", calls)
    decl = dispatch.PathDecl(
        "spy", frozenset({"win"}), frozenset({"cpu"}), frozenset({torch.float32}), True, True,
        doc="test path", impls={"win": "tests.test_dispatch:_spy_window"},
        supports={"win": "tests.test_dispatch:_spy_supports"},
        layouts={"win": "tests.test_dispatch:_spy_layout"},
    )  # fmt: skip
    monkeypatch.setitem(dispatch.PATHS, "spy", decl)
    q, k, v, gates = inputs(1, 13, 2, 2, 8, 8)
    with dispatch.force_path(win="spy"):
        p = plan_of(q, k, v, CFG)
        o = nsa_attention(q, k, v, gates, CFG, plan=p)
        assert dispatch.explain(q, CFG, k=k, v=v)["win"].path == "spy"
        with pytest.raises(RuntimeError, match="only odd lengths"):
            plan_of(q[:, :12], k[:, :12], v[:, :12], CFG)
    assert calls == [("layout", 13), ("run", 13)]  # the layout once, at plan time
    assert err(o, nsa_ref.nsa_attention(q, k, v, gates, CFG)) < FP32_OUT_ATOL


class _Spy:
    calls: list = []


def _spy_supports(inp):
    return (inp.T % 2 == 1), "only odd lengths (a test kernel's limit)"


def _spy_layout(plan):
    _Spy.calls.append(("layout", plan.T))
    return plan.win_masked


def _spy_window(q, k, v, plan, scale):
    _Spy.calls.append(("run", q.shape[1]))
    from nsa_impl.branches import range_attention

    return range_attention(q, k, v, plan.layout_of("win", "spy"), scale)


# ------------------------------------------------------------------------------------------
# The router


def test_cpu_defaults():
    assert _paths({}) == {"cmp": "masked", "sel": "packed", "win": "masked"}


def test_flags_steer_the_choice():
    assert _paths({"NSA_USE_SEL_PACK": "0"})["sel"] == "masked"
    assert _paths({"NSA_SEL_VARLEN_V2": "1"})["sel"] == "varlen"
    assert _paths({"NSA_USE_WIN_MASK": "0"})["win"] == "reference"
    assert _paths({"NSA_USE_CMP_MASK": "0"})["cmp"] == "reference"
    assert _paths({"NSA_FORCE_PARITY": "1"}) == dict.fromkeys(("cmp", "sel", "win"), "reference")


def test_force_path_by_name_and_per_branch():
    routing.reload_settings({"NSA_FORCE_PARITY": "1"})
    inp = _inp()
    with dispatch.force_path("packed"):  # only the branches that have it
        assert dispatch.choose(inp).paths() == {
            "cmp": "reference", "sel": "packed", "win": "reference"
        }  # fmt: skip
        with dispatch.force_path("masked"):  # innermost wins
            assert dispatch.choose(inp).paths() == dict.fromkeys(("cmp", "sel", "win"), "masked")
    with dispatch.force_path(cmp="masked", sel="varlen"):
        assert dispatch.choose(inp).paths() == {
            "cmp": "masked", "sel": "varlen", "win": "reference"
        }  # fmt: skip
    assert dispatch.forced_paths() == {}
    with pytest.raises(ValueError, match="unknown path"):
        with dispatch.force_path("fast"):
            pass
    with pytest.raises(ValueError, match="no cmp implementation"):
        with dispatch.force_path(cmp="packed"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs flash to be unavailable (no GPU)")
def test_forced_path_that_cannot_run_raises_instead_of_falling_back():
    routing.reload_settings({})
    q, k, v, gates = inputs(1, 13, 2, 2, 16, 16)
    with dispatch.force_path("flash"):
        route = dispatch.choose(_inp())
        assert route["win"].error and "flash" in route["win"].error
        assert route["cmp"].error and "cuda" in route["cmp"].error  # forced, CPU tensors
        assert route["sel"].path != "flash"  # no flash selection path: router's choice
        with pytest.raises(RuntimeError, match="win"):
            nsa_attention(q, k, v, gates, CFG)


def test_forced_triton_declines_float64():
    routing.reload_settings({"NSA_TRITON_SEL_FORCE": "1", "TRITON_INTERPRET": "1"})
    route = dispatch.choose(_inp(dtype=torch.float64))
    assert route["sel"].path == "triton" and "dtype" in route["sel"].error
    routing.reload_settings({"NSA_TRITON_SEL_FORCE": "1", "TRITON_INTERPRET": "0"})
    route = dispatch.choose(_inp())
    assert "TRITON_INTERPRET" in route["sel"].error


def test_triton_length_guard_is_a_preference(cpu_gpu_paths):
    """The kernel's minimum length steers the router only; forcing ignores it."""
    routing.reload_settings({"TRITON_INTERPRET": "1"})
    short = dispatch.choose(_inp(T=100))
    assert short["sel"].path == "packed" and "guard" in short["sel"].reason
    assert dispatch.choose(_inp(T=1024))["sel"].path == "triton"
    with dispatch.force_path("triton"):
        assert dispatch.choose(_inp(T=100))["sel"].path == "triton"


def test_explain_is_a_printable_table():
    routing.reload_settings({"NSA_USE_FA2_CMP": "1"})
    q = inputs(1, 13, 2, 2, 16, 16)[0]
    table = dispatch.explain(q, CFG)
    text = str(table)
    for branch in ("cmp", "sel", "win"):
        assert branch in text and table[branch].reason
    # CPU tensors: the cmp flash path is declined, and the reason names why
    assert table["cmp"].path == "masked" and "skipped flash: device cpu" in table["cmp"].reason
    assert not dispatch.explain(q, CFG).get("sel").error


def test_explain_equals_the_plans_route():
    q, k, v, _ = inputs(1, 13, 2, 2, 16, 8, grad=True)
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    assert dispatch.explain(q, CFG, k=k, v=v, cu_seqlens=cu).paths() == (
        plan_of(q, k, v, CFG, cu).route.paths()
    )


# ------------------------------------------------------------------------------------------
# Routed calls compute the same function; the fallbacks


def test_parity_flag_runs_the_reference_exactly():
    routing.reload_settings({"NSA_FORCE_PARITY": "1"})
    q, k, v, gates = inputs(1, 13, 2, 2, 16, 16)
    o, aux = nsa_attention(q, k, v, gates, CFG, return_aux=True)
    ro, raux = nsa_ref.nsa_attention(q, k, v, gates, CFG, return_aux=True)
    assert torch.equal(o, ro) and torch.equal(aux.block_indices, raux.block_indices)


def test_varlen_min_len_flag_reaches_the_plan():
    routing.reload_settings({"NSA_SEL_VARLEN_V2": "1", "NSA_SEL_VARLEN_MIN_L": "7"})
    q, k, v, gates = inputs(1, 13, 2, 2, 16, 16)
    p = plan_of(q, k, v, CFG)
    assert p.route["sel"].path == "varlen" and p.sel_varlen_min_len == 7
    assert err(nsa_attention(q, k, v, gates, CFG, plan=p),
               nsa_ref.nsa_attention(q, k, v, gates, CFG)) < FP32_OUT_ATOL  # fmt: skip


def _nan_window(q, k, v, plan, scale):
    return torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype)


def test_nonfinite_fallback_only_with_validate(monkeypatch, caplog):
    """A path declaring a finite fallback: NaN from finite inputs is recomputed (logged once)
    when validate=True; with validate=False nothing is read from the device."""
    decl = dataclasses.replace(
        dispatch.PATHS["masked"], name="nan", branches=frozenset({"win"}),
        impls={"win": "tests.test_dispatch:_nan_window"}, finite_fallback="masked",
    )  # fmt: skip
    monkeypatch.setitem(dispatch.PATHS, "nan", decl)
    monkeypatch.setattr(dispatch, "_WARNED", set())
    q, k, v, gates = inputs(1, 13, 2, 2, 16, 16)
    want = nsa_ref.nsa_attention(q, k, v, gates, CFG)
    with dispatch.force_path(win="nan"), caplog.at_level(logging.WARNING, dispatch.__name__):
        for _ in range(2):
            assert err(nsa_attention(q, k, v, gates, CFG), want) < FP32_OUT_ATOL
        assert torch.isnan(nsa_attention(q, k, v, gates, CFG, validate=False)).any()
        bad = q.clone()
        bad[0, 3] = float("nan")  # non-finite inputs: no fallback, the NaN is the answer
        assert torch.isnan(nsa_attention(bad, k, v, gates, CFG)).any()
    assert sum("not finite" in r.message for r in caplog.records) == 1


@pytest.mark.triton
def test_triton_selection_forced_on_cpu_under_the_interpreter():
    """NSA_TRITON_SEL_FORCE=1 + TRITON_INTERPRET=1 route CPU tensors' selection to triton."""
    pytest.importorskip("triton", reason="triton is not installed")
    routing.reload_settings({"NSA_TRITON_SEL_FORCE": "1", "TRITON_INTERPRET": "1"})
    q, k, v, gates = inputs(1, 9, 2, 2, 16, 16)
    p = plan_of(q, k, v, CFG)
    assert p.route["sel"].path == "triton" and p.route["sel"].error is None
    assert err(nsa_attention(q, k, v, gates, CFG, plan=p),
               nsa_ref.nsa_attention(q, k, v, gates, CFG)) < FP32_OUT_ATOL  # fmt: skip


# ------------------------------------------------------------------------------------------
# The "triton" path of every branch and the device profiles


def _tri_inputs(T=80, seed=5):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, 4, 16, generator=gen)
    k = torch.randn(1, T, 2, 16, generator=gen)
    v = torch.randn(1, T, 2, 24, generator=gen)
    gates = torch.rand(1, T, 4, 3, generator=gen)
    return q, k, v, gates, torch.randn(1, T, 4, 24, generator=gen)


TRI_CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)


@pytest.mark.triton
@pytest.mark.parametrize("cu", [None, [0, 30, 31, 80]])
def test_force_path_triton_runs_every_branch_on_cpu(cu):
    """force_path("triton") under TRITON_INTERPRET=1: cmp, sel, win and the fused gate on the
    Triton kernels (CPU tensors, interpreter), in the fp32 class of the reference."""
    pytest.importorskip("triton", reason="triton is not installed")
    routing.reload_settings({"TRITON_INTERPRET": "1"})
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, gates, do = _tri_inputs()
    leaves = [t.requires_grad_() for t in (q, k, v, gates)]
    with dispatch.force_path("triton"):
        route = dispatch.explain(q, TRI_CFG, k=k, v=v, cu_seqlens=cu)
        o = nsa_attention(*leaves, TRI_CFG, cu_seqlens=cu)
    assert route.paths() == {"cmp": "triton", "sel": "triton", "win": "triton"}
    assert route.gate == "triton" and "profile: cpu" in str(route)
    grads = torch.autograd.grad(o, leaves, do)
    ref = nsa_ref.nsa_attention(*leaves, TRI_CFG, cu_seqlens=cu)
    rgrads = torch.autograd.grad(ref, leaves, do)
    assert err(o, ref) <= FP32_OUT_ATOL
    for a, b in zip(grads, rgrads, strict=True):
        assert err(a, b) <= 10 * FP32_OUT_ATOL


def test_cpu_tensors_never_choose_triton_unforced():
    routing.reload_settings({"TRITON_INTERPRET": "1"})
    q, k, v, _, _ = _tri_inputs(64)
    assert "triton" not in dispatch.explain(q, TRI_CFG, k=k, v=v).paths().values()


def test_profiles_order_the_paths(cpu_gpu_paths):
    """The profile decides: sm90 lists triton first for cmp and win, sm80 does not list it (the
    flash order of before), sm89 keeps the Triton selection off; the fused gate follows the
    route and the profile's gate_triton; explain names the profile."""
    from nsa_impl.kernels import tuning

    routing.reload_settings({"TRITON_INTERPRET": "1"})
    inp = _inp(T=2048, Dk=16, dtype=torch.bfloat16)
    with tuning.use_profile(tuning.load_profile("sm90")):
        route = dispatch.choose(inp)
    assert route.paths() == {"cmp": "triton", "sel": "triton", "win": "triton"}
    assert route.gate == "triton" and route.profile.startswith("sm90")
    assert "profile: sm90" in str(route)
    with tuning.use_profile(tuning.load_profile("sm80")):
        route = dispatch.choose(inp)
    assert route.paths() == {"cmp": "flash", "sel": "triton", "win": "flash"}
    assert route.gate == "torch"
    with tuning.use_profile(tuning.load_profile("sm89")):
        assert dispatch.choose(inp)["sel"].path == "packed"
    no_gate = dataclasses.replace(
        tuning.load_profile("sm90"),
        routing={**tuning.load_profile("sm90").routing, "gate_triton": False},
    )
    with tuning.use_profile(no_gate):
        route = dispatch.choose(inp)
    assert route.gate == "torch" and "gate_triton off" in route.gate_reason


def test_selection_length_guard_comes_from_the_profile(cpu_gpu_paths):
    from nsa_impl.kernels import tuning

    routing.reload_settings({"TRITON_INTERPRET": "1"})
    base = tuning.load_profile("cpu")
    short = dataclasses.replace(base, routing={**base.routing, "sel_triton_min_len": 64})
    with tuning.use_profile(short):
        assert dispatch.choose(_inp(T=100))["sel"].path == "triton"
        d = dispatch.choose(_inp(T=50))["sel"]
    assert d.path == "packed" and "sel_triton_min_len guard" in d.reason
    assert d.skipped[0][0] == "triton"  # what observe counts as a fallback


def test_no_compressed_block_needs_no_kernel_even_when_forced():
    """Every sequence shorter than l: cmp is "masked" (exact zeros, forced selection) whatever
    was forced, "reference" excepted; the triton path's outputs on such inputs equal nsa_ref."""
    routing.reload_settings({"TRITON_INTERPRET": "1"})
    q, k, v, gates = inputs(1, 7, 2, 2, 16, 16)
    with dispatch.force_path("triton"):
        route = dispatch.explain(q, TRI_CFG, k=k, v=v)
    assert route["cmp"].path == "masked" and "shorter than l" in route["cmp"].reason
    assert route["sel"].path == route["win"].path == "triton" and route["cmp"].error is None
    with dispatch.force_path("reference"):
        assert dispatch.explain(q, TRI_CFG, k=k, v=v)["cmp"].path == "reference"
    if __import__("importlib").util.find_spec("triton") is not None:
        with dispatch.force_path("triton"):
            o = nsa_attention(q, k, v, gates, TRI_CFG)
        assert err(o, nsa_ref.nsa_attention(q, k, v, gates, TRI_CFG)) < FP32_OUT_ATOL
