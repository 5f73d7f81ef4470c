"""Triton selection attention (spec I.6, Eq. 12), forward and backward: the ``triton`` path.

``selection_attention(q, k, v, block_indices, sel_block, scale, cu_seqlens=None) -> o``
computes, for every query position ``p`` and KV group ``g``, attention of the ``h`` query heads
of ``g`` over exactly the keys ``s <= p`` of the blocks listed in ``block_indices[p, g]``
(``-1`` and repeated entries ignored, an empty selection gives exact zeros). With ``cu_seqlens``
positions and block indices are local to each packed sequence. Gradients flow to q, k and v.

Design (why it looks like this)
-------------------------------
*Forward: group-centric query tiles packed along M.* A program owns one KV group ``g`` and a
tile of ``P`` consecutive query positions of one sequence; its ``M = P*h`` rows are the ``h``
query heads of ``g`` at those positions (the paper's group-centric load: the heads of a group
share every K/V block read). ``P = max(1, 16 // h)``, so a group of ``h = 1, 2, 4, 8`` heads
still fills the 16 rows that a tensor-core MMA needs instead of padding ``h`` rows to 16. The
program loops over the *union* of the tile's selected blocks (deduplicated with torch sorts
before the launch, which is also what makes duplicate indices harmless), and masks per row the
blocks that row's position did not select plus the keys after it. With ``h >= 16`` a tile is a
single position and this is exactly the paper's kernel. Packing never costs more than padding:
in the worst case (neighbouring positions select disjoint blocks) a tile does ``P`` positions'
block loads with full 16-row MMAs, the same work as ``P`` padded programs; whenever neighbours
share blocks (forced initial/local blocks always, learned selections mostly) each shared block
is loaded once for all of them. We chose this over the FSA paper's KV-block-outer forward
(arXiv 2508.18224) because FSA needs a partial-output buffer of ``T*n*H*Dv`` floats plus a
reduction (34 GB at T=64k, 64 heads, n=16): the query-tile design needs no buffer and keeps the
online softmax in registers. Softmax is online in float32; masked scores are ``-inf``.

*Backward.* dQ uses the forward's tiling, recomputes probabilities from the saved log-sum-exp
and also writes ``delta = rowsum(dO * O)`` for its rows. dK/dV use an inverse index (CSR built
with a stable torch sort and a fixed-size scatter count): for every (selection block, group) the
positions that selected it.
A program owns one K/V block chunk and a run of at most ``CH`` of those positions, gathering
``QB*h`` query rows per step (``QB*h = 64``, whatever ``h``). Its partial dK/dV go to a float32
buffer and a second kernel adds a segment's partials in a fixed order: no atomics, bit-identical
results run to run. Splitting long segments matters because the forced block 0 is selected by
every position of a sequence.

*Loads.* On Hopper (and in the interpreter), fp16/bf16 forward and dQ kernels read each K/V
block chunk through a tensor descriptor (one TMA bulk copy of ``[BN, D]`` per operand, no
per-element address or mask arithmetic; power-of-two head dims). The copy reads the whole
chunk, rows a query may not see included: those scores are never selected, and the operand
they could poison is clean (``v`` in the forward, ``k`` in the backward), so the results are
bit-identical to masked loads (``LaunchShape.tma = 0``; a CPU test compares the two).

*Numerics and bounds.* fp16/bf16 inputs run the MMAs in that dtype with float32 accumulation;
float32 inputs use IEEE float32 dots (``input_precision="ieee"``), float64 for the logits and
libdevice ``exp``/``log`` so the float32 path meets the fp32 class of spec I.10 (a float32
``q.k`` over 128 dims alone rounds logits by ~1e-6). Positions, row offsets and sequence
starts are int64 inside the kernels (T >= 128k does not overflow ``row * stride``).

*No host sync.* Every index tensor (tiles, unions, the inverse index) is sized by an upper
bound known from the shapes, counts are scatter-adds into fixed-size buffers, and the token
layout (`TokenLayout`) is built once per plan; a forward+backward reads no device value.

*Custom ops.* The launches are ``nsa::sel_forward`` / ``nsa::sel_backward``
(`nsa_impl.kernels.ops.kernel_op`); the index set-up around them is plain PyTorch, traced by
``torch.compile``. The autograd Function saves only tensors (``torch.func`` compatible).

*NaN containment.* Masked keys contribute exactly nothing: scores and probabilities are
selected with ``tl.where``, and the operands that products contract over masked entries are
cleaned once per call, before the launches (`nsa_impl.kernels.ops.nan_to_zero`: ``v`` in
the forward, ``q``, ``k`` and the dK/dV kernel's ``dO`` in the backward), so the kernels' loops
carry no containment code (cleaning every tile inside them cost 2.5x on an H200). The forward
reads keys poisoned (`nsa_impl.kernels.ops.poison`) where ``v`` is not finite: a
row that reads a non-finite ``v`` gets a NaN score, so a NaN output and log-sum-exp; in the
backward a row whose ``dO`` or ``O`` is not finite has a NaN ``delta``, which makes its dK/dV
probabilities NaN. Other rows are bit-identical to a run without the non-finite value.

Interpreter: ``triton.jit`` picks compiled or interpreted code when a function is decorated,
so the kernels live in `nsa_impl.kernels._sel_kernels` and are executed lazily, once per mode:
CUDA tensors get compiled kernels, CPU tensors (only with ``TRITON_INTERPRET=1``) interpreted
ones, in one process, whatever was imported first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace

import torch

from ._loader import load_kernel_module
from .ops import (
    TUNING,
    Inputs,
    autocast_off_backward,
    finite_rows,
    kernel_op,
    nan_to_zero,
    new_output,
    poison,
    record_launch,
)

#: Head dims the kernels accept (tl.dot needs K >= 16; 256 keeps a tile in registers).
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BIG = torch.iinfo(torch.int32).max  # sorts after every real block index


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def triton_available() -> tuple[bool, str]:
    """Whether ``import triton`` works here, and why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, "triton importable"


