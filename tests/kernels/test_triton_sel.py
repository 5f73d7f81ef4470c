"""nsa_impl.kernels.triton_sel: the Triton selection kernels, forward and backward.

CPU tensors run in Triton's interpreter (the root conftest sets ``TRITON_INTERPRET=1`` without a
GPU), in float32 at the fp32 class (spec I.10) against the dense oracle given the same block
indices: group sizes 1/2/4, ``Dk != Dv``, ``-1`` padding, repeated and unsorted indices,
blocks after the query, packed sequences, empty selections, NaN containment; plus determinism
and `supports`. Every kernel-written buffer is NaN-poisoned first (`nsa_impl.kernels.ops.tuning`),
so an element a kernel forgets to write cannot pass. GPU tests (marked ``gpu``): every dtype,
long sequences (int64 offsets), determinism.
"""

from __future__ import annotations

import math

import pytest
import torch

import nsa_ref
from nsa_impl.kernels.ops import Inputs, tuning
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound
from nsa_ref import NSAConfig

from ..helpers import dense_o_sel, err, requires_cuda

pytestmark = pytest.mark.triton
pytest.importorskip("triton", reason="triton is not installed")
from nsa_impl.kernels import triton_sel  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    with tuning(poison_outputs=True):  # unwritten outputs read as NaN
        yield


def _cfg(sel_block: int) -> NSAConfig:
    """A valid config whose only field the selection reads is ``sel_block``."""
    s = sel_block
    return NSAConfig(cmp_block=s, cmp_stride=s, sel_block=s, window=s)


def _inputs(B, T, G, h, Dk, Dv, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, G * h, Dk, generator=gen, device=device).to(dtype)
    k = torch.randn(B, T, G, Dk, generator=gen, device=device).to(dtype)
    v = torch.randn(B, T, G, Dv, generator=gen, device=device).to(dtype)
    return [t.requires_grad_() for t in (q, k, v)], gen


