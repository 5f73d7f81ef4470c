"""nsa_impl.routing: flags parsed once, path declarations, the router, force_path, explain."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import nsa_ref
from nsa_impl import nsa_attention, routing
from nsa_impl.branches import selection
from nsa_impl.tolerances import FP32_OUT_ATOL
from nsa_ref import NSAConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)


@pytest.fixture(autouse=True)
def _restore_settings():
    """Each test may reload the flags from a patched environment; put the real ones back."""
    real = dict(os.environ)
    yield
    routing.reload_settings(real)


def _inputs(T=13, Dk=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, 4, Dk, generator=gen).to(dtype)
    k = torch.randn(1, T, 2, Dk, generator=gen).to(dtype)
    v = torch.randn(1, T, 2, Dk, generator=gen).to(dtype)
    gates = torch.rand(1, T, 4, 3, generator=gen).to(dtype)
    return q, k, v, gates


def _paths(env: dict, q=None, **kw) -> dict:
    routing.reload_settings(env)
    q = _inputs()[0] if q is None else q
    return routing.route(q, **kw).paths()


# ------------------------------------------------------------------------------------------
# Settings


def test_defaults_and_parse_once(monkeypatch):
    s = routing.reload_settings({})
    assert (s.force_parity, s.use_win_mask, s.use_cmp_mask, s.use_sel_pack) == (
        False,
        True,
        True,
        True,
    )
    assert s.sel_varlen_min_len is None and s.fa2_win and s.fa2_cmp
    assert routing.settings() is s  # cached: parsed once
    monkeypatch.setenv("NSA_FORCE_PARITY", "1")
    assert routing.settings() is s and not routing.settings().force_parity
    assert routing.reload_settings().force_parity  # only a reload re-reads
    with pytest.raises(dataclass_error()):
        s.force_parity = True  # frozen


def dataclass_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_every_api_flag_is_known():
    api_flags = {
        "NSA_FORCE_PARITY",
        "NSA_USE_WIN_MASK",
        "NSA_USE_CMP_MASK",
        "NSA_USE_SEL_PACK",
        "NSA_SEL_VARLEN_V2",
        "NSA_SEL_VARLEN_MIN_L",
        "NSA_USE_TRITON_SEL",
        "NSA_TRITON_SEL_FORCE",
        "NSA_USE_FA2",
        "NSA_USE_FA2_CMP",
        "NSA_USE_FA2_WIN",
        "NSA_DEBUG_TIMING",  # nsa_impl.observe; API.md's flag list needs it too
    }
    assert set(routing.FLAGS) == api_flags


def test_unknown_flag_warns_with_the_known_ones():
    with pytest.warns(RuntimeWarning, match=r"NSA_FORCE_PARTY.*NSA_FORCE_PARITY"):
        routing.reload_settings({"NSA_FORCE_PARTY": "1"})


@pytest.mark.parametrize(
    "name,value",
    [("NSA_FORCE_PARITY", "maybe"), ("NSA_SEL_VARLEN_MIN_L", "-3"), ("NSA_SEL_VARLEN_MIN_L", "x")],
)
def test_bad_flag_value_names_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        routing.reload_settings({name: value})


def test_values_are_parsed():
    s = routing.reload_settings(
        {
            "NSA_USE_FA2": "off",
            "NSA_USE_FA2_WIN": "yes",
            "NSA_SEL_VARLEN_MIN_L": "128",
            "NSA_USE_SEL_PACK": "False",
        }
    )
    assert (s.fa2_win, s.fa2_cmp, s.sel_varlen_min_len, s.use_sel_pack) == (True, False, 128, False)


# ------------------------------------------------------------------------------------------
# Declarations


def test_declarations_have_the_shared_fields():
    assert set(routing.PATHS) == {"reference", "masked", "packed", "varlen", "triton", "flash"}
    for name, decl in routing.PATHS.items():
        assert decl.name == name
        assert decl.branches <= {"cmp", "sel", "win"} and decl.branches
        assert decl.devices <= {"cpu", "cuda"} and decl.dtypes
        assert isinstance(decl.backward, bool) and isinstance(decl.varlen, bool)
        assert decl.min_head_dim >= 1
        ok, why = decl.available()
        assert isinstance(ok, bool) and isinstance(why, str) and why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without a GPU")
def test_gpu_paths_unavailable_without_gpu_say_why():
    routing.reload_settings({})
    ok, why = routing.PATHS["flash"].available()
    assert not ok and why
    ok, why = routing.PATHS["triton"].available()
    assert not ok and ("CUDA" in why or "triton" in why)


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


def test_force_path_overrides_only_branches_it_has():
    routing.reload_settings({"NSA_FORCE_PARITY": "1"})
    q = _inputs()[0]
    with routing.force_path("packed"):
        assert routing.route(q).paths() == {"cmp": "reference", "sel": "packed", "win": "reference"}
        with routing.force_path("masked"):  # innermost wins
            assert routing.route(q).paths() == dict.fromkeys(("cmp", "sel", "win"), "masked")
    assert routing.forced_path() is None
    with pytest.raises(ValueError, match="unknown path"):
        with routing.force_path("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs flash to be unavailable (no GPU)")
def test_forced_path_that_cannot_run_raises_instead_of_falling_back():
    routing.reload_settings({})
    q, k, v, gates = _inputs()
    with routing.force_path("flash"):
        plan = routing.route(q, k, v)
        assert plan["win"].error and "flash" in plan["win"].error
        assert plan["cmp"].error and "cuda" in plan["cmp"].error  # forced, CPU tensors
        assert plan["sel"].path != "flash"  # no flash selection path: router's choice
        with pytest.raises(RuntimeError, match="win"):
            nsa_attention(q, k, v, gates, CFG)


def test_forced_triton_declines_float64():
    routing.reload_settings({"NSA_TRITON_SEL_FORCE": "1", "TRITON_INTERPRET": "1"})
    plan = routing.route(_inputs(dtype=torch.float64)[0])
    assert plan["sel"].path == "triton" and "dtype" in plan["sel"].error


def test_backward_need_is_detected():
    q = _inputs()[0]
    assert not routing.Inputs.of(q).backward
    assert routing.Inputs.of(q.requires_grad_()).backward
    with torch.no_grad():
        assert not routing.Inputs.of(q).backward
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    inp = routing.Inputs.of(q, cu_seqlens=cu)
    assert inp.varlen and inp.max_seqlen == 9


def test_explain_is_a_printable_table():
    routing.reload_settings({"NSA_USE_FA2_CMP": "1"})
    table = routing.explain(_inputs()[0], CFG)
    text = str(table)
    for branch in ("cmp", "sel", "win"):
        assert branch in text and table[branch].reason
    # CPU tensors: the cmp flash path is declined, and the reason names why
    assert table["cmp"].path == "masked" and "skipped flash: device cpu" in table["cmp"].reason


# ------------------------------------------------------------------------------------------
# Routed calls compute the same function


def test_parity_flag_runs_the_reference_exactly():
    routing.reload_settings({"NSA_FORCE_PARITY": "1"})
    q, k, v, gates = _inputs()
    o, aux = nsa_attention(q, k, v, gates, CFG, return_aux=True)
    ro, raux = nsa_ref.nsa_attention(q, k, v, gates, CFG, return_aux=True)
    assert torch.equal(o, ro) and torch.equal(aux.block_indices, raux.block_indices)


@pytest.mark.parametrize("path", ["masked", "packed", "varlen"])
def test_every_cpu_selection_path_matches_the_reference(path):
    routing.reload_settings({})
    q, k, v, gates = _inputs(T=21)
    cu = torch.tensor([0, 8, 21], dtype=torch.int32)
    with routing.force_path(path):
        o = nsa_attention(q, k, v, gates, CFG, cu_seqlens=cu)
    ro = nsa_ref.nsa_attention(q, k, v, gates, CFG, cu_seqlens=cu)
    assert (o - ro).abs().max().item() < FP32_OUT_ATOL


def test_varlen_min_len_flag_reaches_the_selection_path(monkeypatch):
    routing.reload_settings({"NSA_SEL_VARLEN_V2": "1", "NSA_SEL_VARLEN_MIN_L": "7"})
    seen = {}
    real = selection.selection_attention

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "selection_attention", spy)
    nsa_attention(*_inputs(), CFG)
    assert seen["path"] == "varlen" and seen["varlen_min_len"] == 7


_TRITON_SCRIPT = """
import torch, nsa_ref
from nsa_impl import nsa_attention, routing
from nsa_ref import NSAConfig
cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 9, n, 16, generator=gen) for n in (4, 2, 2))
gates = torch.rand(1, 9, 4, 3, generator=gen)
plan = routing.route(q, k, v)
assert plan["sel"].path == "triton" and plan["sel"].error is None, plan["sel"]
err = (nsa_attention(q, k, v, gates, cfg) - nsa_ref.nsa_attention(q, k, v, gates, cfg)).abs().max()
print("ERR", float(err))
"""


@pytest.mark.triton
def test_triton_selection_forced_on_cpu_under_the_interpreter():
    """NSA_TRITON_SEL_FORCE=1 + TRITON_INTERPRET=1 route CPU tensors' selection to triton.

    Runs in a fresh interpreter: triton must see TRITON_INTERPRET before its first import.
    """
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        NSA_TRITON_SEL_FORCE="1",
        PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    run = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    err = float(run.stdout.split("ERR")[-1])
    assert err < FP32_OUT_ATOL
