"""The NSA branches' PyTorch paths, and the row-range attention the compressed and sliding
branches share.

Both dense branches attend, for each query row ``r``, to one contiguous range of keys
``[lo[r], hi[r])`` (window: ``[max(start, p-w+1), p+1)``; compressed: the visible compressed
blocks of the row's sequence). `range_attention` computes that as an explicit masked softmax over
chunks of rows, with a backward that recomputes the probabilities chunk by chunk, so neither
direction ever holds more than one chunk's ``[B, H, c, span]`` tile. Forward and backward are
the custom ops ``nsa::range_attention`` / ``nsa::range_attention_backward``
(`nsa_impl.kernels.ops.kernel_op`): ``torch.compile`` sees one node per call whatever the length,
so a new ``T`` does not unroll a different chunk loop.

Memory bound (per call, besides inputs, outputs and gradients): one chunk of ``c`` rows over
``span`` keys keeps at most `BYTES_PER_ELEM` bytes per element of its ``B * H * c * span`` tile
alive (the logits, the probabilities in the softmax dtype, the probability gradient or the
scoring hook's working set), and ``c`` is the largest row count with
``BYTES_PER_ELEM * B * H * c * span <= budget_bytes`` (default: `default_budget`, 8 MiB on a
CPU where small cache-resident tiles are fastest, 512 MiB on CUDA where fewer launches are).
Only when a single row already exceeds the budget (``B * H * span`` huge) does a chunk of one
row go over it. The chunk table is computed once per layout (`RangeLayout`, held by the plan).

Numerics follow `nsa_impl.numerics`: float32/float64 inputs compute logits, softmax and
``p @ v`` in float64 and round the output once; float16/bfloat16 multiply ``(q * scale) @ k^T``
and ``p @ v`` in `nsa_impl.numerics.product_dtype` (their own dtype on CUDA's tensor cores,
float32 on the CPU) with a float32 softmax.

NaN containment: a chunk's key span covers the ranges of all its rows, so a key outside one
row's range is still inside the tile. Masked keys contribute exactly nothing: logits and
probabilities are *selected* (``masked_fill``), never multiplied by zero, and every matrix
product whose contraction runs over masked entries reads a copy of its other operand with
non-finite values zeroed (``v`` forward; ``q``, ``k`` and ``dO`` backward). A row that really
reads a non-finite value is then marked NaN (forward: rows that read a non-finite ``v``;
backward: the ``dV`` of keys read by a row whose ``dO`` is not finite); the others are
bit-identical to a run without the non-finite value. Empty rows (``lo == hi``) give exact zeros
forward and backward, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.ops import (
    autocast_off_backward,
    finite_rows,
    kernel_op,
    nan_to_zero,
    poison,
)
from ..numerics import compute_dtype, product_dtype

#: Default byte budget of one chunk's live tiles, per device type (see the module docstring).
DEFAULT_BUDGET_BYTES = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}
#: Bytes alive per element of a chunk's ``[B, H, c, span]`` tile, at most: for float32 inputs the
#: float64 logits (8), the float64 probabilities (8) and the hook's or the backward's float64
#: working tile (8).
BYTES_PER_ELEM = 24


def default_budget(device: torch.device) -> int:
    """Default chunk budget in bytes for tensors on ``device``."""
    return DEFAULT_BUDGET_BYTES.get(torch.device(device).type, DEFAULT_BUDGET_BYTES["cuda"])


#: ``on_probs(r0, r1, s0, p)``: sees the probabilities ``p [B, G, h, r1-r0, span]`` of rows
#: ``[r0, r1)`` over keys ``[s0, s0+span)`` during the forward pass (read only, no autograd).
ProbsHook = Callable[[int, int, int, torch.Tensor], None]


@dataclass(frozen=True)
class RowRanges:
    """Allowed keys ``[lo[r], hi[r])`` of every query row, host int64 tensors ``[T]``.

    Requirements (checked): ``lo`` non-decreasing and ``hi`` growing by at most one key per row,
    so a chunk of ``c`` rows spans at most ``width + c - 1`` keys (``width = max(hi - lo)``).
    A row subset (`subset`: e.g. a context-parallel shard's two chunks of a longer sequence) is
    several such runs: ``breaks`` are the rows where a new run starts, the requirements hold
    within each run, and no chunk crosses a break.

    Attributes:
        lo, hi: the ranges.
        num_keys: length of the key axis the ranges index.
        breaks: ascending rows ``0 < b < T`` that start a new run (``()``: one run).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    num_keys: int
    breaks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        lo, hi = self.lo, self.hi
        if lo.shape != hi.shape or lo.dim() != 1 or lo.device.type != "cpu":
            raise ValueError("RowRanges.lo/hi must be host 1-D tensors of one shape")
        if bool((hi < lo).any()) or bool((lo < 0).any()) or bool((hi > self.num_keys).any()):
            raise ValueError("RowRanges need 0 <= lo <= hi <= num_keys")
        T = lo.numel()
        if any(not 0 < b < T for b in self.breaks) or list(self.breaks) != sorted(
            set(self.breaks)
        ):
            raise ValueError(f"RowRanges.breaks must be ascending rows in (0, {T}), got "
                             f"{self.breaks}")  # fmt: skip
        if T > 1:
            inside = torch.ones(T - 1, dtype=torch.bool)  # diff i compares rows i and i + 1
            inside[[b - 1 for b in self.breaks]] = False
            if bool((lo.diff() < 0)[inside].any()) or bool((hi.diff() > 1)[inside].any()):
                raise ValueError(
                    "RowRanges need lo non-decreasing and hi growing by <= 1 per row (within "
                    "each run)"
                )

    def subset(self, rows: torch.Tensor) -> RowRanges:
        """The ranges of rows ``rows`` (host int64, strictly increasing) in that order: a run
        starts wherever ``rows`` skips a row (or at one of this object's breaks)."""
        if rows.dim() != 1 or rows.dtype != torch.int64 or rows.device.type != "cpu":
            raise ValueError("rows must be a host 1-D int64 tensor")
        T = self.lo.numel()
        if rows.numel() and (bool((rows.diff() <= 0).any()) or rows[0] < 0 or rows[-1] >= T):
            raise ValueError(f"rows must be strictly increasing and in [0, {T})")
        starts = torch.zeros(T + 1, dtype=torch.bool)
        starts[list(self.breaks)] = True
        jump = (rows.diff() != 1) | starts[rows[1:]]
        breaks = tuple((torch.nonzero(jump).flatten() + 1).tolist())
        return RowRanges(self.lo[rows], self.hi[rows], self.num_keys, breaks)

    @property
    def width(self) -> int:
        """Widest single row range."""
        return int((self.hi - self.lo).max()) if self.lo.numel() else 0

    def max_span(self, rows: int) -> int:
        """Upper bound on the keys a chunk of ``rows`` consecutive rows touches."""
        return min(self.num_keys, self.width + rows - 1)

    def chunk_rows(self, heads: int, budget_bytes: int) -> int:
        """Most rows per chunk keeping ``BYTES_PER_ELEM * heads * rows * span <= budget_bytes``.

        ``heads`` is ``B * H``. Returns at least 1.
        """
        T = self.lo.numel()
        per_elem = BYTES_PER_ELEM * heads

        def fits(c: int) -> bool:
            return c * max(self.max_span(c), 1) * per_elem <= budget_bytes

        lo, hi = 1, max(T, 1)
        if fits(hi):
            return hi
        while lo < hi:  # largest c with fits(c); fits is monotone in c
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def chunks(self, rows: int) -> torch.Tensor:
        """Host int64 ``[C, 4]``: row chunk ``[r0, r1)`` and the key span ``[s0, s1)`` it reads
        (chunks of ``rows`` rows, each run cut separately)."""
        T = self.lo.numel()
        edges = [0, *self.breaks, T]
        runs = list(zip(edges, edges[1:], strict=False))
        starts = [torch.arange(a, b, rows, dtype=torch.int64) for a, b in runs]
        ends = [torch.full_like(r, b) for r, (_, b) in zip(starts, runs, strict=True)]
        r0 = torch.cat(starts)
        r1 = torch.minimum(r0 + rows, torch.cat(ends))  # a chunk ends at its run's end
        s0 = self.lo[r0] if T else r0
        s1 = torch.maximum(s0, self.hi[r1 - 1]) if T else r0
        return torch.stack([r0, r1, s0, s1], dim=1)


@dataclass(frozen=True)
class RangeLayout:
    """`RowRanges` ready to run: device copies of ``lo``/``hi`` and the chunk table.

    Built once per (ranges, heads, budget) by `build` (host work); a plan keeps it, so a call
    does no host work. Attributes: ``lo``, ``hi`` (int64 ``[T]`` on the inputs' device),
    ``chunks`` (host int64 ``[C, 4]``, see `RowRanges.chunks`), ``num_keys``.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    chunks: torch.Tensor
    num_keys: int

    @classmethod
    def build(cls, ranges: RowRanges, heads: int, device, budget_bytes: int | None = None):
        """Chunk ``ranges`` for ``heads = B * H`` under ``budget_bytes`` (default per device)."""
        budget = default_budget(device) if budget_bytes is None else int(budget_bytes)
        chunks = ranges.chunks(ranges.chunk_rows(heads, budget))
        return cls(ranges.lo.to(device), ranges.hi.to(device), chunks, ranges.num_keys)


def _rows(x: torch.Tensor, r0: int, r1: int, G: int) -> torch.Tensor:
    """``x[:, r0:r1]`` ``[B, c, H, D]`` -> ``[B, G, h*c, D]`` (heads of a group, row-major)."""
    B, _, H, D = x.shape
    c = r1 - r0
    return x[:, r0:r1].reshape(B, c, G, H // G, D).permute(0, 2, 3, 1, 4).reshape(B, G, -1, D)


def _unrows(x: torch.Tensor, c: int) -> torch.Tensor:
    """Inverse of `_rows`: ``[B, G, h*c, D]`` -> ``[B, c, H, D]``."""
    B, G, hc, D = x.shape
    return x.reshape(B, G, hc // c, c, D).permute(0, 3, 1, 2, 4).reshape(B, c, -1, D)


def _keys(x: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """``x[:, s0:s1]`` ``[B, span, G, ...]`` -> ``[B, G, span, ...]``."""
    return x[:, s0:s1].transpose(1, 2)


def _allowed(lo, hi, r0: int, r1: int, s0: int, s1: int, active=None) -> torch.Tensor:
    """Bool ``[1|B, 1|G, c, span]``: key ``j`` is allowed for row ``r`` iff
    ``lo[r] <= j < hi[r]`` and, with ``active`` (bool ``[B, T, G]``), row ``r`` of that batch
    row and group is active (an inactive row reads nothing: its probabilities are exact zeros).
    """
    j = torch.arange(s0, s1, device=lo.device)
    allowed = ((j >= lo[r0:r1, None]) & (j < hi[r0:r1, None]))[None, None]
    if active is not None:
        allowed = allowed & active[:, r0:r1].transpose(1, 2).unsqueeze(-1)
    return allowed


def _probs(qc, kc, allowed, scale: float, acc) -> torch.Tensor:
    """Softmax probabilities ``[B, G, h, c, span]`` (``acc`` dtype) of one chunk.

    Disallowed keys get exactly ``-inf`` logits and then exactly 0 probability, selected (an
    empty row's NaN softmax is overwritten too). Forward and backward call this same function,
    so the backward's recomputed probabilities equal the forward's bit for bit.
    """
    B, G, hc, _ = qc.shape
    c, span = allowed.shape[-2:]
    shape = (B, G, hc // c, c, span)
    mm = product_dtype(qc.dtype, qc.device)  # scaled before the product: no overflow
    s = torch.matmul(qc.to(mm) * scale, kc.to(mm).transpose(-1, -2)).view(shape).to(acc)
    banned = ~allowed.unsqueeze(2)  # the same for the h heads of a group
    p = torch.softmax(s.masked_fill_(banned, float("-inf")), dim=-1)
    return p.masked_fill_(banned, 0.0)


def chunk_forward(q, k, v, lo, hi, chunks: list, scale: float, on_probs: ProbsHook | None = None,
                  active: torch.Tensor | None = None):  # fmt: skip
    """The forward pass of `range_attention` over a chunk list ``[(r0, r1, s0, s1), ...]``.

    ``active`` (bool ``[B, T, G]``, optional) switches rows off per batch row and group: an
    inactive row's output is exactly 0 and it reads no key, while the chunks (so every active
    row's arithmetic) stay those of ``lo``/``hi``.
    """
    B, T, H, _ = q.shape
    G, Dv = k.shape[2], v.shape[-1]
    h = H // G
    acc, mm = compute_dtype(q.dtype), product_dtype(q.dtype, q.device)
    v_bad = ~finite_rows(v)  # [B, S, G]
    v_clean = nan_to_zero(v)
    o = q.new_zeros(B, T, H, Dv)
    for r0, r1, s0, s1 in chunks:
        c, span = r1 - r0, s1 - s0
        if span == 0:  # every row of the chunk is empty: o stays 0
            if on_probs is not None:
                on_probs(r0, r1, s0, q.new_zeros(B, G, h, c, 0, dtype=acc))
            continue
        allowed = _allowed(lo, hi, r0, r1, s0, s1, active)
        p = _probs(_rows(q, r0, r1, G), _keys(k, s0, s1), allowed, scale, acc)
        if on_probs is not None:
            on_probs(r0, r1, s0, p)
        oc = torch.matmul(p.view(B, G, h * c, span).to(mm), _keys(v_clean, s0, s1).to(mm))
        reads_bad = (allowed & _keys(v_bad, s0, s1)[:, :, None, :]).any(-1)  # [B, G, c]
        oc = poison(oc.view(B, G, h, c, Dv), reads_bad[:, :, None, :])
        o[:, r0:r1] = _unrows(oc.view(B, G, h * c, Dv), c)  # the one rounding to q's dtype
    return o


def chunk_backward(do, q, k, v, o, lo, hi, chunks: list, scale: float,
                   active: torch.Tensor | None = None):  # fmt: skip
    """``(dq, dk, dv)`` of `chunk_forward` (probabilities recomputed chunk by chunk); inactive
    rows contribute exact zeros."""
    B, T, H, _ = q.shape
    G = k.shape[2]
    h = H // G
    acc, mm = compute_dtype(q.dtype), product_dtype(q.dtype, q.device)
    do = do.to(q.dtype)
    # Operands of products contracted over masked entries, with non-finite values zeroed.
    q_clean, k_clean, do_clean = nan_to_zero(q), nan_to_zero(k), nan_to_zero(do)
    do_bad = ~finite_rows(do)  # [B, T, H]
    # dq rows are written once (chunks own disjoint rows); dk/dv accumulate across chunks.
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dv_bad = torch.zeros(v.shape[:-1], dtype=torch.bool, device=v.device)  # [B, S, G]
    for r0, r1, s0, s1 in chunks:
        c, span = r1 - r0, s1 - s0
        if span == 0:
            continue
        allowed = _allowed(lo, hi, r0, r1, s0, s1, active)
        p = _probs(_rows(q, r0, r1, G), _keys(k, s0, s1), allowed, scale, acc)
        doc = _rows(do, r0, r1, G).to(mm)
        pt = p.view(B, G, h * c, span).transpose(-1, -2).to(mm)
        dv[:, s0:s1] += torch.matmul(pt, _rows(do_clean, r0, r1, G).to(mm)).transpose(1, 2)
        bad_rows = _rows(do_bad[..., None], r0, r1, G).view(B, G, h, c).any(2)  # [B, G, c]
        dv_bad[:, s0:s1] |= (allowed & bad_rows[..., None]).any(2).transpose(1, 2)
        dp = torch.matmul(doc, _keys(v, s0, s1).to(mm).transpose(-1, -2)).view(p.shape).to(acc)
        delta = (doc.to(acc) * _rows(o, r0, r1, G).to(acc)).sum(-1).view(B, G, h, c, 1)
        ds = p.mul_(dp.sub_(delta)).masked_fill_(~allowed.unsqueeze(2), 0.0)  # dS = P (dP - D)
        ds = ds.view(B, G, h * c, span).to(mm)
        dq_c = torch.matmul(ds, _keys(k_clean, s0, s1).to(mm)).to(acc).mul_(scale)
        dq[:, r0:r1] = _unrows(dq_c, c)
        dk_c = torch.matmul(ds.transpose(-1, -2), _rows(q_clean, r0, r1, G).to(mm))
        dk[:, s0:s1] += dk_c.to(acc).mul_(scale).transpose(1, 2)
    dv = poison(dv, dv_bad)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _forward_fake(q, k, v, lo, hi, chunks, scale):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@kernel_op("range_attention", _forward_fake)
def _range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    chunks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return chunk_forward(q, k, v, lo, hi, chunks.tolist(), scale)


def _backward_fake(do, q, k, v, o, lo, hi, chunks, scale):
    # contiguous, like the real outputs (a fake must match their strides, not the inputs')
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("range_attention_backward", _backward_fake)
def range_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    chunks: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op of `chunk_backward` (shared with the compressed branch's scoring op)."""
    return chunk_backward(do, q, k, v, o, lo, hi, chunks.tolist(), scale)


class _RangeAttention(torch.autograd.Function):
    """Chunked masked attention; saves only tensors (``torch.func`` compatible)."""

    @staticmethod
    def forward(q, k, v, lo, hi, chunks, scale):
        return _range_attention(q, k, v, lo, hi, chunks, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, lo, hi, chunks, scale = inputs
        ctx.save_for_backward(q, k, v, output, lo, hi, chunks)
        ctx.scale = scale

    @staticmethod
    @autocast_off_backward
    def backward(ctx, do):
        with torch.no_grad():  # the backward op has no derivative of its own
            dq, dk, dv = range_attention_backward(do, *ctx.saved_tensors, ctx.scale)
        return dq, dk, dv, None, None, None, None


def range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: RowRanges | RangeLayout,
    scale: float,
    *,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """Attention of each query row over its own key range, chunked, with autograd.

    Args:
        q: ``[B, T, H, Dk]`` queries.
        k, v: ``[B, S, G, Dk]`` / ``[B, S, G, Dv]`` keys and values (``H % G == 0``; query head
            ``i`` reads group ``i // (H // G)``).
        ranges: row ``r`` attends to keys ``[lo[r], hi[r])``: host `RowRanges` (chunked here
            with ``budget_bytes``), or a prepared `RangeLayout` (a plan's).
        scale: softmax scale.
        budget_bytes: byte budget of the live tiles of one chunk (``None``: `default_budget`).

    Returns:
        ``o [B, T, H, Dv]``; rows with an empty range are exactly 0.
    """
    B, T, H, _ = q.shape
    if isinstance(ranges, RowRanges):
        ranges = RangeLayout.build(ranges, B * H, q.device, budget_bytes)
    if ranges.lo.numel() != T or ranges.num_keys != k.shape[1]:
        raise ValueError(
            f"ranges cover {ranges.lo.numel()} rows / {ranges.num_keys} keys, "
            f"q has T={T} rows and k has {k.shape[1]} keys"
        )
    return _RangeAttention.apply(q, k, v, ranges.lo, ranges.hi, ranges.chunks, float(scale))
