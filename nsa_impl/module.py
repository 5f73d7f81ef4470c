"""`NSAAttention`: a drop-in NSA attention layer (projections, gates, phi, RoPE, decode cache).

The layer computes ``q, k, v`` (GQA), the per-head branch gates ``sigmoid(MLP(x))`` (spec I.8,
paper Eq. 5), optionally rotates ``q`` and every ``k`` (RoPE), and calls `nsa_impl.nsa_attention`
(or, with a cache, `NSACache.step`). Compressed keys pool the *rotated* keys (paper silent, A14:
the FLA choice), so prefill and decode see the same compressed keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nsa_ref.config import NSAConfig
from nsa_ref.scalars import as_int
from nsa_ref.validate import BRANCHES, check_cu_seqlens

from . import amp
from .api import nsa_attention
from .decode import NSACache
from .plan import Plan
from .plan import plan as make_plan

PHI_CHOICES = ("mean", "mlp")


class LearnablePhi(nn.Module):
    """Learnable compression ``phi: [..., l, D] -> [..., D]`` (paper Eq. 7, spec I.3, A2).

    ``phi(x) = mean_l(x) + W2 act(W1 flatten(x + E))`` with an intra-block position embedding
    ``E [l, D]``. ``W2`` (and its bias) start at zero, so at step 0 the output is exactly mean
    pooling (``mean + 0``) while ``W1`` and ``E`` are random and train as soon as ``W2`` moves.

    Args:
        block_len: ``l``, the compression block length.
        dim: ``D``, the feature size of the keys (or values) it pools.
        hidden: width of the MLP (default ``dim``).
    """

    def __init__(self, block_len: int, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.block_len, self.dim = block_len, dim
        self.pos = nn.Parameter(torch.randn(block_len, dim) * 0.02)
        self.fc1 = nn.Linear(block_len * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool blocks ``x [..., l, D]`` to ``[..., D]``."""
        if x.shape[-2:] != (self.block_len, self.dim):
            raise ValueError(
                f"phi input must end in [l={self.block_len}, D={self.dim}], got {tuple(x.shape)}"
            )
        residual = self.fc2(F.gelu(self.fc1((x + self.pos).flatten(-2))))
        return x.mean(dim=-2) + residual


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """Rotary angles for integer ``positions`` (``[T]``, or ``[B, T]`` when every sequence has
    its own positions, as in a ragged decode): ``(cos, sin)`` of shape ``[..., dim/2]``.

    Computed in float64 and then cast, so a position gets the same angles whether it is part of a
    long prefill or a single decode step.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    inv_freq = theta**-exponents
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, N, D]`` by ``cos, sin`` of shape ``[T, D/2]`` or ``[B, T, D/2]``
    (rotate-half convention).

    The result has ``x``'s dtype whatever the angles' (under autocast the projections come out
    in bfloat16 while the angles stay float32: rotated in float32, rounded once).
    """
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[..., None, :], sin[..., None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def sequence_positions(T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Token positions ``[T]``: ``0..T-1``, or restarting at 0 at every ``cu_seqlens`` boundary.

    (A `nsa_impl.Plan` holds the same positions on its device: ``plan.positions``.)
    """
    pos = torch.arange(T, device=device)
    if cu_seqlens is None:
        return pos
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    return pos - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])


class NSAAttention(nn.Module):
    """Native Sparse Attention layer: ``x [B, T, hidden] -> [B, T, hidden]`` (API.md).

    Args:
        hidden_size: model width.
        num_heads: query heads ``H``.
        num_kv_heads: KV groups ``G`` (``H % G == 0``; GQA, all heads of a group share a
            selection, Eq. 10).
        head_dim: ``Dk``, the query/key head size.
        config: the `NSAConfig` (paper defaults).
        v_head_dim: ``Dv`` (default ``head_dim``).
        separate_branch_kv: give each branch its own K/V projection (the paper's independent
            keys and values, spec I.8); otherwise the branches share ``k, v``.
        phi: ``"mean"`` (parameter-free mean pooling) or ``"mlp"`` (`LearnablePhi` for keys and
            values, equal to mean pooling at initialisation).
        rope: rotate ``q`` and every ``k`` (RoPE); positions restart at each ``cu_seqlens``
            sequence, and in decode the position is ``cache.length``.
        rope_theta: RoPE base.
        gate_hidden: ``None``: the gate is one linear layer ``hidden -> 3*H``; an int: an MLP
            ``hidden -> gate_hidden -> 3*H`` (SiLU). Its last layer starts at zero, so every gate
            is ``sigmoid(0) = 0.5`` at initialisation.
        bias: bias in the q/k/v/o projections (the gate's last layer always has one).
    """

    #: `nsa_impl.observe.Collector.attach` labels the calls of modules that set this.
    nsa_observed = True

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: NSAConfig = NSAConfig(),
        *,
        v_head_dim: int | None = None,
        separate_branch_kv: bool = False,
        phi: str = "mean",
        rope: bool = False,
        rope_theta: float = 10000.0,
        gate_hidden: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        hidden_size = as_int("hidden_size", hidden_size, minimum=1)
        num_heads = as_int("num_heads", num_heads, minimum=1)
        num_kv_heads = as_int("num_kv_heads", num_kv_heads, minimum=1)
        head_dim = as_int("head_dim", head_dim, minimum=1)
        v_head_dim = head_dim if v_head_dim is None else as_int("v_head_dim", v_head_dim, minimum=1)
        if gate_hidden is not None:
            gate_hidden = as_int("gate_hidden", gate_hidden, minimum=1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
        if phi not in PHI_CHOICES:
            raise ValueError(f"phi must be one of {PHI_CHOICES}, got {phi!r}")
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {rope_theta}")

        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.v_head_dim, self.config = head_dim, v_head_dim, config
        self.separate_branch_kv, self.rope, self.rope_theta = separate_branch_kv, rope, rope_theta
        self.scale = 1.0 / math.sqrt(head_dim)
        copies = len(BRANCHES) if separate_branch_kv else 1

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, copies * num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, copies * num_kv_heads * v_head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)
        gate_out = nn.Linear(hidden_size if gate_hidden is None else gate_hidden, 3 * num_heads)
        nn.init.zeros_(gate_out.weight)
        nn.init.zeros_(gate_out.bias)
        self.gate = (
            gate_out
            if gate_hidden is None
            else nn.Sequential(nn.Linear(hidden_size, gate_hidden), nn.SiLU(), gate_out)
        )
        if phi == "mlp":
            self.phi_k = LearnablePhi(config.cmp_block, head_dim)
            self.phi_v = LearnablePhi(config.cmp_block, v_head_dim)
        else:
            self.phi_k = self.phi_v = None

    def extra_repr(self) -> str:
        """Sizes and options, shown by ``print(module)``."""
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"v_head_dim={self.v_head_dim}, separate_branch_kv={self.separate_branch_kv}, "
            f"rope={self.rope}, config={self.config}"
        )

    def new_cache(self, batch_size: int, *, max_len: int | None = None, **options) -> NSACache:
        """An empty `NSACache` for this layer (its phi and scale) and ``batch_size`` sequences;
        ``options`` (``path``, ``cuda_graph``, ``splits``) go to `NSACache`."""
        return NSACache(
            self.config,
            scale=self.scale,
            phi_k=self.phi_k,
            phi_v=self.phi_v,
            batch_size=batch_size,
            max_len=max_len,
            **options,
        )

    def plan_for(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> Plan:
        """The `nsa_impl.Plan` of this layer's attention on ``x [B, T, hidden]``.

        Build it once per forward and pass it to every layer of the same shape (`forward`'s
        ``plan``): the route, the layouts and ``cu_seqlens`` (read once here) are shared. Under
        ``torch.autocast`` it is built for the autocast dtype (`nsa_impl.amp.run_dtype`), which
        is what `nsa_attention` computes in.
        """
        self._check_x(x, None, None)
        B, T, _ = x.shape
        return make_plan(
            (B, T, self.num_heads, self.head_dim), self.config, kv_heads=self.num_kv_heads,
            v_head_dim=self.v_head_dim, cu_seqlens=cu_seqlens, device=x.device,
            dtype=amp.run_dtype(x), backward=torch.is_grad_enabled(),
        )  # fmt: skip

    def _check_x(self, x, cu_seqlens, cache) -> None:
        """Argument checks of `forward` (spec I.11: name the argument, say what was expected)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"x must have shape [B, T, hidden_size={self.hidden_size}] with B, T > 0, "
                f"got {list(x.shape)}"
            )
        weight = self.q_proj.weight
        # Under autocast the projections take any float dtype (e.g. a bfloat16 norm output).
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x dtype {x.dtype} does not match the parameters' {weight.dtype}")
        if x.device != weight.device:
            raise ValueError(f"x device {x.device} does not match the parameters' {weight.device}")
        if cache is None:
            return
        if not isinstance(cache, NSACache):
            raise TypeError(f"cache must be an NSACache, got {type(cache).__name__}")
        if cu_seqlens is not None:
            raise ValueError(
                "cache and cu_seqlens cannot be combined (decode: one row per sequence)"
            )
        expected = cache.batch_size if cache.batch_size is not None else (
            len(cache.lengths) if cache.length else None)
        if expected is not None and x.shape[0] != expected:
            raise ValueError(f"x batch B={x.shape[0]} does not match the cache's "
                             f"batch_size={expected}")

    def _project(self, x: torch.Tensor, positions: torch.Tensor | None):
        """``x`` -> ``q [B,T,H,Dk]``, per-branch ``(k, v)`` and gates ``[B,T,H,3]``."""
        B, T, _ = x.shape
        H, G, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        q = self.q_proj(x).view(B, T, H, Dk)
        ks = self.k_proj(x).view(B, T, -1, G, Dk).unbind(2)
        vs = self.v_proj(x).view(B, T, -1, G, Dv).unbind(2)
        if self.rope:
            cos, sin = rope_cos_sin(positions, Dk, self.rope_theta, x.dtype)
            q = apply_rope(q, cos, sin)
            ks = [apply_rope(k, cos, sin) for k in ks]
        gates = torch.sigmoid(self.gate(x)).view(B, T, H, 3)
        pairs = list(zip(ks, vs, strict=True))
        return q, pairs, gates

    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: NSACache | None = None,
        plan: Plan | None = None,
    ) -> torch.Tensor:
        """NSA attention over ``x [B, T, hidden]``; returns ``[B, T, hidden]``.

        Args:
            x: hidden states.
            cu_seqlens: int32 ``[N+1]`` boundaries of sequences packed in ``B = 1`` (spec I.1);
                positions (and RoPE) restart at every boundary.
            plan: the `nsa_impl.Plan` of this call (`plan_for`), shared by the layers of a
                model; built here when ``None``. Not used with a cache.
            cache: an `NSACache` from `new_cache`. With a non-empty cache ``x [B, 1, hidden]`` is
                one decode step (`NSACache.step`) and ``x [B, C, hidden]`` a chunk of ``C`` tokens
                (`NSACache.extend`), each sequence at its own position ``cache.lengths[b]``;
                with an empty cache ``x`` is the prompt, computed in one call and stored
                (`NSACache.prefill`). Decoding is inference only (run it under
                ``torch.no_grad()``).
        """
        self._check_x(x, cu_seqlens, cache)
        B, T, _ = x.shape
        if cache is None and plan is None:
            plan = self.plan_for(x, cu_seqlens)  # checks cu_seqlens (named errors) once
        positions = None
        if self.rope:
            if cache is not None and cache.length:
                positions = cache.positions(T)  # [B, T]: device lengths on the Triton path
            elif cache is not None:
                if cu_seqlens is not None:  # named errors before the positions are built
                    check_cu_seqlens(cu_seqlens, B, T, x.device)
                positions = sequence_positions(T, cu_seqlens, x.device)
            else:
                positions = plan.positions  # restart at every boundary; on the device, no sync
        q, pairs, gates = self._project(x, positions)
        k, v = pairs[0]
        branch_kv = dict(zip(BRANCHES, pairs, strict=True)) if self.separate_branch_kv else None
        if cache is not None and cache.length and T == 1:
            o = cache.step(q, k, v, gates, branch_kv=branch_kv, validate=False)
        elif cache is not None and cache.length:
            o = cache.extend(q, k, v, gates, branch_kv=branch_kv, validate=False)
        elif cache is not None:
            o = cache.prefill(q, k, v, gates, branch_kv=branch_kv, validate=False)
        else:
            o = nsa_attention(
                q,
                k,
                v,
                gates,
                self.config,
                scale=self.scale,
                phi_k=self.phi_k,
                phi_v=self.phi_v,
                branch_kv=branch_kv,
                cu_seqlens=cu_seqlens,
                validate=False,
                plan=plan,
            )
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))
