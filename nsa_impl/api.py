"""`nsa_attention`: the library's functional entry point (same contract as `nsa_ref.nsa_attention`).

Reads top to bottom like the data path: validate inputs -> route -> compress (Eq. 7) ->
compressed branch + score/select (Eqs. 8-11) -> selection branch (Eq. 12) -> sliding window ->
gate (Eq. 5). Each branch runs on the path `nsa_impl.routing` picks; the "reference" path takes
that branch's output from one evaluation of `nsa_ref` (exact, slow, for parity).
"""

from __future__ import annotations

import math

import torch

import nsa_ref
from nsa_ref.config import NSAConfig
from nsa_ref.reference import NSAAux, branch_pairs, gate
from nsa_ref.validate import check_inputs

from . import amp, observe, routing, scoring
from .branches import selection
from .branches.compressed import CmpLayout
from .branches.sliding import window_attention
from .varlen import PackedLayout


class _ReferenceDelegate:
    """`nsa_ref` evaluated at most once per call, for the branches routed to "reference"."""

    def __init__(self, args: tuple, kwargs: dict):
        self._args, self._kwargs, self._aux = args, kwargs, None

    @property
    def aux(self) -> NSAAux:
        """The reference's `NSAAux` (branch outputs with autograd, indices, scores)."""
        if self._aux is None:
            _, self._aux = nsa_ref.nsa_attention(
                *self._args, **self._kwargs, return_aux=True, validate=False
            )
        return self._aux


@amp.entry("q", "k", "v", "gates", "branch_kv")
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
    """Native Sparse Attention (Eq. 5 over Eqs. 7-12 and the sliding window), fast paths.

    Arguments, result and `nsa_ref.NSAAux` fields are exactly those of `nsa_ref.nsa_attention`
    (``q [B, T, H, Dk]``, ``k/v [B, T, G, D]``, ``gates [B, T, H, 3]`` -> ``o [B, T, H, Dv]``);
    here every branch runs on the path `nsa_impl.routing` picks and gradients flow to ``q``,
    ``k``, ``v``, ``gates`` and whatever ``phi_k``/``phi_v`` close over. ``phi`` receives all
    compressed blocks at once, shaped ``[B, G, N, l, D]``.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype and the body runs with
    autocast off (`nsa_impl.amp`): the router sees, and the output has, the autocast dtype.

    Raises:
        ValueError / TypeError: bad inputs (spec I.11), naming the argument.
        RuntimeError: a path forced by `routing.force_path` or a flag cannot run these inputs.
    """
    # Inputs.
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
    phi_k, phi_v = amp.user_fn(phi_k), amp.user_fn(phi_v)  # under the caller's autocast
    scale = 1.0 / math.sqrt(dims.Dk) if scale is None else float(scale)
    kv = branch_pairs(k, v, branch_kv)
    layout = PackedLayout.build(dims.T, bounds)
    plan = routing.route(
        q,
        *kv["sel"],
        cu_seqlens=cu_seqlens,
        backward=_needs_grad(q, gates, kv),
        max_seqlen=max(layout.lengths),
    )
    plan.raise_errors()
    path = plan.paths()
    observe.mark("begin", q)
    ref = _ReferenceDelegate(
        (q, k, v, gates, cfg),
        dict(scale=scale, phi_k=phi_k, phi_v=phi_v, branch_kv=branch_kv, cu_seqlens=cu_seqlens),
    )

    # Compress (Eq. 7), then compressed branch + selection scores + top-n (Eqs. 8-11).
    if path["cmp"] == "reference":
        o_cmp, block_indices = ref.aux.o_cmp, ref.aux.block_indices
        p_slc, p_cmp = ref.aux.p_slc, ref.aux.p_cmp
    else:
        cmp_layout = CmpLayout.build(cfg, layout)
        k_cmp = scoring.compress(kv["cmp"][0], cfg, cmp_layout, phi_k, name="phi_k")
        v_cmp = scoring.compress(kv["cmp"][1], cfg, cmp_layout, phi_v, name="phi_v")
        select = scoring.compressed_and_select
        if path["cmp"] == "flash":  # imported lazily: it needs triton
            from .kernels.flash_cmp import compressed_and_select as select
        elif path["cmp"] == "triton":
            from .branches.cmp_triton import compressed_and_select as select
        scores = select(q, k_cmp, v_cmp, cfg, scale, layout, cmp_layout, want_aux=return_aux)
        o_cmp, block_indices = scores.o_cmp, scores.block_indices
        p_slc, p_cmp = scores.p_slc, scores.p_cmp
    observe.mark("cmp", q)

    # Selection branch (Eq. 12) over the selected blocks.
    if path["sel"] == "reference":
        o_sel = ref.aux.o_sel
    else:
        o_sel = selection.selection_attention(
            q,
            *kv["sel"],
            block_indices,
            cfg,
            scale,
            cu_seqlens=cu_seqlens,
            **_selection_options(path["sel"]),
        )
    observe.mark("sel", q)

    # Sliding window (spec I.7).
    if path["win"] == "reference":
        o_win = ref.aux.o_win
    else:
        o_win = window_attention(
            q, *kv["win"], cfg, scale, layout, path=path["win"], cu_seqlens=cu_seqlens
        )
    observe.mark("win", q)

    # Gate (Eq. 5): fused in one Triton kernel on the triton route (profile's gate_triton).
    o = _gate(path, o_cmp, o_sel, o_win, gates)
    if observe.ACTIVE is not None:  # training-time statistics (nsa_impl.observe); off by default
        observe.ACTIVE.record(
            o_cmp=o_cmp, o_sel=o_sel, o_win=o_win, gates=gates, block_indices=block_indices,
            sel_block=cfg.sel_block, positions=layout.pos, plan=plan,
        )  # fmt: skip
    if not return_aux:
        return o
    return o, NSAAux(block_indices, p_slc, p_cmp, o_cmp, o_sel, o_win)


