"""Hypothesis strategies for the NSA property tests: structure only, never tensor elements.

A `Structure` is what hypothesis draws: sizes (B, G, h, T, Dk, Dv), an `NSAConfig` satisfying
spec I.2, optional `cu_seqlens` lengths, a value regime, the compression function and a seed.
`make_inputs` turns it into tensors with ``torch.Generator(seed)``: element-wise tensor
strategies shrink toward nearly constant arrays, which exercise nothing in attention.

Value regimes:
- ``normal``: standard normal q, k, v; uniform gates.
- ``large``: queries scaled by `LARGE_LOGIT_FACTOR`, so softmaxes are nearly one-hot.
- ``ties``: every key of a (sequence, group) is the same vector, so all compressed keys are equal,
  ``p_cmp`` is uniform and many selection scores tie exactly (the tie-break decides).
- ``tiny``: ``T`` (or every packed sequence) at most `TINY_MAX_T` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from nsa_impl.tolerances import fp_class_atol
from nsa_ref import NSAConfig, nsa_attention

REGIMES = ("normal", "large", "ties", "tiny")
#: Query scale of the ``large`` regime: logits of order 30, far from the softmax's linear range.
LARGE_LOGIT_FACTOR = 30.0
#: Longest sequence of the ``tiny`` regime.
TINY_MAX_T = 3
PHIS = ("mean", "weighted")
SEEDS = st.integers(0, 2**31 - 1)


def weighted_pool(blocks: torch.Tensor) -> torch.Tensor:
    """A position-dependent ``phi``: weights ``1..l`` (normalised) over the ``l`` keys of a block.

    Unlike the mean it depends on the order of keys inside a block, so a cache or packing bug that
    reorders or shifts a block changes the result.
    """
    l = blocks.shape[-2]
    w = torch.arange(1, l + 1, dtype=blocks.dtype, device=blocks.device)
    # An elementwise product and a sum over the block axis, as the mean does; an einsum (a matmul)
    # rounded a block differently in float32 depending on how many blocks were pooled together.
    return (blocks * (w / w.sum())[:, None]).sum(dim=-2)


def phi_function(name: str):
    """The ``phi_k``/``phi_v`` callable of a `Structure.phi` name (``None`` = reference mean)."""
    return {"mean": None, "weighted": weighted_pool}[name]


@dataclass(frozen=True)
class Structure:
    """One drawn problem: everything but the tensor values, which come from ``seed``.

    ``seqlens`` set means a packed variable-length batch: ``B == 1``, ``T == sum(seqlens)``.
    ``branch_kv`` set means each branch gets its own (k, v) (spec I.8).
    """

    B: int
    G: int
    h: int
    T: int
    Dk: int
    Dv: int
    cfg: NSAConfig
    regime: str = "normal"
    seed: int = 0
    seqlens: tuple[int, ...] | None = None
    phi: str = "mean"
    branch_kv: bool = False

    @property
    def H(self) -> int:
        """Query heads ``G * h``."""
        return self.G * self.h

    @property
    def cu_seqlens(self) -> list[int] | None:
        """Packed boundaries ``0 = c_0 < ... < c_N = T``, or ``None``."""
        if self.seqlens is None:
            return None
        out = [0]
        for n in self.seqlens:
            out.append(out[-1] + n)
        return out

    def sequences(self) -> list[tuple[int, int, int]]:
        """Independent sequences as ``(batch row, start, end)``: batch rows, or packed segments."""
        cu = self.cu_seqlens
        if cu is None:
            return [(b, 0, self.T) for b in range(self.B)]
        return [(0, s, e) for s, e in pairwise(cu)]

    def with_cfg(self, **changes) -> Structure:
        """The same structure under a modified config (re-validated by `NSAConfig`)."""
        return replace(self, cfg=replace(self.cfg, **changes))


BRANCH_FIELDS = tuple(f"{b}.{x}" for b in ("cmp", "sel", "win") for x in ("k", "v"))


@dataclass
class Inputs:
    """Tensors of one `Structure` plus the keyword arguments of ``nsa_attention``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: torch.Tensor
    structure: Structure
    branch_kv: dict | None = None
    cu_seqlens: torch.Tensor | None = None

    def kwargs(self) -> dict:
        """``phi_k``, ``phi_v``, ``branch_kv`` and ``cu_seqlens`` for ``nsa_attention``."""
        phi = phi_function(self.structure.phi)
        return dict(phi_k=phi, phi_v=phi, branch_kv=self.branch_kv, cu_seqlens=self.cu_seqlens)

    def leaves(self) -> list[torch.Tensor]:
        """Every input tensor (branch K/V included), e.g. to ask for gradients."""
        extra = [t for pair in (self.branch_kv or {}).values() for t in pair]
        return [self.q, self.k, self.v, self.gates, *extra]

    def kv(self, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k, v) a branch reads: its own pair under ``branch_kv``, else the shared one."""
        return (self.branch_kv or {}).get(branch, (self.k, self.v))


def splice(a: Inputs, b: Inputs, fields: dict[str, torch.Tensor], groups=None) -> Inputs:
    """``a`` with some entries taken from ``b`` (same structure, other seed): a perturbation.

    ``fields`` maps ``"q"``, ``"k"``, ``"v"``, ``"gates"`` or a branch field such as ``"cmp.k"``
    to a bool ``[T]`` mask of the positions to replace; ``groups`` (bool ``[G]``) restricts the
    replacement to some KV groups and their query heads. Replaced tensors stay leaves.
    """
    s = a.structure
    grp = torch.ones(s.G, dtype=torch.bool) if groups is None else groups

    def mix(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name not in fields:
            return x
        per_head = name in ("q", "gates")
        g = grp.repeat_interleave(s.h) if per_head else grp
        take = fields[name][None, :, None, None] & g[None, None, :, None]
        return torch.where(take, y, x).detach().requires_grad_(x.requires_grad)

    branch_kv = None
    if a.branch_kv is not None:
        branch_kv = {
            n: (mix(f"{n}.k", ka, kb), mix(f"{n}.v", va, vb))
            for (n, (ka, va)), (kb, vb) in zip(
                a.branch_kv.items(), b.branch_kv.values(), strict=True
            )
        }
    return Inputs(
        q=mix("q", a.q, b.q),
        k=mix("k", a.k, b.k),
        v=mix("v", a.v, b.v),
        gates=mix("gates", a.gates, b.gates),
        structure=s,
        branch_kv=branch_kv,
        cu_seqlens=a.cu_seqlens,
    )


def segment(x: Inputs, start: int, end: int) -> Inputs:
    """Positions ``start .. end-1`` as unpacked inputs of their own (a prefix, or one whole
    packed sequence, which then becomes a ``B = 1`` batch)."""
    cut = {n: (k[:, start:end], v[:, start:end]) for n, (k, v) in (x.branch_kv or {}).items()}
    return Inputs(
        q=x.q[:, start:end],
        k=x.k[:, start:end],
        v=x.v[:, start:end],
        gates=x.gates[:, start:end],
        structure=replace(x.structure, T=end - start, seqlens=None),
        branch_kv=cut or None,
    )


def cotangent(o: torch.Tensor, seed: int) -> torch.Tensor:
    """Random output weights for a backward pass: ``(o * cotangent).sum()`` reaches every entry."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(o.shape, generator=gen, dtype=o.dtype)


