"""`NSACache`: token-by-token NSA decoding, vectorised over batch, heads and groups (spec I.9).

One `step` appends the new token's raw K/V, emits a compressed block when one just completed
(pooling only the newest ``l`` raw keys), scores the selection blocks from the compressed
attention probabilities (Eqs. 8-10, with Eq. 9 as a banded overlap weight), picks top-n (Eq. 11)
and attends over exactly the keys each branch reads: the visible compressed blocks, the selected
keys ``<= p`` and the last ``min(w, p+1)`` keys. Nothing is recomputed over the whole history, so a
step costs what the three branches read (plus amortised O(1) buffer growth).
"""

from __future__ import annotations

import math

import torch

from nsa_ref.config import NSAConfig
from nsa_ref.reference import gate
from nsa_ref.scalars import as_int, as_positive_float
from nsa_ref.validate import BRANCHES, check_inputs, check_phi, check_phi_output

from . import amp
from .numerics import compute_dtype
from .scoring import overlap_scores, top_n

#: Tokens a fresh cache holds before its first doubling (when no ``max_len`` is given).
INITIAL_CAPACITY = 256


def attend(q, k, v, scale: float, valid: torch.Tensor | None = None):
    """Eq. 2 per group: ``q [B, G, h, Dk]``, ``k [B, G, n, Dk]``, ``v [B, G, n, Dv]``.

    All in one dtype (the caller's `compute_dtype`). ``valid [B, G, n]`` excludes keys exactly
    (``-inf``). Returns ``(o [B, G, h, Dv], probs)``; callers never pass an empty or all-invalid
    key set except the compressed branch, which handles ``n = 0`` itself.
    """
    logits = (q * scale) @ k.transpose(-1, -2)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return probs @ v, probs


class _Buffer:
    """A ``[B, G, capacity, D]`` buffer filled along dim 2, grown by doubling (or fixed)."""

    def __init__(self, like: torch.Tensor, capacity: int, fixed: bool):
        # ``like`` is a [B, T, G, D] input; the buffer keeps [B, G, slot, D] so that a group's
        # keys are contiguous for the per-group matmuls.
        self.data = like.new_zeros(like.shape[0], like.shape[2], capacity, like.shape[3])
        self.fixed = fixed

    def write(self, pos: int, x: torch.Tensor, what: str) -> None:
        """Store ``x [B, G, n, D]`` at slots ``pos .. pos+n-1``, doubling the buffer when full."""
        cap, end = self.data.shape[2], pos + x.shape[2]
        if end > cap:
            if self.fixed:
                raise ValueError(f"NSACache max_len={cap} exceeded while appending {what}")
            while cap < end:
                cap *= 2
            grown = self.data.new_zeros(*self.data.shape[:2], cap, self.data.shape[3])
            grown[:, :, :pos] = self.data[:, :, :pos]
            self.data = grown
        self.data[:, :, pos:end] = x

    def clone(self) -> _Buffer:
        """An independent copy (when shared branch K/V start to differ)."""
        out = object.__new__(_Buffer)
        out.data, out.fixed = self.data.clone(), self.fixed
        return out


def selected_key_count(blocks: torch.Tensor, p: int, sel_block: int) -> torch.Tensor:
    """Spec I.9 ``sel`` reads: keys ``<= p`` in the (distinct, ``-1`` padded) selected blocks.

    ``blocks [B, G, k]`` -> the maximum over batch and groups, as a 0-d tensor (no sync).
    """
    per_block = (p + 1 - blocks * sel_block).clamp(0, sel_block).masked_fill(blocks < 0, 0)
    return per_block.sum(-1).amax()


