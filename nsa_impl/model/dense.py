"""`DenseAttention`: causal full attention with `NSAAttention`'s projections, for comparison.

The baseline of the training command's ``--attention dense``: the same q/k/v/o projections
(GQA), the same RoPE, and PyTorch's ``scaled_dot_product_attention`` with ``is_causal=True``
(FlashAttention on a GPU). With ``cu_seqlens`` each packed sequence is attended on its own (one
SDPA call per sequence, boundaries read on the host once per call), so nothing crosses a
document, exactly as in NSA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nsa_ref.validate import check_cu_seqlens

from ..module import apply_rope, rope_cos_sin, sequence_positions


class DenseAttention(nn.Module):
    """Causal softmax attention ``x [B, T, hidden] -> [B, T, hidden]``.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim, rope, rope_theta, bias:
            as in `NSAAttention` (no gates, no compression, no selection).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        v_head_dim: int | None = None,
        rope: bool = False,
        rope_theta: float = 10000.0,
        bias: bool = False,
    ):
        super().__init__()
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        sizes = dict(
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            v_head_dim=v_head_dim,
        )
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.rope, self.rope_theta = rope, rope_theta
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * v_head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)

    def extra_repr(self) -> str:
        """Sizes and options, shown by ``print(module)``."""
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"v_head_dim={self.v_head_dim}, rope={self.rope}"
        )

    def new_cache(self, batch_size: int, *, max_len: int | None = None):
        """Dense attention has no decode cache here (it is a training baseline)."""
        raise TypeError("DenseAttention has no decode cache; decode with NSAAttention")

    def forward(self, x: torch.Tensor, *, cu_seqlens=None, cache=None) -> torch.Tensor:
        """Causal attention over ``x [B, T, hidden]`` (``cu_seqlens``: packed, ``B == 1``)."""
        if cache is not None:
            raise TypeError("DenseAttention has no decode cache; decode with NSAAttention")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, T, hidden_size={self.hidden_size}], got {got}")
        B, T, _ = x.shape
        H, G, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
        q = self.q_proj(x).view(B, T, H, Dk)
        k = self.k_proj(x).view(B, T, G, Dk)
        v = self.v_proj(x).view(B, T, G, Dv)
        if self.rope:
            positions = sequence_positions(T, cu_seqlens, x.device)
            cos, sin = rope_cos_sin(positions, Dk, self.rope_theta, x.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        if G != H:  # GQA: each KV head serves H/G query heads
            k, v = (t.repeat_interleave(H // G, dim=1) for t in (k, v))
        if bounds is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:  # one causal call per packed sequence: nothing crosses a boundary
            o = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=self.scale
                    )
                    for s, e in zip(bounds, bounds[1:], strict=False)
                ],
                dim=2,
            )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * Dv))
