"""The compressed branch and the selection scores on a GPU: the kernels of the ``flash`` cmp path.

``compressed_and_select`` computes what the masked path does (spec I.3-I.5, Eqs. 8-11) and
returns ``(o_cmp, block_indices, p_slc, p_cmp)``, in two steps:

1. ``o_cmp`` and each row's log-sum-exp from **one causal FlashAttention-2 call**. Query ``p``
   sees the compressed blocks ``0 .. (p + 1 - l) // d``, so the ``d`` consecutive rows
   ``p = l - 1 + m*d + r`` (``r < d``) all see blocks ``0..m``: call them query group ``m``. A
   sequence has exactly as many groups as compressed blocks, and group ``m`` attending causally
   to blocks ``<= m`` is Eq. 8 exactly. FlashAttention gets the groups as its sequence axis and
   the ``d`` rows of a group as extra query heads of the same KV head (GQA), i.e.
   ``q [groups, G*h*d, Dk]`` against ``k_cmp [N, G, Dk]`` (`QueryPacking`). It returns the
   log-sum-exp, is causal-block-skipping, has a backward, and takes ``cu_seqlens`` (one
   FlashAttention sequence per packed sequence). Rows ``p < l - 1`` see no block: exact zeros
   (selected). NaN containment is `nsa_impl.kernels.flash`'s.
2. The scores ``P [B, G, rows, S]`` (Eqs. 9-10) from a Triton kernel that recomputes the logits
   band by band and exponentiates them against the log-sum-exp (``_cmp_kernels``), selecting the
   visible blocks: ``p_cmp [B, H, T, N]`` never exists in memory. Then the top-n of Eq. 11 by a
   second kernel (the rule of `nsa_impl.scoring.top_n`). Rows are processed in chunks whose
   float32 score buffer fits the budget. Both kernels are custom ops (``nsa::cmp_scores``,
   ``nsa::top_n``).

`FlashCmpLayout` holds everything the call needs on the device (the packing, FlashAttention's
group boundaries, the score tiles of every row chunk), built once on the host by a plan: the
path does no host work and no device sync per call. On CPU tensors (tests, under
``TRITON_INTERPRET=1``) the kernels run in Triton's interpreter and FlashAttention's function
in dense PyTorch. ``p_cmp`` is materialised only for ``want_aux``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import flash
from ._loader import load_kernel_module
from .ops import TUNING, Inputs, kernel_op
from .triton_sel import triton_available

#: Default byte budget of one row chunk's float32 score buffer ``[B, G, c, S]``.
DEFAULT_BUDGET_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}
#: Scores one top-n program holds (rows x padded blocks), and the widest row it takes.
TOP_N_TILE, MAX_TOP_N_BLOCKS = 4096, 16384
#: FlashAttention launches one CUDA block row per query head (grid limit 65535).
MAX_PACKED_HEADS = 65535
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _num_cmp(p: int, cfg) -> int:
    return 0 if p + 1 < cfg.cmp_block else (p + 1 - cfg.cmp_block) // cfg.cmp_stride + 1


def supports(inp: Inputs) -> tuple[bool, str]:
    """Can this path run the compressed branch of ``inp``? ``(ok, reason)``, never raises.

    Needs triton (the scoring kernels), ``Dk, Dv <= 256``, at least one compressed block,
    ``H * d`` packed heads within FlashAttention's grid, at most `MAX_TOP_N_BLOCKS` selection
    blocks per row, and CUDA (compute capability >= 8.0, fp16/bf16, FlashAttention-2) or CPU
    tensors (fp16/bf16/fp32: the interpreter, for tests).
    """
    ok, why = triton_available()
    if not ok:
        return False, why
    if max(inp.Dk, inp.Dv) > flash.MAX_HEAD_DIM:
        return False, f"Dk={inp.Dk}, Dv={inp.Dv}: FlashAttention-2 takes head dims <= 256"
    cfg = inp.cfg
    if _num_cmp(inp.max_seqlen - 1, cfg) == 0:
        return False, "no row sees a compressed block yet (every sequence shorter than l)"
    if inp.H * cfg.cmp_stride > MAX_PACKED_HEADS:
        return False, f"H * d = {inp.H * cfg.cmp_stride} packed heads > {MAX_PACKED_HEADS}"
    if -(-inp.max_seqlen // cfg.sel_block) > MAX_TOP_N_BLOCKS:
        return False, f"more than {MAX_TOP_N_BLOCKS} selection blocks per row (top-n kernel)"
    if inp.device_type == "cpu":
        if inp.dtype not in _CPU_DTYPES:
            return False, f"dtype {inp.dtype} not supported (fp16, bf16, fp32)"
        return True, "CPU tensors: Triton interpreter, attention in dense PyTorch"
    if inp.device_type != "cuda" or getattr(torch.version, "hip", None):
        return False, f"device {inp.device_type} not supported"
    if inp.dtype not in _FLASH_DTYPES:
        return False, f"dtype {inp.dtype}: FlashAttention-2 runs fp16/bf16 only"
    major, minor = torch.cuda.get_device_capability(inp.device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return flash.available()


def _kernels(interpret: bool):
    """`_cmp_kernels` executed in the given mode (compiled or interpreted), cached."""
    return load_kernel_module("_cmp_kernels.py", interpret)


# --------------------------------------------------------------------------------------------
# Layout (host work, once per plan)


@dataclass(frozen=True)
class QueryPacking:
    """Which query row sits in which slot of the packed causal attention (module docstring).

    Slot ``(m, r)`` of (global) query group ``m`` holds row ``l - 1 + m'*d + r`` of that
    group's sequence, ``m'`` the group's index inside it. Group ``m`` is compressed block ``m``
    (blocks are numbered sequence by sequence), the last one its rows see.

    Attributes (host tensors):
        src: int64 ``[groups, d]``: the row of each slot (slots past a sequence's end repeat
            its last row; their outputs are never read).
        group, slot: int64 ``[T]``: each row's group (``-1``: the row sees no block) and its
            ``r`` inside the group.
        bounds: group boundaries of the sequences that have groups (host ints).
    """

    src: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    bounds: tuple[int, ...]

    @classmethod
    def build(cls, cfg, bounds, lo: torch.Tensor, hi: torch.Tensor) -> QueryPacking:
        """From the row's sequence ``bounds`` and each row's visible compressed blocks
        ``[lo, hi)`` (a `nsa_impl.branches.compressed.CmpLayout`'s ranges)."""
        l, d = cfg.cmp_block, cfg.cmp_stride
        b = torch.tensor(list(bounds), dtype=torch.long)
        starts, ends = b[:-1], b[1:]
        counts = torch.tensor([_num_cmp(n - 1, cfg) for n in b.diff().tolist()], dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        local = torch.arange(seq.numel()) - (torch.cumsum(counts, 0) - counts)[seq]
        row = starts[seq, None] + (l - 1) + local[:, None] * d + torch.arange(d)  # [groups, d]
        src = torch.minimum(row, ends[seq, None] - 1)
        group = torch.where(hi > lo, hi - 1, -1)
        pos = torch.arange(int(b[-1])) - torch.repeat_interleave(starts, b.diff())
        slot = (pos - (l - 1)).clamp(min=0) % d
        cu = torch.cumsum(torch.cat([counts.new_zeros(1), counts[counts > 0]]), 0)
        return cls(src, group, slot, tuple(cu.tolist()))


@dataclass(frozen=True)
class ScoreChunk:
    """One row chunk ``[r0, r1)`` of the scoring pass: its ``S`` columns and kernel tiles
    (device int64 tile start rows, row counts and compressed-block offsets)."""

    r0: int
    r1: int
    S: int
    start: torch.Tensor
    rows: torch.Tensor
    cmp0: torch.Tensor


@dataclass(frozen=True)
class FlashCmpLayout:
    """Everything `compressed_and_select` needs on the device, built once by `build`.

    Attributes:
        src, group, slot: `QueryPacking` on the device (``src`` flattened).
        flash: the FlashAttention layout of the ``B * groups`` packed query groups (causal).
        count, block, lo: int64 ``[T]``: visible compressed blocks, current selection block
            ``b(p)``, first visible block of each row.
        chunks: the scoring pass's row chunks.
        block_m, block_n: the scoring kernel's tile (rows x compressed-block columns).
    """

    src: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    flash: flash.FlashLayout
    count: torch.Tensor
    block: torch.Tensor
    lo: torch.Tensor
    chunks: tuple[ScoreChunk, ...]
    block_m: int
    block_n: int

    @classmethod
    def build(cls, cfg, bounds, pos, lo, hi, *, B: int, G: int, device,
              budget_bytes: int | None = None, block_m: int | None = None,
              block_n: int | None = None) -> FlashCmpLayout:  # fmt: skip
        """Host-side geometry for one row of sequences ``bounds`` repeated over ``B`` batch
        rows: local positions ``pos`` and visible compressed blocks ``[lo, hi)`` (host int64
        ``[T]``), ``G`` KV groups. Tiles default to `TUNING.score`; the score budget to
        `DEFAULT_BUDGET_BYTES`."""
        block_m = TUNING.score["block_m"] if block_m is None else int(block_m)
        block_n = TUNING.score["block_n"] if block_n is None else int(block_n)
        packing = QueryPacking.build(cfg, bounds, lo, hi)
        N = int(hi.max()) if hi.numel() else 0  # compressed blocks of the row (all sequences)
        group_bounds = [0] + [c + b * N for b in range(B) for c in packing.bounds[1:]]
        T = pos.numel()
        S_all = -(-(int(pos.max()) + 1) // cfg.sel_block)
        budget = DEFAULT_BUDGET_BYTES.get(torch.device(device).type, DEFAULT_BUDGET_BYTES["cuda"])
        budget = budget if budget_bytes is None else int(budget_bytes)
        step = max(1, budget // max(1, 4 * B * G * S_all))
        chunks = []
        seq_b = torch.tensor(list(bounds), dtype=torch.long)
        for r0 in range(0, T, step):
            r1 = min(T, r0 + step)
            # Columns past the chunk's last current block are 0 and never candidates.
            S = int(pos[r0:r1].max()) // cfg.sel_block + 1
            start, rows, cmp0 = _tiles(seq_b, lo, r0, r1, block_m)
            chunks.append(ScoreChunk(r0, r1, S, start.to(device), rows.to(device), cmp0.to(device)))
        return cls(
            packing.src.reshape(-1).to(device),
            packing.group.to(device),
            packing.slot.to(device),
            flash.FlashLayout.build(group_bounds, None, device),
            (hi - lo).to(device),
            (pos // cfg.sel_block).to(device),
            lo.to(device),
            tuple(chunks),
            block_m,
            block_n,
        )


def _tiles(bounds: torch.Tensor, lo: torch.Tensor, r0: int, r1: int, bm: int):
    """Row tiles of ``[r0, r1)`` that never cross a sequence: start row, rows, cmp offset."""
    a, b = bounds[:-1].clamp(r0, r1), bounds[1:].clamp(r0, r1)
    ntile = (b - a + bm - 1) // bm
    seq = torch.repeat_interleave(torch.arange(ntile.numel()), ntile)
    first = torch.cumsum(ntile, 0) - ntile
    start = a[seq] + (torch.arange(seq.numel()) - first[seq]) * bm
    rows = torch.minimum(b[seq] - start, torch.tensor(bm))
    return start, rows, lo[start]


# --------------------------------------------------------------------------------------------
# Step 1: compressed attention as causal attention over query groups


def cmp_attention(q, k_cmp, v_cmp, cfg, layout: FlashCmpLayout, scale: float):
    """``o_cmp [B, T, H, Dv]`` (autograd) and the log-sum-exp ``[B, H, T]`` float32 (detached).

    ``k_cmp/v_cmp [B, N, G, D]`` with ``N >= 1``. Rows that see no compressed block give exact
    zeros (selected; their log-sum-exp is meaningless and unused: the scores mask those rows).
    """
    B, T, H, Dk = q.shape
    N, G, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    h, d = H // G, cfg.cmp_stride
    # [B, N*d slots, H, Dk] (one row gather) -> [B*N groups, (g, slot, head) heads, Dk]: GQA
    # major, so each KV head serves its own d*h packed query heads.
    qs = q.index_select(1, layout.src).view(B, N, d, G, h, Dk)
    qp = qs.transpose(2, 3).reshape(B * N, G * d * h, Dk)
    kp, vp = k_cmp.reshape(B * N, G, Dk), v_cmp.reshape(B * N, G, Dv)
    op, lse = flash.causal_attention_lse(qp, kp, vp, layout.flash, scale)
    # Back to rows: slots in row order again, then each row picks its slot; no slot -> 0.
    at = layout.group.clamp(min=0) * d + layout.slot  # the row's slot
    o = op.view(B, N, G, d, h, Dv).transpose(2, 3).reshape(B, N * d, H, Dv).index_select(1, at)
    o_cmp = torch.where((layout.group >= 0).view(1, T, 1, 1), o, 0.0)
    lse_rows = lse.view(G, d, h, B * N).permute(3, 1, 0, 2).reshape(B, N * d, H)[:, at]
    return o_cmp, lse_rows.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Step 2: selection scores from recomputed logits (Eqs. 9-10), then top-n (Eq. 11)


def _launch_options() -> dict:
    opts = {"num_warps": TUNING.score["warps"]}
    if TUNING.score["stages"] is not None:
        opts["num_stages"] = TUNING.score["stages"]
    return opts


def _scores_fake(q, k_cmp, lse, start, rows, cmp0, count, r0, r1, S, sizes, scale):
    return q.new_empty(q.shape[0], k_cmp.shape[2], r1 - r0, S, dtype=torch.float32)


@kernel_op("cmp_scores", _scores_fake)
def cmp_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    start: torch.Tensor,
    rows: torch.Tensor,
    cmp0: torch.Tensor,
    count: torch.Tensor,
    r0: int,
    r1: int,
    S: int,
    sizes: list[int],
    scale: float,
) -> torch.Tensor:
    """Eqs. 9-10 for rows ``[r0, r1)``: float32 ``[B, G, r1 - r0, S]`` (local block indices).

    ``sizes = [sel_block, cmp_block, cmp_stride, block_m, block_n]``; ``lse [B, H, T]`` comes
    from `cmp_attention`; the tiles from the chunk's `ScoreChunk`.
    """
    ls, l, d, block_m, block_n = sizes
    B, _, H, Dk = q.shape
    G = k_cmp.shape[2]
    R, M = ls // d, l // d
    bn = max(block_n, 16, 1 << (R + M - 2).bit_length())  # one selection block + its halo fits
    bs = (bn - (M - 1)) // R
    bsp = max(16, 1 << (bs - 1).bit_length())
    out = torch.empty(B, G, r1 - r0, S, dtype=torch.float32, device=q.device)
    grid = (start.numel(), B * G, -(-S // bs))
    interpret = q.device.type == "cpu"
    _kernels(interpret)._slc_scores_kernel[grid](
        q, k_cmp, lse, out, start, rows, cmp0, count,
        q.stride(0), q.stride(1), q.stride(2),
        k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        r0, S, G, float(scale),
        H_PER_G=H // G, DK=Dk, BD=max(16, 1 << (Dk - 1).bit_length()),
        BM=block_m, BN=bn, BS=bs, BSP=bsp, R=R, M=M, IEEE=q.dtype == torch.float32,
        **({} if interpret else _launch_options()),
    )  # fmt: skip
    return out


def _top_n_fake(scores, block, n, init, local):
    B, G, rows, _ = scores.shape
    return scores.new_empty(B, rows, G, n, dtype=torch.int64)


@kernel_op("top_n", _top_n_fake)
def top_n(scores: torch.Tensor, block: torch.Tensor, n: int, init: int, local: int) -> torch.Tensor:
    """Eq. 11 (the rule of `nsa_impl.scoring.top_n`) as a Triton kernel: ``[B, rows, G, n]``.

    ``scores [B, G, rows, S]`` float32 (contiguous rows, ``S <= MAX_TOP_N_BLOCKS``), ``block
    [rows]`` each row's current block. One program holds ``BR`` rows of ``S`` scores and takes
    ``n`` argmax rounds (no sort over ``S``).
    """
    B, G, rows, S = scores.shape
    if S > MAX_TOP_N_BLOCKS:
        raise ValueError(f"top_n kernel takes at most {MAX_TOP_N_BLOCKS} blocks per row, got {S}")
    out = torch.empty(B, rows, G, n, dtype=torch.int64, device=scores.device)
    sp = max(16, 1 << (S - 1).bit_length())
    br = max(1, min(64, TOP_N_TILE // sp))
    interpret = scores.device.type == "cpu"
    _kernels(interpret)._top_n_kernel[(-(-rows // br), B * G)](
        scores, block, out,
        scores.stride(0), scores.stride(1), scores.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        rows, S, G,
        N_TOP=n, NP=max(16, 1 << (n - 1).bit_length()), INIT=init,
        LOCAL=local, BR=br, SP=sp,
    )  # fmt: skip
    return out


def aux_p_cmp(q, k_cmp, lse, lo, count, cfg, scale: float):
    """``p_cmp [B, T, H, num_cmp(T-1)]`` (local block index) from the log-sum-exp (aux only).

    ``lse [B, H, T]``; ``lo``/``count`` int64 ``[T]`` on the device: each row's first visible
    compressed block and how many it sees. Shared by the "triton" compressed path.
    """
    B, T, H, _ = q.shape
    N, h = k_cmp.shape[1], H // k_cmp.shape[2]
    kh = k_cmp.repeat_interleave(h, dim=2).transpose(1, 2).float()
    s = torch.matmul(q.transpose(1, 2).float() * scale, kh.transpose(-1, -2))
    n_loc = _num_cmp(T - 1, cfg)
    i = torch.arange(n_loc, device=q.device)
    idx = (lo[:, None] + i).clamp(max=N - 1).expand(B, H, T, n_loc)
    visible = i < count[:, None]
    p = torch.exp(s - lse[..., None]).gather(-1, idx).masked_fill_(~visible, 0.0)
    return p.permute(0, 2, 1, 3).to(q.dtype)


def compressed_and_select(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cfg,
    scale: float,
    layout: FlashCmpLayout,
    *,
    want_aux: bool = False,
):
    """The compressed branch and the selection of Eqs. 8-11 (module docstring).

    ``q [B, T, H, Dk]``, ``k_cmp/v_cmp [B, N, G, D]`` (``N >= 1``). Returns ``(o_cmp,
    block_indices [B, T, G, n] int64, p_slc, p_cmp)``; the last two are ``None`` unless
    ``want_aux``. The selection is detached (top-n is discrete).
    """
    B, T, H, _ = q.shape
    G = k_cmp.shape[2]
    o_cmp, lse = cmp_attention(q, k_cmp, v_cmp, cfg, layout, scale)
    sizes = [cfg.sel_block, cfg.cmp_block, cfg.cmp_stride, layout.block_m, layout.block_n]
    picked, p_slc = [], None
    with torch.no_grad():
        qd, kd = q.detach(), k_cmp.detach()
        if want_aux:
            p_slc = q.new_zeros(B, T, G, -(-T // cfg.sel_block))
        for c in layout.chunks:
            scores = cmp_scores(qd, kd, lse, c.start, c.rows, c.cmp0, layout.count, c.r0, c.r1,
                                c.S, sizes, float(scale))  # fmt: skip
            picked.append(top_n(scores, layout.block[c.r0 : c.r1], cfg.sel_top_n,
                                cfg.sel_init_blocks, cfg.sel_local_blocks))  # fmt: skip
            if want_aux:
                p_slc[:, c.r0 : c.r1, :, : c.S] = scores.permute(0, 2, 1, 3)
        block_indices = torch.cat(picked, dim=1)
        p_cmp = aux_p_cmp(qd, kd, lse, layout.lo, layout.count, cfg, scale) if want_aux else None
    return o_cmp, block_indices, p_slc, p_cmp
