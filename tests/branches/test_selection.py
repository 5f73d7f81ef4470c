"""nsa_impl.branches.selection: the torch selection paths ("masked", "packed", "varlen").

Oracles: `nsa_ref` (its ``aux.o_sel`` and the gradients through it) and the dense formulation
`conformance.dense` given the block indices (independent of every index trick under test).
Shapes are tiny; ``chunk_slots`` is set small so that the chunk loops, the length buckets and
the varlen/packed split all run several times. The Triton path: tests/kernels/test_triton_sel.py.
"""

from __future__ import annotations

import pytest
import torch

import nsa_ref
from nsa_impl.branches import selection
from nsa_impl.branches.selection import (
    DEFAULT_VARLEN_MIN_L,
    block_ranges,
    flash_varlen_available,
    selection_attention,
)
from nsa_impl.kernels.ops import Inputs
from nsa_impl.tolerances import EXACT_ATOL, FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound
from nsa_ref import NSAConfig, rules

from ..helpers import dense_o_sel, err, grads, inputs, requires_cuda

PATHS = ("masked", "packed", "varlen")
#: Small config with real top-n choice: n=4 of which 3 forced, l'=4, so T=37 has 10 blocks.
CFG = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=4, window=8)
ATOL = {torch.float32: (FP32_OUT_ATOL, FP32_GRAD_ATOL), torch.float64: (EXACT_ATOL, EXACT_ATOL)}


def _qkv(B, T, G, h, Dk, Dv, dtype=torch.float32, seed=0, device="cpu"):
    return inputs(B, T, G, h, Dk, Dv, seed=seed, dtype=dtype, device=device)[:3]


def _check_against(q, k, v, bi, cfg, scale, want=None, want_grads=None, cu=None, **kw):
    """Every path: forward and gradients against the given values (default: the dense oracle)."""
    out_tol, grad_tol = ATOL[q.dtype]
    w = torch.randn(*q.shape[:3], v.shape[-1], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(q)  # fmt: skip
    if want is None:  # the dense oracle in float64 on the same inputs (the exact/fp32 class)
        wide = [t.double() for t in (q, k, v)]
        want, *want_grads = grads(lambda *t: dense_o_sel(*t, bi, cfg, scale, cu), wide, w)
    for path in PATHS:
        got = grads(lambda a, b, c, path=path: selection_attention(
            a, b, c, bi, cfg, scale, cu_seqlens=cu, path=path, **kw), (q, k, v), w)  # fmt: skip
        assert err(got[0], want) <= out_tol, f"{path} o_sel"
        for name, g, ref in zip("qkv", got[1:], want_grads, strict=True):
            assert err(g, ref) <= grad_tol, f"{path} d{name}: {err(g, ref)}"


# --------------------------------------------------------------------------------------------
# block_ranges


def test_block_ranges_merges_exactly_the_selected_keys():
    g = torch.Generator().manual_seed(3)
    R, n = 400, 6
    blocks = torch.randint(-3, 12, (R, n), generator=g)
    blocks[::7] = blocks[::7, :1]  # fully overlapping rows
    blocks[1::7] = -1  # empty rows
    blocks[2::7] = torch.arange(n)  # adjacent blocks: one merged range
    pos = torch.randint(0, 40, (R,), generator=g)
    starts, ends = block_ranges(blocks, CFG, pos)
    assert starts.shape == ends.shape == (R, n) and starts.dtype == torch.int64
    for r in range(R):
        st, en = starts[r].tolist(), ends[r].tolist()
        keys = rules.selected_keys(blocks[r].tolist(), int(pos[r]), CFG)
        used = [(a, b) for a, b in zip(st, en, strict=True) if b > a]
        assert sum((list(range(a, b)) for a, b in used), []) == keys, (r, used, keys)
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(used, used[1:], strict=False))
        assert all(a == b for a, b in zip(st[len(used) :], en[len(used) :], strict=True))
        assert st == sorted(st) and en == sorted(en)
    assert (ends[2::7, 0] == torch.minimum(pos[2::7] + 1, torch.tensor(n * 4))).all()
    assert torch.equal(block_ranges(blocks, 4, pos)[0], starts)  # l' itself works too