def tolerance(dtype: torch.dtype, kind: str = "out") -> float:
    """The spec I.10 absolute tolerance class of a float64 or float32 run."""
    return fp_class_atol(str(dtype).removeprefix("torch."), kind)


#: Run a property in float64 (`exact` class) and float32 (`fp32` class).
over_dtypes = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def reseeded(s: Structure, offset: int = 1) -> Structure:
    """The same structure with other values (a perturbation source)."""
    return replace(s, seed=s.seed + offset)


def _keys(s: Structure, gen: torch.Generator, dtype) -> torch.Tensor:
    """Keys ``[B, T, G, Dk]``; in the ``ties`` regime one vector per (sequence, group)."""
    if s.regime != "ties":
        return torch.randn(s.B, s.T, s.G, s.Dk, generator=gen, dtype=dtype)
    k = torch.empty(s.B, s.T, s.G, s.Dk, dtype=dtype)
    for b, start, end in s.sequences():
        k[b, start:end] = torch.randn(s.G, s.Dk, generator=gen, dtype=dtype)
    return k


def make_inputs(s: Structure, dtype=torch.float64, *, requires_grad: bool = False) -> Inputs:
    """Build the tensors of ``s`` from ``torch.Generator().manual_seed(s.seed)``.

    Values are drawn in float64 and then cast, so the float32 inputs of a structure are the
    rounded float64 ones.
    """
    gen = torch.Generator().manual_seed(s.seed)
    f64 = torch.float64
    q = torch.randn(s.B, s.T, s.H, s.Dk, generator=gen, dtype=f64)
    if s.regime == "large":
        q = q * LARGE_LOGIT_FACTOR
    k = _keys(s, gen, f64)
    v = torch.randn(s.B, s.T, s.G, s.Dv, generator=gen, dtype=f64)
    gates = torch.rand(s.B, s.T, s.H, 3, generator=gen, dtype=f64)
    branch_kv = None
    if s.branch_kv:
        branch_kv = {
            name: (_keys(s, gen, f64), torch.randn(s.B, s.T, s.G, s.Dv, generator=gen, dtype=f64))
            for name in ("cmp", "sel", "win")
        }

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).requires_grad_(requires_grad)

    cu = s.cu_seqlens
    if branch_kv is not None:
        branch_kv = {n: (leaf(a), leaf(b)) for n, (a, b) in branch_kv.items()}
    return Inputs(
        q=leaf(q),
        k=leaf(k),
        v=leaf(v),
        gates=leaf(gates),
        structure=s,
        branch_kv=branch_kv,
        cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32),
    )


