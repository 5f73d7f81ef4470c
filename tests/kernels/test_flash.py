"""nsa_impl.kernels.flash: FlashAttention-2 varlen with a window, its layout and containment.

Without a GPU the ops compute FlashAttention's function in dense PyTorch, so the wrapper's
logic runs here: the layout (``left = w - 1``, ``-1`` for a window covering everything), the
NaN containment (clean inputs, poisoned readers), zero padding of ``Dk != Dv``. The window
path against `nsa_ref`: tests/branches/test_sliding.py. GPU tests (marked ``gpu``): parity in
fp16/bf16 by the low-precision criterion, and containment on the real kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

from conformance import dense
from nsa_impl.kernels import flash
from nsa_impl.kernels.ops import Inputs
from nsa_impl.tolerances import lowp_bound
from nsa_ref import NSAConfig

from ..helpers import err, requires_cuda


def test_layout_translates_the_window():
    lay = flash.FlashLayout.build([0, 4, 10], window=3, device="cpu")
    assert lay.left == 2 and lay.max_len == 6 and lay.cu.dtype == torch.int32
    assert lay.row_lo.tolist() == [0, 0, 0, 1, 4, 4, 4, 5, 6, 7]
    assert lay.key_hi.tolist() == [2, 3, 3, 3, 6, 7, 8, 9, 9, 9]
    causal = flash.FlashLayout.build([0, 4, 10], window=7, device="cpu")  # covers every sequence
    assert causal.left == -1 and causal.row_lo.tolist() == [0] * 4 + [4] * 6
    assert causal.key_hi.tolist() == [3] * 4 + [9] * 6


def test_supports_on_cpu_and_available_without_gpu():
    inp = Inputs(torch.device("cpu"), torch.bfloat16, 1, 8, 4, 2, 64, 64, 8, False, True, None)
    ok, why = flash.supports(inp)
    assert not ok and "CUDA" in why
    if not torch.cuda.is_available():
        assert flash.available() == (False, "no CUDA GPU")
    assert flash.padded_dim(192, 128) == 192 and flash.padded_dim(20, 16) == 24


def _packed(seed=0, N=24, H=4, G=2, D=8, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, n, D, generator=gen, dtype=torch.float64).to(device, dtype)
            for n in (H, G, G, H)]  # fmt: skip


def _run(q, k, v, do, layout):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o, _ = flash.contained_attention(q, k, v, layout, 0.4)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))


@pytest.mark.parametrize("which", ["q", "k", "v", "do"])
def test_nan_changes_only_the_rows_that_read_it(which, device="cpu", dtype=torch.float64):
    """Two packed sequences, a window of 5, a NaN at row 13 (sequence 1): sequence 0 and the
    rows of sequence 1 that do not read row 13 are bit-identical to a clean run (forward and
    backward); the readers are NaN."""
    bounds, j = [0, 9, 24], 13
    layout = flash.FlashLayout.build(bounds, 5, device)
    clean = _packed(device=device, dtype=dtype)
    dirty = [t.clone() for t in clean]
    dirty["qkvd".index(which[0])][j, 0, 0] = float("nan")
    got, want = _run(*dirty, layout), _run(*clean, layout)
    rows = torch.arange(24, device=device)
    readers = (rows == j) if which in ("q", "do") else ((rows >= j) & (rows <= j + 4))
    read = torch.zeros(24, dtype=torch.bool, device=device)
    for r in rows[readers].tolist():
        read[max(9, r - 4) : r + 1] = True
    o, dq, dk, dv = got
    o0, dq0, dk0, dv0 = want
    assert torch.equal(o[~readers], o0[~readers])
    assert torch.equal(dq[~readers], dq0[~readers])
    assert torch.equal(dk[~read], dk0[~read]) and torch.equal(dv[~read], dv0[~read])
    hit = [0] if which in ("q", "do") else [0, 1]  # head 0 / the heads of group 0
    rest = [h for h in range(4) if h not in hit]
    if which != "do":
        assert torch.isnan(o[readers][:, hit]).all()
    assert torch.equal(o[readers][:, rest], o0[readers][:, rest])  # other heads unaffected
    assert torch.isnan(dq[readers][:, hit]).all()
    assert torch.isnan(dk[read][:, 0]).all() and torch.isnan(dv[read][:, 0]).all()
    if which in ("k", "v"):  # group 1 reads nothing of group 0's keys
        assert torch.equal(dk[:, 1], dk0[:, 1]) and torch.equal(dq[:, 2:], dq0[:, 2:])


# ------------------------------------------------------------------------------------------
# GPU


def _flash_or_skip():
    ok, why = flash.available()
    if not ok:
        pytest.skip(f"no FlashAttention kernel: {why}")


def _dense_window(q, k, v, window, scale, cu):
    """The window branch by the dense oracle (gates (0, 0, 1)), in the inputs' dtype."""
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_top_n=3, window=window)
    gates = torch.zeros(*q.shape[:3], 3, device=q.device, dtype=q.dtype)
    gates[..., 2] = 1
    return dense.nsa_dense(q, k, v, gates, cfg, scale=scale, cu_seqlens=cu).o_win


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "B,T,G,h,Dk,Dv,window,cu",
    [
        (2, 1000, 2, 8, 128, 128, 512, None),
        (1, 1500, 4, 4, 192, 128, 256, [0, 200, 1111, 1500]),
        (1, 300, 1, 2, 64, 64, 1, None),
        (1, 700, 2, 2, 64, 64, 5000, [0, 350, 700]),
    ],
)
def test_window_parity(dtype, B, T, G, h, Dk, Dv, window, cu):
    _flash_or_skip()
    gen = torch.Generator(device="cuda").manual_seed(T + window)
    q, k, v, do = (torch.randn(B, T, n, d, device="cuda", generator=gen).to(dtype)
                   for n, d in ((G * h, Dk), (G, Dk), (G, Dv), (G * h, Dv)))  # fmt: skip
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(Dk)
    rows = cu if cu is not None else [b * T for b in range(B + 1)]
    layout = flash.FlashLayout.build(rows, window, "cuda")

    def run(fn, *ts):
        ts = [t.detach().requires_grad_() for t in ts]
        o = fn(*ts)
        return (o.detach(), *torch.autograd.grad(o, ts, do.to(o.dtype)))

    got = run(lambda a, b, c: flash.window_attention(a, b, c, layout, scale), q, k, v)
    ref = run(lambda a, b, c: _dense_window(a, b, c, window, scale, cu_t), *(t.double() for t in (q, k, v)))  # noqa: E501
    low = run(lambda a, b, c: _dense_window(a, b, c, window, scale, cu_t), q, k, v)
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        bound = lowp_bound(err(low[i], ref[i]), "out" if i == 0 else "grad")
        assert err(got[i], ref[i]) <= bound, f"{name}: {err(got[i], ref[i]):.3g} > {bound:.3g}"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("which", ["q", "k", "v", "do"])
def test_nan_containment_on_the_real_kernel(which):
    """The same property as on CPU, with FlashAttention-2's tiles (128 rows share a tile)."""
    _flash_or_skip()
    test_nan_changes_only_the_rows_that_read_it(which, device="cuda", dtype=torch.bfloat16)