def test_block_ranges_broadcasts_positions():
    bi = torch.tensor([[[[0, 2]], [[1, -1]], [[0, 0]]]])  # [1, 3, 1, 2]
    starts, ends = block_ranges(bi, CFG, torch.tensor([5, 6, 2]).view(1, 3, 1))
    assert (ends - starts).sum(-1).flatten().tolist() == [4, 3, 3]


# --------------------------------------------------------------------------------------------
# Parity with nsa_ref (its own block indices)


@pytest.mark.parametrize(
    "h, dtype",
    [(1, torch.float32), (2, torch.float32), (4, torch.float32), (2, torch.float64)],
    ids=["h1-fp32", "h2-fp32", "h4-fp32", "h2-fp64"],
)
def test_paths_match_reference_o_sel_and_grads(h, dtype):
    B, T, G, Dk, Dv = 2, 29, 2, 8, 5  # T not a multiple of l'; Dk != Dv
    q, k, v, gates = inputs(B, T, G, h, Dk, Dv, dtype=dtype, seed=h)
    w = torch.randn(B, T, G * h, Dv, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(dtype)  # fmt: skip
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    _, aux = nsa_ref.nsa_attention(qr, kr, vr, gates, CFG, scale=0.3, return_aux=True)
    ref_grads = torch.autograd.grad((aux.o_sel * w).sum(), (qr, kr, vr))
    assert (aux.block_indices >= 0).sum(-1).max() == CFG.sel_top_n  # top-n really chooses
    _check_against(q, k, v, aux.block_indices, CFG, 0.3, aux.o_sel.detach(), ref_grads,
                   chunk_slots=40, varlen_min_len=9)  # fmt: skip


def test_paths_match_reference_with_cu_seqlens():
    cu = torch.tensor([0, 6, 7, 25, 34], dtype=torch.int32)  # lengths 6, 1, 18, 9
    q, k, v, gates = inputs(1, 34, 2, 2, 6, 4, seed=11)
    _, aux = nsa_ref.nsa_attention(q, k, v, gates, CFG, scale=0.5, cu_seqlens=cu, return_aux=True)
    _check_against(q, k, v, aux.block_indices, CFG, 0.5, cu=cu, chunk_slots=30, varlen_min_len=6)


# --------------------------------------------------------------------------------------------
# Hand-built block indices


def _hand_built(kind, B, T, G, n, ls, seed=0):
    """Block indices exercising one robustness rule (spec I.6, P20)."""
    g = torch.Generator().manual_seed(seed)
    cur = (torch.arange(T) // ls).view(1, T, 1, 1).expand(B, T, G, 1)
    if kind == "duplicates_and_minus_one":  # current block twice, -1 between, unsorted
        bi = torch.cat([cur, -torch.ones_like(cur), cur, (cur - 2).clamp_min(0)], -1)
        return bi[..., torch.randperm(4, generator=g)][..., :n]
    if kind == "all_minus_one":
        return torch.full((B, T, G, n), -1)
    if kind == "zero_ranges":  # only blocks after the current one: nothing is <= p
        return cur + 1 + torch.arange(n)
    if kind == "fully_overlapping":  # n copies of one block
        return torch.randint(0, 3, (B, T, G, 1), generator=g).expand(B, T, G, n).clone()
    if kind == "maximal_coverage":  # every block 0 .. ceil(T/l')-1, in reverse order
        return torch.arange(-(-T // ls) - 1, -1, -1).expand(B, T, G, -1).clone()
    if kind == "garbage":  # anything: negatives, huge, future, repeated
        bi = torch.randint(-4, T // ls + 4, (B, T, G, n), generator=g)
        bi[..., 0] = 10**12
        return bi
    raise ValueError(kind)


KINDS = ("duplicates_and_minus_one", "all_minus_one", "zero_ranges", "fully_overlapping",
         "maximal_coverage", "garbage")  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_hand_built_indices_match_the_dense_oracle(kind):
    B, T, G, h, Dk, Dv = 2, 21, 2, 2, 4, 3
    bi = _hand_built(kind, B, T, G, 4 if kind != "maximal_coverage" else 6, CFG.sel_block)
    q, k, v = _qkv(B, T, G, h, Dk, Dv, seed=7)
    want = dense_o_sel(q, k, v, bi, CFG, 0.6)
    if kind in ("all_minus_one", "zero_ranges"):
        assert not want.any()
    _check_against(q, k, v, bi, CFG, 0.6, chunk_slots=23, varlen_min_len=5)


def test_maximal_coverage_is_causal_attention():
    B, T, G, h = 1, 19, 1, 4
    q, k, v = _qkv(B, T, G, h, 8, 8, seed=4)
    bi = _hand_built("maximal_coverage", B, T, G, 0, CFG.sel_block)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    full = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=0.4)
    for path in PATHS:
        out = selection_attention(q, k, v, bi, CFG, 0.4, path=path, chunk_slots=50)
        assert err(out, full.transpose(1, 2)) <= FP32_OUT_ATOL, path


@pytest.mark.parametrize("cu", [None, torch.tensor([0, 13, 14, 30], dtype=torch.int32)])
def test_causal_prefix_region_is_fixed_and_rows_decide_alone(cu):
    """The prefix region is each sequence's first ``min(len, n * l')`` rows (shapes only); in
    it, exactly the (batch, position, group) rows selecting every key ``0..p`` take the causal
    attention, the others (here one row of one group) the chunks, and every row matches."""
    B, T, G, h = (2 if cu is None else 1), 30, 2, 2
    n = 4
    bi = torch.arange(n).expand(B, T, G, n).clone()  # blocks 0..3 cover keys 0..15
    bi[-1, 9, 1] = torch.tensor([1, 2, 3, -1])  # position 9 (local 9 / 9) misses keys 0..3
    bi[:, 22:] = torch.tensor([0, 2, 3, 5])  # later rows: partial again (sequence 3 at 8+)
    q, k, v = _qkv(B, T, G, h, 8, 8, seed=11)
    bounds = [0, T] if cu is None else cu.tolist()
    assert selection._causal_prefixes(n, CFG.sel_block, bounds) == (
        [16] if cu is None else [13, 1, 16]
    )
    b = torch.tensor(bounds)
    seq_start = torch.repeat_interleave(b[:-1], b.diff())
    positions = torch.arange(T) - seq_start
    work = selection._work(q, k, bi, positions, seq_start, b, "packed", CFG.sel_block, 40, 5)
    want = (positions < 16).view(1, T, 1).expand(B, T, G).clone()
    want[-1, 9, 1] = False
    want[:, 22:] = False  # sequence 3's local rows 8..15 are in its region but partial
    assert torch.equal(work.causal, want)
    _check_against(q, k, v, bi, CFG, 0.5, cu=cu, chunk_slots=40, varlen_min_len=5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("path", ("packed", "varlen"))
def test_other_batch_rows_selections_leave_a_row_bit_identical(path, dtype):
    """Batch row 0 losing a block inside the prefix region (what a NaN in its keys does to its
    top-n) changes nothing of batch row 1, forward or backward, bit for bit (the prefix region
    was once the run common to all batch rows, so row 1's rows changed path: NSA-NAN-ROWS)."""
    B, T, G, h = 2, 40, 2, 2
    q, k, v = (t.to(dtype) for t in _qkv(B, T, G, h, 8, 8, seed=5))
    cur = torch.arange(T) // CFG.sel_block
    recent = torch.stack([torch.zeros_like(cur), cur, cur - 1, cur - 2], -1).clamp(min=0)
    first = torch.arange(4).expand(T, 4)
    bi = torch.where((cur < 4).unsqueeze(-1), first, recent).view(1, T, 1, 4).expand(B, T, G, 4)
    changed = bi.clone()
    changed[0, 5, 0] = -1
    changed[0, 11, 1, 2] = -1
    w = torch.randn(B, T, G * h, 8, generator=torch.Generator().manual_seed(2)).to(dtype)

    def run(indices):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = selection_attention(*leaves, indices, CFG, 0.5, path=path, chunk_slots=64)
        (out * w).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    for name, a, b in zip(("o", "dq", "dk", "dv"), run(bi), run(changed), strict=True):
        assert torch.equal(a[1], b[1]), f"{path} {dtype} {name}"


@pytest.mark.parametrize("path", PATHS)
def test_empty_selection_is_exact_zero_with_zero_grads(path):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 9, 2, 2, 4, 4))
    bi = torch.full((1, 9, 2, 3), -1)
    bi[0, 4, 1, 2] = 1  # one row selects block 1 (keys 4..4 for p = 4)
    out = selection_attention(q, k, v, bi, CFG, 1.0, path=path)
    rows = torch.zeros(9, 2, dtype=torch.bool)
    rows[4, 1] = True
    flat = out.view(9, 2, 2, 4)
    assert torch.equal(flat[~rows], torch.zeros_like(flat[~rows]))
    assert err(flat[4, 1], v[0, 4, 1].expand(2, 4)) <= FP32_OUT_ATOL
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert not q.grad.view(9, 2, 2, 4)[~rows].any()
    assert not k.grad[0, torch.arange(9) != 4].any() and not v.grad[0, torch.arange(9) != 4].any()


@pytest.mark.parametrize("path", PATHS)
def test_future_keys_never_leak_even_when_non_finite(path):
    B, T, G, h = 1, 18, 2, 2
    q, k, v = _qkv(B, T, G, h, 4, 4, seed=9)
    bi = _hand_built("garbage", B, T, G, 5, CFG.sel_block, seed=2)
    p0 = 9  # inside block 2: keys 10, 11 of the current block are in the future of row 9
    base = selection_attention(q, k, v, bi, CFG, 0.5, path=path, chunk_slots=17)
    for bad in (float("nan"), float("inf"), 1e30):
        k2, v2 = k.clone(), v.clone()
        k2[:, p0 + 1 :], v2[:, p0 + 1 :] = bad, -bad
        out = selection_attention(q, k2, v2, bi, CFG, 0.5, path=path, chunk_slots=17)
        assert torch.equal(out[:, : p0 + 1], base[:, : p0 + 1]), f"future value {bad} leaked"


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_float64(path):
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=3, window=4)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 9, 2, 2, 3, 2, torch.float64, seed=5))
    bi = _hand_built("garbage", 1, 9, 2, 4, 2, seed=6)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    for cu_seqlens in (None, cu):

        def fn(a, b, c, cu_seqlens=cu_seqlens):
            return selection_attention(a, b, c, bi, cfg, 0.7, cu_seqlens=cu_seqlens, path=path,
                                       chunk_slots=9, varlen_min_len=3)  # fmt: skip

        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("path", PATHS)
