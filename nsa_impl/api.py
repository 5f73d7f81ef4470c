"""`nsa_attention`: the library's functional entry point (same contract as `nsa_ref.nsa_attention`).

Reads top to bottom like the data path: check inputs -> plan -> compress (Eq. 7) -> compressed
branch + score/select (Eqs. 8-11) -> selection branch (Eq. 12) -> sliding window -> gate (Eq. 5).
Each branch runs on the path its plan's route names (`nsa_impl.dispatch`); the "reference" path
takes that branch's output from one evaluation of `nsa_ref` (exact, slow, for parity).

Around that data path: the autocast rule of `nsa_impl.amp` (inputs cast at the entry, the body
with autocast off, ``phi`` under the caller's autocast) and the observation hook of
`nsa_impl.observe` (one ``is None`` test per call while no collector is active).
"""

from __future__ import annotations

import math

import torch

from nsa_ref.config import NSAConfig
from nsa_ref.reference import NSAAux, branch_pairs
from nsa_ref.validate import check_inputs

from . import amp, dispatch, observe
from .branches import selection as _selection
from .plan import Plan, cached_plan
from .plan import plan as make_plan
from .scoring import compress


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
    plan: Plan | None = None,
):
    """Native Sparse Attention (Eq. 5 over Eqs. 7-12 and the sliding window), fast paths.

    Arguments, result and `nsa_ref.NSAAux` fields are exactly those of `nsa_ref.nsa_attention`
    (``q [B, T, H, Dk]``, ``k/v [B, T, G, D]``, ``gates [B, T, H, 3]`` -> ``o [B, T, H, Dv]``);
    here every branch runs on the path of the plan's route and gradients flow to ``q``, ``k``,
    ``v``, ``gates`` and whatever ``phi_k``/``phi_v`` close over. ``phi`` receives all
    compressed blocks at once, shaped ``[B, G, N, l, D]``.

    Args:
        plan: a `nsa_impl.plan` built for these shapes (and ``cu_seqlens``), reused across calls
            and layers. When ``None`` it is built here (host work, and one read of
            ``cu_seqlens``); without ``cu_seqlens`` the plan of an earlier plan-free call with
            the same shapes and routing state is reused (`nsa_impl.plan.cached_plan`).
            With a plan, ``cu_seqlens`` may be omitted (the plan holds it) or must be the tensor
            the plan was built from.
        validate: value checks. ``True`` (the default, as in `nsa_ref`): gates must be finite and
            in ``[0, 1]``, and a FlashAttention output that is not finite for finite inputs is
            recomputed on the masked path; both read device values (host syncs). ``False``:
            shapes, dtypes and devices are still checked, nothing is read from the device, so a
            planned call on the CUDA paths performs no host sync: what a model's training step
            wants (`nsa_impl.NSAAttention` passes ``False``).

    Under ``torch.autocast`` the inputs are cast to the autocast dtype and the body runs with
    autocast off (`nsa_impl.amp`): the plan must be built for, the router sees and the output
    has the autocast dtype; ``phi_k``/``phi_v`` run under the caller's autocast.

    Raises:
        ValueError / TypeError: bad inputs (spec I.11), or inputs that do not fit ``plan``.
        RuntimeError: a path forced by `nsa_impl.dispatch.force_path` or a flag cannot run these
            inputs.
    """
    # Inputs (already cast by the autocast rule, `amp.entry`).
    dims, bounds = check_inputs(
        q,
        k,
        v,
        gates,
        cfg,
        scale=scale,
        branch_kv=branch_kv,
        cu_seqlens=cu_seqlens if plan is None else None,  # a plan checked its content once
        phi_k=phi_k,
        phi_v=phi_v,
        validate_gates=validate,
    )
    phi_k, phi_v = amp.user_fn(phi_k), amp.user_fn(phi_v)  # under the caller's autocast
    kv = branch_pairs(k, v, branch_kv)
    needs_grad = _needs_grad(q, gates, kv)
    if plan is None and cu_seqlens is None:  # the same shapes again: the plan of last time
        plan = cached_plan(q.shape, cfg, kv_heads=dims.G, v_head_dim=dims.Dv, device=q.device,
                           dtype=q.dtype, backward=needs_grad)  # fmt: skip
    elif plan is None:
        plan = make_plan(
            q.shape, cfg, kv_heads=dims.G, v_head_dim=dims.Dv, cu_seqlens=cu_seqlens,
            device=q.device, dtype=q.dtype, backward=needs_grad, _bounds=bounds,
        )  # fmt: skip
    else:
        _check_plan(plan, q, kv, cfg, cu_seqlens, needs_grad)
    scale = 1.0 / math.sqrt(dims.Dk) if scale is None else float(scale)
    ref = dispatch.ReferenceDelegate(
        (q, k, v, gates, cfg),
        dict(scale=scale, phi_k=phi_k, phi_v=phi_v, branch_kv=branch_kv,
             cu_seqlens=plan.cu_seqlens if plan.varlen else None),
    )  # fmt: skip
    o, scores, o_sel, o_win = data_path(q, kv, gates, cfg, plan, scale, phi_k=phi_k,
                                        phi_v=phi_v, validate=validate, reference=ref,
                                        want_aux=return_aux)  # fmt: skip
    if not return_aux:
        return o
    p_slc, p_cmp, o_cmp, o_sel, o_win = (
        t.to(q.dtype) for t in (scores.p_slc, scores.p_cmp, scores.o_cmp, o_sel, o_win)
    )
    return o, NSAAux(scores.block_indices, p_slc, p_cmp, o_cmp, o_sel, o_win)


