"""The decoder model with context-parallel attention: `CPToyLM` over an `NSAToyLM`.

`CPToyLM(model)` and its `CPDecoderBlock` s hold the very modules of the wrapped `NSAToyLM`
under the same names (``embed``, ``blocks.<i>.attn_norm``, ``blocks.<i>.attn.q_proj``, ...), so
state dicts and distributed checkpoints are interchangeable with the single-process model and
``fully_shard`` (`nsa_impl.parallel.fsdp`) can wrap each `CPDecoderBlock`. Each rank feeds its
own rows (``cp.layout.shard(tokens, rank)``) and gets its rows' logits; the attention layers
run `nsa_impl.parallel.cp_nsa_attention` with the rank's `ContextParallel` (RoPE at the rows'
global positions), everything else (embedding, norms, MLP, head) is per token and stays local.

The blocks repeat `NSADecoderBlock.forward` and `NSAAttention.forward`'s residual and projection
steps around the context-parallel call (the tests compare the two models' logits, losses and
gradients, so a divergence fails them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nsa_ref.validate import BRANCHES

from ..data import IGNORE_INDEX
from ..model import NSADecoderBlock, NSAToyLM
from ..module import NSAAttention
from .attention import ContextParallel, context_parallel, cp_nsa_attention


def cp_attention(attn: NSAAttention, x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """`NSAAttention` ``attn`` on this rank's rows ``x [B, 2C, hidden]`` (context parallel)."""
    if not isinstance(attn, NSAAttention):
        raise TypeError(f"context parallelism needs NSAAttention layers, got {type(attn).__name__}")
    B, T, _ = x.shape
    q, pairs, gates = attn._project(x, cp.positions if attn.rope else None)
    k, v = pairs[0]
    branch_kv = dict(zip(BRANCHES, pairs, strict=True)) if attn.separate_branch_kv else None
    o = cp_nsa_attention(q, k, v, gates, attn.config, cp, scale=attn.scale, phi_k=attn.phi_k,
                         phi_v=attn.phi_v, branch_kv=branch_kv, validate=False)  # fmt: skip
    return attn.o_proj(o.reshape(B, T, attn.num_heads * attn.v_head_dim))


class CPDecoderBlock(nn.Module):
    """`NSADecoderBlock` ``block``'s modules with context-parallel attention (module docstring).

    Args:
        block: the block whose ``attn_norm``, ``attn``, ``mlp_norm`` and ``mlp`` are shared.
    """

    def __init__(self, block: NSADecoderBlock):
        super().__init__()
        if not isinstance(block, NSADecoderBlock) or not isinstance(block.attn, NSAAttention):
            raise TypeError("block must be an NSADecoderBlock with NSAAttention")
        self.attn_norm, self.attn = block.attn_norm, block.attn
        self.mlp_norm, self.mlp = block.mlp_norm, block.mlp

    def forward(self, x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
        """``x [B, 2C, hidden]`` (this rank's rows) -> the same shape."""
        x = x + cp_attention(self.attn, self.attn_norm(x), cp)
        return x + self.mlp(self.mlp_norm(x))


class CPToyLM(nn.Module):
    """`NSAToyLM` ``model``'s modules, run context parallel (module docstring).

    Args:
        model: the `NSAToyLM` (its modules are shared, not copied).
    """

    def __init__(self, model: NSAToyLM):
        super().__init__()
        if not isinstance(model, NSAToyLM):
            raise TypeError(f"model must be an NSAToyLM, got {type(model).__name__}")
        self.embed, self.norm, self.head = model.embed, model.norm, model.head
        self.blocks = nn.ModuleList(CPDecoderBlock(b) for b in model.blocks)

    @property
    def attention(self) -> NSAAttention:
        """The first block's attention (sizes and config of every layer's plan)."""
        return self.blocks[0].attn

    def context_parallel(self, group, T: int, *, cu_seqlens=None, batch: int = 1,
                         dtype: torch.dtype | None = None, device=None,
                         **options) -> ContextParallel:  # fmt: skip
        """`context_parallel` for this model's attention (sizes from its layers) on rows of
        ``T`` tokens; ``dtype`` is the attention's compute dtype (default: the parameters';
        the mixed-precision ``param_dtype`` under FSDP2)."""
        attn = self.attention
        weight = attn.q_proj.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight  # an FSDP2 DTensor
        return context_parallel(
            group, T, attn.config, heads=attn.num_heads, kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, v_head_dim=attn.v_head_dim, batch=batch,
            cu_seqlens=cu_seqlens, device=local.device if device is None else device,
            dtype=local.dtype if dtype is None else dtype, **options,
        )  # fmt: skip

    def forward(self, tokens: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
        """This rank's ``tokens [B, 2C]`` -> their logits ``[B, 2C, vocab]``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a [B, 2C] tensor of token ids")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cp)
        return self.head(self.norm(x))


def cp_loss(logits: torch.Tensor, targets: torch.Tensor, cp: ContextParallel, *,
            num_labels: int | None = None) -> torch.Tensor:  # fmt: skip
    """This rank's share of the mean next-token cross-entropy of the whole row.

    ``sum(CE over this rank's labelled rows) / num_labels``, where ``num_labels`` counts the
    labelled rows of the whole row (all ranks; ``None``: counted with one all-reduce). The sum
    of the ranks' values is the single-process mean loss, so the gradients must be **summed**
    over the context-parallel ranks (`nsa_impl.parallel.fsdp.shard_model` sets that).
    """
    if num_labels is None:
        count = (targets != IGNORE_INDEX).sum().to(torch.float64)
        dist.all_reduce(count, group=cp.group)
        num_labels = count  # a device scalar: no host read
    if logits.dtype in (torch.float16, torch.bfloat16):  # half logits: the loss in float32
        logits = logits.float()
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
    if isinstance(num_labels, torch.Tensor):
        return total / num_labels.clamp(min=1).to(total.dtype)
    return total / max(int(num_labels), 1)