def supports(inp: Inputs) -> tuple[bool, str]:
    """Can these kernels run this problem? ``(ok, reason)``, never raises.

    Checks triton, the dtype (fp16, bf16, fp32), head dims ``16..256`` (``Dk != Dv`` allowed)
    and the device (CUDA with compute capability >= 8.0; CPU tensors run in Triton's
    interpreter, which the dispatcher allows only when forced with ``TRITON_INTERPRET=1``).
    """
    ok, why = triton_available()
    if not ok:
        return False, why
    if inp.dtype not in _DTYPES:
        return False, f"dtype {inp.dtype} not supported (fp16, bf16, fp32)"
    for name, d in (("Dk", inp.Dk), ("Dv", inp.Dv)):
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            return False, f"{name}={d} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if inp.device_type == "cpu":
        return True, "CPU tensors, Triton interpreter"
    if inp.device_type != "cuda":
        return False, f"device {inp.device_type} not supported"
    if getattr(torch.version, "hip", None):
        return False, "ROCm is not tested for these kernels"
    major, minor = torch.cuda.get_device_capability(inp.device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 (bf16 tensor cores needed)"
    return True, f"CUDA sm_{major}{minor}"


# --------------------------------------------------------------------------------------------
# Lazy kernel loading (compiled vs interpreted)
# --------------------------------------------------------------------------------------------


def _kernels(interpret: bool):
    """`_sel_kernels` executed in the given mode (cached; see the module docstring)."""
    return load_kernel_module("_sel_kernels.py", interpret)


# --------------------------------------------------------------------------------------------
# Layout: tokens, tiles, unions, inverse index (torch, no host sync)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLayout:
    """Per-token sequence geometry on the device (batch rows become sequences).

    Attributes: ``cu`` int64 ``[S+1]`` boundaries, ``seq``/``seq_start``/``local`` int64 ``[N]``
    each token's sequence, its start and its position inside it. Built by `build` with torch
    ops on the device (no sync); a plan builds it once.
    """

    cu: torch.Tensor
    seq: torch.Tensor
    seq_start: torch.Tensor
    local: torch.Tensor
    #: ``("tiles", P)`` -> `_tile_geometry`, ``("blocks", l')`` -> `_block_geometry`: what
    #: `build` was asked to precompute
    geometry: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, B: int, T: int, cu_seqlens: torch.Tensor | None, device,
              tile_positions: tuple[int, ...] = (),
              sel_block: int | None = None) -> TokenLayout:  # fmt: skip
        """Layout of ``B`` rows of ``T`` tokens, or of ``cu_seqlens`` sequences (``B == 1``);
        with the query-tile geometry of each tile size in ``tile_positions`` and the block
        geometry of ``sel_block`` (a plan passes its own, so a call does not rebuild them:
        about 25 small ops forward, 15 backward, one of them a searchsorted)."""
        if cu_seqlens is None:
            cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.int64)
        tok = torch.arange(B * T, device=device, dtype=torch.int64)
        seq = torch.searchsorted(cu[1:], tok, right=True)
        start = cu[seq]
        layout = cls(cu, seq, start, tok - start)
        for P in tile_positions:
            layout.geometry["tiles", P] = _tile_geometry(layout, P)
        if sel_block is not None:
            layout.geometry["blocks", sel_block] = _block_geometry(layout, sel_block)
        return layout

    def tiles(self, P: int):
        """`_tile_geometry` of tile size ``P``: built with the layout, else computed now."""
        got = self.geometry.get(("tiles", P))
        return got if got is not None else _tile_geometry(self, P)

    def blocks(self, sel_block: int):
        """`_block_geometry` of ``l' = sel_block``: built with the layout, else computed now."""
        got = self.geometry.get(("blocks", sel_block))
        return got if got is not None else _block_geometry(self, sel_block)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """CSR offsets: ``[0, c0, c0 + c1, ...]`` (int64, one longer than ``counts``)."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    out[1:] = torch.cumsum(counts, 0)
    return out


def _clean_indices(idx: torch.Tensor, local: torch.Tensor, sel: int) -> torch.Tensor:
    """``[N, G, n]`` -> int32, sorted per row, -1 for padding, repeats and blocks after ``p``.

    A block ``b`` with ``b * l' > p`` holds no visible key, so dropping it changes nothing.
    """
    idx = idx.to(torch.int64)
    valid = (idx >= 0) & (idx * sel <= local[:, None, None])
    s, _ = torch.sort(torch.where(valid, idx, -1), dim=-1)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    return torch.where(dup, -1, s).to(torch.int32)


def _tile_geometry(L: TokenLayout, P: int):
    """Query tiles of ``P`` positions that never cross a sequence: ``(tstart int64, trows
    int32, tseq int64)`` ``[NT]`` (first token, rows, sequence start) with ``NT = ceil(N/P) +
    S`` (an upper bound known without a host sync; unused tiles have zero rows)."""
    N = L.local.numel()
    dev = L.local.device
    S = L.cu.numel() - 1
    lens = L.cu[1:] - L.cu[:-1]
    ntile = (lens + P - 1) // P
    toff = _offsets(ntile)
    NT = -(-N // P) + S
    seq = L.seq
    first = L.local % P == 0
    tid = torch.where(first, toff[seq] + L.local // P, NT)  # non-first tokens -> dummy slot
    tstart = torch.zeros(NT + 1, dtype=torch.int64, device=dev)
    tseq = torch.zeros(NT + 1, dtype=torch.int64, device=dev)
    trows = torch.zeros(NT + 1, dtype=torch.int64, device=dev)
    tok = torch.arange(N, device=dev)
    tstart.scatter_(0, tid, tok)
    tseq.scatter_(0, tid, L.seq_start)
    trows.scatter_(0, tid, torch.clamp(lens[seq] - L.local, max=P))
    return tstart[:NT], trows[:NT].to(torch.int32), tseq[:NT]  # int32: what the kernels read


def _tiles(idx: torch.Tensor, L: TokenLayout, P: int):
    """The query tiles (`_tile_geometry`) and each tile's block union.

    Returns ``(tstart int64, trows int32, tseq int64, union int32 [NT, G, P*n], count int32
    [NT, G])``; unused tiles have an empty union.
    """
    N, G, n = idx.shape
    dev = idx.device
    tstart, trows, tseq = L.tiles(P)
    NT = tstart.numel()
    if P == 1:
        # A tile is a token (tile id == token id): the cleaned row, valid blocks first.
        union = torch.full((NT, G, n), _BIG, dtype=torch.int64, device=dev)
        union[:N], _ = torch.sort(torch.where(idx >= 0, idx.to(torch.int64), _BIG), dim=-1)
    else:
        rows = tstart[:, None] + torch.arange(P, device=dev)  # [NT, P]
        ok = torch.arange(P, device=dev)[None, :] < trows[:, None]
        blocks = idx[torch.where(ok, rows, 0)]  # [NT, P, G, n]
        blocks = torch.where(ok[:, :, None, None] & (blocks >= 0), blocks, _BIG)
        union = blocks.permute(0, 2, 1, 3).reshape(NT, G, P * n)
        union, _ = torch.sort(union, dim=-1)
        dup = torch.zeros_like(union, dtype=torch.bool)
        dup[..., 1:] = union[..., 1:] == union[..., :-1]
        union, _ = torch.sort(torch.where(dup, _BIG, union), dim=-1)
    count = (union != _BIG).sum(-1).to(torch.int32)
    union = union.to(torch.int32).contiguous()
    return tstart, trows, tseq, union, count.contiguous()


def _canonical_tiles(idx: torch.Tensor, L: TokenLayout, P: int):
    """`_tiles` of canonical indices (`selection_attention`'s ``canonical``): with ``P == 1`` a
    row's valid blocks already are its union, so ``union`` is ``idx`` itself (tile id ==
    token id, the ``S`` trailing dummy tiles have count 0 and are never read) and only the
    counts are computed: 3 ops instead of the cleaning's sort and ~30 ops."""
    if P != 1:
        return _tiles(idx, L, P)  # the union of several rows still needs its sort
    N, G, _ = idx.shape
    tstart, trows, tseq = L.tiles(P)
    count = torch.zeros(tstart.numel(), G, dtype=torch.int32, device=idx.device)
    count[:N] = (idx >= 0).sum(-1, dtype=torch.int32)
    return tstart, trows, tseq, idx, count  # idx: int32 already (selection_attention)