def data_path(q, kv: dict, gates, cfg, plan: Plan, scale: float, *, phi_k=None, phi_v=None,
              validate: bool = True, reference=None, want_aux: bool = False):
    """The NSA data path on a plan the inputs were checked against: compress (Eq. 7), the
    compressed branch with scores and top-n (Eqs. 8-11), selection (Eq. 12), window, gate (Eq. 5).

    ``kv``: branch -> ``(k, v)`` (`nsa_ref.reference.branch_pairs`), the whole row's keys even
    when ``q`` holds a row subset (`nsa_impl.parallel`). ``reference``: the
    `dispatch.ReferenceDelegate` of the "reference" path (``None`` where the route cannot take
    it). Returns ``(o, scores, o_sel, o_win)``: ``o`` in the input dtype, the branch outputs in
    the plan's work dtype (`nsa_impl.numerics.work_dtype`).
    """
    observe.mark("begin", q)
    # The torch paths' inputs in the work dtype (numerics.work_dtype: float32 for half precision
    # on the CPU), each input cast once so that its branches' gradients meet in that dtype.
    work = plan.work_dtype
    qw = q.to(work)
    kvw = _cast_pairs(kv, work)

    # Compress (Eq. 7), then compressed branch + selection scores + top-n (Eqs. 8-11).
    # A user phi pools in the input dtype (its parameters are in it); the mean in the work dtype.
    k_cmp = v_cmp = None
    if plan.route["cmp"].path != "reference":
        k_src = kvw["cmp"][0] if phi_k is None else kv["cmp"][0]
        v_src = kvw["cmp"][1] if phi_v is None else kv["cmp"][1]
        k_cmp = compress(k_src, cfg, plan.cmp, phi_k, name="phi_k").to(work)
        v_cmp = compress(v_src, cfg, plan.cmp, phi_v, name="phi_v").to(work)
    scores = dispatch.compressed(qw, k_cmp, v_cmp, plan, scale, want_aux=want_aux,
                                 validate=validate, reference=reference)  # fmt: skip
    observe.mark("cmp", q)

    # Selection branch (Eq. 12) over the selected blocks.
    o_sel = dispatch.selection(qw, *kvw["sel"], scores.block_indices, plan, scale,
                               reference=reference, canonical=scores.canonical)  # fmt: skip
    observe.mark("sel", q)

    # Sliding window (spec I.7).
    o_win = dispatch.window(qw, *kvw["win"], plan, scale, validate=validate, reference=reference)
    observe.mark("win", q)

    # Gate (Eq. 5): the fused Triton kernel where the plan decided so (`dispatch.gate`); the
    # output in the input dtype, rounded once.
    o = dispatch.gate(scores.o_cmp, o_sel, o_win, gates, plan)
    if observe.ACTIVE is not None:  # training-time statistics (nsa_impl.observe); off by default
        observe.ACTIVE.record(
            o_cmp=scores.o_cmp, o_sel=o_sel, o_win=o_win, gates=gates,
            block_indices=scores.block_indices, sel_block=cfg.sel_block,
            positions=plan.positions, route=plan.route,
        )  # fmt: skip
    return o, scores, o_sel, o_win


@amp.entry("q", "k", "v")
def selection_attention(q, k, v, block_indices, cfg, scale=None, *, cu_seqlens=None, plan=None):
    """The selection branch alone (Eq. 12) given ``block_indices [B, T, G, n]``, routed.

    ``o_sel [B, T, H, Dv]``: attention over the selected keys ``<= p``; ``-1`` and duplicate
    indices are ignored. The plan's "sel" path runs it (built here when ``plan`` is ``None``);
    the "reference" path maps to the exact "masked" selection, since `nsa_ref` computes its own
    indices. Autocast as in `nsa_attention`.
    """
    _selection.check_arguments(q, k, v, block_indices, cfg)
    needs_grad = _needs_grad(q, q, {"sel": (k, v)})
    if plan is None:
        plan = make_plan(
            q.shape, cfg, kv_heads=k.shape[2], v_head_dim=v.shape[-1], cu_seqlens=cu_seqlens,
            device=q.device, dtype=q.dtype, backward=needs_grad, _branches=("sel",),
        )  # fmt: skip
    else:
        _check_plan(plan, q, {"sel": (k, v)}, cfg, cu_seqlens, needs_grad)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    w = plan.work_dtype  # numerics.work_dtype, as in nsa_attention
    o = dispatch.selection(q.to(w), k.to(w), v.to(w), block_indices, plan, scale, reference=None)
    return o.to(q.dtype)


def _cast_pairs(kv: dict, dtype: torch.dtype) -> dict:
    """``branch -> (k, v)`` in ``dtype``, each distinct tensor cast once (a tensor the branches
    share stays one tensor, so its gradients are summed before the cast back). Identity is
    compared with ``is`` (traceable by torch.compile, unlike ``id``)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cast(t):
        for src, out in seen:
            if src is t:
                return out
        seen.append((t, t.to(dtype)))
        return seen[-1][1]

    return {b: (cast(k), cast(v)) for b, (k, v) in kv.items()}


def _check_plan(plan, q, kv: dict, cfg, cu_seqlens, needs_grad: bool) -> None:
    """The call fits the plan (shapes, dtypes, devices, identity of cu_seqlens; no sync)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a nsa_impl.Plan, got {type(plan).__name__}")
    plan.check(q, kv.values(), cfg, cu_seqlens)
    if needs_grad and not plan.backward:
        raise ValueError("gradients are needed but the plan was built with backward=False")


def _needs_grad(q, gates, kv) -> bool:
    """Whether autograd will ask for gradients of this call."""
    tensors = [q, gates, *(t for pair in kv.values() for t in pair)]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
