"""`NSADecoderBlock`: pre-norm residual block, ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nsa_ref.config import NSAConfig

from ..decode import NSACache
from ..module import NSAAttention
from ..plan import Plan
from .dense import DenseAttention

#: ``attention=`` choices of `NSADecoderBlock`.
ATTENTIONS = ("nsa", "dense")


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``.

    Args:
        hidden_size: model width.
        intermediate_size: inner width.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., hidden] -> [..., hidden]``."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


class NSADecoderBlock(nn.Module):
    """One decoder layer with NSA attention.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, config: as in `NSAAttention`.
        intermediate_size: MLP width (default ``4 * hidden_size``).
        eps: RMSNorm epsilon.
        attention: ``"nsa"`` (`NSAAttention`) or ``"dense"`` (`DenseAttention`: causal SDPA with
            the same projections and RoPE, the baseline; ``config`` is then unused).
        **attention_options: further keyword options of the attention module (``rope``, and for
            NSA ``phi``, ``separate_branch_kv``, ...).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: NSAConfig = NSAConfig(),
        *,
        intermediate_size: int | None = None,
        eps: float = 1e-6,
        attention: str = "nsa",
        **attention_options,
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attn_norm = nn.RMSNorm(hidden_size, eps=eps)
        if attention == "nsa":
            self.attn = NSAAttention(
                hidden_size, num_heads, num_kv_heads, head_dim, config, **attention_options
            )
        else:
            self.attn = DenseAttention(
                hidden_size, num_heads, num_kv_heads, head_dim, **attention_options
            )
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, intermediate_size or 4 * hidden_size)

    def new_cache(self, batch_size: int, *, max_len: int | None = None, **options) -> NSACache:
        """An empty decode cache for this block's attention (``options`` go to `NSACache`)."""
        return self.attn.new_cache(batch_size, max_len=max_len, **options)

    def plan_for(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> Plan | None:
        """The `nsa_impl.Plan` of this block's NSA attention on ``x`` (`NSAAttention.plan_for`);
        ``None`` for dense attention, which has no plan."""
        return self.attn.plan_for(x, cu_seqlens) if isinstance(self.attn, NSAAttention) else None

    def forward(
        self, x, *, cu_seqlens=None, cache: NSACache | None = None, plan: Plan | None = None
    ) -> torch.Tensor:
        """``x [B, T, hidden] -> [B, T, hidden]``; ``cu_seqlens``/``cache``/``plan`` as in
        `NSAAttention` (``plan`` is for NSA attention only)."""
        h = self.attn_norm(x)
        if isinstance(self.attn, NSAAttention):
            h = self.attn(h, cu_seqlens=cu_seqlens, cache=cache, plan=plan)
        elif plan is not None:
            raise ValueError("plan is for NSA attention; this block's attention is dense")
        else:
            h = self.attn(h, cu_seqlens=cu_seqlens, cache=cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))
