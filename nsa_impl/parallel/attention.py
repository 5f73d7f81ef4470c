"""Context-parallel NSA attention: local queries, gates and output; all-gathered keys and values.

Per layer and rank (docs/parallel.md has the byte counts and the choice against a ring):

1. ``q``, ``gates`` and every branch's ``k``/``v`` are computed for the rank's own rows
   (`CPLayout`: chunks ``r`` and ``2R-1-r``).
2. The raw ``k``/``v`` of all ranks are all-gathered in one collective (all branches' tensors
   concatenated on the feature axis; per KV group, so ``G * (Dk + Dv)`` values per token, a
   fraction ``G (Dk + Dv) / (H Dk)`` of ``q``'s bytes). The selection may read any block before
   a query, so it needs them all; the window's ``w - 1`` halo and the compressed blocks that
   straddle a chunk boundary then come from the same gathered tensor, with no halo exchange.
3. Every rank compresses the whole row (Eq. 7; ``T / d`` blocks, cheap next to attention) and
   runs the three branches for its rows only, through a row-subset `nsa_impl.plan`
   (``rows=``): per-row window and compressed ranges and selection positions at the rows'
   global positions. Only the torch paths serve row subsets ("masked" compressed branch and
   window, "masked"/"packed"/"varlen" selection); the FlashAttention and Triton kernels do not
   yet, so the router skips them (``cp.plan.route`` says so) and forcing one is an error.
4. Gate (Eq. 5) locally. The backward of the all-gather reduce-scatters ``dK``/``dV``, so each
   rank's projections receive the gradient of all ranks' queries for its own keys.

The output of rank ``r`` equals rows ``cp.layout.rows(r)`` of the single-process
`nsa_impl.nsa_attention` on the whole (padded) row, within the tolerance classes (tested with
gloo in ``tests/parallel``). ``return_aux`` is not offered (block indices and scores are per
query row, so they would be local too; ask for them on one process).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nsa_ref.config import NSAConfig
from nsa_ref.reference import branch_pairs
from nsa_ref.validate import check_inputs

from .. import amp
from ..api import data_path
from ..plan import Plan
from ..plan import plan as make_plan
from .collectives import gather_rows
from .layout import CPLayout


class ContextParallel:
    """One rank's share of a context-parallel NSA problem (build with `context_parallel`).

    Attributes:
        group: the process group the sequence is sharded over (``None``: the default group).
        rank: this process's rank in ``group``.
        layout: the `CPLayout` (which rows each rank holds, the padding).
        rows: host int64 ``[2C]``, this rank's global rows.
        plan: the row-subset `nsa_impl.Plan` of this rank (route, per-row layouts), shared by
            every layer of a model; ``print(cp.plan.route)`` explains the paths.
    """

    def __init__(self, group, layout: CPLayout, plan: Plan):
        self.group, self.layout, self.plan = group, layout, plan
        self.rank = dist.get_rank(group)
        self.rows = plan.rows

    @property
    def positions(self) -> torch.Tensor:
        """Positions of this rank's rows in their sequences (device int64 ``[2C]``: RoPE)."""
        return self.plan.row_positions

    def __repr__(self) -> str:
        lay = self.layout
        chunks = lay.chunks_of(self.rank)
        return (f"ContextParallel(rank {self.rank} of {lay.world}, chunks {chunks} of "
                f"{lay.chunk} tokens, T={lay.T} padded to {lay.T_pad}; {self.plan!r})")