def _messy_indices(B, T, G, n, sel_block, gen, device="cpu"):
    """Random indices in ``[-1, ceil(T/l'))``: padding, repeats, unsorted, blocks after p."""
    return torch.randint(-1, -(-T // sel_block), (B, T, G, n), generator=gen, device=device)


def _check_parity(q, k, v, idx, sel_block, scale, cu=None, seed=0):
    """The fp32 class: the kernel against the dense oracle run in float64 on the same inputs."""
    o = triton_sel.selection_attention(q, k, v, idx, sel_block, scale, cu)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_o_sel(*wide, idx, _cfg(sel_block), scale, cu)
    assert err(o, ref) <= FP32_OUT_ATOL, f"forward error {err(o, ref):.3g}"
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(ref, wide, do.double())
    for name, a, b in zip("qkv", got, want, strict=False):
        assert err(a, b) <= FP32_GRAD_ATOL, f"d{name} error {err(a, b):.3g} (unwritten?)"
    return o, got


# B, T, G, h, Dk, Dv, n, l', cu_seqlens
CASES = {
    "h2-dk32-dv16": (1, 40, 2, 2, 32, 16, 3, 16, None),
    "h1-batch2-dv32": (2, 70, 1, 1, 16, 32, 4, 16, None),
    "h4-l32-varlen": (1, 100, 2, 4, 32, 16, 3, 32, [0, 37, 100]),
    "h2-varlen-len1": (1, 130, 1, 2, 16, 16, 2, 32, [0, 1, 65, 130]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_messy_indices(case):
    """Forward/backward vs the dense oracle on random indices (padding, repeats, late blocks)."""
    B, T, G, h, Dk, Dv, n, sel, cu = CASES[case]
    (q, k, v), gen = _inputs(B, T, G, h, Dk, Dv, seed=len(case))
    idx = _messy_indices(B, T, G, n, sel, gen)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    _check_parity(q, k, v, idx, sel, 0.3, cu)


def test_parity_with_reference_selection():
    """Indices chosen by `nsa_ref` (gates = selection only): kernel output equals ref ``o``."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=16, sel_top_n=3, window=16)
    (q, k, v), _ = _inputs(1, 64, 2, 2, 32, 16, seed=7)
    gates = torch.zeros(1, 64, 4, 3)
    gates[..., 1] = 1.0
    o_ref, aux = nsa_ref.nsa_attention(q, k, v, gates, cfg, return_aux=True)
    o = triton_sel.selection_attention(q, k, v, aux.block_indices, 16, 1.0 / math.sqrt(32))
    assert err(o, o_ref) <= FP32_OUT_ATOL
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do),
                    torch.autograd.grad(o_ref, (q, k, v), do), strict=False):  # fmt: skip
        assert err(a, b) <= FP32_GRAD_ATOL


def test_duplicates_never_double_count():
    """Repeating every index (and shuffling) gives bit-identical outputs and gradients."""
    (q, k, v), gen = _inputs(1, 48, 1, 4, 16, 16, seed=3)
    idx = torch.randint(0, 3, (1, 48, 1, 2), generator=gen)
    noisy = torch.cat([idx, idx.flip(-1), torch.full_like(idx, -1)], dim=-1)  # [.., 6]
    o1 = triton_sel.selection_attention(q, k, v, idx, 16, 0.25)
    o2 = triton_sel.selection_attention(q, k, v, noisy, 16, 0.25)
    assert torch.equal(o1, o2)
    do = torch.randn_like(o1)
    for a, b in zip(torch.autograd.grad(o1, (q, k, v), do),
                    torch.autograd.grad(o2, (q, k, v), do), strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_empty_selection_is_exact_zero():
    """Rows selecting nothing (all -1, or only blocks after p) give exact 0 and finite grads."""
    (q, k, v), gen = _inputs(1, 40, 2, 2, 16, 32, seed=5)
    idx = torch.randint(0, 3, (1, 40, 2, 2), generator=gen)
    idx[0, :10] = -1  # nothing selected
    idx[0, 10:16] = 2  # block 2 starts at 32 > p: nothing visible
    o, (dq, dk, dv) = _check_parity(q, k, v, idx, 16, 0.25)
    assert torch.equal(o[0, :16], torch.zeros_like(o[0, :16]))
    assert torch.equal(dq[0, :16], torch.zeros_like(dq[0, :16]))


def test_backward_is_deterministic():
    """Two backward passes are bit-identical (no atomics; fixed reduction order)."""
    (q, k, v), gen = _inputs(1, 64, 1, 2, 16, 16, seed=11)
    idx = _messy_indices(1, 64, 1, 3, 16, gen)
    do = torch.randn(1, 64, 2, 16, generator=gen)
    g1, g2 = (torch.autograd.grad(triton_sel.selection_attention(q, k, v, idx, 16, 0.25),
                                  (q, k, v), do) for _ in range(2))  # fmt: skip
    for a, b in zip(g1, g2, strict=False):
        assert torch.equal(a, b)


def _canonical(idx, sel_block, cu=None):
    """``idx`` in the fused top-n kernel's form: each row's distinct blocks at or before its
    own, ascending, valid first and ``-1`` after them (what ``canonical=True`` promises)."""
    B, T = idx.shape[:2]
    bounds = [0, T] if cu is None else cu
    local = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:], strict=False)])
    big = 1 << 30
    s = torch.where((idx >= 0) & (idx * sel_block <= local[None, :, None, None]), idx, big)
    s = s.sort(-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    s = torch.where(dup, big, s).sort(-1).values
    return torch.where(s == big, -1, s)


# B, T, G, h, Dk, Dv, n, l', cu_seqlens: P = 1 (h = 16) and P > 1 (h = 2, 4), packed sequences
CANONICAL_CASES = {
    "h16-P1": (1, 40, 1, 16, 16, 16, 3, 16, None),
    "h16-P1-varlen": (1, 40, 1, 16, 16, 8, 3, 16, [0, 13, 40]),
    "h4-P4-varlen": (1, 64, 2, 4, 16, 16, 3, 16, [0, 23, 64]),
    "h2-batch2": (2, 40, 2, 2, 16, 16, 2, 16, None),
}


@pytest.mark.parametrize("case", list(CANONICAL_CASES))
def test_canonical_indices_skip_the_cleaning_bit_identically(case, monkeypatch):
    """``canonical=True`` (the library's route from the fused top-n) gives outputs and gradients
    bit-identical to the cleaned path on the same canonical indices, without running the
    cleaning."""
    B, T, G, h, Dk, Dv, n, sel, cu = CANONICAL_CASES[case]
    (q, k, v), gen = _inputs(B, T, G, h, Dk, Dv, seed=len(case) + 40)
    idx = _canonical(_messy_indices(B, T, G, n, sel, gen), sel, cu)
    assert (idx[..., 0] >= 0).any() and (idx < 0).any()  # some selections, some padding
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    do = torch.randn(B, T, G * h, Dv, generator=gen)

    def run(indices, canonical):
        o = triton_sel.selection_attention(q, k, v, indices, sel, 0.3, cu_t, canonical=canonical)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    cleaned = run(idx, False)
    with monkeypatch.context() as m:
        m.setattr(triton_sel, "_clean_indices", None)  # calling it would raise TypeError
        fast = run(idx, True)
    for name, a, b in zip(("o", "dq", "dk", "dv"), fast, cleaned, strict=True):
        assert torch.equal(a, b), f"{name}: canonical path differs from the cleaned one"


def test_library_route_hands_canonical_indices_to_the_selection(monkeypatch):
    """The triton route's selection indices come from the fused top-n (`Scores.canonical`), so
    a full call never cleans them; the result equals the cleaned call's bit for bit."""
    import nsa_impl
    from nsa_impl import dispatch

    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=16, sel_top_n=3, window=16)
    (q, k, v), gen = _inputs(1, 48, 1, 16, 16, 16, seed=9)
    gates = torch.rand(1, 48, 16, 3, generator=gen)
    calls = []
    clean = triton_sel._clean_indices
    monkeypatch.setattr(triton_sel, "_clean_indices",
                        lambda *a: calls.append(1) or clean(*a))  # fmt: skip
    with dispatch.force_path(cmp="triton", sel="triton", win="triton"), torch.no_grad():
        _, aux = nsa_impl.nsa_attention(q, k, v, gates, cfg, return_aux=True)
        assert not calls, "the library cleaned indices its own top-n produced"
        o_sel = triton_sel.selection_attention(q, k, v, aux.block_indices, 16, 0.25)
    assert calls, "the public entry point must clean the indices it is given"
    fast = triton_sel.selection_attention(q, k, v, aux.block_indices, 16, 0.25, canonical=True)
    assert torch.equal(fast, o_sel)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_inverse_index_matches_a_loop(chunk):
    """The dK/dV kernel's CSR (`_inverse_index`) against a plain loop: every segment (group,
    global block) lists its tokens in ascending order, cut into items of at most ``chunk``
    entries in segment order; unused item slots are empty with segment -1."""
    cu = [0, 23, 23 + 41, 100]
    N, G, n, sel = 100, 2, 3, 8
    layout = triton_sel.TokenLayout.build(1, N, torch.tensor(cu, dtype=torch.int32), "cpu")
    boff, blk_seq0, blk_local, blk_len = layout.blocks(sel)
    NB = blk_seq0.numel()
    gen = torch.Generator().manual_seed(chunk)
    idx = triton_sel._clean_indices(_messy_indices(1, N, G, n, sel, gen)[0], layout.local, sel)
    ent_pos, item_seg, item_start, item_end, item_off = triton_sel._inverse_index(
        idx, layout.seq, boff, NB, chunk)
    segments = {}
    for t in range(N):
        for g in range(G):
            for b in idx[t, g].tolist():
                if b >= 0:
                    segments.setdefault(g * NB + int(boff[layout.seq[t]]) + b, []).append(t)
    want_items = []
    for seg in range(NB * G):
        tokens = segments.get(seg, [])
        want_items += [(seg, tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)]
    got_items = [(int(sg), ent_pos[a:e].tolist())
                 for sg, a, e in zip(item_seg, item_start, item_end, strict=True) if sg >= 0]
    assert got_items == want_items
    assert item_off.tolist()[-1] == len(want_items)
    assert (item_start[item_seg < 0] == 0).all() and (item_end[item_seg < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["q", "k", "v", "do"])
def test_nan_in_one_sequence_leaves_the_other_bit_identical(which, dtype, device="cpu"):
    """A NaN at one token of sequence 0: sequence 1's outputs and gradients are bit-identical to
    a clean run, so are rows of sequence 0 that do not read the token; its readers are NaN.
    bf16 takes the descriptor (TMA) loads, which read whole blocks, masked rows included."""
    cu = torch.tensor([0, 40, 70], dtype=torch.int32, device=device)
    (q, k, v), gen = _inputs(1, 70, 1, 2, 16, 16, seed=2, dtype=dtype, device=device)
    idx = _messy_indices(1, 70, 1, 3, 16, gen, device=device)
    do = torch.randn(1, 70, 2, 16, generator=gen, device=device).to(dtype)
    j = 20  # block 1 of sequence 0

    def run(q, k, v, do):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = triton_sel.selection_attention(*leaves, idx, 16, 0.3, cu)
        return (o.detach(), *torch.autograd.grad(o, leaves, do))

    clean = run(q, k, v, do)
    tensors = [q.detach().clone(), k.detach().clone(), v.detach().clone(), do.clone()]
    tensors["qkvd".index(which[0])][0, j, 0, 0] = float("nan")
    dirty = run(*tensors)
    pos = torch.arange(70, device=device)
    local = pos - torch.where(pos >= 40, 40, 0)
    blocks = idx[0, :, 0]  # [T, n] (G = 1)
    has_keys = ((blocks >= 0) & (blocks * 16 <= local[:, None])).any(-1)
    selects = (blocks == 1).any(-1) & (pos >= j) & (pos < 40)  # rows that read token j
    readers = ((pos == j) & has_keys) if which in ("q", "do") else selects
    for a, b in zip(dirty, clean, strict=True):
        assert torch.equal(a[0, 40:], b[0, 40:])  # the other sequence: bit-identical
    assert torch.equal(dirty[0][0, ~readers], clean[0][0, ~readers])
    assert torch.equal(dirty[1][0, ~readers], clean[1][0, ~readers])
    hit = slice(0, 1) if which in ("q", "do") else slice(None)  # head 0 / both heads of g
    if readers.any() and which != "do":
        assert torch.isnan(dirty[0][0, readers, hit]).all()


def _launch(q, k, v, idx, sel, tma):
    """Outputs and gradients with the K/V blocks loaded through descriptors (``tma=1``) or
    masked pointer loads (``tma=0``)."""
    with tuning(sel={"tma": tma}):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = triton_sel.selection_attention(*leaves, idx, sel, 0.3)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9)).to(o.dtype)
        return (o.detach(), *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_descriptor_loads_equal_masked_loads(case, dtype):
    """The forward's and dQ's K/V blocks through tensor descriptors (whole blocks, rows outside
    the range included) give bit-identical outputs and gradients to masked loads, with a
    non-finite k and v at some tokens (whose readers turn NaN in both)."""
    B, T, G, h, Dk, Dv, n, sel, cu = CASES[case]
    (q, k, v), gen = _inputs(B, T, G, h, Dk, Dv, seed=len(case), dtype=dtype)
    idx = _messy_indices(B, T, G, n, sel, gen)
    k, v = k.detach().clone(), v.detach().clone()
    k[0, T // 3, 0, 1] = float("inf")
    v[0, T // 2, -1, 0] = float("nan")
    tn = triton_sel.launch_shape(h, sel, Dk, Dv, ieee=False)
    flat = k.reshape(B * T, G, Dk), v.reshape(B * T, G, Dv)
    assert triton_sel._kv_descriptors(*flat, tn)[2], "the descriptor path was not taken"
    with_tma, without = _launch(q, k, v, idx, sel, 1), _launch(q, k, v, idx, sel, 0)
    assert torch.isnan(with_tma[0]).any()  # the non-finite tokens have readers
    for name, a, b in zip(("o", "dq", "dk", "dv"), with_tma, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


def test_supports_reasons():
    """`supports` declines with a reason, never raises."""

    def inp(**kw):
        base = dict(device=torch.device("cpu"), dtype=torch.float32, B=1, T=4, H=2, G=1, Dk=16,
                    Dv=16, max_seqlen=4, varlen=False, backward=True, cfg=None)  # fmt: skip
        base.update(kw)
        return Inputs(**base)

    assert triton_sel.supports(inp())[0]
    for kw, word in ((dict(dtype=torch.float64), "dtype"), (dict(Dk=8), "Dk=8"),
                     (dict(Dv=512), "Dv=512"), (dict(device=torch.device("meta")), "meta")):
        ok, why = triton_sel.supports(inp(**kw))
        assert not ok and word in why, (kw, why)


def test_bad_shapes_raise():
    q = torch.zeros(1, 4, 3, 16)
    k = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        triton_sel.selection_attention(q, k, k, torch.zeros(1, 4, 2, 1, dtype=torch.long), 16)


# ------------------------------------------------------------------------------------------
# GPU


def _random_indices(B, T, G, n, sel, gen):
    from bench.workloads import random_block_indices

    return random_block_indices(B, T, G, n, sel, generator=gen, device="cuda")


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))


# name: (B, T, G, h, Dk, Dv, n, l', cu_seqlens)
SHAPES = {
    "h16-128": (1, 1536, 2, 16, 128, 128, 16, 64, None),
    "h4-192-128": (1, 1300, 4, 4, 192, 128, 8, 64, [0, 300, 1037, 1300]),
    "h1-64": (2, 777, 2, 1, 64, 64, 6, 32, None),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_parity_per_dtype(shape, dtype):
    """Outputs and q/k/v gradients vs a float64 reference (spec I.10 classes); the naive
    same-dtype twin is the dense formulation in the kernel's dtype."""
    B, T, G, h, Dk, Dv, n, sel, cu = SHAPES[shape]
    (q, k, v), gen = _inputs(B, T, G, h, Dk, Dv, seed=list(SHAPES).index(shape), dtype=dtype,
                             device="cuda")  # fmt: skip
    idx = _random_indices(B, T, G, n, sel, gen)
    idx[..., -1] = idx[..., 0]  # a repeated block must not count twice
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(Dk)
    do = torch.randn(B, T, G * h, Dv, device="cuda", generator=gen).to(dtype)
    oracle = lambda a, b, c: dense_o_sel(a, b, c, idx, _cfg(sel), scale, cu)  # noqa: E731
    ref = _grads(oracle, q.double(), k.double(), v.double(), do.double())
    got = _grads(lambda a, b, c: triton_sel.selection_attention(a, b, c, idx, sel, scale, cu),
                 q, k, v, do)  # fmt: skip
    if dtype == torch.float32:
        bounds = [FP32_OUT_ATOL] + [FP32_GRAD_ATOL] * 3
    else:
        low = _grads(oracle, q, k, v, do)
        bounds = [lowp_bound(err(x, r), "out" if i == 0 else "grad")
                  for i, (x, r) in enumerate(zip(low, ref, strict=False))]  # fmt: skip
    for name, x, r, bound in zip(("o", "dq", "dk", "dv"), got, ref, bounds, strict=False):
        assert err(x, r) <= bound, f"{name}: {err(x, r):.3g} > {bound:.3g}"


def _row_oracle(q, k, v, idx, rows, sel, scale, dtype=torch.float64):
    """Selection attention of the given rows (B = 1, one sequence), gathered from nsa_ref's
    rules, in ``dtype`` (float64: the reference; the inputs' dtype: the naive twin)."""
    G = k.shape[2]
    h = q.shape[2] // G
    cfg = _cfg(sel)
    out = []
    for p in rows:
        heads = []
        for g in range(G):
            keys = nsa_ref.rules.selected_keys(idx[0, p, g].tolist(), p, cfg)
            kk = torch.tensor(keys, device=q.device, dtype=torch.long)
            logits = (q[0, p, g * h:(g + 1) * h].to(dtype) * scale) @ k[0, kk, g].to(dtype).T
            heads.append(torch.softmax(logits, -1) @ v[0, kk, g].to(dtype))
        out.append(torch.cat(heads))
    return torch.stack(out)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("T,G,h,Dk,Dv", [(65536, 2, 4, 64, 64), (131072, 4, 16, 256, 256)],
                         ids=["T64k", "T128k-int64-offsets"])  # fmt: skip
def test_long_sequence_index_bounds(T, G, h, Dk, Dv):
    """Long T: sampled rows (the last ones included) meet the low-precision criterion.

    The 128k case has ``T * H * Dk = 2^31`` elements in q: any int32 row offset would overflow.
    """
    free, _ = torch.cuda.mem_get_info()
    need = T * G * h * Dk * 2 * 4 + T * G * (Dk + Dv) * 2 * 4
    if free < need * 2:
        pytest.skip(f"needs ~{2 * need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} free")
    (q, k, v), gen = _inputs(1, T, G, h, Dk, Dv, seed=T % 97, dtype=torch.bfloat16, device="cuda")
    idx = _random_indices(1, T, G, 16, 64, gen)
    scale = 1.0 / math.sqrt(Dk)
    o = triton_sel.selection_attention(q, k, v, idx, 64, scale)
    rows = [0, 1, 63, 64, 4097, T // 2 + 5, T - 65, T - 2, T - 1]
    ref = _row_oracle(q.detach(), k.detach(), v.detach(), idx, rows, 64, scale)
    low = _row_oracle(q.detach(), k.detach(), v.detach(), idx, rows, 64, scale, dtype=q.dtype)
    assert err(o[0, rows], ref) <= lowp_bound(err(low, ref), "out")
    do = torch.zeros_like(o)
    do[0, -1] = 1.0  # a gradient on the last row only reaches q at that row
    (dq,) = torch.autograd.grad(o, (q,), do)
    assert torch.isfinite(dq).all()
    assert dq[0, :-1].abs().max().item() == 0.0 and dq[0, -1].abs().max().item() > 0.0


@pytest.mark.gpu
@requires_cuda
def test_backward_deterministic_and_nan_contained_on_gpu():
    (q, k, v), gen = _inputs(1, 4096, 2, 8, 128, 128, seed=1, dtype=torch.bfloat16, device="cuda")
    idx = _random_indices(1, 4096, 2, 16, 64, gen)
    do = torch.randn(1, 4096, 16, 128, device="cuda", generator=gen).to(torch.bfloat16)
    run = lambda a, b, c: triton_sel.selection_attention(a, b, c, idx, 64)  # noqa: E731
    g1, g2 = _grads(run, q, k, v, do), _grads(run, q, k, v, do)
    for a, b in zip(g1, g2, strict=False):
        assert torch.equal(a, b)
    for which in ("q", "k", "v", "do"):
        for dtype in (torch.float32, torch.bfloat16):  # masked loads; descriptor (TMA) loads
            test_nan_in_one_sequence_leaves_the_other_bit_identical(which, dtype, device="cuda")


def test_descriptor_loads_are_declined_where_they_do_not_fit():
    """`_kv_descriptors` keeps masked loads for float32, head dims not a power of two,
    non-contiguous rows, a base not 16-byte aligned and ``tma=0``."""
    tn = triton_sel.launch_shape(4, 16, 32, 32, ieee=False)
    N, G, D = 40, 2, 32

    def fits(k, v, shape=tn):
        return triton_sel._kv_descriptors(k, v, shape)[2]

    k = torch.randn(N, G, D).bfloat16()
    assert fits(k, k.clone())
    assert not fits(k.float(), k.float())
    assert not fits(torch.randn(N, G, 24).bfloat16(), torch.randn(N, G, 24).bfloat16())
    assert not fits(k.transpose(0, 1).contiguous().transpose(0, 1), k)
    shifted = torch.randn(N * G * D + 1).bfloat16()[1:].view(N, G, D)  # 2 bytes off
    assert shifted.data_ptr() % 16 and not fits(shifted, k)
    assert not fits(k, k, triton_sel.LaunchShape(**{**tn.__dict__, "tma": 0}))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_descriptor_loads_equal_masked_loads_on_gpu(dtype):
    """On the GPU (TMA bulk copies on sm_90): bit-identical to masked loads, packed sequences,
    a non-finite k and v included."""
    if not triton_sel._has_tma(torch.device("cuda")):
        pytest.skip("no TMA on this GPU (compute capability < 9.0): nothing to compare")
    T, G, h, D = 1536, 2, 16, 128
    (q, k, v), gen = _inputs(1, T, G, h, D, D, seed=4, dtype=dtype, device="cuda")
    idx = _random_indices(1, T, G, 16, 64, gen)
    cu = torch.tensor([0, 700, T], dtype=torch.int32, device="cuda")
    k, v = k.detach().clone(), v.detach().clone()
    k[0, 300, 0, 5] = float("inf")
    v[0, 1000, 1, 7] = float("nan")
    do = torch.randn(1, T, G * h, D, device="cuda", generator=gen).to(dtype)
    runs = []
    for tma in (1, 0):
        with tuning(sel={"tma": tma}):
            runs.append(_grads(lambda a, b, c: triton_sel.selection_attention(
                a, b, c, idx, 64, None, cu), q, k, v, do))  # fmt: skip
    assert torch.isnan(runs[0][0]).any()
    for name, a, b in zip(("o", "dq", "dk", "dv"), *runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("cu", [None, [0, 5, 6, 23]])
def test_token_layout_keeps_the_tile_geometry_it_was_built_with(cu):
    """A plan's `TokenLayout` holds the query tiles of its tile size and the block geometry of
    its l' (so a call does not rebuild them), equal to the ones computed on demand; another size
    is computed, not stored."""
    B, T = (2, 23) if cu is None else (1, 23)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    kept = triton_sel.TokenLayout.build(B, T, cu_t, "cpu", (4,), 8)
    fresh = triton_sel.TokenLayout.build(B, T, cu_t, "cpu")
    assert kept.tiles(4) is kept.geometry["tiles", 4] and not fresh.geometry
    assert kept.blocks(8) is kept.geometry["blocks", 8]
    for a, b in zip(kept.tiles(4) + kept.blocks(8), fresh.tiles(4) + fresh.blocks(8),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    tstart, trows, tseq = kept.tiles(4)
    bounds = [0, T] if cu is None else cu
    lengths = [T] * B if cu is None else [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    assert int(trows.sum()) == B * T and int((trows > 0).sum()) == sum(-(-n // 4) for n in lengths)
    assert ("tiles", 2) not in kept.geometry
    assert kept.tiles(2)[0].numel() == -(-B * T // 2) + len(lengths)
    boff, blk_seq0, blk_local, blk_len = kept.blocks(8)  # blocks of 8 keys per sequence
    assert boff.tolist()[-1] == sum(-(-n // 8) for n in lengths)
    used = blk_len > 0  # blk_len: the block's sequence length (0 for the spare slots)
    assert int(used.sum()) == boff.tolist()[-1] and int(blk_local[used].max()) < -(-T // 8)