class NSACache:
    """Decode state of `nsa_impl` for a batch of ``B`` sequences decoded in lock step.

    Same contract as `nsa_ref.NSARefCache`, vectorised: raw K/V per branch (one shared buffer
    while the branches share K/V), the compressed K/V cache (block ``i`` emitted at the step where
    ``i*d + l == p + 1`` by pooling only the newest ``l`` raw keys), and per-step read counters.

    Args:
        cfg: the `NSAConfig`.
        scale: softmax scale, default ``1/sqrt(Dk)``.
        phi_k, phi_v: compression functions ``[..., l, D] -> [..., D]`` (default: mean), the
            same callables a prefill would get.
        batch_size: if given, every step must have this batch size.
        max_len: if given, buffers are allocated once for ``max_len`` tokens (static memory) and
            a step past it raises ``ValueError``; otherwise they start at `INITIAL_CAPACITY`
            tokens and double when full.

    Buffers live on the device and dtype of the first step's tensors; later steps must match
    (``ValueError`` for a device, ``TypeError`` for a dtype). Attention and block scores run in
    `nsa_impl.numerics.compute_dtype` (float64 for float32/float64 inputs, float32 for half);
    each branch output is rounded to the input dtype and gated by `nsa_ref.reference.gate`,
    as in the prefill. Decoding is inference only: a step
    whose inputs require grad (with grad mode on) raises ``ValueError``; run it under
    ``torch.no_grad()``. `prefill` fills an empty cache from a prompt in one call. Under
    ``torch.autocast`` both cast their inputs to the autocast dtype first (`nsa_impl.amp`).

    Attributes:
        length: tokens decoded so far (the next step's position ``p``).
        reads: ``{"cmp", "sel", "win"}`` key reads of the last step, per (sequence, KV group),
            maximum over the batch and groups: ``cmp = num_cmp(p)``, ``sel`` = selected keys
            ``<= p``, ``win = min(w, p+1)`` (spec I.9).
    """

    def __init__(
        self,
        cfg: NSAConfig,
        *,
        scale: float | None = None,
        phi_k=None,
        phi_v=None,
        batch_size: int | None = None,
        max_len: int | None = None,
    ):
        if not isinstance(cfg, NSAConfig):
            raise TypeError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
        scale = None if scale is None else as_positive_float("scale", scale)
        check_phi("phi_k", phi_k)
        check_phi("phi_v", phi_v)
        batch_size = None if batch_size is None else as_int("batch_size", batch_size, minimum=1)
        max_len = None if max_len is None else as_int("max_len", max_len, minimum=1)
        self.cfg, self.scale, self.phi_k, self.phi_v = cfg, scale, phi_k, phi_v
        self.batch_size, self.max_len = batch_size, max_len
        self.reset()

    def reset(self) -> None:
        """Forget every token (keeps the configuration)."""
        self.length = 0
        self._raw: dict[str, tuple[_Buffer, _Buffer]] | None = None
        self._cmp: tuple[_Buffer, _Buffer] | None = None
        self._sig: tuple | None = None  # (B, H, G, Dk, Dv, dtype, device) of the first step
        self._reads = {"cmp": 0, "sel": 0, "win": 0}

    @property
    def reads(self) -> dict[str, int]:
        """Key reads of the last step (spec I.9); read lazily so a step never syncs a device."""
        return {name: int(value) for name, value in self._reads.items()}

    # ------------------------------------------------------------------ input handling

    def _check(self, q_t, k_t, v_t, gates_t, branch_kv, validate: bool, T: int | None):
        """Validate one call's inputs against nsa_ref's rules and the cache's first step."""
        dims, _ = check_inputs(
            q_t, k_t, v_t, gates_t, self.cfg, branch_kv=branch_kv, validate_gates=validate
        )
        if T is not None and dims.T != T:
            raise ValueError(f"q_t must hold exactly one position (T=1), got T={dims.T}")
        if self.batch_size is not None and dims.B != self.batch_size:
            raise ValueError(f"q_t batch B={dims.B} does not match batch_size={self.batch_size}")
        pairs = {name: tuple((branch_kv or {}).get(name, (k_t, v_t))) for name in BRANCHES}
        if torch.is_grad_enabled():
            named = [("q_t", q_t), ("gates_t", gates_t)] + [
                (f"{name} k/v", t) for name, pair in pairs.items() for t in pair
            ]
            for label, t in named:
                if t.requires_grad:
                    raise ValueError(
                        f"{label} requires grad: NSACache decoding is inference only; "
                        "run it under torch.no_grad()"
                    )
        sig = (dims.B, dims.H, dims.G, dims.Dk, dims.Dv, q_t.dtype, q_t.device)
        if self._sig is not None and sig != self._sig:
            B, H, G, Dk, Dv, dtype, device = self._sig
            if dtype != q_t.dtype:
                raise TypeError(f"q_t dtype {q_t.dtype} does not match the cache's {dtype}")
            if device != q_t.device:
                raise ValueError(f"q_t device {q_t.device} does not match the cache's {device}")
            raise ValueError(
                f"q_t/k_t/v_t sizes (B={dims.B}, H={dims.H}, G={dims.G}, Dk={dims.Dk}, "
                f"Dv={dims.Dv}) do not match the cache's (B={B}, H={H}, G={G}, Dk={Dk}, Dv={Dv})"
            )
        return dims, pairs

    def _ensure_buffers(self, pairs, dims, tokens: int) -> None:
        """Allocate on first use; give each branch its own buffers once their K/V differ."""
        first = pairs["cmp"]
        shared = all(pairs[n][0] is first[0] and pairs[n][1] is first[1] for n in BRANCHES)
        if self._raw is None:
            self._sig = (dims.B, dims.H, dims.G, dims.Dk, dims.Dv, first[0].dtype, first[0].device)
            fixed = self.max_len is not None
            cap = self.max_len if fixed else max(tokens, INITIAL_CAPACITY)

            def buffers(k, v, capacity):
                return _Buffer(k, capacity, fixed), _Buffer(v, capacity, fixed)

            if shared:  # one buffer serves the three branches
                self._raw = dict.fromkeys(BRANCHES, buffers(*first, cap))
            else:
                self._raw = {name: buffers(*pairs[name], cap) for name in BRANCHES}
            self._cmp = buffers(*first, max(1, self.cfg.num_cmp(cap - 1)))
        elif not shared and self._raw["cmp"] is self._raw["sel"] is self._raw["win"]:
            k, v = self._raw["cmp"]
            self._raw = {name: (k.clone(), v.clone()) for name in BRANCHES}

    def _append(self, pairs, pos: int) -> None:
        """Write the new tokens' raw K/V ``[B, n, G, D]`` at slots ``pos..`` of each buffer."""
        written: list[_Buffer] = []
        for name in BRANCHES:
            kb, vb = self._raw[name]
            if any(kb is other for other in written):
                continue  # a shared buffer is written once
            written.append(kb)
            k, v = pairs[name]
            kb.write(pos, k.transpose(1, 2), f"branch {name!r} keys")
            vb.write(pos, v.transpose(1, 2), f"branch {name!r} values")

    @staticmethod
    def _pool(raw: torch.Tensor, phi, label: str) -> torch.Tensor:
        """``phi`` over ``[..., l, D]`` blocks (mean when ``None``); checks its result."""
        if phi is None:
            return raw.mean(dim=-2)
        return check_phi_output(label, amp.user_fn(phi)(raw), raw)

    def _emit(self, first: int, last: int) -> None:
        """Compress the blocks that complete at positions ``first .. last`` (``i*d + l = p + 1``).

        Only their own raw keys are pooled: one block per ``d`` steps while decoding.
        """
        cfg = self.cfg
        l, d = cfg.cmp_block, cfg.cmp_stride
        i0, i1 = cfg.num_cmp(first - 1), cfg.num_cmp(last)
        if i1 == i0:
            return
        phis = ((self.phi_k, "phi_k"), (self.phi_v, "phi_v"))
        for buf, cmp_buf, (phi, label) in zip(self._raw["cmp"], self._cmp, phis, strict=True):
            raw = buf.data[:, :, i0 * d : (i1 - 1) * d + l].unfold(2, l, d).transpose(-1, -2)
            cmp_buf.write(i0, self._pool(raw, phi, label), f"compressed {label}")

    # ------------------------------------------------------------------ decoding

    @amp.entry("q_t", "k_t", "v_t", "gates_t", "branch_kv")
    def step(self, q_t, k_t, v_t, gates_t, branch_kv: dict | None = None, *, validate=True):
        """Decode one position for every sequence: ``q_t [B, 1, H, Dk]`` -> ``o_t [B, 1, H, Dv]``.

        ``k_t [B, 1, G, Dk]``, ``v_t [B, 1, G, Dv]`` are the new token's keys and values and
        ``gates_t [B, 1, H, 3]`` its gates; ``branch_kv`` may give the new token's per-branch
        ``(k, v)`` as in `nsa_ref.nsa_attention`. ``validate=False`` skips the gate-range check
        (a device sync).
        """
        dims, pairs = self._check(q_t, k_t, v_t, gates_t, branch_kv, validate, T=1)
        p = self.length
        self._ensure_buffers(pairs, dims, 1)
        self._append(pairs, p)
        self._emit(p, p)
        self.length = p + 1
        return self._attend_row(q_t, gates_t, dims, p)

    @amp.entry("q", "k", "v", "gates", "branch_kv")
    def prefill(self, q, k, v, gates, branch_kv: dict | None = None, *, validate=True):
        """Fill an empty cache from a prompt and return the prompt's output ``[B, T, H, Dv]``.

        The output is `nsa_impl.nsa_attention` on the prompt; the buffers then hold the prompt's
        raw and compressed K/V, so `step` continues at position ``T``. ``reads`` describes the
        prompt's last position.
        """
        if self.length:
            raise ValueError(f"prefill needs an empty cache, this one holds {self.length} tokens")
        dims, pairs = self._check(q, k, v, gates, branch_kv, validate, T=None)
        # No return_aux: its p_cmp/p_slc are [T, T/d] and [T, T/l'] per head (64 GB at T=64k).
        o = _prefill_attention()(
            q,
            k,
            v,
            gates,
            self.cfg,
            scale=self.scale,
            phi_k=self.phi_k,
            phi_v=self.phi_v,
            branch_kv=branch_kv,
            validate=validate,
        )
        self._ensure_buffers(pairs, dims, dims.T)
        self._append(pairs, 0)
        self._emit(0, dims.T - 1)
        self.length, last = dims.T, dims.T - 1
        # The last position once more through the decode path: it sets `reads` (spec I.9).
        self._attend_row(q[:, last:], gates[:, last:], dims, last)
        return o

    def _attend_row(self, q_t, gates_t, dims, p: int) -> torch.Tensor:
        """The three branches and Eq. 5 for position ``p`` of every sequence."""
        cfg = self.cfg
        B, G, h, H = dims.B, dims.G, dims.h, dims.H
        acc = compute_dtype(q_t.dtype)
        scale = 1.0 / math.sqrt(dims.Dk) if self.scale is None else float(self.scale)
        q = q_t[:, 0].reshape(B, G, h, dims.Dk).to(acc)

        # Compression branch (Eqs. 7-8): the M visible compressed blocks.
        M = cfg.num_cmp(p)
        if M:
            kc, vc = (buf.data[:, :, :M].to(acc) for buf in self._cmp)
            o_cmp, p_cmp = attend(q, kc, vc, scale)
        else:  # empty row: exact zeros (spec I.3)
            o_cmp, p_cmp = q.new_zeros(B, G, h, dims.Dv), q.new_zeros(B, G, h, 0)

        # Selection (Eqs. 9-12): score blocks 0 .. b(p) from p_cmp (the prefill's own helpers:
        # Eq. 10 head sum, Eq. 9 band, Eq. 11 top-n), then gather only the selected keys.
        ls = cfg.sel_block
        b = p // ls
        scores = overlap_scores(p_cmp.sum(dim=2)[:, :, None], b + 1, cfg)  # [B, G, 1, b+1]
        b_t = torch.full((1,), b, dtype=torch.long, device=q.device)
        blocks = top_n(scores, b_t, cfg)[:, :, 0, : min(cfg.sel_top_n, b + 1)]  # no -1 padding
        pos = (blocks[..., None] * ls + torch.arange(ls, device=q.device)).flatten(-2)
        valid = pos <= p  # only the current block reaches past p; its later keys are excluded
        idx = pos.clamp(max=p)[..., None]  # clamped so no unwritten slot is ever read
        ks, vs = self._raw["sel"]
        k_sel = ks.data.gather(2, idx.expand(-1, -1, -1, dims.Dk)).to(acc)
        v_sel = vs.data.gather(2, idx.expand(-1, -1, -1, dims.Dv)).to(acc)
        o_sel, _ = attend(q, k_sel, v_sel, scale, valid)

        # Sliding window (spec I.7): the last min(w, p+1) keys, a contiguous slice.
        start = max(0, p - cfg.window + 1)
        kw, vw = (buf.data[:, :, start : p + 1].to(acc) for buf in self._raw["win"])
        o_win, _ = attend(q, kw, vw, scale)

        self._reads = {"cmp": M, "sel": selected_key_count(blocks, p, ls), "win": p + 1 - start}
        # Each branch rounded once to the input dtype, then Eq. 5 exactly as the prefill does.
        rows = (o.reshape(B, 1, H, dims.Dv).to(q_t.dtype) for o in (o_cmp, o_sel, o_win))
        return gate(*rows, gates_t)


def _prefill_attention():
    """The functional prefill `NSACache.prefill` uses (imported late: `api` may import us)."""
    from .api import nsa_attention

    return nsa_attention
