"""nsa_impl.routing: the NSA_* flags, parsed once (routing decisions: tests/test_dispatch.py)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from nsa_impl import routing


@pytest.fixture(autouse=True)
def _restore_settings():
    """Each test may reload the flags from a patched environment; put the real ones back."""
    real = dict(os.environ)
    yield
    routing.reload_settings(real)


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
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.force_parity = True  # frozen


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
            "TRITON_INTERPRET": "1",
        }
    )
    assert (s.fa2_win, s.fa2_cmp, s.sel_varlen_min_len, s.use_sel_pack) == (True, False, 128, False)
    assert s.triton_interpret and s.source["NSA_USE_FA2"] == "off"
    assert hash(s) == hash(routing.Settings.from_environ(dict(s.source, TRITON_INTERPRET="1")))


def test_tooling_variables_are_not_warned_about():
    """The project's own NSA_* tooling variables (nox, conformance) are not routing flags and
    raise no unknown-variable warning; an unknown NSA_* name still does."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        routing.Settings.from_environ({name: "x" for name in routing.TOOLING_VARIABLES})
    with pytest.warns(RuntimeWarning, match="NSA_BOGUS"):
        routing.Settings.from_environ({"NSA_BOGUS": "1"})
