"""Reference decode: one token at a time with a cache, and per-step read counters (spec I.9)."""

from __future__ import annotations

import math

import torch

from . import rules
from .config import NSAConfig
from .reference import SequenceKV, gate, nsa_row
from .scalars import as_positive_float
from .validate import BRANCHES, check_inputs, check_phi


class NSARefCache:
    """Decode state of the reference for a batch of ``B`` sequences.

    Holds the raw K/V of every branch and the compressed K/V. Compressed block ``i`` is emitted
    at the step where ``i*d + l == p + 1`` (spec I.9): only the newest ``l`` raw keys are pooled,
    never the whole history again.

    Attributes:
        reads: ``{"cmp", "sel", "win"}`` key reads of the last step, per (sequence, KV group),
            maximum over the batch and groups: ``cmp = num_cmp(p)``, ``sel`` = selected keys
            ``<= p``, ``win = min(w, p+1)``.
        length: tokens decoded so far.
    """

    def __init__(self, cfg: NSAConfig, *, scale: float | None = None, phi_k=None, phi_v=None):
        if not isinstance(cfg, NSAConfig):
            raise TypeError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
        scale = None if scale is None else as_positive_float("scale", scale)
        check_phi("phi_k", phi_k)
        check_phi("phi_v", phi_v)
        self.cfg, self.scale, self.phi_k, self.phi_v = cfg, scale, phi_k, phi_v
        self.length = 0
        self.reads = {"cmp": 0, "sel": 0, "win": 0}
        self._seqs: list[SequenceKV] = []

    def step(self, q_t, k_t, v_t, gates_t, *, branch_kv: dict | None = None):
        """Decode one position for every sequence: ``q_t [B, 1, H, Dk]`` -> ``o_t [B, 1, H, Dv]``.

        ``k_t, v_t`` are the new token's keys and values ``[B, 1, G, D]``; ``branch_kv`` may give
        the new token's per-branch ``(k, v)`` as in `nsa_ref.nsa_attention`.
        """
        dims, _ = check_inputs(q_t, k_t, v_t, gates_t, self.cfg, branch_kv=branch_kv)
        if dims.T != 1:
            raise ValueError(f"q_t must hold exactly one position (T=1), got T={dims.T}")
        if self._seqs and len(self._seqs) != dims.B:
            raise ValueError(f"q_t batch B={dims.B} does not match the cache's B={len(self._seqs)}")
        if not self._seqs:
            self._seqs = [
                SequenceKV(self.cfg, dims.h, self.phi_k, self.phi_v) for _ in range(dims.B)
            ]
        scale = 1.0 / math.sqrt(dims.Dk) if self.scale is None else float(self.scale)
        branch_kv = branch_kv or {}
        p = self.length
        cfg = self.cfg
        W = rules.overlap_weights(p // cfg.sel_block + 1, cfg.num_cmp(p), cfg)

        outs = []
        reads = {"cmp": 0, "sel": 0, "win": 0}
        for b, seq in enumerate(self._seqs):
            new = {name: branch_kv.get(name, (k_t, v_t)) for name in BRANCHES}
            seq.set_raw(
                {
                    name: tuple(
                        torch.cat([seq.raw[name][i], t[b, 0][None]]) if seq.raw else t[b, 0][None]
                        for i, t in enumerate(pair)
                    )
                    for name, pair in new.items()
                }
            )
            self._emit_compressed(seq, p)
            row = nsa_row(p, q_t[b, 0], seq, scale, W)
            outs.append(gate(row.o_cmp, row.o_sel, row.o_win, gates_t[b, 0]))
            reads["cmp"] = max(reads["cmp"], row.p_cmp.shape[1])
            reads["sel"] = max(reads["sel"], row.sel_reads)
            reads["win"] = max(reads["win"], len(rules.window_keys(p, cfg)))
        self.length += 1
        self.reads = reads
        return torch.stack(outs)[:, None]

    def _emit_compressed(self, seq: SequenceKV, p: int) -> None:
        """Append compressed block ``i`` when ``i*d + l == p + 1`` (its last key just arrived)."""
        cfg = self.cfg
        k, v = seq.raw["cmp"]
        # float16/bfloat16: compressed blocks in float32, as the prefill's (`SequenceKV.widen`:
        # the mean pools the float32 copies, a user phi sees the input dtype)
        wide = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
        if seq.cmp_k is None:
            seq.cmp_k = k.new_zeros(0, k.shape[1], k.shape[2], dtype=wide)
            seq.cmp_v = v.new_zeros(0, v.shape[1], v.shape[2], dtype=wide)
        start = p + 1 - cfg.cmp_block
        if start >= 0 and start % cfg.cmp_stride == 0:  # one block: the newest l keys
            ks, vs = k[start:], v[start:]
            new_k = rules.compress(ks.to(wide) if seq.phi_k is None else ks, 1, cfg, seq.phi_k,
                                   name="phi_k")  # fmt: skip
            new_v = rules.compress(vs.to(wide) if seq.phi_v is None else vs, 1, cfg, seq.phi_v,
                                   name="phi_v")  # fmt: skip
            seq.cmp_k = torch.cat([seq.cmp_k, new_k.to(wide)])
            seq.cmp_v = torch.cat([seq.cmp_v, new_v.to(wide)])