def _block_geometry(L: TokenLayout, sel: int):
    """Selection blocks of every sequence, numbered globally (block ``b`` of sequence ``i`` is
    ``gb = boff[i] + b``): ``(boff int64 [S+1], blk_seq0 int64, blk_local int32, blk_len
    int64)``, the last three ``[NB]`` with ``NB = ceil(N / l') + S`` (an upper bound known
    without a host sync; unused blocks have length 0). Shapes only: a plan builds it once."""
    N = L.local.numel()
    dev = L.local.device
    cu = L.cu
    S = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    boff = _offsets((lens + sel - 1) // sel)
    NB = -(-N // sel) + S
    gb = torch.arange(NB, device=dev)
    bseq = torch.clamp(torch.searchsorted(boff[1:].contiguous(), gb, right=True), max=S - 1)
    blk_seq0 = cu[bseq]
    blk_local = (gb - boff[bseq]).to(torch.int32)
    blk_len = torch.where(gb < boff[S], lens[bseq], 0)
    return boff, blk_seq0.contiguous(), blk_local.contiguous(), blk_len.contiguous()


def _inverse_index(idx: torch.Tensor, seq: torch.Tensor, boff: torch.Tensor, NB: int,
                   chunk: int):  # fmt: skip
    """CSR of (selection block, group) -> positions that selected it, split into work items.

    Segment ``g * NB + gb`` lists, in ascending position order, the tokens whose selection for
    group ``g`` holds global block ``gb`` (`_block_geometry`). Each segment is cut into items
    of at most ``chunk`` entries. Everything is sized by upper bounds and found by binary
    searches in sorted arrays (segment starts in the sorted keys, each item's segment in the
    item offsets), so no host sync is needed and only the sort and three ops touch every entry.

    Returns ``(ent_pos, item_seg, item_start, item_end, item_off)``: each entry's token, each
    item's segment (``-1`` for unused items), first and end entry, and the items' offsets per
    segment.
    """
    N, G, n = idx.shape
    dev = idx.device
    NBG = NB * G
    # Entries: every (token, group, slot) with a valid block; key NBG sorts after all segments.
    base = (torch.arange(G, device=dev) * NB)[None, :, None] + boff[seq][:, None, None]
    key, order = torch.sort(torch.where(idx >= 0, base + idx, NBG).reshape(-1), stable=True)
    ent_pos = torch.div(order, G * n, rounding_mode="floor")  # token of each entry
    seg_off = torch.searchsorted(key, torch.arange(NBG + 1, device=dev))  # first entry >= seg
    item_off = _offsets((seg_off[1:] - seg_off[:-1] + (chunk - 1)) // chunk)
    W = -(-(N * G * n) // chunk) + NBG  # items: an upper bound
    w = torch.arange(W, device=dev)
    seg = torch.searchsorted(item_off, w, right=True) - 1  # NBG for the unused items
    used = seg < NBG
    segc = torch.clamp(seg, max=NBG - 1)
    start = seg_off[segc] + (w - item_off[segc]) * chunk
    end = torch.minimum(start + chunk, seg_off[segc + 1])
    return (
        ent_pos, torch.where(used, segc, -1), torch.where(used, start, 0),
        torch.where(used, end, 0), item_off,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launch parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchShape:
    """Tile sizes and launch options; `launch_shape` picks them from the shapes."""

    P: int  # query positions per forward/dQ tile
    BM: int  # rows per forward/dQ tile (P*h padded to a power of two)
    BN: int  # keys per chunk in forward/dQ
    QB: int  # positions per step in dK/dV
    BR: int  # rows per step in dK/dV (QB*h padded)
    BKEY: int  # keys per dK/dV program
    CH: int  # max positions per dK/dV work item
    warps_fwd: int  # forward kernel
    warps_dq: int  # dQ kernel
    warps_bwd: int  # dK/dV kernel
    stages_fwd: int  # software-pipelining depth of the forward loop
    stages_dq: int
    stages_kv: int
    tma: int  # 1: forward and dQ load K/V blocks through tensor descriptors where they fit

    def as_list(self) -> list[int]:
        """The fields in declaration order (how the custom ops take them)."""
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values: list[int]) -> LaunchShape:
        """Inverse of `as_list`."""
        return cls(*values)


def launch_shape(h: int, sel: int, dk: int, dv: int, ieee: bool) -> LaunchShape:
    """Tile sizes for group size ``h``, ``l' = sel`` and the head dims.

    Measured on an H100 (docs/gpu_notes.md): the forward is bound by L2 bandwidth and
    insensitive to warps/stages; the dK/dV kernel holds two [BKEY, D] float32 accumulators and
    runs best with ``num_stages=1`` (fewer register spills). Float32 inputs (the parity path,
    float64 logits and dK/dV sums) use smaller tiles so the float64 operands fit in shared memory.
    `nsa_impl.kernels.ops.TUNING` ``.sel`` overrides fields (benchmarks).
    """
    P = max(1, 16 // h)
    BM = max(16, _next_pow2(P * h))
    big = _next_pow2(dk) + _next_pow2(dv) > 256
    if ieee:  # float64 operands: halve the tiles again for head dims above 128
        rows = 16 if max(_next_pow2(dk), _next_pow2(dv)) > 128 else 32
        BN, QB, BKEY = min(rows, max(16, _next_pow2(sel))), max(1, rows // h), 16
    else:
        BN, QB = min(64, max(16, _next_pow2(sel))), max(1, 64 // h)
        BKEY = min(32 if big else 64, max(16, _next_pow2(sel)))
    BR = max(16, _next_pow2(QB * h))
    tn = LaunchShape(
        P=P, BM=BM, BN=BN, QB=QB, BR=BR, BKEY=BKEY, CH=1024,
        # dK/dV: 4 warps at every head dim (192/128 at 64k on an H200: 8 warps 95.3 ms backward,
        # 4 warps 74.1; bench/sel_sweep.py --dims, session 5)
        warps_fwd=4 if BM <= 32 else 8, warps_dq=4 if BM <= 32 else 8, warps_bwd=4,
        stages_fwd=1 if ieee else 2, stages_dq=1 if ieee else 2, stages_kv=1, tma=1,
    )  # fmt: skip
    if TUNING.sel:
        tn = replace(tn, **TUNING.sel)
        tn = replace(tn, BM=max(16, _next_pow2(tn.P * h)), BR=max(16, _next_pow2(tn.QB * h)))
    return tn


def _launch_opts(warps: int, stages: int, interpret: bool) -> dict:
    return {} if interpret else dict(num_warps=warps, num_stages=stages)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Tensor-memory-accelerator copies: Hopper (sm_90) and later; the interpreter emulates them."""
    if device.type == "cpu":
        return True
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, tn: LaunchShape):
    """``(kd, vd, True)``: descriptors of ``k [N,G,Dk]`` and ``v`` as ``[N, G*D]`` with
    ``[BN, D]`` boxes (`_sel_kernels._kv_chunk`); ``(k, v, False)`` where they do not fit:
    ``tma=0``, no TMA on the device, a head dim not a power of two, rows not contiguous or
    not 16-byte aligned (a descriptor's base must be), or float32 (the parity path keeps its
    masked loads; its boxes would be twice as wide)."""
    dk, dv = k.shape[-1], v.shape[-1]
    fits = (
        tn.tma and k.element_size() == 2 and _has_tma(k.device)
        and _next_pow2(dk) == dk and _next_pow2(dv) == dv
        and k.is_contiguous() and v.is_contiguous()
        and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0
    )  # fmt: skip
    if not fits:
        return k, v, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, G = k.shape[0], k.shape[1]
    kd = TensorDescriptor.from_tensor(k.view(N, G * dk), [tn.BN, dk])
    vd = TensorDescriptor.from_tensor(v.view(N, G * dv), [tn.BN, dv])
    return kd, vd, True


# --------------------------------------------------------------------------------------------
# The kernel ops
# --------------------------------------------------------------------------------------------


def _forward_fake(q, k, v, idx, union, count, tstart, trows, tseq, scale, sizes, launch):
    N, H, _ = q.shape
    return q.new_empty(N, H, v.shape[-1]), q.new_empty(N, H, dtype=torch.float32)


@kernel_op("sel_forward", _forward_fake)
def sel_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    union: torch.Tensor,
    count: torch.Tensor,
    tstart: torch.Tensor,
    trows: torch.Tensor,
    tseq: torch.Tensor,
    scale: float,
    sizes: list[int],
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N,H,Dk], k [N,G,Dk], v [N,G,Dv]`` -> ``o [N,H,Dv]``, ``lse [N,H]`` (float32).

    ``sizes = [h, n, sel]``; ``launch`` is a `LaunchShape` as a list.
    """
    h, n, sel = sizes
    tn = LaunchShape.from_list(launch)
    interpret = q.device.type == "cpu"
    kern = _kernels(interpret)
    N, H, DK = q.shape
    G, DV = k.shape[1], v.shape[-1]
    o = new_output(N, H, DV, like=q)
    lse = new_output(N, H, like=q, dtype=torch.float32)
    k, v = poison(k, ~finite_rows(v)), nan_to_zero(v)  # NaN containment (`_sel_kernels`)
    kd, vd, tma = _kv_descriptors(k, v, tn)
    grid = (tstart.numel(), G)
    handle = kern._sel_fwd_kernel[grid](
        q, k, v, kd, vd, o, lse, idx, union, count, tstart, trows, tseq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), idx.stride(0), idx.stride(1),
        union.stride(0), union.stride(1), lse.stride(0),
        scale, G,
        h=h, P=tn.P, BM=tn.BM, NSEL=n, NP=max(2, _next_pow2(n)),
        SEL=sel, BN=tn.BN, DK=DK, DV=DV, BDK=max(16, _next_pow2(DK)),
        BDV=max(16, _next_pow2(DV)), IEEE=q.dtype == torch.float32,
        PRECISE=q.dtype == torch.float32 and not interpret, TMA=tma,
        **_launch_opts(tn.warps_fwd, tn.stages_fwd, interpret),
    )  # fmt: skip
    record_launch("fwd", handle)
    return o, lse


def _backward_fake(do, q, k, v, o, lse, idx, union, count, tstart, trows, tseq, ent_pos,
                   item_seg, item_start, item_end, item_off, blk_seq0, blk_local, blk_len,
                   scale, sizes, launch):  # fmt: skip
    # contiguous, like the real outputs (a fake must match their strides, not the inputs')
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("sel_backward", _backward_fake)
def sel_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    idx: torch.Tensor,
    union: torch.Tensor,
    count: torch.Tensor,
    tstart: torch.Tensor,
    trows: torch.Tensor,
    tseq: torch.Tensor,
    ent_pos: torch.Tensor,
    item_seg: torch.Tensor,
    item_start: torch.Tensor,
    item_end: torch.Tensor,
    item_off: torch.Tensor,
    blk_seq0: torch.Tensor,
    blk_local: torch.Tensor,
    blk_len: torch.Tensor,
    scale: float,
    sizes: list[int],
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of `sel_forward` (deterministic, no atomics).

    ``sizes = [h, n, sel, NB]``; the inverse index comes from `_inverse_index`.
    """
    h, n, sel, NB = sizes
    tn = LaunchShape.from_list(launch)
    interpret = q.device.type == "cpu"
    kern = _kernels(interpret)
    N, H, DK = q.shape
    G, DV = k.shape[1], v.shape[-1]
    BDK, BDV = max(16, _next_pow2(DK)), max(16, _next_pow2(DV))
    IEEE = q.dtype == torch.float32
    PRECISE = IEEE and not interpret
    delta = torch.empty(N, H, device=q.device, dtype=torch.float32)  # written by the dQ kernel
    dq = new_output(*q.shape, like=q)
    # NaN containment (`_sel_kernels`): the products read cleaned q and k; the dQ kernel's delta
    # comes from the raw dO, the dK/dV products read a cleaned one.
    q, k = nan_to_zero(q), nan_to_zero(k)
    kd, vd, tma = _kv_descriptors(k, v, tn)
    handle = kern._sel_dq_kernel[(tstart.numel(), G)](
        q, k, v, kd, vd, o, do, dq, lse, delta, idx, union, count, tstart, trows, tseq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        idx.stride(0), idx.stride(1), union.stride(0), union.stride(1), lse.stride(0),
        scale, G,
        h=h, P=tn.P, BM=tn.BM, NSEL=n, NP=max(2, _next_pow2(n)),
        SEL=sel, BN=tn.BN, DK=DK, DV=DV, BDK=BDK, BDV=BDV, IEEE=IEEE, PRECISE=PRECISE,
        TMA=tma, **_launch_opts(tn.warps_dq, tn.stages_dq, interpret),
    )  # fmt: skip
    record_launch("dq", handle)
    W = item_seg.numel()
    SELP = -(-sel // tn.BKEY) * tn.BKEY
    part_dtype = torch.float64 if IEEE else torch.float32  # see _sel_kernels._acc_zeros
    part_k = torch.empty(W, SELP, BDK, device=q.device, dtype=part_dtype)
    part_v = torch.empty(W, SELP, BDV, device=q.device, dtype=part_dtype)
    nkc = SELP // tn.BKEY
    do = nan_to_zero(do)
    handle = kern._sel_dkdv_kernel[(W, nkc)](
        q, k, v, do, lse, delta, part_k, part_v,
        ent_pos, item_seg, item_start, item_end, blk_seq0, blk_local, blk_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), lse.stride(0), part_k.stride(0), part_v.stride(0),
        scale, NB,
        h=h, QB=tn.QB, BR=tn.BR, SEL=sel, BKEY=tn.BKEY, DK=DK, DV=DV,
        BDK=BDK, BDV=BDV, IEEE=IEEE, PRECISE=PRECISE,
        **_launch_opts(tn.warps_bwd, tn.stages_kv, interpret),
    )  # fmt: skip
    record_launch("dkdv", handle)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    kern._sel_reduce_kernel[(NB * G, nkc)](
        part_k, part_v, dk, dv, item_off, blk_seq0, blk_local,
        blk_len, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        part_k.stride(0), part_v.stride(0), NB,
        SEL=sel, BKEY=tn.BKEY, DK=DK, DV=DV, BDK=BDK, BDV=BDV, IEEE=IEEE,
        **_launch_opts(4, 2, interpret),
    )  # fmt: skip
    return dq, dk, dv


class _SelectionAttention(torch.autograd.Function):
    """Autograd wrapper of the two ops: flattened ``[N, heads, dim]`` tensors in, ``o`` out.

    Saves only tensors; the inverse index is built in the backward (it is needed only there).
    """

    @staticmethod
    def forward(q, k, v, idx, union, count, tstart, trows, tseq, seq, boff, blk_seq0, blk_local,
                blk_len, scale, sizes, launch):  # fmt: skip
        o, lse = sel_forward(q, k, v, idx, union, count, tstart, trows, tseq, scale, sizes,
                             launch)  # fmt: skip
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, scale, sizes, launch = inputs
        q, k, v, *layout = tensors  # idx, union, count, tstart, trows, tseq, seq, the blocks
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, *layout)
        ctx.mark_non_differentiable(lse)
        ctx.scale, ctx.sizes, ctx.launch = scale, sizes, launch

    @staticmethod
    @autocast_off_backward
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, idx, union, count, tstart, trows, tseq, seq, *blocks = ctx.saved_tensors
        boff, blk_seq0, blk_local, blk_len = blocks
        h, n, sel = ctx.sizes
        tn = LaunchShape.from_list(ctx.launch)
        NB = blk_seq0.numel()
        with torch.no_grad():  # the backward op has no derivative of its own
            inv = _inverse_index(idx, seq, boff, NB, tn.CH)
            dq, dk, dv = sel_backward(
                do.contiguous(), q, k, v, o, lse, idx, union, count, tstart, trows, tseq,
                *inv, blk_seq0, blk_local, blk_len, ctx.scale, [h, n, sel, NB], ctx.launch,
            )  # fmt: skip
        return dq, dk, dv, *([None] * 14)


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    sel_block: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    layout: TokenLayout | None = None,
    canonical: bool = False,
) -> torch.Tensor:
    """Selection-branch attention (Eq. 12, spec I.6) with the Triton kernels.

    Args:
        q: ``[B, T, H, Dk]`` queries; ``H = G * h``.
        k, v: ``[B, T, G, Dk]`` / ``[B, T, G, Dv]``.
        block_indices: ``[B, T, G, n]`` integer block indices (local to each sequence), ``-1``
            padded; repeats and blocks after the query are ignored.
        sel_block: ``l'``, keys per selection block.
        scale: softmax scale (default ``1/sqrt(Dk)``).
        cu_seqlens: optional int32 ``[S+1]`` packed-sequence boundaries (requires ``B == 1``).
        layout: the `TokenLayout` of these shapes (a plan's); built here when ``None``.
        canonical: the caller guarantees ``block_indices`` in the fused top-n kernel's form
            (`nsa_impl.kernels.triton_topn`: each row's blocks distinct and at or before the
            row's own block, valid entries first, ``-1`` after them). The per-call cleaning
            (a sort and ~30 small ops) is then skipped; other indices give wrong results, so
            only the library's own producers set it.

    Returns:
        ``o [B, T, H, Dv]`` in q's dtype, differentiable with respect to q, k and v.

    Raises:
        ValueError: on inconsistent shapes; callers should consult `supports` first.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or block_indices.dim() != 4:
        raise ValueError("q, k, v, block_indices must be 4-D")
    B, T, H, DK = q.shape
    G, DV = k.shape[2], v.shape[3]
    if k.shape[:2] != (B, T) or v.shape[:3] != (B, T, G) or k.shape[3] != DK:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if G == 0 or H % G:
        raise ValueError(f"H={H} must be a multiple of G={G}")
    if block_indices.shape[:3] != (B, T, G):
        raise ValueError(
            f"block_indices {tuple(block_indices.shape)} must be [B, T, G, n] = [{B}, {T}, {G}, n]"
        )
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens requires B == 1, got B={B}")
    if int(sel_block) <= 0:
        raise ValueError(f"sel_block must be positive, got {sel_block}")
    scale = 1.0 / math.sqrt(DK) if scale is None else float(scale)
    h, n, sel = H // G, block_indices.shape[-1], int(sel_block)
    N = B * T
    if layout is None:
        layout = TokenLayout.build(B, T, cu_seqlens, q.device)
    tn = launch_shape(h, sel, DK, DV, q.dtype == torch.float32)
    if canonical:
        # int32 like the cleaned indices: the kernels see the same operands either way
        idx = block_indices.reshape(N, G, n).to(torch.int32)
        tstart, trows, tseq, union, count = _canonical_tiles(idx, layout, tn.P)
    else:
        idx = _clean_indices(block_indices.reshape(N, G, n).to(q.device), layout.local, sel)
        tstart, trows, tseq, union, count = _tiles(idx, layout, tn.P)
    o, _ = _SelectionAttention.apply(
        q.reshape(N, H, DK).contiguous(), k.reshape(N, G, DK).contiguous(),
        v.reshape(N, G, DV).contiguous(), idx, union, count, tstart, trows, tseq,
        layout.seq, *layout.blocks(sel), scale, [h, n, sel], tn.as_list(),
    )  # fmt: skip
    return o.reshape(B, T, H, DV)
