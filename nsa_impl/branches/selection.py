"""Selection branch (Eq. 12, spec I.6): attention over the keys of the selected blocks.

Query row ``(b, p, g)`` (batch, position, KV group) attends with its ``h`` query heads to exactly
the keys ``{s : s in a selected block, s <= p}``: a ``-1`` (or any negative) index, a duplicate,
an index past the current block or unsorted input never change that set. Keys after ``p`` are
excluded exactly (boolean masks become ``-inf`` logits; no finite sentinel), and a row with no
key gives an exact zero. Selection attention is non-causal over these already-causal keys.

Paths (the dispatcher's names; `selection_attention` ``path=``):

``masked``
    The exact fallback: every row gets ``n * l'`` key slots (its ``n`` block windows), a slot is
    valid iff its block is a first occurrence and its key is ``<= p``; explicit masked softmax.
``packed``
    Rows are bucketed by their own width ``W`` (selected length ``L`` rounded up to whole
    selection blocks; rows with ``L == W`` apart) and cut into chunks; the selected keys of each
    row are compacted (via `block_ranges`) to the left of a ``[rows, W]`` slab, and one
    ``scaled_dot_product_attention`` call per chunk attends (a boolean prefix mask only in the
    chunks of rows with ``L < W``), so a row's width and mask depend on that row alone (which
    chunk it lands in still depends on the other rows: on an H200 a NaN in another sequence's
    keys still changes bf16 results here, docs/gpu_notes.md). The ``h`` heads of a group are the
    query rows of one SDPA problem, so each gathered key is read once per group (the paper's
    group-centric layout).
``varlen``
    Flat packing over (row, group) pairs: the compacted keys of all rows of a chunk are
    concatenated with ``cu_seqlens_k = cumsum(L)`` and ``cu_seqlens_q = arange * h`` (built with
    ``repeat_interleave`` given its ``output_size``, no Python loop over rows). On CUDA with
    fp16/bf16 and ``Dk == Dv`` this goes through PyTorch's FlashAttention-2 varlen kernel
    (``torch.nn.attention.varlen.varlen_attn``); otherwise the flat packing is unpadded into
    dense buckets and run like ``packed``. Rows with ``0 < L < varlen_min_len`` always take the
    packed buckets (tiny varlen sequences waste FlashAttention tiles).
``triton``
    `nsa_impl.kernels.triton_sel.selection_attention` with the plan's token layout.

Causal-prefix shortcut (``packed`` and ``varlen``): a row whose merged ranges are the single
range ``[0, p]`` is plain causal attention. Only rows with ``p < n * l'`` can be such rows (``n``
blocks hold at most ``n * l'`` keys), so each sequence's first ``min(len, n * l')`` rows form a
prefix region fixed by the shapes; the shared row-range attention
(`nsa_impl.branches.chunk_forward`) computes it over the sequence's first keys, with every
(batch row, position, group) row that does not select all of ``0..p`` (read from the block
indices, never assumed) switched off there and gathered into the chunks instead. In the paper
configuration every row of the region qualifies. Since the region's layout depends on no row's
data, a change in one sequence's selections (a NaN in its keys) never moves another sequence's
rows to another path. Applied for at most `MAX_PREFIX_SEQUENCES` ``cu_seqlens`` sequences.

Ops and autograd: the three torch paths are one custom op pair, ``nsa::sel_chunked`` and
``nsa::sel_chunked_backward`` (`nsa_impl.kernels.ops.kernel_op`), inside an autograd Function
that saves only ``q, k, v``, the output, the block indices and the sequence geometry. The
backward rebuilds the same chunks from them (the bucketing is deterministic), re-gathers each
chunk's keys, recomputes its probabilities and applies the FlashAttention backward identities
(``dS = P * (dP - rowsum(dO * O))``); ``dq`` rows are written once, ``dk``/``dv`` are
accumulated with ``index_add_``. The "packed" and "varlen" bucketing reads the row lengths on the
host (a device sync per call): they are CPU-first paths; "masked" and "triton" are sync-free.

NaN containment: each row's slab holds only its own selected keys (padding slots repeat one of
them, or are selected out in "masked"), probabilities of padded slots are selected to 0 and
their gradients go to a discarded row, so a row never reads a key outside its key set.

Memory bound (beyond inputs, output and gradients): one chunk holds at most ``chunk_slots``
key slots (rows x padded width, default `DEFAULT_CHUNK_SLOTS` = 2**18). Its live working set is
about ``S * (2*Dk + 2*Dv + 3*h) * c + 40 * S`` bytes for ``S = chunk_slots`` and ``c`` the
compute itemsize (float32 for float16/bfloat16/float32 inputs, float64 for float64): gathered
K and V and their gradients, three ``[rows, h, W]`` probability-sized tiles, and the int64/bool
index tensors. For Dk = Dv = 64, h = 8, float32 that is ``2**18 * (1024 + 96 + 40)`` B ≈ 290 MiB,
independent of ``T``. Persistent metadata is ``O(B*T*G*n)`` int64 (2 MiB at T=8192, G=2, n=16).
A single row wider than ``chunk_slots`` (only if ``n * l' > chunk_slots``) forms a chunk alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nsa_ref.config import NSAConfig
from nsa_ref.validate import check_cu_seqlens

from ..kernels import triton_sel
from ..kernels.ops import Inputs, autocast_off_backward, kernel_op
from ..numerics import compute_dtype, product_dtype
from . import RangeLayout, RowRanges, chunk_backward, chunk_forward

#: Paths `selection_attention` accepts.
SELECTION_PATHS = ("masked", "packed", "varlen", "triton")
#: Default ``varlen_min_len`` (``NSA_SEL_VARLEN_MIN_L``): rows selecting fewer keys than this
#: take the packed buckets in the varlen path. One selection block at the paper's ``l' = 64``:
#: shorter rows fill less than one FlashAttention key tile.
DEFAULT_VARLEN_MIN_L = 64
#: Default key slots (rows x padded width) per chunk; bounds the working set (module docstring).
DEFAULT_CHUNK_SLOTS = 1 << 18


# --------------------------------------------------------------------------------------------
# Block indices -> key ranges
# --------------------------------------------------------------------------------------------


def block_ranges(
    block_indices: torch.Tensor, cfg: NSAConfig | int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the selected blocks of each row into sorted, disjoint ``[start, end)`` key ranges.

    Block ``j`` covers local keys ``[j*l', (j+1)*l')``; keys are clamped to ``<= p`` (the row's
    local position), so blocks after the current one are empty. Negative indices, duplicates
    and unsorted input are handled; adjacent blocks are fused into one range. Vectorised (a sort
    and a few scatters over the last axis).

    Args:
        block_indices: integer ``[..., n]`` selected blocks (e.g. ``[B, T, G, n]``).
        cfg: the `NSAConfig` (``sel_block`` is ``l'``), or ``l'`` itself.
        positions: integer local query positions ``p``, broadcastable to
            ``block_indices.shape[:-1]``.

    Returns:
        ``(starts, ends)``, int64 ``[..., n]``. The first ``count`` slots of a row hold its
        merged ranges in ascending order with ``ends[i] < starts[i+1]``; the remaining slots are
        empty (``start == end`` = the row's last end, or 0), so both stay non-decreasing and
        ``(ends - starts).sum(-1)`` is the number of selected keys.
    """
    ls = cfg if isinstance(cfg, int) else cfg.sel_block
    j = block_indices.to(torch.int64)
    n = j.shape[-1]
    p = positions.to(device=j.device, dtype=torch.int64).expand(j.shape[:-1]).unsqueeze(-1)
    if n == 0:
        return j.clone(), j.clone()
    cap = p // ls + 1  # first block holding no key <= p; also absorbs invalid and huge indices
    j = torch.where(j < 0, cap, torch.minimum(j, cap)).sort(dim=-1).values
    start = j * ls
    end = torch.minimum(start + ls, p + 1)
    prev = torch.cat([torch.full_like(j[..., :1], -2), j[..., :-1]], dim=-1)
    valid = (start < end) & (j != prev)  # a non-empty first occurrence
    opens = valid & (j != prev + 1)  # not adjacent to the previous selected block
    rid = opens.cumsum(dim=-1) - 1  # merged range of each entry
    shape = (*j.shape[:-1], n + 1)  # column n collects the entries to drop
    starts = torch.zeros(shape, dtype=torch.int64, device=j.device).scatter_(
        -1, torch.where(opens, rid, n), start
    )[..., :n]
    ends = torch.zeros(shape, dtype=torch.int64, device=j.device).scatter_reduce_(
        -1, torch.where(valid, rid, n), end, reduce="amax"
    )[..., :n]
    used = torch.arange(n, device=j.device) < opens.sum(dim=-1, keepdim=True)
    fill = ends.amax(dim=-1, keepdim=True)
    return torch.where(used, starts, fill), torch.where(used, ends, fill)


