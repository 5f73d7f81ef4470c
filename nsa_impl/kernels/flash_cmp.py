"""The compressed branch and the selection scores on a GPU: the ``flash`` path of "cmp".

``compressed_and_select`` has the contract of `nsa_impl.scoring.compressed_and_select` (spec
I.3-I.5, Eqs. 8-11) and returns the same `nsa_impl.scoring.Scores`, in two steps:

1. ``o_cmp`` and each row's log-sum-exp from **one causal FlashAttention-2 call**. Query ``p``
   sees the compressed blocks ``0 .. (p + 1 - l) // d``, so the ``d`` consecutive rows
   ``p = l - 1 + m*d + r`` (``r < d``) all see blocks ``0..m``: call them query group ``m``. A
   sequence has exactly as many groups as compressed blocks, and group ``m`` attending causally
   to blocks ``<= m`` is Eq. 8 exactly. FlashAttention gets the groups as its sequence axis and
   the ``d`` rows of a group as extra query heads of the same KV head (GQA), i.e.
   ``q [groups, G*h*d, Dk]`` against ``k_cmp [N, G, Dk]`` (`QueryPacking`). It returns the
   log-sum-exp, is causal-block-skipping, has a backward, and takes ``cu_seqlens`` (one
   FlashAttention sequence per packed sequence). Rows ``p < l - 1`` see no block: exact zeros.
2. The scores ``P [B, G, rows, S]`` (Eqs. 9-10) from a Triton kernel that recomputes the logits
   band by band and exponentiates them against the log-sum-exp
   (`nsa_impl.kernels._cmp_kernels`): ``p_cmp [B, H, T, N]`` never exists in memory. Then the
   top-n of Eq. 11 by a second kernel (`top_n`, the rule of `nsa_impl.scoring.top_n`). Rows
   are processed in chunks whose float32 score buffer fits ``budget_bytes``.

On CPU tensors (tests, under ``TRITON_INTERPRET=1``) and for float32 the attention of step 1
runs as plain PyTorch math over the same packed layout (float64 logits for float32 inputs), so
the packing is tested without a GPU. An ``o_cmp`` with NaN/Inf from finite inputs is recomputed
by the masked path (`nsa_impl.kernels.flash.nonfinite_output`, logged once; one device sync).
``p_cmp`` is materialised only for ``want_aux``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_ref.config import NSAConfig

from .. import scoring
from ..branches.compressed import CmpLayout
from ..varlen import PackedLayout
from . import flash
from ._loader import load_kernel_module
from .triton_sel import interpret_mode, triton_available

#: Default byte budget of one row chunk's float32 score buffer ``[B, G, c, S]``.
DEFAULT_BUDGET_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}
#: Launch shape of the scoring kernel: query rows per program, compressed-block columns per
#: band, warps, pipeline stages (``None``: triton's default). Benchmarks sweep it.
#: Default: the fastest of the shapes timed at T=65536, H=64 on an H200 (docs/gpu_notes.md).
SCORE_TUNING = {"block_m": 64, "block_n": 64, "warps": 4, "stages": None}
#: Scores one top-n program holds (rows x padded blocks), and the widest row it takes.
TOP_N_TILE, MAX_TOP_N_BLOCKS = 4096, 16384
#: FlashAttention launches one CUDA block row per query head (grid limit 65535).
MAX_PACKED_HEADS = 65535
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Can this path run ``q [B,T,H,Dk]`` with ``k/v [B,T,G,D]``? ``(ok, reason)``, never raises.

    Needs triton (the scoring kernel), ``Dk, Dv <= 256``, and either CUDA (compute
    capability >= 8.0, fp16/bf16, FlashAttention-2 available) or CPU tensors under
    ``TRITON_INTERPRET=1`` (fp16/bf16/fp32; the attention then runs as plain math).
    """
    ok, why = triton_available()
    if not ok:
        return False, why
    if not (q.dtype == k.dtype == v.dtype):
        return False, f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    dk, dv = q.shape[-1], v.shape[-1]
    if max(dk, dv) > flash.MAX_HEAD_DIM:
        return False, f"Dk={dk}, Dv={dv}: FlashAttention-2 takes head dims <= {flash.MAX_HEAD_DIM}"
    if q.device.type == "cpu":
        if q.dtype not in _CPU_DTYPES:
            return False, f"dtype {q.dtype} not supported (fp16, bf16, fp32)"
        if not interpret_mode():
            return False, "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1)"
        return True, "CPU tensors: Triton interpreter, attention as plain math"
    if q.device.type != "cuda" or getattr(torch.version, "hip", None):
        return False, f"device {q.device.type} not supported"
    if q.dtype not in _FLASH_DTYPES:
        return False, f"dtype {q.dtype}: FlashAttention-2 runs fp16/bf16 only"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return flash.available()


