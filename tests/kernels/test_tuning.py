"""nsa_impl.kernels.tuning: launch shapes as explicit objects and the per-GPU-class profiles
(the router's use of them: tests/test_dispatch.py)."""

from __future__ import annotations

import pytest

from nsa_impl.kernels import tuning


def test_profiles_load_and_resolve():
    for name in ("sm90", "sm89", "sm80", "cpu"):
        prof = tuning.load_profile(name)
        assert prof.name == name and isinstance(prof.cmp.fwd, tuning.Launch)
        assert tuning.load_profile(name) is prof  # cached
        assert tuning.load_profile(name) == tuning.Profile(**{
            k: v for k, v in vars(prof).items()
        })  # fmt: skip
    assert not tuning.load_profile("sm89").route("sel_triton", True)  # Ada: selection stays off
    assert "triton" in tuning.load_profile("sm90").route("cmp", [])
    assert "triton" not in tuning.load_profile("sm80").route("cmp", [])  # until measured
    assert tuning.profile_name("cpu") == "cpu"
    tile = tuning.resolve(tuning.Launch(rows=128, block_n=64), h=16, dk=128, dv=128, ieee=False)
    assert (tile.P, tile.HP, tile.BM, tile.BN) == (8, 16, 128, 64)
    tile = tuning.resolve(tuning.Launch(rows=128, block_n=64), h=3, dk=192, dv=128, ieee=True)
    assert (tile.P, tile.HP, tile.BM, tile.BN) == (8, 4, 32, 32)
    # wide heads: the dK/dV launch runs at most WIDE_DKDV_WARPS warps, the others keep theirs
    wide = tuning.Launch(rows=64, block_n=128, warps=8)
    assert tuning.resolve(wide, 16, 192, 128, False, dkdv=True).warps == tuning.WIDE_DKDV_WARPS
    assert tuning.resolve(wide, 16, 192, 128, False).warps == 8
    assert tuning.resolve(wide, 16, 128, 128, False, dkdv=True).warps == 8
    with pytest.raises(ValueError, match="unknown kernel profile"):
        tuning.load_profile("sm70")
    with pytest.raises(ValueError, match="rows"):
        tuning.Launch(rows=96)
    with pytest.raises(ValueError, match="positions"):
        tuning.TopNTuning(positions=8)


def test_tuning_objects_travel_as_int_lists():
    """The custom ops take launch shapes as ``list[int]``; the round trip is exact."""
    tn = tuning.AttnTuning(dkdv=tuning.Launch(rows=32, block_n=16, chunk=64), dq_atomic=True)
    assert tuning.AttnTuning.from_list(tn.as_list()) == tn
    assert all(isinstance(x, int) for x in tn.as_list()) and len(tn.as_list()) == 16
    top = tuning.TopNTuning(positions=32, block_n=16)
    assert tuning.TopNTuning(*top.as_list()) == top
    assert tuning.GateTuning(*tuning.GateTuning(rows=16).as_list()) == tuning.GateTuning(rows=16)


def test_use_profile_is_scoped_and_typed():
    prof = tuning.load_profile("sm90")
    with tuning.use_profile(prof):
        assert tuning.profile_for("cpu") is prof
    assert tuning.profile_for("cpu").name == "cpu"
    with pytest.raises(TypeError, match="Profile"):
        with tuning.use_profile("sm90"):
            pass
    assert tuning.load_profile("cpu") == tuning.load_profile("cpu")
    assert tuning.profile_dict(prof)["routing"] == dict(prof.routing)
