"""Shared input checks (`nsa_ref.validate`, `nsa_ref.scalars`) as both libraries see them.

One check serves `nsa_ref` and `nsa_impl`: a wrong ``phi`` result, a numpy scalar, a float
where an int is expected fail the same way in both, with the argument named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nsa_impl
import nsa_ref
from nsa_impl import varlen
from nsa_ref import NSAConfig

CFG = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=4)
LIBS = {"nsa_ref": nsa_ref, "nsa_impl": nsa_impl}
CACHES = {"nsa_ref": nsa_ref.NSARefCache, "nsa_impl": nsa_impl.NSACache}


def _inputs(T=12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, T, 4, 8, generator=gen, dtype=dtype)
    k = torch.randn(1, T, 2, 8, generator=gen, dtype=dtype)
    v = torch.randn(1, T, 2, 6, generator=gen, dtype=dtype)
    return q, k, v, torch.rand(1, T, 4, 3, generator=gen, dtype=dtype)


def _keepdim_mean(x):  # [..., l, D] -> [..., 1, D]: would broadcast silently if unchecked
    return x.mean(dim=-2, keepdim=True)


def _drop_last_feature(x):  # [..., l, D] -> [..., D - 1]: dies inside einsum if unchecked
    return x.mean(dim=-2)[..., :-1]


BAD_PHI = {
    "keepdim": (_keepdim_mean, ValueError),
    "wrong_dim": (_drop_last_feature, ValueError),
    "not_a_tensor": (lambda x: x.mean(dim=-2).tolist(), TypeError),
    "wrong_dtype": (lambda x: x.mean(dim=-2).float(), TypeError),
}


@pytest.mark.parametrize("bad", list(BAD_PHI))
@pytest.mark.parametrize("which", ["phi_k", "phi_v"])
@pytest.mark.parametrize("lib", list(LIBS))
def test_wrong_phi_result_is_rejected_naming_the_argument(lib, which, bad):
    phi, error = BAD_PHI[bad]
    q, k, v, gates = _inputs()
    with pytest.raises(error, match=which):
        LIBS[lib].nsa_attention(q, k, v, gates, CFG, **{which: phi})


@pytest.mark.parametrize("which", ["phi_k", "phi_v"])
@pytest.mark.parametrize("lib", list(CACHES))
def test_wrong_phi_result_is_rejected_by_the_decode_caches(lib, which):
    q, k, v, gates = _inputs()
    cache = CACHES[lib](CFG, **{which: _keepdim_mean})
    with torch.no_grad(), pytest.raises(ValueError, match=which):
        for p in range(CFG.cmp_block):  # the first compressed block is emitted at p = l - 1
            cache.step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], gates[:, p : p + 1])


@pytest.mark.parametrize("lib", list(LIBS))
def test_phi_that_is_not_callable_is_a_type_error(lib):
    q, k, v, gates = _inputs()
    with pytest.raises(TypeError, match="phi_v must be callable"):
        LIBS[lib].nsa_attention(q, k, v, gates, CFG, phi_v="mean")
    with pytest.raises(TypeError, match="phi_k must be callable"):
        CACHES[lib](CFG, phi_k=3)


@pytest.mark.parametrize("lib", list(LIBS))
def test_numpy_scalars_are_accepted_like_python_numbers(lib):
    q, k, v, gates = _inputs()
    cfg = NSAConfig(
        cmp_block=np.int64(4), cmp_stride=np.int32(2), sel_block=4, sel_top_n=3, window=np.int64(4)
    )
    assert cfg == CFG and type(cfg.window) is int and hash(cfg) == hash(CFG)
    want = LIBS[lib].nsa_attention(q, k, v, gates, CFG, scale=0.5)
    got = LIBS[lib].nsa_attention(q, k, v, gates, cfg, scale=np.float32(0.5))
    assert torch.equal(got, want)
    CACHES[lib](CFG, scale=np.float64(0.25))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("window", 4.0, TypeError),
        ("window", np.float64(4), TypeError),
        ("window", True, TypeError),
        ("window", np.bool_(True), TypeError),
        ("window", 0, ValueError),
        ("sel_init_blocks", -1, ValueError),
    ],
)
def test_config_rejects_non_integers_without_truncating(field, value, error):
    with pytest.raises(error, match=f"NSAConfig.{field}"):
        NSAConfig(**{field: value})


@pytest.mark.parametrize("scale", [True, "0.5", 0.0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("lib", list(LIBS))
def test_bad_scale_names_scale(lib, scale):
    q, k, v, gates = _inputs()
    with pytest.raises((TypeError, ValueError), match="scale"):
        LIBS[lib].nsa_attention(q, k, v, gates, CFG, scale=scale)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(edges=[]), ValueError, "edges must hold at least one value"),
        (dict(edges=[4.0, 8.0]), TypeError, r"edges\[0\] must be an int"),
        (dict(edges=[8, 4]), ValueError, "strictly increasing"),
        (dict(edges=[0, 8]), ValueError, "edges must be positive"),
        (dict(edges=[2]), ValueError, "cover the longest length 5"),
    ],
)
def test_bucket_edges_give_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        varlen.bucket_by_length([3, 5], **kwargs)


def test_bucket_edges_accept_numpy_integers():
    buckets = varlen.bucket_by_length([3, 5], edges=[np.int64(4), np.int32(8)])
    assert [b.max_len for b in buckets] == [4, 8]


def test_pad_refuses_a_float_max_len():
    x = torch.arange(5.0)[None, :, None]
    cu = varlen.cu_seqlens_from_lengths([2, 3])
    with pytest.raises(TypeError, match="max_len must be an int"):
        varlen.pad(x, cu, max_len=4.7)
    assert varlen.pad(x, cu, max_len=np.int64(4)).shape == (2, 4, 1)