def test_chunking_and_varlen_split_do_not_change_results(path):
    B, T, G, h = 2, 29, 2, 2
    q, k, v = _qkv(B, T, G, h, 8, 8, seed=12)
    bi = _hand_built("garbage", B, T, G, 5, CFG.sel_block, seed=8)
    ref = selection_attention(q, k, v, bi, CFG, 0.35, path="masked")
    for chunk_slots in (1, 13, 10**6):
        for min_len in (0, 4, DEFAULT_VARLEN_MIN_L, 10**9):
            out = selection_attention(q, k, v, bi, CFG, 0.35, path=path, chunk_slots=chunk_slots,
                                      varlen_min_len=min_len)  # fmt: skip
            assert err(out, ref) <= FP32_OUT_ATOL, (path, chunk_slots, min_len)


def test_non_contiguous_inputs():
    q, k, v = _qkv(1, 16, 2, 2, 4, 4, seed=3)
    bi = _hand_built("garbage", 1, 16, 2, 4, CFG.sel_block)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    kt = torch.cat([k, k], dim=-1)[..., :4]
    want = dense_o_sel(q, k, v, bi, CFG, 0.5)
    for path in PATHS:
        assert err(selection_attention(qt, kt, v, bi, CFG, 0.5, path=path), want) <= FP32_OUT_ATOL


