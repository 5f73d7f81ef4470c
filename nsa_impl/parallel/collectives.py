"""Differentiable collectives of context parallelism: the K/V all-gather and its reduce-scatter.

`all_gather` concatenates every rank's tensor along dim 0; its backward is the reduce-scatter
(sum) of the gradient, so each rank gets the sum over all ranks' queries of ``dK``/``dV`` for the
keys it owns. `gather_rows` puts the gathered chunks of a `CPLayout` back in sequence order (the
reordering is plain tensor indexing, differentiated by autograd).

Half-precision gradients are summed in float32 (``reduce_dtype``): adding ``R`` bfloat16
partial sums would round ``R - 1`` more times than the single-process backward does. The
collectives run on the caller's process group (gloo on the CPU, NCCL on GPUs) synchronously;
overlapping them with the projections is left to the GPU work (docs/parallel.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import CPLayout


def _all_gather_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


def default_reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which gradients of ``dtype`` are summed over ranks: float32 for float16 and
    bfloat16, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _AllGather(torch.autograd.Function):
    """Forward: all-gather along dim 0; backward: reduce-scatter (sum) along dim 0."""

    @staticmethod
    def forward(ctx, x, group, reduce_dtype):
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_into(out, x, group)
        ctx.group, ctx.world, ctx.reduce_dtype, ctx.dtype = group, world, reduce_dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        dout = dout.to(ctx.reduce_dtype).contiguous()
        dx = dout.new_empty((dout.shape[0] // ctx.world, *dout.shape[1:]))
        _reduce_scatter_into(dx, dout, ctx.group)
        return dx.to(ctx.dtype), None, None


def all_gather(x: torch.Tensor, group=None, *, reduce_dtype: torch.dtype | None = None):
    """Every rank's ``x`` concatenated along dim 0 (rank order), differentiable.

    The gradient of rank ``r``'s ``x`` is the sum over ranks of the gradients of slice ``r`` of
    the result (a reduce-scatter), summed in ``reduce_dtype`` (default `default_reduce_dtype`)
    and returned in ``x``'s dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("x must be a tensor with at least one dimension")
    reduce_dtype = default_reduce_dtype(x.dtype) if reduce_dtype is None else reduce_dtype
    return _AllGather.apply(x, group, reduce_dtype)


def gather_rows(x: torch.Tensor, layout: CPLayout, group=None) -> torch.Tensor:
    """Rank-local rows ``x [B, 2C, ...]`` -> the whole padded row ``[B, T_pad, ...]``
    (differentiable: the backward reduce-scatters, see `all_gather`)."""
    world = dist.get_world_size(group)
    if world != layout.world:
        raise ValueError(f"the process group has {world} ranks, the layout {layout.world}")
    if x.dim() < 2 or x.shape[1] != layout.local_len:
        raise ValueError(f"x must be [B, 2C={layout.local_len}, ...], got {list(x.shape)}")
    B, C, rest = x.shape[0], layout.chunk, x.shape[2:]
    g = all_gather(x.unsqueeze(0), group).view(world, B, 2, C, *rest)
    # Rank r holds chunks r and 2R-1-r: the first halves are chunks 0..R-1 in rank order, the
    # second halves chunks R..2R-1 in reverse rank order.
    chunks = torch.cat([g[:, :, 0], g[:, :, 1].flip(0)], dim=0)  # [2R, B, C, ...]
    return chunks.movedim(0, 1).reshape(B, layout.T_pad, *rest)