def context_parallel(
    group,
    T: int,
    cfg: NSAConfig,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    v_head_dim: int | None = None,
    batch: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    multiple: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    budget_bytes: int | None = None,
) -> ContextParallel:
    """This rank's `ContextParallel` for rows of ``T`` tokens (``batch`` rows, or one packed row
    with ``cu_seqlens``) sharded over ``group``.

    Args:
        group: an initialised ``torch.distributed`` process group (``None``: the default one).
        T: tokens per row before padding (`CPLayout`).
        cfg: the `NSAConfig`.
        heads, kv_heads, head_dim, v_head_dim: ``H``, ``G``, ``Dk``, ``Dv`` (as for
            `nsa_impl.plan`).
        batch: ``B`` (``1`` with ``cu_seqlens``).
        cu_seqlens: int32 ``[N+1]`` boundaries of the packed sequences of the whole row (the
            same on every rank; read once).
        multiple: round the chunk size up to this multiple.
        device, dtype, backward, budget_bytes: as for `nsa_impl.plan`.

    Raises:
        ValueError / TypeError: bad sizes or ``cu_seqlens``; RuntimeError: a forced path
        (`nsa_impl.dispatch.force_path`) that cannot serve row subsets.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel needs an initialised torch.distributed process group")
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens requires batch == 1, got batch={batch}")
    layout = CPLayout.build(T, dist.get_world_size(group), cu_seqlens=cu_seqlens, multiple=multiple)
    rows = layout.rows(dist.get_rank(group))
    plan = make_plan(
        (batch, layout.T_pad, heads, head_dim), cfg, kv_heads=kv_heads, v_head_dim=v_head_dim,
        device=device, dtype=dtype, backward=backward, budget_bytes=budget_bytes, rows=rows,
        _bounds=list(layout.bounds),  # checked by CPLayout.build; B > 1 rows share them
    )  # fmt: skip
    return ContextParallel(group, layout, plan)


@amp.entry("q", "k", "v", "gates", "branch_kv")
def cp_nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cfg: NSAConfig,
    cp: ContextParallel,
    *,
    scale: float | None = None,
    phi_k=None,
    phi_v=None,
    branch_kv: dict | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """NSA attention of this rank's rows (module docstring): ``o [B, 2C, H, Dv]``.

    Arguments are those of `nsa_impl.nsa_attention` for the rank's rows (``q [B, 2C, H, Dk]``,
    ``k/v [B, 2C, G, D]``, ``gates [B, 2C, H, 3]``, ``branch_kv`` likewise local), plus ``cp``
    from `context_parallel`. ``phi_k``/``phi_v`` see all compressed blocks of the row on every
    rank; their parameters' gradients are this rank's queries' share (sum them over the ranks,
    as data-parallel training does). Every rank of ``cp.group`` must call it (a collective).
    """
    check_inputs(q, k, v, gates, cfg, scale=scale, branch_kv=branch_kv, phi_k=phi_k, phi_v=phi_v,
                 validate_gates=validate)  # fmt: skip
    if not isinstance(cp, ContextParallel):
        raise TypeError(f"cp must be a ContextParallel, got {type(cp).__name__}")
    plan = cp.plan
    if q.shape[1] != cp.layout.local_len:
        raise ValueError(f"q must hold this rank's {cp.layout.local_len} rows, got "
                         f"{list(q.shape)}")  # fmt: skip
    kv = _gather_pairs(branch_pairs(k, v, branch_kv), cp)
    return attend_rows(q, kv, gates, cfg, plan, scale=scale, phi_k=phi_k, phi_v=phi_v,
                       validate=validate)  # fmt: skip


def attend_rows(q, kv: dict, gates, cfg: NSAConfig, plan: Plan, *, scale: float | None = None,
                phi_k=None, phi_v=None, validate: bool = True) -> torch.Tensor:  # fmt: skip
    """The NSA data path of a row-subset plan: ``q``/``gates`` hold the plan's rows
    (``[B, T_q, ...]``), ``kv`` (branch -> ``(k, v)``, as `nsa_ref.reference.branch_pairs`
    gives) the whole row's keys and values (``[B, T, G, D]``); returns ``o [B, T_q, H, Dv]``.

    What `cp_nsa_attention` runs after its all-gather; on one process it computes any subset of
    a problem's rows (the tests compare it with the whole problem's rows).
    """
    if plan.rows is None:
        raise ValueError("plan must be a row-subset plan (nsa_impl.plan(..., rows=...))")
    plan.check(q, kv.values(), cfg, None)
    if gates.shape != (*q.shape[:3], 3):
        raise ValueError(f"gates must be [B, T_q, H, 3] = {[*q.shape[:3], 3]}, got "
                         f"{list(gates.shape)}")  # fmt: skip
    if _needs_grad(q, gates, kv) and not plan.backward:
        raise ValueError("gradients are needed but the plan was built with backward=False")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    # nsa_impl.api's data path on the rows' plan (no "reference" path: it cannot serve row
    # subsets, so the router never picks it and no delegate is needed).
    o, *_ = data_path(q, kv, gates, cfg, plan, scale, phi_k=phi_k, phi_v=phi_v,
                      validate=validate)  # fmt: skip
    return o


def _gather_pairs(kv: dict, cp: ContextParallel) -> dict:
    """Every branch's local ``(k, v)`` -> the whole row's, in one all-gather (the distinct
    tensors concatenated on the feature axis, split again after)."""
    distinct: list[torch.Tensor] = []
    for pair in kv.values():
        for t in pair:
            if not any(t is u for u in distinct):
                distinct.append(t)
    sizes = [t.shape[-1] for t in distinct]
    packed = distinct[0] if len(distinct) == 1 else torch.cat(distinct, dim=-1)
    whole = gather_rows(packed, cp.layout, cp.group).split(sizes, dim=-1)
    full = {id(t): w for t, w in zip(distinct, whole, strict=True)}
    return {b: (full[id(k)], full[id(v)]) for b, (k, v) in kv.items()}


def _needs_grad(q, gates, kv) -> bool:
    tensors = [q, gates, *(t for pair in kv.values() for t in pair)]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