# --------------------------------------------------------------------------------------------
# Row metadata and chunk plans
# --------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Per-row metadata, rows ``r = (b*T + t)*G + g`` in the order of ``block_indices``.

    Key ``s`` (local to the row's sequence) of row ``r`` lives at row ``kbase[r] + s*G`` of
    ``k.reshape(B*S*G, Dk)`` (``S`` keys per batch row: ``T``, or more for a row subset).
    ``starts``/``ends``/``lengths`` (merged ranges, see `block_ranges`) are computed only for the
    paths that compact keys.
    """

    G: int
    ls: int
    blocks: torch.Tensor  # [R, n] int64, raw
    pos: torch.Tensor  # [R] local query position
    kbase: torch.Tensor  # [R] flat key row of the sequence start, group g
    starts: torch.Tensor | None = None  # [R, n] merged ranges (local), see block_ranges
    ends: torch.Tensor | None = None
    lengths: torch.Tensor | None = None  # [R] selected keys per row

    @property
    def R(self) -> int:
        """Number of (batch, position, group) rows."""
        return self.pos.numel()


def _build_rows(block_indices, sel_block: int, G: int, positions: torch.Tensor,
                seq_start: torch.Tensor, num_keys: int, *, ranges: bool):  # fmt: skip
    """Positions (local to each sequence), key bases and, with ``ranges``, merged ranges.

    ``positions`` and ``seq_start`` (int64 ``[T]`` on the device) are each query row's position
    in its sequence and the key row where that sequence starts, among ``num_keys`` keys per
    batch row (``positions = arange(T) - seq_start`` when every row is present; a row subset,
    `nsa_impl.plan.Plan.rows`, gives its own): no host data.
    """
    B, T = block_indices.shape[:2]
    dev = block_indices.device
    pos = positions.view(1, T, 1).expand(B, T, G).reshape(-1)
    tok0 = torch.arange(B, device=dev).view(B, 1) * num_keys + seq_start.view(1, T)  # [B, T]
    kbase = (tok0.view(B, T, 1) * G + torch.arange(G, device=dev)).reshape(-1)
    blocks = block_indices.reshape(B * T * G, -1).to(torch.int64)
    rows = _Rows(G, sel_block, blocks, pos, kbase)
    if ranges:
        rows.starts, rows.ends = block_ranges(blocks, sel_block, pos)
        rows.lengths = (rows.ends - rows.starts).sum(-1)
    return rows


@dataclass
class _Chunk:
    """One bucket of rows: ``kind`` in masked/packed/varlen, padded width ``W`` (host int),
    ``uniform`` when every row fills ``W`` (no mask), ``total`` = selected keys in the chunk."""

    kind: str
    rows: torch.Tensor
    W: int
    uniform: bool
    total: int


def _natural_chunks(rows: _Rows, chunk_slots: int) -> list[_Chunk]:
    """Masked layout: rows in their own order, ``n * l'`` slots each (host ints only)."""
    W = rows.blocks.shape[1] * rows.ls
    if W == 0:
        return []
    step = max(1, chunk_slots // W)
    order = torch.arange(rows.R, device=rows.pos.device)
    return [_Chunk("masked", order[i : i + step], W, False, -1) for i in range(0, rows.R, step)]


def _sorted_chunks(rows: _Rows, member: torch.Tensor, kind: str, chunk_slots: int) -> list[_Chunk]:
    """Rows with ``member`` (and ``L > 0``) bucketed by their own width, cut into chunks.

    A row's padded width is its length rounded up to whole selection blocks, and rows whose
    length fills that width exactly go to chunks of their own (no mask): a row's width and mask
    depend on that row alone. (With ``W`` = the chunk's longest row, a NaN in another sequence's
    keys changed its selections, so the bucketing, so other rows' bf16 results on CUDA. The
    chunk a row lands in still depends on the other rows, and NSA-NAN-ROWS still fails on an
    H200 with the flash compressed scores: `bench/nan_probe.py`, docs/gpu_notes.md.)
    Two host syncs per call (the bucket counts, then every chunk's key total), none per chunk.
    """
    ls = rows.ls
    L = torch.where(member, rows.lengths, 0)
    width = (L + ls - 1) // ls * ls
    key = width * 2 + (L != width).to(width.dtype)  # 0: not in these chunks
    order = torch.argsort(key, stable=True)
    keys, counts = (t.tolist() for t in torch.unique_consecutive(key[order], return_counts=True))
    first, last, widths, uniform = [], [], [], []
    start = 0
    for kv, n in zip(keys, counts, strict=True):
        if kv > 0:
            W = kv // 2
            step = max(1, chunk_slots // W)
            for i in range(start, start + n, step):
                first.append(i)
                last.append(min(i + step, start + n) - 1)
                widths.append(W)
                uniform.append(kv % 2 == 0)
        start += n
    if not first:
        return []
    sorted_L = L[order]
    csum = torch.cat([sorted_L.new_zeros(1), sorted_L.cumsum(0)])
    a = torch.tensor(first, device=L.device)
    b = torch.tensor(last, device=L.device)
    totals = (csum[b + 1] - csum[a]).tolist()
    return [
        _Chunk(kind, order[i : j + 1], W, u, tot)
        for i, j, W, u, tot in zip(first, last, widths, uniform, totals, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# Dense index of a chunk: key rows [N, W] of k.reshape(-1, D), validity [N, W] (None = all)
# --------------------------------------------------------------------------------------------


def _slot_index(rows: _Rows, r: torch.Tensor):
    """Gather layout: slot ``(i, u)`` is key ``j_i*l' + u`` of the ``i``-th sorted block.

    Invalid slots (a repeated or negative block, a key ``> p``) point at the row's first valid
    key, so a padded slot never reads another sequence's (or a future) value; empty rows point
    at their own position.
    """
    ls, p = rows.ls, rows.pos[r].unsqueeze(-1)
    cap = p // ls + 1
    j = rows.blocks[r]
    j = torch.where(j < 0, cap, torch.minimum(j, cap)).sort(dim=-1).values  # [N, n]
    first = torch.cat([torch.ones_like(j[:, :1], dtype=torch.bool), j[:, 1:] != j[:, :-1]], 1)
    local = (j.unsqueeze(-1) * ls + torch.arange(ls, device=j.device)).flatten(1)  # [N, n*ls]
    valid = first.repeat_interleave(ls, dim=1) & (local <= p)
    pad = local.gather(1, valid.to(torch.uint8).argmax(dim=1, keepdim=True))
    pad = torch.where(valid.any(dim=1, keepdim=True), pad, p)
    local = torch.where(valid, local, pad)
    return rows.kbase[r].unsqueeze(-1) + local * rows.G, valid


def _compact_index(rows: _Rows, r: torch.Tensor, W: int, uniform: bool):
    """Packed layout: slot ``u < L`` is the ``u``-th selected key (merged ranges, searchsorted);
    slots ``u >= L`` repeat the row's first selected key."""
    st = rows.starts[r]
    ln = rows.ends[r] - st
    cum = ln.cumsum(dim=1)  # inclusive; slot u lies in the first range with cum > u
    u = torch.arange(W, device=st.device).expand(r.numel(), W)
    valid = None if uniform else u < rows.lengths[r].unsqueeze(-1)
    if valid is not None:
        u = torch.where(valid, u, 0)
    ri = torch.searchsorted(cum, u.contiguous(), right=True).clamp_max_(cum.shape[1] - 1)
    local = st.gather(1, ri) + u - (cum.gather(1, ri) - ln.gather(1, ri))
    return rows.kbase[r].unsqueeze(-1) + local * rows.G, valid


def _flat_index(rows: _Rows, r: torch.Tensor, total: int):
    """Varlen layout: the selected keys of rows ``r`` back to back ``[total]``, and
    ``cu_seqlens_k [N+1]``; no Python loop over rows."""
    st, ln = rows.starts[r].flatten(), (rows.ends[r] - rows.starts[r]).flatten()
    N, n = r.numel(), rows.starts.shape[1]
    rep = lambda x, c: torch.repeat_interleave(x, c, output_size=total)  # noqa: E731
    offset = torch.arange(total, device=st.device) - rep(ln.cumsum(0) - ln, ln)
    row_of = rep(torch.arange(N, device=st.device).repeat_interleave(n), ln)
    flat = rows.kbase[r][row_of] + (rep(st, ln) + offset) * rows.G
    L = rows.lengths[r]
    cu = torch.cat([L.new_zeros(1), L.cumsum(0)])
    return flat, cu


def _unpad_index(flat: torch.Tensor, cu: torch.Tensor, L: torch.Tensor, W: int, uniform: bool):
    """Flat packing -> dense ``[N, W]`` (the varlen path's dense buckets); padding repeats the
    row's first key."""
    u = torch.arange(W, device=flat.device).expand(L.numel(), W)
    valid = None if uniform else u < L.unsqueeze(-1)
    if valid is not None:
        u = torch.where(valid, u, 0)
    return flat[cu[:-1].unsqueeze(-1) + u], valid


def _dense_index(rows: _Rows, c: _Chunk):
    """The chunk's ``[N, W]`` key rows and validity, built by its own layout."""
    if c.kind == "masked":
        return _slot_index(rows, c.rows)
    if c.kind == "packed":
        return _compact_index(rows, c.rows, c.W, c.uniform)
    flat, cu = _flat_index(rows, c.rows, c.total)
    return _unpad_index(flat, cu, rows.lengths[c.rows], c.W, c.uniform)


# --------------------------------------------------------------------------------------------
# Chunk kernels
# --------------------------------------------------------------------------------------------


def _probs(qc, kc, valid, scale):
    """Row softmax of ``scale * q.k`` over valid slots, ``[N, h, W]``; exactly 0 (selected)
    elsewhere and for rows without a valid slot."""
    s = torch.matmul(qc * scale, kc.transpose(1, 2))
    if valid is None:
        return torch.softmax(s, dim=-1)
    allowed = valid.unsqueeze(1)
    s.masked_fill_(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m.masked_fill_(m == float("-inf"), 0.0)  # empty row: exp(-inf - 0) = 0, never NaN
    s.sub_(m).exp_()
    den = s.sum(dim=-1, keepdim=True)
    s.div_(torch.where(den > 0, den, torch.ones_like(den)))
    return s.masked_fill_(~allowed, 0.0)


_VARLEN_ATTN = None


def _varlen_attn():
    """PyTorch's FlashAttention-2 varlen entry point, or ``None`` (looked up once, lazily)."""
    global _VARLEN_ATTN
    if _VARLEN_ATTN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # older torch: no public varlen entry point
            varlen_attn = False
        _VARLEN_ATTN = varlen_attn
    return _VARLEN_ATTN or None


def flash_varlen_available(inp: Inputs) -> tuple[bool, str]:
    """Whether the varlen path can use FlashAttention-2 varlen for this problem, and why not.

    Needs CUDA float16/bfloat16 on compute capability >= 8.0, ``Dk == Dv``, a head dim that is a
    multiple of 8 and ``<= 256``, and ``torch.nn.attention.varlen.varlen_attn``. Never touches
    CUDA for CPU problems.
    """
    if inp.device_type != "cuda":
        return False, "inputs are not on a CUDA device"
    if inp.dtype not in (torch.float16, torch.bfloat16):
        return False, f"FlashAttention-2 needs float16/bfloat16, got {inp.dtype}"
    if inp.Dk != inp.Dv or inp.Dk % 8 or inp.Dk > 256:
        return (
            False,
            f"FlashAttention-2 needs Dk == Dv, a multiple of 8 and <= 256 (Dk={inp.Dk}, "
            f"Dv={inp.Dv})",
        )
    if torch.cuda.get_device_capability(inp.device)[0] < 8:
        return False, "FlashAttention-2 needs compute capability >= 8.0"
    if _varlen_attn() is None:
        return False, "torch.nn.attention.varlen.varlen_attn is missing in this torch"
    return True, "FlashAttention-2 varlen available"


# --------------------------------------------------------------------------------------------
# Chunk kernels
# --------------------------------------------------------------------------------------------


def _gather(k_flat, v_flat, idx, valid, kind: str):
    """The chunk's keys and values ``[N, W, D]``; "masked" selects invalid slots to 0 (they are
    outside the row's key set), the compacted layouts pad with one of the row's own keys."""
    kc, vc = k_flat[idx], v_flat[idx]
    if kind == "masked":
        keep = valid.unsqueeze(-1)
        kc, vc = torch.where(keep, kc, 0.0), torch.where(keep, vc, 0.0)
    return kc, vc


def _chunk_forward(q_rows, k_flat, v_flat, rows: _Rows, c: _Chunk, scale: float, flash: bool):
    """Output ``[N, h, Dv]`` of one chunk, in ``q``'s dtype."""
    r = c.rows
    qc = q_rows[r]
    h = qc.shape[1]
    if c.kind == "varlen" and flash:
        flat, cu = _flat_index(rows, r, c.total)
        cu = cu.to(torch.int32)
        cu_q = torch.arange(r.numel() + 1, device=r.device, dtype=torch.int32) * h
        o = _varlen_attn()(
            qc.reshape(-1, 1, qc.shape[-1]),
            k_flat[flat].unsqueeze(1),
            v_flat[flat].unsqueeze(1),
            cu_q,
            cu,
            h,
            c.W,
            scale=scale,
        )
        return o.view(r.numel(), h, -1)
    idx, valid = _dense_index(rows, c)
    kc, vc = _gather(k_flat, v_flat, idx, valid, c.kind)
    if c.kind == "masked":  # explicit masked softmax in the compute dtype
        cdt = compute_dtype(qc.dtype)
        p = _probs(qc.to(cdt), kc.to(cdt), valid, scale)
        o = torch.matmul(p, vc.to(cdt))
        return torch.where(valid.any(dim=1)[:, None, None], o, 0.0).to(qc.dtype)
    mask = None if valid is None else valid[:, None, None, :]
    mm = product_dtype(qc.dtype, qc.device)
    o = F.scaled_dot_product_attention(
        qc.unsqueeze(1).to(mm),
        kc.unsqueeze(1).to(mm),
        vc.unsqueeze(1).to(mm),
        attn_mask=mask,
        scale=scale,
    )
    return o.squeeze(1).to(qc.dtype)


def _chunks_backward(do, q, k, v, o, rows: _Rows, chunks: list[_Chunk], scale: float):
    """``(dq, dk, dv)`` of the chunk rows (re-gathered, probabilities recomputed)."""
    B, T, H, Dk = q.shape
    G, Dv = k.shape[2], v.shape[-1]
    R, h = B * T * G, H // G
    cdt = compute_dtype(q.dtype)
    q_rows = q.reshape(R, h, Dk)
    k_flat, v_flat = k.reshape(-1, Dk), v.reshape(-1, Dv)
    do_rows, o_rows = do.reshape(R, h, Dv), o.reshape(R, h, Dv)
    dq = torch.zeros(R, h, Dk, dtype=cdt, device=q.device)
    dump = k_flat.shape[0]  # one extra accumulator row absorbs the padded slots
    dk = torch.zeros(dump + 1, Dk, dtype=cdt, device=q.device)
    dv = torch.zeros(dump + 1, Dv, dtype=cdt, device=q.device)
    for c in chunks:
        idx, valid = _dense_index(rows, c)
        qc = q_rows[c.rows].to(cdt)
        kc, vc = (t.to(cdt) for t in _gather(k_flat, v_flat, idx, valid, c.kind))
        doc = do_rows[c.rows].to(cdt)
        p = _probs(qc, kc, valid, scale)  # [N, h, W]
        dvc = torch.matmul(p.transpose(1, 2), doc)  # [N, W, Dv]
        delta = (doc * o_rows[c.rows].to(cdt)).sum(-1, keepdim=True)  # rowsum(dO * O)
        ds = torch.matmul(doc, vc.transpose(1, 2)).sub_(delta).mul_(p)  # dS = P (dP - D)
        if valid is not None:
            ds.masked_fill_(~valid.unsqueeze(1), 0.0)
            idx = torch.where(valid, idx, dump)
        dq.index_copy_(0, c.rows, torch.matmul(ds, kc).mul_(scale))
        dsq = torch.matmul(ds.transpose(1, 2), qc).mul_(scale).flatten(0, 1)
        _add_rows(dk, idx.flatten(), dsq)
        _add_rows(dv, idx.flatten(), dvc.flatten(0, 1))
    return dq.view(q.shape), dk[:dump].view(k.shape), dv[:dump].view(v.shape)


def _add_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[idx[i]] += src[i]``, bit-reproducible on every device.

    CUDA's ``index_add_`` adds with atomics, so a key's gradient sums its rows in a different
    order on every run (measured on an H200: dK/dV of the torch selection paths differed run to
    run, and NSA-NAN-ROWS, which compares a clean and a dirty run bit for bit, failed). Under
    PyTorch's deterministic mode it sorts the indices and adds in that order instead; the mode is
    switched on for this one call and restored (``warn_only`` keeps other code unaffected).
    """
    if dst.device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        dst.index_add_(0, idx, src)
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        dst.index_add_(0, idx, src)
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


# --------------------------------------------------------------------------------------------
# Causal-prefix shortcut
# --------------------------------------------------------------------------------------------

#: Most ``cu_seqlens`` sequences for which the causal-prefix shortcut runs (beyond this many,
#: the per-sequence bookkeeping outweighs the saved gathers).
MAX_PREFIX_SEQUENCES = 64


def _causal_prefixes(num_blocks: int, sel_block: int, bounds: list[int]) -> list[int]:
    """Per sequence, how many leading rows may be causal: row ``p`` can select every key
    ``0..p`` only if ``p < n * l'`` (``n`` blocks of ``l'`` keys). Fixed by the shapes alone, so
    the prefix layout (and every row's arithmetic in it) never depends on any row's data.
    Empty list when the shortcut does not apply (too many sequences)."""
    if len(bounds) - 1 > MAX_PREFIX_SEQUENCES:
        return []
    limit = num_blocks * sel_block
    return [min(b - a, limit) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _prefix_rows(prefix: list[int], bounds: list[int], T: int) -> torch.Tensor:
    """Host bool ``[T]``: tokens inside a causal prefix."""
    in_prefix = torch.zeros(T, dtype=torch.bool)
    for a, L in zip(bounds[:-1], prefix, strict=True):
        in_prefix[a : a + L] = True
    return in_prefix


def _prefix_layout(prefix: list[int], bounds: list[int], T: int, heads: int, device):
    """`RangeLayout` of the prefix rows: row ``a + i`` of a prefix reads ``[a, a + i]``; any
    other row ``r`` reads nothing (``[r + 1, r + 1)``, which keeps ``lo`` non-decreasing and
    ``hi`` growing by at most one per row, as `RowRanges` requires)."""
    rows = torch.arange(T, dtype=torch.int64)
    lo, hi = rows + 1, rows + 1
    for a, L in zip(bounds[:-1], prefix, strict=True):
        lo[a : a + L] = a
    return RangeLayout.build(RowRanges(lo, hi, T), heads, device)


# --------------------------------------------------------------------------------------------
# The op pair (all three torch paths)
# --------------------------------------------------------------------------------------------


@dataclass
class _Work:
    """A call's rows, chunks and causal prefix (rebuilt identically by the backward)."""

    rows: _Rows
    chunks: list[_Chunk]
    prefix: RangeLayout | None
    causal: torch.Tensor | None  # bool [B, T, G]: the rows the prefix computes


def _work(q, k, blocks, positions, seq_start, bounds_t, kind, sel_block, chunk_slots,
          varlen_min_len) -> _Work:  # fmt: skip
    B, T, H, _ = q.shape
    G, S = blocks.shape[2], k.shape[1]
    rows = _build_rows(blocks, sel_block, G, positions, seq_start, S, ranges=kind != "masked")
    if kind == "masked":
        return _Work(rows, _natural_chunks(rows, chunk_slots), None, None)
    bounds = bounds_t.tolist()
    # The causal-prefix shortcut reads query rows as key rows: not for a row subset (S > T).
    prefix = _causal_prefixes(blocks.shape[3], sel_block, bounds) if S == T else []
    rest = torch.ones_like(rows.pos, dtype=torch.bool)
    layout = causal = None
    if any(prefix):
        inside = _prefix_rows(prefix, bounds, T).to(rows.pos.device)
        # Each row decides for itself (batch row and group alike): a row of the prefix region
        # that selects fewer keys than 0..p goes to the chunks, and no other row changes path.
        full = (rows.lengths == rows.pos + 1) & inside.view(1, T, 1).expand(B, T, G).reshape(-1)
        rest = ~full
        causal = full.view(B, T, G)
        layout = _prefix_layout(prefix, bounds, T, B * H, q.device)
    if kind == "packed":
        chunks = _sorted_chunks(rows, rest, "packed", chunk_slots)
    else:
        wide = rows.lengths >= varlen_min_len
        chunks = _sorted_chunks(rows, rest & ~wide, "packed", chunk_slots)
        chunks += _sorted_chunks(rows, rest & wide, "varlen", chunk_slots)
    return _Work(rows, chunks, layout, causal)


def _chunked_fake(q, k, v, blocks, positions, seq_start, bounds, kind, sizes, scale, flash):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@kernel_op("sel_chunked", _chunked_fake)
def _sel_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    positions: torch.Tensor,
    seq_start: torch.Tensor,
    bounds: torch.Tensor,
    kind: str,
    sizes: list[int],
    scale: float,
    flash: bool,
) -> torch.Tensor:
    sel_block, chunk_slots, varlen_min_len = sizes
    B, T, H, Dk = q.shape
    G, Dv = k.shape[2], v.shape[-1]
    work = _work(q, k, blocks, positions, seq_start, bounds, kind, sel_block, chunk_slots,
                 varlen_min_len)  # fmt: skip
    q_rows = q.reshape(B * T * G, H // G, Dk)
    k_flat, v_flat = k.reshape(-1, Dk), v.reshape(-1, Dv)
    o = q.new_zeros(B * T * G, H // G, Dv)
    for c in work.chunks:
        o.index_copy_(0, c.rows, _chunk_forward(q_rows, k_flat, v_flat, work.rows, c, scale, flash))
    o = o.view(B, T, H, Dv)
    if work.prefix is not None:
        lay = work.prefix
        o_pre = chunk_forward(q, k, v, lay.lo, lay.hi, lay.chunks.tolist(), scale,
                              active=work.causal)  # fmt: skip
        causal_heads = work.causal.repeat_interleave(H // G, dim=2).unsqueeze(-1)
        o = torch.where(causal_heads, o_pre, o)
    return o


def _chunked_backward_fake(do, q, k, v, o, blocks, positions, seq_start, bounds, kind, sizes,
                           scale):  # fmt: skip
    # contiguous, like the real outputs (a fake must match their strides, not the inputs')
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("sel_chunked_backward", _chunked_backward_fake)
def _sel_chunked_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    blocks: torch.Tensor,
    positions: torch.Tensor,
    seq_start: torch.Tensor,
    bounds: torch.Tensor,
    kind: str,
    sizes: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sel_block, chunk_slots, varlen_min_len = sizes
    work = _work(q, k, blocks, positions, seq_start, bounds, kind, sel_block, chunk_slots,
                 varlen_min_len)  # fmt: skip
    do = do.to(q.dtype)
    dq, dk, dv = _chunks_backward(do, q, k, v, o, work.rows, work.chunks, scale)
    if work.prefix is not None:
        lay = work.prefix
        dqp, dkp, dvp = chunk_backward(do, q, k, v, o, lay.lo, lay.hi, lay.chunks.tolist(), scale,
                                       active=work.causal)  # fmt: skip
        dq, dk, dv = dq + dqp, dk + dkp, dv + dvp
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _SelectionAttention(torch.autograd.Function):
    """The torch paths' autograd wrapper; saves only tensors (``torch.func`` compatible)."""

    @staticmethod
    def forward(q, k, v, blocks, positions, seq_start, bounds, kind, sizes, scale, flash):
        return _sel_chunked(q, k, v, blocks, positions, seq_start, bounds, kind, sizes, scale,
                            flash)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, blocks, positions, seq_start, bounds, kind, sizes, scale, flash = inputs
        ctx.save_for_backward(q, k, v, output, blocks, positions, seq_start, bounds)
        ctx.kind, ctx.sizes, ctx.scale = kind, sizes, scale

    @staticmethod
    @autocast_off_backward
    def backward(ctx, do):
        with torch.no_grad():  # the backward op has no derivative of its own
            dq, dk, dv = _sel_chunked_backward(
                do, *ctx.saved_tensors, ctx.kind, ctx.sizes, ctx.scale
            )
        return dq, dk, dv, *([None] * 8)


def _run(q, k, v, block_indices, sel_block, scale, positions, seq_start, bounds, kind, *,
         chunk_slots=None, varlen_min_len=None, flash=False) -> torch.Tensor:  # fmt: skip
    chunk_slots = DEFAULT_CHUNK_SLOTS if chunk_slots is None else int(chunk_slots)
    varlen_min_len = DEFAULT_VARLEN_MIN_L if varlen_min_len is None else int(varlen_min_len)
    if chunk_slots < 1:
        raise ValueError(f"chunk_slots must be positive, got {chunk_slots}")
    sizes = [int(sel_block), chunk_slots, varlen_min_len]
    return _SelectionAttention.apply(
        q, k, v, block_indices.to(torch.int64), positions, seq_start, bounds, kind, sizes,
        float(scale), bool(flash),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Entry points: the dispatcher's (from a plan) and the plan-free one
# --------------------------------------------------------------------------------------------


def masked(q, k, v, block_indices, plan, scale: float, *, canonical: bool = False) -> torch.Tensor:
    """The "masked" path from a plan (sync-free); a row-subset plan's rows too. The torch paths
    accept any indices, so they ignore ``canonical`` (`nsa_impl.dispatch.selection`)."""
    return _run(q, k, v, block_indices, plan.cfg.sel_block, scale, plan.row_positions,
                plan.row_seq_start, plan.bounds_tensor, "masked")  # fmt: skip


def packed(q, k, v, block_indices, plan, scale: float, *, canonical: bool = False) -> torch.Tensor:
    """The "packed" path from a plan; a row-subset plan's rows too."""
    return _run(q, k, v, block_indices, plan.cfg.sel_block, scale, plan.row_positions,
                plan.row_seq_start, plan.bounds_tensor, "packed")  # fmt: skip


def varlen(q, k, v, block_indices, plan, scale: float, *, canonical: bool = False) -> torch.Tensor:
    """The "varlen" path from a plan (FlashAttention-2 varlen where the plan found it); a
    row-subset plan's rows too."""
    return _run(q, k, v, block_indices, plan.cfg.sel_block, scale, plan.row_positions,
                plan.row_seq_start, plan.bounds_tensor, "varlen",
                varlen_min_len=plan.sel_varlen_min_len, flash=plan.sel_varlen_flash)  # fmt: skip


def triton(q, k, v, block_indices, plan, scale: float, *, canonical: bool = False) -> torch.Tensor:
    """The "triton" path from a plan (its token layout; sync-free); ``canonical`` indices (the
    fused top-n kernel's) skip the cleaning."""
    return triton_sel.selection_attention(
        q, k, v, block_indices, plan.cfg.sel_block, scale, layout=plan.sel_tokens,
        canonical=canonical,
    )


def check_arguments(q, k, v, block_indices, cfg, path: str = "masked") -> None:
    """Shapes, dtypes and devices of the arguments (``ValueError``/``TypeError`` naming them)."""
    if path not in SELECTION_PATHS:
        raise ValueError(f"path must be one of {SELECTION_PATHS}, got {path!r}")
    if not isinstance(cfg, NSAConfig):
        raise TypeError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v), ("block_indices", block_indices)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a rank-4 tensor, got {shape}")
    B, T, H, Dk = q.shape
    G = k.shape[2]
    if k.shape[:2] != (B, T) or k.shape[3] != Dk or G == 0 or H % G:
        raise ValueError(
            f"k must be [B={B}, T={T}, G, Dk={Dk}] with H={H} % G == 0, got {list(k.shape)}"
        )
    if v.shape[:3] != (B, T, G):
        raise ValueError(f"v must be [B={B}, T={T}, G={G}, Dv], got {list(v.shape)}")
    if block_indices.shape[:3] != (B, T, G):
        raise ValueError(
            f"block_indices must be [B={B}, T={T}, G={G}, n], got {list(block_indices.shape)}"
        )
    if (
        block_indices.is_floating_point()
        or block_indices.is_complex()
        or block_indices.dtype == torch.bool
    ):
        raise TypeError(f"block_indices must be an integer tensor, got {block_indices.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
    for name, t in (("k", k), ("v", v), ("block_indices", block_indices)):
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} does not match q device {q.device}")


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    cfg: NSAConfig,
    scale: float,
    *,
    cu_seqlens: torch.Tensor | None = None,
    path: str = "packed",
    varlen_min_len: int = DEFAULT_VARLEN_MIN_L,
    chunk_slots: int = DEFAULT_CHUNK_SLOTS,
) -> torch.Tensor:
    """Selection attention ``o_sel`` (Eq. 12, spec I.6) on one named path, without a plan.

    Args:
        q: ``[B, T, H, Dk]`` queries; head ``i`` uses KV group ``i // (H // G)``.
        k, v: ``[B, T, G, Dk]`` / ``[B, T, G, Dv]`` the selection branch's keys and values.
        block_indices: integer ``[B, T, G, n]`` selected blocks per (position, group), as in
            ``NSAAux.block_indices``; negative entries, duplicates, unsorted order and blocks
            after the current one are allowed and change nothing.
        cfg: the `NSAConfig` (``sel_block`` is ``l'``).
        scale: softmax scale.
        cu_seqlens: int32 ``[N+1]`` boundaries of packed sequences (``B == 1``): positions and
            block indices are local to each sequence; nothing crosses a boundary.
        path: ``"masked"``, ``"packed"``, ``"varlen"`` or ``"triton"`` (module docstring).
        varlen_min_len: varlen path only: rows with fewer selected keys take packed buckets.
        chunk_slots: key slots per chunk; bounds the working memory (module docstring).

    Returns:
        ``o_sel [B, T, H, Dv]`` in ``q``'s dtype; exact zeros for rows that select no key.
    """
    check_arguments(q, k, v, block_indices, cfg, path)
    B, T, H, _ = q.shape
    bounds = [0, T] if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T, q.device)
    if path == "triton":
        return triton_sel.selection_attention(
            q, k, v, block_indices, cfg.sel_block, scale, cu_seqlens
        )
    b = torch.tensor(bounds, dtype=torch.int64)
    seq_start = torch.repeat_interleave(b[:-1], b.diff()).to(q.device)
    positions = torch.arange(T, device=q.device) - seq_start
    flash = path == "varlen" and flash_varlen_available(
        Inputs(q.device, q.dtype, B, T, H, k.shape[2], q.shape[-1], v.shape[-1], T,
               cu_seqlens is not None, True, cfg)  # fmt: skip
    )[0]
    return _run(q, k, v, block_indices, cfg.sel_block, scale, positions, seq_start, b, path,
                chunk_slots=chunk_slots, varlen_min_len=varlen_min_len, flash=flash)  # fmt: skip
