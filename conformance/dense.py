"""An independent dense-mask formulation of the whole of spec Part I: the suite's oracle.

`nsa_ref` computes NSA one query row at a time from key *lists*. This module computes it for
all rows at once from boolean *masks* written straight from the spec, and shares no code with
`nsa_ref` (only the `NSAConfig` record is read, and none of its helper methods are called):

* every packed token gets a sequence id and a local position (batch rows and ``cu_seqlens``
  segments are the same thing here: independent sequences of one packed row);
* compressed block ``c`` of a sequence covers local keys ``[i*d, i*d + l)`` and is visible to a
  query at local position ``p`` iff ``i*d + l <= p + 1`` (I.3): a ``[rows, blocks]`` mask;
* Eq. 9's overlap matrix ``W[j, i] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d`` comes from interval
  arithmetic on all (selection block, compressed block) pairs at once (I.4);
* Eq. 10 is a reshape-and-sum over the heads of a group;
* Eq. 11's top-n ranks candidates by *counting* how many candidates beat each one under the
  composite key (forced, score, lower index): ``rank[j] = #{j' : key(j') > key(j)}``. No sort,
  no per-row loop (I.5);
* the selection mask is block membership & causality, the window mask ``p - w < s <= p`` (I.6,
  I.7), and every branch is a softmax over a masked row with exact exclusion (``-inf`` and an
  explicit zero for empty rows, I.3).

It is differentiable (the gradient oracle for float64 checks), runs on any device and dtype
(the float32 reference and the naive same-dtype implementation of the low-precision criterion,
spec I.10), can evaluate a subset of query positions (long sequences), and can take the block
indices to use instead of choosing them (so outputs of an implementation that legitimately broke
a near-tie differently can still be checked).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

from nsa_ref.config import NSAConfig

Phi = Callable[[torch.Tensor], torch.Tensor]
_BRANCHES = ("cmp", "sel", "win")


# ---------------------------------------------------------------------------------------------
# Closed-form counts of the spec (also checked on the spec's worked vectors by the meta tests).


def num_cmp(p: int, cfg: NSAConfig) -> int:
    """Compressed blocks visible to 0-based position ``p``: blocks ``i`` with ``i*d + l <= p+1``."""
    l, d = cfg.cmp_block, cfg.cmp_stride
    # Count i >= 0 with i*d <= p + 1 - l, written as a ceiling so that it reads differently from
    # the reference's floor formula.
    last_start = p + 1 - l
    return 0 if last_start < 0 else -(-(last_start + 1) // d)


def read_bound(S: int, cfg: NSAConfig) -> int:
    """Spec I.9 bound of keys read at a decode step with ``S`` cached tokens."""
    return num_cmp(S - 1, cfg) + cfg.sel_top_n * cfg.sel_block + min(cfg.window, S)


def overlap_matrix(num_sel: int, num_cmp_blocks: int, cfg: NSAConfig, *, exact: bool = False):
    """Eq. 9 weights ``W [num_sel, num_cmp]`` from interval arithmetic (spec I.4).

    With ``exact=True`` the result is a list of lists of `fractions.Fraction` (for worked
    vectors); otherwise a float64 tensor.
    """
    l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    j = torch.arange(num_sel, dtype=torch.int64)[:, None]
    i = torch.arange(num_cmp_blocks, dtype=torch.int64)[None, :]
    lo = torch.maximum(i * d, j * ls)
    hi = torch.minimum(i * d + l, (j + 1) * ls)
    overlap = (hi - lo).clamp(min=0)
    if exact:
        return [[Fraction(int(x), d) for x in row] for row in overlap.tolist()]
    return overlap.to(torch.float64) / d


# ---------------------------------------------------------------------------------------------
# The oracle.


@dataclass
class DenseOut:
    """Everything the oracle computes, in the public layout.

    ``Q`` is ``T`` unless ``positions`` selected a subset of query positions. Score tensors use
    local (per-sequence) block indices, like `nsa_ref.NSAAux`.

    Attributes:
        o, o_cmp, o_sel, o_win: ``[B, Q, H, Dv]`` output and branch outputs before gating.
        p_cmp: ``[B, Q, H, num_cmp(T-1)]`` compressed-attention probabilities.
        p_slc: ``[B, Q, G, ceil(T/l')]`` group scores (Eqs. 9-10), 0 where not a candidate.
        block_indices: ``[B, Q, G, n]`` int64, ascending, ``-1`` padded (the blocks used).
        reads_cmp: ``[B, Q]`` visible compressed blocks.
        reads_sel: ``[B, Q, G]`` selected keys ``<= p`` per group.
        reads_win: ``[B, Q]`` window keys.
        positions: the query positions evaluated (``[Q]`` int64).
    """

    o: torch.Tensor
    o_cmp: torch.Tensor
    o_sel: torch.Tensor
    o_win: torch.Tensor
    p_cmp: torch.Tensor
    p_slc: torch.Tensor
    block_indices: torch.Tensor
    reads_cmp: torch.Tensor
    reads_sel: torch.Tensor
    reads_win: torch.Tensor
    positions: torch.Tensor


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``mask``; rows with no key give exact zeros.

    Excluded entries are ``-inf`` before ``exp`` (exact exclusion, never a finite sentinel), and
    the shift is detached, so no NaN appears forward or backward, even for empty rows.
    """
    if logits.shape[-1] == 0:  # no key at all (e.g. no compressed block yet): nothing to weigh
        return logits
    x = logits.masked_fill(~mask, float("-inf"))
    shift = x.amax(dim=-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(x - shift)
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def attend_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
):
    """``q [R, H, Dk]`` over keys ``k [S, H, Dk]`` / ``v [S, H, Dv]`` allowed by ``mask [R, H, S]``.

    Returns ``(o [R, H, Dv], probs [R, H, S])``.
    """
    logits = torch.einsum("rhd,shd->rhs", q, k) * scale
    probs = masked_softmax(logits, mask)
    return torch.einsum("rhs,shd->rhd", probs, v), probs


def causal_attention(q, k, v, *, scale=None, cu_seqlens=None):
    """Plain causal attention ``o[p] = Attn(q[p], k[:p+1])`` per sequence (Eq. 1): ``[B,T,H,Dv]``.

    ``cu_seqlens`` packs sequences as in `nsa_dense`; ``scale`` defaults to ``1/sqrt(Dk)``.
    """
    B, T, H, Dk = q.shape
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    lay = _Layout.build(B, T, cu_seqlens, q.device)
    h = H // k.shape[2]
    qf, kf, vf = (lay.flat(x) for x in (q, k, v))
    kh, vh = kf.repeat_interleave(h, dim=1), vf.repeat_interleave(h, dim=1)
    same = lay.seq[:, None] == lay.seq[None, :]
    mask = same & (lay.pos[None, :] <= lay.pos[:, None])
    o, _ = attend_masked(qf, kh, vh, mask[:, None, :].expand(-1, H, -1), scale)
    return lay.unflat(o, torch.arange(T, device=q.device))


@dataclass
class _Layout:
    """Packed tokens: sequence id, local position and global start of each sequence."""

    B: int
    T: int
    varlen: bool
    lengths: list[int]
    starts: torch.Tensor  # [N] global start of each sequence
    seq: torch.Tensor  # [total] sequence id of each token
    pos: torch.Tensor  # [total] local position of each token

    @classmethod
    def build(cls, B: int, T: int, cu_seqlens, device) -> _Layout:
        if cu_seqlens is None:
            lengths = [T] * B
        else:
            bounds = [int(c) for c in cu_seqlens.tolist()]
            lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        lens = torch.tensor(lengths, dtype=torch.int64, device=device)
        starts = torch.cumsum(lens, 0) - lens
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        pos = torch.arange(int(lens.sum()), device=device) - starts[seq]
        return cls(B, T, cu_seqlens is not None, lengths, starts, seq, pos)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...] -> [B*T, ...]`` (varlen: ``[1, total, ...] -> [total, ...]``)."""
        return x.reshape(-1, *x.shape[2:])

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Packed-token indices of the query rows: every sequence row at ``positions``."""
        if self.varlen:
            return positions
        base = torch.arange(self.B, device=positions.device)[:, None] * self.T
        return (base + positions[None, :]).reshape(-1)

    def unflat(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows back to ``[B, Q, ...]``."""
        return x.reshape(1 if self.varlen else self.B, positions.numel(), *x.shape[1:])


def _blocks(lay: _Layout, count: Callable[[int], int], device):
    """Blocks of every sequence (``count(len)`` each): ``(seq id, local index, first id)``."""
    counts = torch.tensor([count(n) for n in lay.lengths], dtype=torch.int64, device=device)
    seq = torch.repeat_interleave(torch.arange(len(lay.lengths), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), device=device) - first[seq]
    return seq, local, first


def _compress(x: torch.Tensor, starts: torch.Tensor, l: int, phi: Phi | None) -> torch.Tensor:
    """``x [total, G, D]`` -> ``[C, G, D]``: ``phi`` of the ``l`` keys from each global start."""
    G, D = x.shape[1], x.shape[2]
    if starts.numel() == 0:
        return x.new_zeros(0, G, D)
    idx = starts[:, None] + torch.arange(l, device=x.device)[None, :]  # [C, l]
    blocks = x[idx].permute(0, 2, 1, 3)  # [C, G, l, D]
    if phi is None:
        return blocks.sum(dim=-2) / l
    return phi(blocks)


def nsa_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cfg: NSAConfig,
    *,
    scale: float | None = None,
    phi_k: Phi | None = None,
    phi_v: Phi | None = None,
    branch_kv: dict | None = None,
    cu_seqlens: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> DenseOut:
    """NSA (spec Part I) for all query rows at once, from full masks. See the module docstring.

    Args:
        q, k, v, gates, cfg, scale, phi_k, phi_v, branch_kv, cu_seqlens: as in
            `nsa_ref.nsa_attention` (inputs are assumed valid; this is an oracle, not an API).
        block_indices: ``[B, T, G, m]`` local selection blocks to use instead of choosing them
            (``-1`` and duplicates ignored); the returned ``block_indices`` are then these, as
            a deduplicated ascending set.
        positions: query positions to evaluate (default: all ``T``); with ``cu_seqlens`` they
            index the packed row.
    """
    B, T, H, Dk = q.shape
    dev = q.device
    kv = {name: tuple((branch_kv or {}).get(name, (k, v))) for name in _BRANCHES}
    G = kv["sel"][0].shape[2]
    h = H // G
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    l, d, ls, n, w = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_top_n, cfg.window
    lay = _Layout.build(B, T, cu_seqlens, dev)
    positions = torch.arange(T, device=dev) if positions is None else positions.to(dev).long()
    rows = lay.rows(positions)
    r_seq, r_pos = lay.seq[rows], lay.pos[rows]
    tok_seq, tok_pos = lay.seq, lay.pos

    def heads(x):  # [S, G, D] -> [S, H, D]: query head i reads group i // h
        return x.repeat_interleave(h, dim=1)

    q_r = lay.flat(q)[rows]  # [R, H, Dk]

    # Compression branch (Eqs. 7-8).
    c_seq, c_idx, _ = _blocks(lay, lambda L: num_cmp(L - 1, cfg), dev)
    c_start = lay.starts[c_seq] + c_idx * d
    k_c = _compress(lay.flat(kv["cmp"][0]), c_start, l, phi_k)
    v_c = _compress(lay.flat(kv["cmp"][1]), c_start, l, phi_v)
    vis = (c_seq[None, :] == r_seq[:, None]) & (c_idx[None, :] * d + l <= r_pos[:, None] + 1)
    o_cmp, p_cmp = attend_masked(
        q_r, heads(k_c), heads(v_c), vis[:, None, :].expand(-1, H, -1), scale
    )

    # Block scores (Eqs. 9-10) over every selection block of every sequence.
    s_seq, s_idx, s_first = _blocks(lay, lambda L: -(-L // ls), dev)
    lo = torch.maximum(c_idx[None, :] * d, s_idx[:, None] * ls)
    hi = torch.minimum(c_idx[None, :] * d + l, (s_idx[:, None] + 1) * ls)
    W = ((hi - lo).clamp(min=0) * (s_seq[:, None] == c_seq[None, :])).to(q.dtype) / d  # [J, C]
    with torch.no_grad():
        p_heads = torch.einsum("rhc,jc->rhj", p_cmp.detach(), W)
        P = p_heads.reshape(p_heads.shape[0], G, h, -1).sum(dim=2)  # [R, G, J]
    b_r = r_pos // ls
    cand = (s_seq[None, :] == r_seq[:, None]) & (s_idx[None, :] <= b_r[:, None])  # [R, J]
    P = P * cand[:, None, :]

    # Top-n (Eq. 11) by counting, or the given block indices.
    if block_indices is None:
        init = s_idx[None, :] < cfg.sel_init_blocks
        local = s_idx[None, :] > b_r[:, None] - cfg.sel_local_blocks
        forced = (cand & (init | local))[:, None, :].expand(-1, G, -1)  # [R, G, J]
        f_a, f_b = forced[..., :, None], forced[..., None, :]  # a = the block ranked, b = rival
        s_a, s_b = P[..., :, None], P[..., None, :]
        i_a, i_b = s_idx[:, None], s_idx[None, :]
        beats = (f_b & ~f_a) | ((f_b == f_a) & ((s_b > s_a) | ((s_b == s_a) & (i_b < i_a))))
        rank = (beats & cand[:, None, None, :]).sum(dim=-1)  # [R, G, J]
        budget = torch.clamp(b_r + 1, max=n)[:, None, None]
        chosen = cand[:, None, :] & (rank < budget)
    else:
        given = lay.flat(block_indices.to(dev).long())[rows]  # [R, G, m]
        member = (given[..., :, None] == s_idx[None, None, None, :]).any(dim=-2)  # [R, G, J]
        chosen = member & (s_seq[None, None, :] == r_seq[:, None, None])

    # Selection branch (Eq. 12): chosen blocks, keys <= p, same sequence.
    tok_block = s_first[tok_seq] + tok_pos // ls  # global selection block of every token
    causal = (tok_seq[None, :] == r_seq[:, None]) & (tok_pos[None, :] <= r_pos[:, None])  # [R, S]
    sel_mask = chosen[:, :, tok_block] & causal[:, None, :]  # [R, G, S]
    k_s, v_s = (lay.flat(x) for x in kv["sel"])
    o_sel, _ = attend_masked(
        q_r, heads(k_s), heads(v_s), sel_mask.repeat_interleave(h, dim=1), scale
    )

    # Sliding window (I.7): p - w < s <= p.
    win_mask = causal & (tok_pos[None, :] > r_pos[:, None] - w)
    k_w, v_w = (lay.flat(x) for x in kv["win"])
    o_win, _ = attend_masked(
        q_r, heads(k_w), heads(v_w), win_mask[:, None, :].expand(-1, H, -1), scale
    )

    # Gate (Eq. 5).
    g = lay.flat(gates)[rows]
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_sel + g[..., 2:3] * o_win

    # Public layout: local block indices, scores placed at local indices.
    n_cmp_out = num_cmp(T - 1, cfg)
    n_sel_out = -(-T // ls)
    to_local_c = (c_idx[:, None] == torch.arange(n_cmp_out, device=dev)[None, :]).to(p_cmp.dtype)
    to_local_s = (s_idx[:, None] == torch.arange(n_sel_out, device=dev)[None, :]).to(P.dtype)
    p_cmp_local = torch.einsum("rhc,ck->rhk", p_cmp.detach(), to_local_c)
    p_slc_local = torch.einsum("rgj,jk->rgk", P, to_local_s)
    big = torch.iinfo(torch.int64).max
    ordered = torch.where(
        chosen, s_idx[None, None, :], torch.full_like(chosen, big, dtype=torch.int64)
    )
    ordered = ordered.sort(dim=-1).values
    # n slots, or more when given indices hold more distinct blocks (then the caller sees them all).
    width = max(n, int(chosen.sum(dim=-1).max())) if chosen.numel() else n
    pad = torch.full(
        (*ordered.shape[:2], max(0, width - ordered.shape[-1])), big, dtype=torch.int64, device=dev
    )
    ordered = torch.cat([ordered, pad], dim=-1)[..., :width]
    idx = torch.where(ordered == big, torch.full_like(ordered, -1), ordered)

    def out(x):
        return lay.unflat(x, positions)

    return DenseOut(
        o=out(o),
        o_cmp=out(o_cmp),
        o_sel=out(o_sel),
        o_win=out(o_win),
        p_cmp=out(p_cmp_local),
        p_slc=out(p_slc_local),
        block_indices=out(idx),
        reads_cmp=out(vis.sum(-1)),
        reads_sel=out(sel_mask.sum(-1)),
        reads_win=out(win_mask.sum(-1)),
        positions=positions,
    )
