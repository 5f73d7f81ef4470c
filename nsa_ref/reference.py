"""The exact NSA reference: ``nsa_attention`` (Eq. 5) built row by row from `nsa_ref.rules`.

Written for clarity, not speed: one query position at a time, attention over exactly the key set
each branch defines ("truncation numerics", never a masked full row). Runs in the dtype it is
given (float64 for the `exact` tolerance class) and is differentiable: it is the gradient oracle.
float32 and float16/bfloat16 results are the wider computation rounded once (spec I.10): each
branch by `rules.attend`, then Eq. 5 by `gate`; half-precision K/V gradients are summed in
float32 (`SequenceKV.widen`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import rules
from .config import NSAConfig
from .validate import BRANCHES, check_inputs


@dataclass
class NSAAux:
    """Intermediate results returned with ``return_aux=True`` (API.md).

    Attributes:
        block_indices: ``[B, T, G, n]`` int64, ascending, ``-1`` padded (spec I.5).
        p_slc: ``[B, T, G, ceil(T/l')]`` group-summed block scores (Eq. 9-10), 0 where the block
            is not a candidate.
        p_cmp: ``[B, T, H, num_cmp(T-1)]`` compressed-attention probabilities (Eq. 8), 0 where the
            compressed block is not visible.
        o_cmp, o_sel, o_win: ``[B, T, H, Dv]`` branch outputs before gating.
    """

    block_indices: torch.Tensor
    p_slc: torch.Tensor
    p_cmp: torch.Tensor
    o_cmp: torch.Tensor
    o_sel: torch.Tensor
    o_win: torch.Tensor


@dataclass
class RowResult:
    """One query position's branch outputs and scores."""

    o_cmp: torch.Tensor  # [H, Dv]
    o_sel: torch.Tensor  # [H, Dv]
    o_win: torch.Tensor  # [H, Dv]
    p_cmp: torch.Tensor  # [H, num_cmp(p)]
    p_slc: torch.Tensor  # [G, b(p) + 1]
    blocks: list[list[int]]  # per group: selected blocks, ascending
    sel_reads: int  # most selected keys <= p over the groups


class SequenceKV:
    """One sequence's keys/values per branch, expanded to query heads, plus compressed K/V.

    Prefill builds it once for the whole sequence; decode appends to it token by token. A row at
    position ``p`` reads only raw keys ``<= p`` and compressed blocks visible to ``p``.
    """

    def __init__(self, cfg: NSAConfig, h: int, phi_k=None, phi_v=None):
        self.cfg, self.h, self.phi_k, self.phi_v = cfg, h, phi_k, phi_v
        self.raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cmp_k: torch.Tensor | None = None  # [N, G, Dk]
        self.cmp_v: torch.Tensor | None = None  # [N, G, Dv]
        self.narrow: dict | None = None  # the half-precision K/V `widen` replaced

    def set_raw(self, kv: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Raw per-branch ``(k [T, G, Dk], v [T, G, Dv])``."""
        self.raw = kv

    def compress_all(self) -> None:
        """Eq. 7 over the whole sequence: every block that ends inside it."""
        k, v = self.raw["cmp"]
        nk, nv = self.narrow["cmp"] if self.narrow is not None else (k, v)
        num_blocks = rules.visible_cmp_blocks(k.shape[0] - 1, self.cfg)
        self.cmp_k = rules.compress(k if self.phi_k is None else nk, num_blocks, self.cfg,
                                    self.phi_k, name="phi_k").to(k.dtype)  # fmt: skip
        self.cmp_v = rules.compress(v if self.phi_v is None else nv, num_blocks, self.cfg,
                                    self.phi_v, name="phi_v").to(v.dtype)  # fmt: skip

    def widen(self) -> None:
        """float16/bfloat16 raw K/V as float32 copies (each tensor once), before `compress_all`:
        the rows' branch outputs are float32 (`rules.attend`), the mean pools in float32, and
        the gradients every row sends are summed in float32 and rounded once (spec I.10). A
        user ``phi`` still sees the input dtype (its parameters are in it)."""
        k, _ = self.raw["cmp"]
        if k.dtype not in _HALF:
            return
        self.narrow = self.raw
        wide: dict[int, torch.Tensor] = {}
        for pair in self.raw.values():
            for t in pair:
                wide.setdefault(id(t), t.float())
        self.raw = {b: (wide[id(k)], wide[id(v)]) for b, (k, v) in self.raw.items()}

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[n, G, D] -> [n, H, D]``: query head ``i`` reads group ``i // h``."""
        return t.repeat_interleave(self.h, dim=1)


def nsa_row(p: int, q_p: torch.Tensor, seq: SequenceKV, scale: float, W: torch.Tensor) -> RowResult:
    """All three branches for query position ``p`` (``q_p [H, Dk]``), spec I.3-I.7.

    ``W`` holds the Eq. 9 overlap weights for at least ``b(p)+1`` rows and ``num_cmp(p)`` columns.
    """
    cfg, h = seq.cfg, seq.h
    H = q_p.shape[0]
    G = H // h

    # Compression branch (Eqs. 7-8): the visible compressed blocks only.
    M = rules.visible_cmp_blocks(p, cfg)
    o_cmp, p_cmp = rules.attend(q_p, seq.heads(seq.cmp_k[:M]), seq.heads(seq.cmp_v[:M]), scale)

    # Block scores (Eqs. 9-10) over the candidates 0 .. b(p).
    b = p // cfg.sel_block
    p_slc_heads = p_cmp @ W[: b + 1, :M].T.to(p_cmp)  # [H, b+1]
    p_slc = rules.group_scores(p_slc_heads, h)  # [G, b+1]

    # Top-n (Eq. 11) and selection attention (Eq. 12), one block set per group.
    k_sel, v_sel = seq.raw["sel"]
    o_sel = []
    blocks_per_group = []
    sel_reads = 0
    scores = p_slc.detach().tolist()
    for g in range(G):
        blocks = rules.top_n_blocks(scores[g], b, cfg)
        keys = torch.tensor(
            rules.selected_keys(blocks, p, cfg), dtype=torch.long, device=q_p.device
        )
        heads = slice(g * h, (g + 1) * h)
        kg = k_sel[keys, g].unsqueeze(1).expand(-1, h, -1)
        vg = v_sel[keys, g].unsqueeze(1).expand(-1, h, -1)
        o_sel.append(rules.attend(q_p[heads], kg, vg, scale)[0])
        blocks_per_group.append(blocks)
        sel_reads = max(sel_reads, len(keys))

    # Sliding window (spec I.7): exactly min(w, p+1) keys.
    k_win, v_win = seq.raw["win"]
    keys = torch.tensor(rules.window_keys(p, cfg), dtype=torch.long, device=q_p.device)
    o_win, _ = rules.attend(q_p, seq.heads(k_win[keys]), seq.heads(v_win[keys]), scale)

    return RowResult(o_cmp, torch.cat(o_sel), o_win, p_cmp, p_slc, blocks_per_group, sel_reads)


_HALF = (torch.float16, torch.bfloat16)


def gate(o_cmp, o_sel, o_win, gates):
    """Eq. 5: ``g_cmp * o_cmp + g_sel * o_sel + g_win * o_win`` per query head.

    float16/bfloat16 inputs are combined in float32 and rounded once (spec I.10: the reference
    rounds the wider result once, as `rules.attend` does for each branch).
    """
    if gates.dtype in _HALF:
        wide = [t.float() for t in (o_cmp, o_sel, o_win, gates)]
        return gate(*wide).to(gates.dtype)
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win


def branch_pairs(k, v, branch_kv: dict | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-branch ``(k, v)``: ``branch_kv`` entries override the shared ``k, v`` (spec I.8)."""
    branch_kv = branch_kv or {}
    return {name: tuple(branch_kv.get(name, (k, v))) for name in BRANCHES}


def _sequence(q, kv, gates, cfg, scale, h, phi_k, phi_v, num_sel_out, num_cmp_out):
    """One sequence (``q [T, H, Dk]``; positions restart at 0) -> per-row stacked results."""
    T = q.shape[0]
    seq = SequenceKV(cfg, h, phi_k, phi_v)
    seq.set_raw(kv)
    seq.widen()
    seq.compress_all()
    W = rules.overlap_weights(cfg.num_sel_blocks(T), seq.cmp_k.shape[0], cfg)
    n = cfg.sel_top_n
    rows = [nsa_row(p, q[p], seq, scale, W) for p in range(T)]

    o_cmp = torch.stack([r.o_cmp for r in rows])
    o_sel = torch.stack([r.o_sel for r in rows])
    o_win = torch.stack([r.o_win for r in rows])
    G = len(rows[0].blocks)
    idx = torch.full((T, G, n), -1, dtype=torch.long)
    p_slc = q.new_zeros(T, G, num_sel_out)
    p_cmp = q.new_zeros(T, q.shape[1], num_cmp_out)
    for p, r in enumerate(rows):
        for g, blocks in enumerate(r.blocks):
            idx[p, g, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        p_slc[p, :, : r.p_slc.shape[1]] = r.p_slc.detach()
        p_cmp[p, :, : r.p_cmp.shape[1]] = r.p_cmp.detach()
    o = gate(o_cmp, o_sel, o_win, gates).to(q.dtype)
    o_cmp, o_sel, o_win = (t.to(q.dtype) for t in (o_cmp, o_sel, o_win))  # half: kept in float32
    return o, NSAAux(idx.to(q.device), p_slc, p_cmp, o_cmp, o_sel, o_win)


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cfg: NSAConfig,
    *,
    scale: float | None = None,
    phi_k=None,
    phi_v=None,
    branch_kv: dict | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_aux: bool = False,
    validate: bool = True,
):
    """Native Sparse Attention, exactly (Eq. 5 over Eqs. 7-12 and the sliding window).

    Args:
        q: ``[B, T, H, Dk]`` queries.
        k, v: ``[B, T, G, Dk]`` / ``[B, T, G, Dv]`` keys and values shared by the branches.
        gates: ``[B, T, H, 3]`` gate values in ``[0, 1]`` ordered ``(cmp, sel, win)``.
        cfg: the `NSAConfig`.
        scale: softmax scale, default ``1/sqrt(Dk)``.
        phi_k, phi_v: compression functions ``[..., l, D] -> [..., D]`` (default: mean).
        branch_kv: optional ``{"cmp"|"sel"|"win": (k, v)}`` overriding ``k, v`` per branch.
        cu_seqlens: int32 ``[N+1]`` boundaries of packed sequences (requires ``B == 1``).
        return_aux: also return an `NSAAux`.
        validate: check that gates are finite and within ``[0, 1]``.

    Returns:
        ``o [B, T, H, Dv]``, or ``(o, aux)`` with ``return_aux=True``.
    """
    dims, bounds = check_inputs(
        q,
        k,
        v,
        gates,
        cfg,
        scale=scale,
        branch_kv=branch_kv,
        cu_seqlens=cu_seqlens,
        phi_k=phi_k,
        phi_v=phi_v,
        validate_gates=validate,
    )
    scale = 1.0 / math.sqrt(dims.Dk) if scale is None else float(scale)
    kv = branch_pairs(k, v, branch_kv)
    num_sel_out = cfg.num_sel_blocks(dims.T)
    num_cmp_out = cfg.num_cmp(dims.T - 1)

    # One run per independent sequence: a batch row, or a cu_seqlens segment of the packed row.
    segments = (
        [(b, 0, dims.T) for b in range(dims.B)]
        if bounds is None
        else [(0, s, e) for s, e in zip(bounds, bounds[1:], strict=False)]
    )
    outs, auxes = [], []
    for b, s, e in segments:
        cut: dict[int, torch.Tensor] = {}  # a tensor the branches share stays one slice

        def piece(t, b=b, s=s, e=e, cut=cut):
            return cut.setdefault(id(t), t[b, s:e])

        seg_kv = {name: (piece(kk), piece(vv)) for name, (kk, vv) in kv.items()}
        o, aux = _sequence(
            q[b, s:e],
            seg_kv,
            gates[b, s:e],
            cfg,
            scale,
            dims.h,
            phi_k,
            phi_v,
            num_sel_out,
            num_cmp_out,
        )
        outs.append(o)
        auxes.append(aux)

    join = (lambda ts: torch.stack(ts)) if bounds is None else (lambda ts: torch.cat(ts)[None])
    o = join(outs)
    if not return_aux:
        return o
    aux = NSAAux(*(join([getattr(a, f) for a in auxes]) for f in NSAAux.__dataclass_fields__))
    return o, aux
