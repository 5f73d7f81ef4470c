"""NaN containment of the routed "triton" path, one branch at a time (spec I.3, I.6, I.7, I.10).

`conformance` (NSA-NAN-ROWS) checks the whole "triton" route; when it fails, these tests say which
kernel leaked: one branch runs on "triton" (`dispatch.force_path`), the others on "masked", and
a NaN at token ``j`` of batch row 0 must leave batch row 1 (another sequence) and the rows of
row 0 before ``j`` (no branch lets a row read a later token) bit-identical, forward and backward:
outputs, branch outputs, indices and every gradient. The "triton" route also runs the gate
(Eq. 5) and the top-n kernels whenever the compressed or window branch is on "triton".

CPU (Triton's interpreter, ``TRITON_INTERPRET=1``): bfloat16, a NaN in ``k`` (the case that
reaches every kernel: compressed keys, scores, selection and window). GPU (marked ``gpu``):
bfloat16 and float16, q/k/v, the device's launch profile, the conformance shape and a larger one.
"""

from __future__ import annotations

import os

import pytest
import torch

import nsa_impl
from nsa_impl import dispatch
from nsa_ref import NSAConfig

from ..helpers import inputs, requires_cuda

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

pytestmark = pytest.mark.triton

#: The conformance clause's configuration (l = l' = 8, d = 4, n = 4, w = 12).
CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=12)
ROUTES = {
    "cmp": dict(cmp="triton", sel="masked", win="masked"),
    "sel": dict(cmp="masked", sel="triton", win="masked"),
    "win": dict(cmp="masked", sel="masked", win="triton"),
    "all": dict(cmp="triton", sel="triton", win="triton"),
}
_FIELDS = ("o_cmp", "o_sel", "o_win", "block_indices")


def _run(q, k, v, gates, route):
    """``{name: tensor}``: output, aux fields and the gradients of ``sum(o * w)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gates)]
    with dispatch.force_path(**ROUTES[route]):
        o, aux = nsa_impl.nsa_attention(*leaves, CFG, return_aux=True)
    w = torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape).to(o.dtype)
    gs = torch.autograd.grad((o * w).sum(), leaves)
    out = {"o": o.detach(), **{f: getattr(aux, f).detach() for f in _FIELDS}}
    out.update({f"grad.{n}": g for n, g in zip(("q", "k", "v", "gates"), gs, strict=True)})
    return out


def _check(route, which, dtype, device, B=2, T=48, D=16, j=21, seed=90):
    q, k, v, gates = inputs(B, T, 2, 2, D, D, seed=seed, dtype=dtype, device=device)
    clean = _run(q, k, v, gates, route)
    bad = {"q": q, "k": k, "v": v}
    bad[which] = bad[which].clone()
    bad[which][0, j] = float("nan")
    dirty = _run(bad["q"], bad["k"], bad["v"], gates, route)
    leaks = [f"{n} of batch row 1" for n, t in clean.items() if not torch.equal(dirty[n][1], t[1])]
    for n in ("o", "o_cmp", "o_sel", "o_win", "block_indices", "grad.q", "grad.gates"):
        if not torch.equal(dirty[n][0, :j], clean[n][0, :j]):  # rows before j read nothing of j
            leaks.append(f"{n} of rows before token {j}")
    assert not leaks, f"route {route}, NaN in {which} ({dtype}): {', '.join(leaks)}"
    assert not bool(torch.isfinite(dirty["o"][0, j:]).all())  # someone reads it, loudly


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors reach the Triton kernels only with TRITON_INTERPRET=1")
@pytest.mark.parametrize("route", ["cmp", "sel", "win"])
def test_a_nan_in_k_stays_in_its_readers_bf16(route):
    """bf16 on CPU: a NaN in k stays in the rows that read it on each triton branch (the
    interpreter's bf16 arithmetic once hid a NaN from the kernels' in-loop cleaning, which the
    launchers' cleaning has since replaced)."""
    _check(route, "k", torch.bfloat16, "cpu")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", [(48, 16), (1024, 64)], ids=["T48-D16", "T1024-D64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_nan_stays_in_its_readers_cuda(route, which, dtype, shape):
    """Compiled kernels with the device's profile; NaN at token 21 (T=48) or 700 (T=1024)."""
    T, D = shape
    _check(route, which, dtype, "cuda", T=T, D=D, j=21 if T == 48 else 700)