def reference(inputs: Inputs, cfg: NSAConfig | None = None, **overrides):
    """``nsa_ref.nsa_attention(..., return_aux=True)`` on ``inputs`` -> ``(o, aux)``.

    ``cfg`` defaults to the structure's; ``overrides`` replace keyword arguments (e.g. ``phi_k``).
    """
    kwargs = {**inputs.kwargs(), **overrides}
    cfg = inputs.structure.cfg if cfg is None else cfg
    return nsa_attention(inputs.q, inputs.k, inputs.v, inputs.gates, cfg, return_aux=True, **kwargs)


@st.composite
def configs(
    draw,
    *,
    strides=st.integers(1, 4),
    cmp_mult=st.integers(1, 4),
    sel_mult=st.integers(1, 4),
    init=st.integers(0, 2),
    local=st.integers(0, 3),
    extra_n=st.integers(0, 3),
    windows=st.integers(1, 72),
) -> NSAConfig:
    """An `NSAConfig` valid under spec I.2, with small blocks: ``l = d*a``, ``l' = d*c``.

    Every argument is a strategy, so a property pins what it needs (``cmp_mult=st.just(1)``).
    ``l' < l`` is allowed: the overlap form of Eq. 9 does not need ``l <= l'`` (spec §2.9).
    ``n`` is at least the forced count (and at least 1) plus ``extra_n``.
    """
    d = draw(strides)
    n_init, n_local = draw(init), draw(local)
    return NSAConfig(
        cmp_block=d * draw(cmp_mult),
        cmp_stride=d,
        sel_block=d * draw(sel_mult),
        sel_top_n=max(1, n_init + n_local) + draw(extra_n),
        sel_init_blocks=n_init,
        sel_local_blocks=n_local,
        window=draw(windows),
    )


@st.composite
def structures(
    draw,
    *,
    cfgs=None,
    min_T: int = 1,
    max_T: int = 64,
    max_B: int = 2,
    min_G: int = 1,
    max_G: int = 2,
    max_h: int = 3,
    max_D: int = 6,
    regimes=REGIMES,
    packed: bool = False,
    max_seqs: int = 3,
    phis=("mean",),
    branch_kv=(False,),
) -> Structure:
    """A `Structure` with ``min_T <= T <= max_T`` (``tiny`` caps T, or each packed sequence).

    ``packed=True`` draws ``1..max_seqs`` sequence lengths (``B = 1``); ``min_T`` then bounds
    each sequence. ``phis`` and ``branch_kv`` list the allowed compression functions and whether
    per-branch K/V may be drawn.
    """
    cfg = draw(cfgs if cfgs is not None else configs())
    regime = draw(st.sampled_from(regimes))
    hi = max(min_T, min(TINY_MAX_T, max_T)) if regime == "tiny" else max_T
    seqlens = None
    if packed:
        count = draw(st.integers(1, max_seqs))
        per_seq = max(min_T, min(hi, max_T // count))
        seqlens = tuple(draw(st.lists(st.integers(min_T, per_seq), min_size=count, max_size=count)))
        B, T = 1, sum(seqlens)
    else:
        B, T = draw(st.integers(1, max_B)), draw(st.integers(min_T, hi))
    return Structure(
        B=B,
        G=draw(st.integers(min_G, max_G)),
        h=draw(st.integers(1, max_h)),
        T=T,
        Dk=draw(st.integers(1, max_D)),
        Dv=draw(st.integers(1, max_D)),
        cfg=cfg,
        regime=regime,
        seed=draw(SEEDS),
        seqlens=seqlens,
        phi=draw(st.sampled_from(phis)),
        branch_kv=draw(st.sampled_from(branch_kv)),
    )


def pinned(T: int, cfg: NSAConfig, **fields) -> Structure:
    """A hand-written `Structure` for ``@example`` edge cases (B=1, G=2, h=2, D=4 unless given)."""
    base = dict(B=1, G=2, h=2, T=T, Dk=4, Dv=4, cfg=cfg, regime="normal", seed=1234)
    base.update(fields)
    return Structure(**base)


def examples(weight: float = 1.0) -> settings:
    """Settings for one property: the loaded profile's ``max_examples`` times ``weight``.

    The root conftest loads the profile before test modules are imported, so ``dev``/``ci``/
    ``deep`` all reach every property in proportion.
    """
    base = settings()
    return settings(base, max_examples=max(1, round(base.max_examples * weight)))