@amp.entry("q", "k", "v")
def selection_attention(q, k, v, block_indices, cfg, scale=None, *, cu_seqlens=None):
    """The selection branch alone (Eq. 12) given ``block_indices [B, T, G, n]``, routed.

    ``o_sel [B, T, H, Dv]``: attention over the selected keys ``<= p``; ``-1`` and duplicate
    indices are ignored. The router picks the path as in `nsa_attention` (the "reference" path
    maps to the exact gather path, since `nsa_ref` computes its own indices); autocast as there.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = routing.route(q, k, v, cu_seqlens=cu_seqlens, backward=_needs_grad(q, q, {"": (k, v)}))
    plan.raise_errors()
    path = plan.paths()["sel"]
    options = {"path": "gather"} if path == "reference" else _selection_options(path)
    return selection.selection_attention(
        q, k, v, block_indices, cfg, scale, cu_seqlens=cu_seqlens, **options
    )


def _gate(path: dict, o_cmp, o_sel, o_win, gates):
    """Eq. 5; the fused Triton kernel when the cmp or win branch ran on "triton"."""
    if "triton" in (path["cmp"], path["win"]):
        from .kernels import triton_gate, tuning

        fused = tuning.profile_for(o_cmp.device).route("gate_triton", True)
        if fused and triton_gate.supports(o_cmp, o_sel, o_win, gates)[0]:
            return triton_gate.gate_combine(o_cmp, o_sel, o_win, gates)
    return gate(o_cmp, o_sel, o_win, gates)


def _needs_grad(q, gates, kv) -> bool:
    """Whether autograd will ask for gradients of this call."""
    tensors = [q, gates, *(t for pair in kv.values() for t in pair)]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _selection_options(path: str) -> dict:
    """Keyword arguments of `selection.selection_attention` for a routed path name."""
    if path == "masked":  # the router's "masked" selection is the gather path
        return {"path": "gather"}
    options = {"path": path}
    min_len = routing.settings().sel_varlen_min_len
    if path == "varlen" and min_len is not None:
        options["varlen_min_len"] = min_len
    return options
