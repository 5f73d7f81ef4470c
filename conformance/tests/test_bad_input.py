"""Bad input (spec I.11) and invalid configurations (spec I.2) raise, naming the argument."""

from __future__ import annotations

import re

import pytest
import torch

from conformance.inputs import Case
from nsa_ref import NSAConfig

from .cases import CFG_A, fit


def _inputs(subject):
    dtype = torch.float64 if torch.float64 in subject.caps.dtypes else torch.float32
    if dtype not in subject.caps.dtypes:
        dtype = sorted(subject.caps.dtypes, key=str)[0]
    inp = fit(subject, Case(T=12, G=2, h=2, seed=110)).make().to(dtype, subject.device)
    return dict(q=inp.q, k=inp.k, v=inp.v, gates=inp.gates)


def _cu(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


# name -> (change to the arguments, accepted exception types, argument named in the message)
BAD = {
    "q-rank-3": (lambda a, d: {**a, "q": a["q"][0]}, (ValueError,), "q"),
    "k-wrong-T": (lambda a, d: {**a, "k": a["k"][:, :-1]}, (ValueError,), "k"),
    "v-wrong-G": (lambda a, d: {**a, "v": a["v"][:, :, :1]}, (ValueError,), "v"),
    "H-not-multiple-of-G": (lambda a, d: {**a, "q": a["q"][:, :, :3]}, (ValueError,), "G"),
    "k-dtype": (
        lambda a, d: {
            **a,
            "k": a["k"].to(torch.float16 if a["k"].dtype != torch.float16 else torch.float32),
        },
        (TypeError, ValueError),
        "k",
    ),
    "q-not-tensor": (lambda a, d: {**a, "q": a["q"].tolist()}, (TypeError,), "q"),
    "gates-shape": (lambda a, d: {**a, "gates": a["gates"][..., :2]}, (ValueError,), "gates"),
    "gates-above-1": (lambda a, d: {**a, "gates": a["gates"] + 1.5}, (ValueError,), "gates"),
    "cfg-not-config": (lambda a, d: {**a, "cfg": {"cmp_block": 8}}, (TypeError,), "cfg"),
    "cu_seqlens-not-increasing": (
        lambda a, d: {**a, "cu_seqlens": _cu([0, 7, 5, 12], d)},
        (ValueError,),
        "cu_seqlens",
    ),
    "cu_seqlens-wrong-total": (
        lambda a, d: {**a, "cu_seqlens": _cu([0, 5, 13], d)},
        (ValueError,),
        "cu_seqlens",
    ),
    "cu_seqlens-not-from-0": (
        lambda a, d: {**a, "cu_seqlens": _cu([2, 5, 12], d)},
        (ValueError,),
        "cu_seqlens",
    ),
    "cu_seqlens-float": (
        lambda a, d: {**a, "cu_seqlens": _cu([0, 5, 12], d).float()},
        (TypeError, ValueError),
        "cu_seqlens",
    ),
}


@pytest.mark.clause("NSA-I11-BAD-INPUT")
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_naming_the_argument(subject, case):
    """ValueError/TypeError whose message names the offending argument; never a silent answer."""
    change, errors, name = BAD[case]
    args = change({**_inputs(subject), "cfg": subject.config(CFG_A)}, subject.device)
    if "cu_seqlens" in case:
        subject.require("varlen")
    with pytest.raises(errors) as info:
        subject.adapter.attention(
            args.pop("q"), args.pop("k"), args.pop("v"), args.pop("gates"), args.pop("cfg"), **args
        )
    subject.expect(
        re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", str(info.value)) is not None,
        f"{type(info.value).__name__} does not name {name!r}: {info.value}",
    )


@pytest.mark.clause("NSA-I11-BAD-INPUT")
def test_device_mismatch_raises(subject):
    """k on another device than q raises, naming k (needs a GPU to have two devices)."""
    if not torch.cuda.is_available():
        pytest.skip("a device mismatch needs a CUDA device next to the CPU")
    args = _inputs(subject)
    other = "cpu" if subject.device == "cuda" else "cuda"
    with pytest.raises((ValueError, TypeError), match=r"\bk\b"):
        subject.adapter.attention(
            args["q"], args["k"].to(other), args["v"], args["gates"], subject.config(CFG_A)
        )


INVALID_CONFIGS = {
    "d-not-dividing-l": (dict(cmp_block=10, cmp_stride=4), "cmp_stride"),
    "d-not-dividing-l'": (dict(cmp_block=8, cmp_stride=4, sel_block=10), "cmp_stride"),
    "n-below-forced": (dict(sel_top_n=2, sel_init_blocks=1, sel_local_blocks=2), "sel_top_n"),
    "zero-window": (dict(window=0), "window"),
    "negative-block": (dict(cmp_block=-8), "cmp_block"),
}


@pytest.mark.clause("NSA-I2-CONFIG")
@pytest.mark.parametrize("case", list(INVALID_CONFIGS))
def test_invalid_configuration_raises(subject, case):
    """NSAConfig raises ValueError naming the field; nothing is clamped."""
    subject.require("nsa_config")
    fields, name = INVALID_CONFIGS[case]
    with pytest.raises(ValueError, match=name):
        NSAConfig(**fields)