def _kernels(interpret: bool):
    """`_cmp_kernels` executed in the given mode (compiled or interpreted), cached."""
    return load_kernel_module("_cmp_kernels.py", interpret)


# --------------------------------------------------------------------------------------------
# Step 1: compressed attention as causal attention over query groups
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryPacking:
    """Which query row sits in which slot of the packed causal attention (module docstring).

    Slot ``(m, r)`` of (global) query group ``m`` holds row ``l - 1 + m'*d + r`` of that
    group's sequence, ``m'`` the group's index inside it. Group ``m`` is compressed block ``m``
    (blocks are numbered sequence by sequence, like `CmpLayout`), the last one its rows see.

    Attributes:
        src: host int64 ``[groups, d]``: the row of each slot (slots past a sequence's end
            repeat its last row; their outputs are never read).
        group, slot: host int64 ``[T]``: each row's group (``-1``: the row sees no block) and
            its ``r`` inside the group.
        cu: host int32 group boundaries of the sequences that have groups.
        max_groups: groups of the longest sequence.
    """

    src: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    cu: torch.Tensor
    max_groups: int

    @classmethod
    def build(cls, cfg: NSAConfig, layout: PackedLayout, cmp_layout: CmpLayout) -> QueryPacking:
        """Host-side geometry (once per call); ``cmp_layout.num_blocks`` must be positive."""
        l, d = cfg.cmp_block, cfg.cmp_stride
        starts = torch.tensor(layout.bounds[:-1], dtype=torch.long)
        ends = torch.tensor(layout.bounds[1:], dtype=torch.long)
        counts = torch.tensor([cfg.num_cmp(n - 1) for n in layout.lengths], dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        local = torch.arange(seq.numel()) - (torch.cumsum(counts, 0) - counts)[seq]
        row = starts[seq, None] + (l - 1) + local[:, None] * d + torch.arange(d)  # [groups, d]
        src = torch.minimum(row, ends[seq, None] - 1)
        ranges = cmp_layout.ranges
        group = torch.where(ranges.hi > ranges.lo, ranges.hi - 1, -1)
        slot = (layout.pos - (l - 1)).clamp(min=0) % d
        cu = torch.cumsum(torch.cat([counts.new_zeros(1), counts[counts > 0]]), 0)
        return cls(src, group, slot, cu.to(torch.int32), int(counts.max()))


def _causal_math(qp, kp, vp, cu: list[int], scale: float):
    """`flash.causal_attention_lse` as plain PyTorch (CPU tests, float32): ``(o, lse)``.

    One dense causal softmax per packed sequence (a loop over sequences, not tokens); logits in
    float64 for float32 inputs, as in `nsa_impl.branches`.
    """
    hq, G = qp.shape[1], kp.shape[1]
    acc = torch.float64 if qp.dtype in (torch.float32, torch.float64) else torch.float32
    outs, lses = [], []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        q = qp[a:b].transpose(0, 1).to(acc)  # [Hq, L, Dk]
        k, v = (t[a:b].repeat_interleave(hq // G, dim=1).transpose(0, 1).to(acc) for t in (kp, vp))
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        future = torch.ones(b - a, b - a, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), v).transpose(0, 1).to(qp.dtype))
        lses.append(lse.float())
    return torch.cat(outs, 0), torch.cat(lses, 1)


def cmp_attention(q, k_cmp, v_cmp, cfg: NSAConfig, packing: QueryPacking, scale: float):
    """``o_cmp [B, T, H, Dv]`` (autograd) and the log-sum-exp ``[B, H, T]`` float32 (detached).

    ``k_cmp/v_cmp [B, N, G, D]`` with ``N >= 1``. Rows that see no compressed block give exact
    zeros (their log-sum-exp is meaningless and unused: the scores mask those rows).
    """
    B, T, H, Dk = q.shape
    N, G, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    h, d, dev = H // G, cfg.cmp_stride, q.device

    def idx(t: torch.Tensor, *shape: int) -> torch.Tensor:
        return t.to(dev, non_blocking=True).reshape(*shape)

    # [B, N*d slots, H, Dk] (one row gather) -> [B*N groups, (g, slot, head) heads, Dk]: GQA
    # major, so each KV head serves its own d*h packed query heads.
    qs = q.index_select(1, idx(packing.src, -1)).view(B, N, d, G, h, Dk)
    qp = qs.transpose(2, 3).reshape(B * N, G * d * h, Dk)
    kp, vp = k_cmp.reshape(B * N, G, Dk), v_cmp.reshape(B * N, G, Dv)
    cu = torch.cat([packing.cu[:-1] + b * N for b in range(B)] + [packing.cu[-1:] + (B - 1) * N])
    if q.device.type == "cuda" and q.dtype in _FLASH_DTYPES:
        op, lse = flash.causal_attention_lse(
            qp, kp, vp, cu.to(dev, non_blocking=True), packing.max_groups, scale
        )
    else:
        op, lse = _causal_math(qp, kp, vp, cu.tolist(), scale)
    # Back to rows: slots in row order again, then each row picks its slot; no slot -> 0.
    group = idx(packing.group, T)
    at = group.clamp(min=0) * d + idx(packing.slot, T)  # the row's slot
    o = op.view(B, N, G, d, h, Dv).transpose(2, 3).reshape(B, N * d, H, Dv).index_select(1, at)
    o_cmp = torch.where((group >= 0).view(1, T, 1, 1), o, 0.0)
    lse_rows = lse.view(G, d, h, B * N).permute(3, 1, 0, 2).reshape(B, N * d, H)[:, at]
    return o_cmp, lse_rows.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Step 2: selection scores from recomputed logits (Eqs. 9-10), then top-n (Eq. 11)
# --------------------------------------------------------------------------------------------


def _tiles(layout: PackedLayout, cmp_layout: CmpLayout, r0: int, r1: int, bm: int, device):
    """Row tiles of ``[r0, r1)`` that never cross a sequence: start row, rows, cmp offset."""
    bounds = torch.tensor(layout.bounds, dtype=torch.long)
    a, b = bounds[:-1].clamp(r0, r1), bounds[1:].clamp(r0, r1)
    ntile = (b - a + bm - 1) // bm
    seq = torch.repeat_interleave(torch.arange(ntile.numel()), ntile)
    first = torch.cumsum(ntile, 0) - ntile
    start = a[seq] + (torch.arange(seq.numel()) - first[seq]) * bm
    rows = torch.minimum(b[seq] - start, torch.tensor(bm))
    cmp0 = cmp_layout.ranges.lo[start]
    return [t.to(device, non_blocking=True) for t in (start, rows, cmp0)]


def selection_scores(
    q,
    k_cmp,
    lse,
    cfg: NSAConfig,
    scale: float,
    layout,
    cmp_layout,
    r0: int,
    r1: int,
    S: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Eqs. 9-10 for rows ``[r0, r1)``: float32 ``[B, G, r1 - r0, S]`` (local block indices).

    ``lse [B, H, T]`` comes from `cmp_attention`; ``S`` selection-block columns are written
    (those past a row's current block are 0). Tile sizes default to `SCORE_TUNING`.
    """
    block_m = SCORE_TUNING["block_m"] if block_m is None else block_m
    block_n = SCORE_TUNING["block_n"] if block_n is None else block_n
    B, _, H, Dk = q.shape
    G = k_cmp.shape[2]
    R, M = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    bn = max(block_n, 16, 1 << (R + M - 2).bit_length())  # one selection block + its halo fits
    bs = (bn - (M - 1)) // R
    bsp = max(16, 1 << (bs - 1).bit_length())
    out = torch.empty(B, G, r1 - r0, S, dtype=torch.float32, device=q.device)
    start, rows, cmp0 = _tiles(layout, cmp_layout, r0, r1, block_m, q.device)
    count = (cmp_layout.ranges.hi - cmp_layout.ranges.lo).to(q.device, non_blocking=True)
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


def top_n(scores: torch.Tensor, block: torch.Tensor, cfg: NSAConfig, out: torch.Tensor) -> None:
    """`nsa_impl.scoring.top_n` as a Triton kernel, written into ``out [B, rows, G, n]``.

    ``scores [B, G, rows, S]`` float32 (contiguous rows), ``block [rows]`` each row's current
    block. One program holds ``BR`` rows of ``S`` scores and takes ``n`` argmax rounds (no sort
    over ``S``). Rows wider than `MAX_TOP_N_BLOCKS` blocks go to the torch version.
    """
    B, G, rows, S = scores.shape
    if S > MAX_TOP_N_BLOCKS:
        out.copy_(scoring.top_n(scores, block, cfg).permute(0, 2, 1, 3))
        return
    sp = max(16, 1 << (S - 1).bit_length())
    br = max(1, min(64, TOP_N_TILE // sp))
    n = cfg.sel_top_n
    interpret = scores.device.type == "cpu"
    _kernels(interpret)._top_n_kernel[(-(-rows // br), B * G)](
        scores, block, out,
        scores.stride(0), scores.stride(1), scores.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        rows, S, G,
        N_TOP=n, NP=max(16, 1 << (n - 1).bit_length()), INIT=cfg.sel_init_blocks,
        LOCAL=cfg.sel_local_blocks, BR=br, SP=sp,
    )  # fmt: skip


def _launch_options() -> dict:
    opts = {"num_warps": SCORE_TUNING["warps"]}
    if SCORE_TUNING["stages"] is not None:
        opts["num_stages"] = SCORE_TUNING["stages"]
    return opts


def _aux_p_cmp(q, k_cmp, lse, cmp_layout: CmpLayout, cfg: NSAConfig, scale: float):
    """``p_cmp [B, T, H, num_cmp(T-1)]`` (local block index) from the log-sum-exp (aux only)."""
    B, T, H, _ = q.shape
    N, h = k_cmp.shape[1], H // k_cmp.shape[2]
    kh = k_cmp.repeat_interleave(h, dim=2).transpose(1, 2).float()
    s = torch.matmul(q.transpose(1, 2).float(), kh.transpose(-1, -2)) * scale
    p = torch.exp(s - lse[..., None])  # [B, H, T, N]
    n_loc = cfg.num_cmp(T - 1)
    lo = cmp_layout.ranges.lo.to(q.device)
    count = (cmp_layout.ranges.hi - cmp_layout.ranges.lo).to(q.device)
    i = torch.arange(n_loc, device=q.device)
    idx = (lo[:, None] + i).clamp(max=N - 1).expand(B, H, T, n_loc)
    p = p.gather(-1, idx).masked_fill_(i >= count[:, None], 0.0)
    return p.permute(0, 2, 1, 3).to(q.dtype)


def compressed_and_select(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cfg: NSAConfig,
    scale: float,
    layout: PackedLayout,
    cmp_layout: CmpLayout,
    *,
    want_aux: bool = False,
    budget_bytes: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> scoring.Scores:
    """Drop-in for `nsa_impl.scoring.compressed_and_select` (same arguments and result).

    ``budget_bytes`` bounds one row chunk's float32 score buffer (default per device,
    `DEFAULT_BUDGET_BYTES`); ``block_m``/``block_n`` override the scoring kernel's tile
    (`SCORE_TUNING`; tests shrink it).
    """
    B, T, H, _ = q.shape
    G = k_cmp.shape[2]
    if cmp_layout.num_blocks == 0:  # no row sees a compressed block: nothing to attend or score
        return scoring.compressed_and_select(
            q, k_cmp, v_cmp, cfg, scale, layout, cmp_layout, want_aux=want_aux
        )
    if H * cfg.cmp_stride > MAX_PACKED_HEADS:
        flash.warn_once(
            "cmp-heads",
            f"H * cmp_stride = {H * cfg.cmp_stride} packed query heads exceed FlashAttention's "
            f"{MAX_PACKED_HEADS}: the compressed branch runs on the masked path (logged once)",
        )
        return scoring.compressed_and_select(
            q, k_cmp, v_cmp, cfg, scale, layout, cmp_layout, want_aux=want_aux
        )
    packing = QueryPacking.build(cfg, layout, cmp_layout)
    o_cmp, lse = cmp_attention(q, k_cmp, v_cmp, cfg, packing, scale)
    if flash.nonfinite_output(o_cmp, (q, k_cmp, v_cmp), "compressed"):  # NaN/Inf: masked path
        return scoring.compressed_and_select(
            q, k_cmp, v_cmp, cfg, scale, layout, cmp_layout, want_aux=want_aux
        )
    S = cfg.num_sel_blocks(T)
    block = (layout.pos // cfg.sel_block).to(q.device, non_blocking=True)  # b(p)
    block_indices = torch.empty(B, T, G, cfg.sel_top_n, dtype=torch.long, device=q.device)
    p_slc = q.new_zeros(B, T, G, S) if want_aux else None
    budget = DEFAULT_BUDGET_BYTES.get(q.device.type, DEFAULT_BUDGET_BYTES["cuda"])
    budget = budget if budget_bytes is None else int(budget_bytes)
    rows = max(1, budget // max(1, 4 * B * G * S))
    with torch.no_grad():
        for r0 in range(0, T, rows):
            r1 = min(T, r0 + rows)
            # Columns past the chunk's last current block are 0 and never candidates.
            s_chunk = int(layout.pos[r0:r1].max()) // cfg.sel_block + 1
            scores = selection_scores(
                q, k_cmp, lse, cfg, scale, layout, cmp_layout, r0, r1, s_chunk,
                block_m=block_m, block_n=block_n,
            )  # fmt: skip
            top_n(scores, block[r0:r1], cfg, block_indices[:, r0:r1])
            if want_aux:
                p_slc[:, r0:r1, :, :s_chunk] = scores.permute(0, 2, 1, 3)
        p_cmp = _aux_p_cmp(q, k_cmp, lse, cmp_layout, cfg, scale) if want_aux else None
    return scoring.Scores(o_cmp, block_indices, p_slc, p_cmp)