def test_bad_inputs_raise():
    q, k, v = _qkv(1, 8, 2, 2, 4, 4)
    bi = torch.zeros(1, 8, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="path"):
        selection_attention(q, k, v, bi, CFG, 1.0, path="gather")  # the former name
    with pytest.raises(ValueError, match="block_indices"):
        selection_attention(q, k, v, bi[:, :4], CFG, 1.0)
    with pytest.raises(TypeError, match="block_indices"):
        selection_attention(q, k, v, bi.float(), CFG, 1.0)
    with pytest.raises(ValueError, match="k must"):
        selection_attention(q, k[:, :, :1].expand(1, 8, 3, 4), v, bi, CFG, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        selection_attention(q, k.double(), v, bi, CFG, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        selection_attention(q, k, v, bi, CFG, 1.0,
                            cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="chunk_slots"):
        selection_attention(q, k, v, bi, CFG, 1.0, chunk_slots=0)


def test_flash_varlen_is_declined_off_gpu_with_a_reason():
    inp = Inputs(torch.device("cpu"), torch.bfloat16, 1, 8, 4, 2, 64, 64, 8, False, True, CFG)
    ok, why = flash_varlen_available(inp)
    assert not ok and "CUDA" in why


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@requires_cuda
def test_cuda_float32_paths_match_the_dense_oracle():
    B, T, G, h = 2, 45, 2, 4
    q, k, v = _qkv(B, T, G, h, 16, 8, seed=2, device="cuda")
    bi = _hand_built("garbage", B, T, G, 5, CFG.sel_block).cuda()
    _check_against(q, k, v, bi, CFG, 0.25, chunk_slots=64, varlen_min_len=9)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_varlen_flash_low_precision(dtype):
    B, T, G, h, D = 1, 300, 2, 8, 64
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=16, sel_top_n=6, window=64)
    q32, k32, v32 = _qkv(B, T, G, h, D, D, seed=5, device="cuda")
    q, k, v = (t.to(dtype) for t in (q32, k32, v32))
    inp = Inputs(q.device, dtype, B, T, G * h, G, D, D, T, False, True, cfg)
    ok, why = flash_varlen_available(inp)
    if not ok:
        pytest.skip(why)
    bi = _hand_built("garbage", B, T, G, 6, cfg.sel_block).cuda()
    w = torch.randn(B, T, G * h, D, device="cuda")
    oracle = lambda *t: dense_o_sel(*t, bi, cfg, 0.125)  # noqa: E731
    ref = grads(oracle, (q.float(), k.float(), v.float()), w)
    naive = grads(oracle, (q, k, v), w)  # the same formulation in the low dtype
    got = grads(lambda a, b, c: selection_attention(a, b, c, bi, cfg, 0.125, path="varlen",
                                                    varlen_min_len=8), (q, k, v), w)  # fmt: skip
    for i, kind in enumerate(("out", "grad", "grad", "grad")):
        bound = lowp_bound(err(naive[i], ref[i]), kind)
        assert err(got[i], ref[i]) <= bound, f"{dtype} item {i}"


def test_a_rows_bucket_depends_on_that_row_alone():
    """The packed/varlen buckets: a row's padded width is its own length rounded up to whole
    selection blocks, and rows filling their width (no mask) are chunked apart, so changing other
    rows' lengths (a NaN in another sequence changes its selections) never changes a row's width
    or mask. Checked on the chunk assignment itself: (width, uniform) per row. (Which chunk a
    row shares with whom still depends on the others; docs/gpu_notes.md.)"""
    from types import SimpleNamespace

    def assignment(lengths, chunk_slots=256):
        rows = SimpleNamespace(ls=16, lengths=torch.tensor(lengths), R=len(lengths))
        member = torch.ones(len(lengths), dtype=torch.bool)
        out = {}
        for c in selection._sorted_chunks(rows, member, "packed", chunk_slots):
            assert c.W % 16 == 0 and c.W * c.rows.numel() <= max(chunk_slots, c.W)
            for r in c.rows.tolist():
                out[r] = (c.W, c.uniform)
        return out

    base = assignment([5, 16, 40, 48, 0, 33, 64, 7])
    assert base == {0: (16, False), 1: (16, True), 2: (48, False), 3: (48, True),
                    5: (48, False), 6: (64, True), 7: (16, False)}  # row 4: L = 0, no chunk
    other = assignment([5, 16, 40, 48, 0, 128, 64, 1])  # rows 5 and 7 changed
    for r in (0, 1, 2, 3, 6):
        assert other[r] == base[r]
