"""Test inputs: a structure (sizes, seed) in, tensors from a seeded `torch.Generator` out.

Tensors are drawn in float64 on the CPU (so every device and dtype sees the same numbers, rounded)
and converted per precision lane. Adversarial builders make the inputs the spec calls out:
logits far below any finite mask sentinel, exact score ties, identical blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

BRANCHES = ("cmp", "sel", "win")


@dataclass
class Inputs:
    """One call's tensors: ``q [B,T,H,Dk]``, ``k [B,T,G,Dk]``, ``v [B,T,G,Dv]``,
    ``gates [B,T,H,3]``.

    ``branch_kv`` maps branch -> ``(k, v)`` (or is ``None``); ``cu_seqlens`` is int32 or ``None``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: torch.Tensor
    branch_kv: dict | None = None
    cu_seqlens: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """``(B, T, G, h, Dk, Dv)``."""
        B, T, H, Dk = self.q.shape
        k = self.k if self.branch_kv is None else self.branch_kv["sel"][0]
        G = k.shape[2]
        return B, T, G, H // G, Dk, self.v.shape[-1]

    def leaves(self) -> dict[str, torch.Tensor]:
        """Differentiable inputs by name (``q``, ``k``, ``v``, ``gates``, ``<branch>.k`` ...)."""
        out = {"q": self.q, "k": self.k, "v": self.v, "gates": self.gates}
        for name, (k, v) in (self.branch_kv or {}).items():
            out[f"{name}.k"], out[f"{name}.v"] = k, v
        return out

    def to(self, dtype: torch.dtype, device, *, requires_grad: bool = False) -> Inputs:
        """A converted copy; with ``requires_grad`` its float tensors are fresh autograd leaves."""

        def conv(t):
            t = t.detach().to(device=device, dtype=dtype)
            return t.requires_grad_(True) if requires_grad else t

        bkv = (
            None
            if self.branch_kv is None
            else {n: (conv(k), conv(v)) for n, (k, v) in self.branch_kv.items()}
        )
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device)
        return Inputs(conv(self.q), conv(self.k), conv(self.v), conv(self.gates), bkv, cu)

    def kwargs(self) -> dict:
        """``branch_kv`` and ``cu_seqlens`` keyword arguments (only those that are set)."""
        out = {}
        if self.branch_kv is not None:
            out["branch_kv"] = self.branch_kv
        if self.cu_seqlens is not None:
            out["cu_seqlens"] = self.cu_seqlens
        return out

    def with_(self, **changes) -> Inputs:
        """A copy with some fields replaced."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Case:
    """Structure of an input: sizes, a seed, optional packing, branch K/V and fixed gates."""

    B: int = 1
    T: int = 40
    G: int = 1
    h: int = 2
    Dk: int = 8
    Dv: int = 8
    seed: int = 0
    cu_seqlens: tuple[int, ...] | None = None
    branch_kv: bool = False
    gates: tuple[float, float, float] | None = None

    def make(self) -> Inputs:
        """Float64 CPU tensors drawn from ``torch.Generator().manual_seed(seed)``."""
        gen = torch.Generator().manual_seed(self.seed)
        B, T, G, H = self.B, self.T, self.G, self.G * self.h

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        q, k, v = randn(B, T, H, self.Dk), randn(B, T, G, self.Dk), randn(B, T, G, self.Dv)
        if self.gates is None:
            gates = torch.rand(B, T, H, 3, generator=gen, dtype=torch.float64)
        else:
            gates = torch.tensor(self.gates, dtype=torch.float64).expand(B, T, H, 3).clone()
        bkv = None
        if self.branch_kv:
            bkv = {n: (randn(B, T, G, self.Dk), randn(B, T, G, self.Dv)) for n in BRANCHES}
        cu = None if self.cu_seqlens is None else torch.tensor(self.cu_seqlens, dtype=torch.int32)
        return Inputs(q, k, v, gates, bkv, cu)


def one_hot_gates(inp: Inputs, branch: str) -> Inputs:
    """Gates selecting one branch exactly (spec P24): the output is that branch's output."""
    g = torch.zeros_like(inp.gates)
    g[..., BRANCHES.index(branch)] = 1
    return inp.with_(gates=g)


def output_weights(inp: Inputs, seed: int = 12345) -> torch.Tensor:
    """Fixed random cotangent ``[B, T, H, Dv]`` for gradient checks (``loss = sum(o * w)``)."""
    B, T, _, h, _, Dv = inp.shape
    H = inp.q.shape[2]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)


def large_negative_logits(case: Case) -> Inputs:
    """Every logit below -1e4 (spec I.6), and all allowed logits of a row exactly equal.

    All keys are the same vector ``-m`` and ``q`` is ``+m`` with small integer jitter per row, so
    ``q.k`` is one exact integer per row. ``m`` puts the default-scaled logits around -1.2e4:
    below a finite mask sentinel such as -1e4, while ``q.k`` still fits float16 for ``Dk <= 16``.
    Exact exclusion then gives the plain mean of the allowed values whatever the rounding of the
    (identical) logits; a finite sentinel hands the excluded keys all the weight.
    """
    base = case.make()
    m = math.ceil(math.sqrt(1.2e4 / math.sqrt(case.Dk)))  # logit = -m * sum(q) / sqrt(Dk)
    gen = torch.Generator().manual_seed(case.seed + 1)
    q = m + torch.randint(0, 4, base.q.shape, generator=gen).to(torch.float64)
    k = torch.full_like(base.k, -float(m))
    bkv = None
    if base.branch_kv is not None:
        bkv = {n: (torch.full_like(kk, -float(m)), vv) for n, (kk, vv) in base.branch_kv.items()}
    return base.with_(q=q, k=k, branch_kv=bkv)


def tied_blocks(case: Case, period: int) -> Inputs:
    """Keys repeating with ``period`` (= the selection block length): every compressed block is
    identical, so all visible block scores tie exactly (spec P17); values stay random."""
    base = case.make()
    reps = -(-case.T // period)
    k = base.k[:, :period].repeat(1, reps, 1, 1)[:, : case.T].contiguous()
    return base.with_(k=k)


def local_positions(T: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Local position of each of the ``T`` (packed) tokens: restarts at every boundary."""
    if cu_seqlens is None:
        return torch.arange(T)
    bounds = cu_seqlens.cpu().long()
    lens = bounds[1:] - bounds[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    return torch.arange(T) - bounds[:-1][seq]
