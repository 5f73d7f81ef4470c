"""Adapters for public NSA implementations: fla-core, flash_nsa (mdy666) and lucidrains'.

Each adapter translates *layout and argument names* only and states, in its ``profile``, the one
convention it assumes for that translation (tensor layout, how the spec's gates in [0, 1] are
passed, what the window size means, which block size is l, d or l', which blocks are forced).
Where the peer's semantics differ from the spec (a window of ``w + 1`` keys, forced blocks added
on top of n, a compressed memory slot, ...) nothing is corrected: the difference shows as a
failed clause with its error. Limits the peer cannot lift (fla-core's one block size and group
sizes >= 16) are declared as capabilities (`ConfigLimits`), so clauses about a property run with
the nearest configuration the peer can run and clauses about one configuration skip with the
reason.

Registered in `conformance.adapters.REGISTRY` as ``fla:naive``, ``fla:parallel``, ``flash_nsa``
and ``lucidrains``; each imports its package lazily, and ``available()`` says why not when the
package (or the device it needs) is missing.

* ``fla:naive``: ``fla.ops.nsa.naive_nsa`` (PyPI ``fla-core``). Its pure-PyTorch logic calls two
  GPU kernels: fla's Triton ``mean_pooling`` and ``flash_attn`` for the window. Where they cannot
  run (no GPU; no flash_attn), the adapter puts `reference_mean_pooling` and
  `reference_flash_attn_func` in their place for the duration of a call: small PyTorch versions
  of the documented contracts of those two kernels (the profile names the backends in use), so
  the clauses grade fla's own code (its top-n, masks, window-size mapping, combination).
* ``fla:parallel``: ``fla.ops.nsa.parallel_nsa`` (Triton; CUDA only).
* ``flash_nsa``: ``HFNSACore`` of github.com/mdy666/Scalable-Flash-Native-Sparse-Attention (not on
  PyPI): the directory holding the ``flash_nsa`` package is named by ``NSA_FLASH_NSA_PATH``;
  CUDA only, and its window needs ``flash_attn`` importable.
* ``lucidrains``: ``native_sparse_attention_pytorch.SparseAttention`` (PyPI), a module with its
  own projections. The adapter drives it with given q, k, v through its public constructor:
  no norm, identity ``to_qkv``/``combine_heads`` weights, mean pooling as ``compress_mlp``, the
  gates' logits from ``strategy_combine_mlp`` (its sigmoid then gives back the gates) and the
  rotary embedding (a model-level choice outside the operator) replaced by the identity.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import dataclass, replace
from importlib import metadata

import torch

from .adapters import Adapter, Capabilities, ConfigLimits

LOWP_ONLY = frozenset({torch.bfloat16, torch.float16})
LOWP_AND_FP32 = LOWP_ONLY | {torch.float32}
ENV_FLASH_NSA_PATH = "NSA_FLASH_NSA_PATH"


# ---------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class PeerAux:
    """The part of the aux record a peer can return: its ``block_indices`` only."""

    block_indices: torch.Tensor


def ascending_indices(idx: torch.Tensor) -> torch.Tensor:
    """``block_indices`` with each row's valid blocks ascending and ``-1`` padding last.

    Peers return their blocks in score order; the spec's format is the ascending set. Reordering
    a row is layout: the set of blocks (and any ``-1`` inside it) is left as the peer chose it.
    """
    idx = idx.long()
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(idx < 0, torch.full_like(idx, big), idx)
    ordered = keyed.sort(dim=-1).values
    return torch.where(ordered == big, torch.full_like(ordered, -1), ordered)


def distribution_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (``None`` when it is not installed)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _import(module: str):
    """``(module, "")`` or ``(None, reason)``."""
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # a missing or broken peer must not break the rest of the suite
        return None, f"cannot import {module} ({type(exc).__name__}: {exc})"


def _unsupported(name: str, **kwargs) -> None:
    """Refuse keyword arguments the adapter does not declare (the suite never passes them)."""
    given = [k for k, v in kwargs.items() if v is not None]
    if given:
        raise NotImplementedError(f"{name} does not support {', '.join(given)}")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class _GateLogit(torch.autograd.Function):
    """``logit(g)`` for a peer that applies a sigmoid to what it is given.

    The backward is ``1 / (g (1 - g))`` with the denominator kept above the dtype's tiny, so that
    at the gates' endpoints (where the peer's sigmoid has derivative 0) the chain gives 0 instead
    of ``inf * 0``; the forward value is the exact logit (``+-inf`` at 1 and 0).
    """

    @staticmethod
    def forward(ctx, g):
        ctx.save_for_backward(g)
        return torch.logit(g)

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad / (g * (1 - g)).clamp(min=torch.finfo(g.dtype).tiny)


def gate_logits(gates: torch.Tensor) -> torch.Tensor:
    """The logits whose sigmoid is ``gates`` (how a sigmoid-applying peer receives the gates)."""
    return _GateLogit.apply(gates)


# ---------------------------------------------------------------------------------------------
# Reference backends: the documented contracts of the GPU kernels fla's naive path calls


def reference_flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs
):
    """FlashAttention-2's ``flash_attn_func`` contract in PyTorch (no dropout).

    ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hk, D]`` (``Hq % Hk == 0``: query head ``i`` reads kv head
    ``i // (Hq / Hk)``). Query ``i`` attends to the keys ``j`` with ``i + Tk - Tq - left <= j <=
    i + Tk - Tq + right`` for ``window_size = (left, right)`` (``-1``: unbounded; ``causal`` sets
    ``right = 0``): ``(left, 0)`` holds ``left + 1`` keys. The scale defaults to ``1/sqrt(D)``.
    """
    if dropout_p:
        raise NotImplementedError("reference_flash_attn_func: dropout_p must be 0")
    outs = [
        _window_attention(q[b], k[b], v[b], softmax_scale, causal, window_size)
        for b in range(q.shape[0])
    ]
    return torch.stack(outs)


def reference_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    **kwargs,
):
    """``flash_attn_varlen_func``: `reference_flash_attn_func` per ``cu_seqlens`` segment.

    ``q [total_q, Hq, D]``, ``k, v [total_k, Hk, D]``; positions restart at every boundary.
    """
    if dropout_p:
        raise NotImplementedError("reference_flash_attn_varlen_func: dropout_p must be 0")
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    parts = [
        _window_attention(q[s:e], k[sk:ek], v[sk:ek], softmax_scale, causal, window_size)
        for s, e, sk, ek in zip(bq, bq[1:], bk, bk[1:], strict=False)
    ]
    return torch.cat(parts)


def _window_attention(q, k, v, scale, causal, window_size):
    """One sequence: ``q [Tq, Hq, D]``, ``k/v [Tk, Hk, D|Dv]`` -> ``[Tq, Hq, Dv]``."""
    Tq, Hq, D = q.shape
    Tk, Hk = k.shape[:2]
    scale = D**-0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)  # FlashAttention accumulates in float32
    rep = Hq // Hk
    kk = k.to(work).repeat_interleave(rep, dim=1)
    vv = v.to(work).repeat_interleave(rep, dim=1)
    logits = torch.einsum("ihd,jhd->hij", q.to(work), kk) * scale
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(Tq, device=q.device).view(-1, 1) + (Tk - Tq)
    j = torch.arange(Tk, device=q.device).view(1, -1)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", probs, vv).to(q.dtype)


def reference_mean_pooling(x, chunk_size, cu_seqlens=None, **kwargs):
    """fla's ``mean_pooling`` contract: means of consecutive ``chunk_size`` tokens per sequence.

    ``x [B, T, H, D]`` -> ``[B, ceil(T / chunk_size), H, D]``; a last, partial chunk is the mean
    of the tokens it has. With ``cu_seqlens`` (``B = 1``) chunks restart at every boundary and
    the result is packed ``[1, sum_i ceil(len_i / chunk_size), H, D]``.
    """
    if cu_seqlens is None:
        return torch.stack([_chunk_means(x[b], chunk_size) for b in range(x.shape[0])])
    bounds = cu_seqlens.tolist()
    parts = [_chunk_means(x[0, s:e], chunk_size) for s, e in zip(bounds, bounds[1:], strict=False)]
    return torch.cat(parts).unsqueeze(0)


def _chunk_means(x, chunk_size):
    """``x [T, H, D]`` -> ``[ceil(T / chunk_size), H, D]``."""
    return torch.stack([c.mean(dim=0) for c in x.split(chunk_size, dim=0)]) if len(x) else x[:0]


# ---------------------------------------------------------------------------------------------
# fla-core


class FlaLimits(ConfigLimits):
    """fla-core's NSA: one block size for l = d = l', forced blocks 0, b-1 and b (init 1, local 2).

    ``parallel_nsa``'s Triton kernels further need the block size to be a power of two >= 16 and
    >= 2 * next_power_of_two(n).
    """

    def __init__(self, kind: str):
        self.kind = kind

    def reason(self, cfg) -> str | None:
        """Why fla-core cannot run ``cfg``."""
        l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
        if not l == d == ls:
            return f"fla-core uses one block size for l = d = l' (got l={l}, d={d}, l'={ls})"
        if (cfg.sel_init_blocks, cfg.sel_local_blocks) != (1, 2):
            return (
                "fla-core always forces block 0 and the blocks b-1, b (init=1, local=2; got "
                f"init={cfg.sel_init_blocks}, local={cfg.sel_local_blocks})"
            )
        if self.kind == "parallel":
            if not _pow2(ls) or ls < 16:
                return f"fla-core's parallel_nsa needs a power-of-two block size >= 16 (got {ls})"
            if ls < 2 * _next_pow2(cfg.sel_top_n):
                n = cfg.sel_top_n
                return f"fla-core's parallel_nsa needs block size >= 2 * next_pow2(n) (n={n})"
        return None

    def nearest(self, cfg, keep=()):
        """l = d = l' := l' (the selection granularity), or l when the test keeps l or d;
        init 1, local 2, n >= 3."""
        compressing = "cmp_block" in keep or "cmp_stride" in keep
        ls = cfg.cmp_block if compressing else cfg.sel_block
        n = max(cfg.sel_top_n, 3)
        if self.kind == "parallel":
            ls = max(16, _next_pow2(ls), 2 * _next_pow2(n))
        return replace(
            cfg,
            cmp_block=ls,
            cmp_stride=ls,
            sel_block=ls,
            sel_top_n=n,
            sel_init_blocks=1,
            sel_local_blocks=2,
        )

    def describe(self) -> str:
        """One line for listings."""
        extra = (
            ", block size a power of two >= max(16, 2*next_pow2(n))"
            if self.kind == "parallel"
            else ""
        )
        return f"l = d = l' (one block size), init=1, local=2{extra}"


class FlaAdapter(Adapter):
    """fla-core's ``naive_nsa`` (``kind="naive"``) or ``parallel_nsa`` (``kind="parallel"``)."""

    DIST = "fla-core"

    def __init__(self, kind: str):
        if kind not in ("naive", "parallel"):
            raise ValueError(f"kind must be 'naive' or 'parallel', got {kind!r}")
        self.kind = kind
        self.name = f"fla:{kind}"
        fn = "naive_nsa" if kind == "naive" else "parallel_nsa"
        self.description = f"fla-core fla.ops.nsa.{fn}"
        self.capabilities = Capabilities(
            devices=frozenset({"cpu", "cuda"} if kind == "naive" else {"cuda"}),
            # naive_nsa computes in float32 whatever it is given; parallel_nsa's window calls
            # flash_attn, which takes fp16/bf16 only and one head dim for q, k and v (measured on
            # the H200: "FlashAttention only support fp16 and bf16 data type")
            dtypes=LOWP_AND_FP32 if kind == "naive" else LOWP_ONLY,
            same_head_dims=kind == "parallel",
            backward=True,
            varlen=True,
            decode=False,
            aux=False,
            indices=True,
            branch_kv=False,
            phi=False,
            selection=True,
            scale=True,
            nsa_config=False,
            min_group_size=16,
            pow2_group_size=True,
            # parallel_nsa's Triton dots need K >= 16 ("Input shapes should have ... K >= 16")
            min_head_dim=1 if kind == "naive" else 16,
            max_head_dim=None if kind == "naive" else 256,
            limits=FlaLimits(kind),
        )

    @property
    def profile(self) -> dict[str, str]:
        """The conventions this adapter assumes (one place; see the module docstring)."""
        return {
            "layout": "q [B, T, HQ, K], k/v [B, T, H, K or V], as the spec (no change)",
            "gates": "g_cmp, g_slc, g_swa = gates[..., 0], [..., 1], [..., 2], passed as given "
            "(fla multiplies the branch outputs by them)",
            "window": "window_size = w (fla calls flash_attn with window_size=(w - 1, 0))",
            "blocks": "block_size = l = d = l' (mean pooling over non-overlapping blocks)",
            "top-n": "block_counts = n (forced blocks counted in n)",
            "forced blocks": "fixed by fla: block 0 and the blocks b-1, b (init=1, local=2)",
            "scale": "scale passed as given",
            "block_indices": "fla's return_block_indices (naive) / parallel_nsa_topk (parallel), "
            "each row reordered ascending with -1 last",
            "backends": self._backend_note(),
        }

    def version(self) -> str | None:
        """fla-core's installed version."""
        return distribution_version(self.DIST)

    def _module(self):
        return _import("fla.ops.nsa.naive" if self.kind == "naive" else "fla.ops.nsa.parallel")

    def available(self) -> tuple[bool, str]:
        """fla-core imports (``pip install fla-core``)."""
        mod, why = self._module()
        return (mod is not None), why

    def _backend_note(self) -> str:
        mod, _ = self._module()
        if mod is None:
            return "-"
        window = (
            "flash_attn (installed)"
            if getattr(mod, "flash_attn_func", None) is not None
            else "conformance.peers.reference_flash_attn_func (flash_attn is not installed)"
        )
        pooling = (
            "fla's Triton mean_pooling on CUDA, conformance.peers.reference_mean_pooling on CPU"
            if self.kind == "naive"
            else "fla's Triton mean_pooling"
        )
        return f"window: {window}; pooling: {pooling}"

    @contextlib.contextmanager
    def _backends(self, mod, device: torch.device):
        """Stand in for the GPU kernels fla's code calls, where they cannot run (this call only)."""
        swaps = {}
        if getattr(mod, "flash_attn_func", None) is None:
            swaps["flash_attn_func"] = reference_flash_attn_func
            swaps["flash_attn_varlen_func"] = reference_flash_attn_varlen_func
        if device.type != "cuda" and hasattr(mod, "mean_pooling"):
            swaps["mean_pooling"] = reference_mean_pooling
        saved = {name: getattr(mod, name, None) for name in swaps}
        for name, fn in swaps.items():
            setattr(mod, name, fn)
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(mod, name, fn)

    def _block_size(self, cfg) -> int:
        why = self.capabilities.limits.reason(cfg)
        if why:
            raise ValueError(f"{self.name}: cfg: {why}")
        return cfg.sel_block

    def attention(
        self,
        q,
        k,
        v,
        gates,
        cfg,
        *,
        scale=None,
        phi_k=None,
        phi_v=None,
        branch_kv=None,
        cu_seqlens=None,
        return_aux=False,
    ):
        """``naive_nsa`` / ``parallel_nsa`` with the spec's arguments (profile above)."""
        _unsupported(self.name, phi_k=phi_k, phi_v=phi_v, branch_kv=branch_kv)
        mod, why = self._module()
        if mod is None:
            raise RuntimeError(why)
        block = self._block_size(cfg)
        kwargs = dict(
            g_cmp=gates[..., 0],
            g_slc=gates[..., 1],
            g_swa=gates[..., 2],
            block_counts=cfg.sel_top_n,
            block_size=block,
            window_size=cfg.window,
            scale=scale,
            cu_seqlens=cu_seqlens,
        )
        idx = None
        with self._backends(mod, q.device):
            if self.kind == "naive":
                out = mod.naive_nsa(q, k, v, **kwargs, return_block_indices=return_aux)
                o, idx = out if return_aux else (out, None)
            else:
                kwargs = {
                    n: (t.contiguous() if n.startswith("g_") else t) for n, t in kwargs.items()
                }
                o = mod.parallel_nsa(q, k, v, **kwargs)
                if return_aux:
                    idx = self._parallel_indices(mod, q, k, v, block, cfg, scale, cu_seqlens)
        if not return_aux:
            return o
        return o, PeerAux(ascending_indices(idx))

    @staticmethod
    def _parallel_indices(mod, q, k, v, block, cfg, scale, cu_seqlens):
        """The block indices ``parallel_nsa`` computes, by the same calls it makes."""
        scale = k.shape[-1] ** -0.5 if scale is None else scale
        k_cmp, v_cmp = (
            mod.mean_pooling(k, block, cu_seqlens),
            mod.mean_pooling(v, block, cu_seqlens),
        )
        _, lse = mod.parallel_nsa_compression(
            q=q,
            k=k_cmp,
            v=v_cmp,
            TK=k.shape[1],
            block_size=block,
            scale=scale,
            cu_seqlens=cu_seqlens,
        )
        return mod.parallel_nsa_topk(
            q=q,
            k=k_cmp,
            lse=lse,
            TK=k.shape[1],
            block_counts=cfg.sel_top_n,
            block_size=block,
            scale=scale,
            cu_seqlens=cu_seqlens,
        )

    def selection(self, q, k, v, block_indices, cfg, scale, cu_seqlens=None):
        """fla's selection alone: ``block_indices`` given, no compressed gate, no window."""
        mod, why = self._module()
        if mod is None:
            raise RuntimeError(why)
        fn = mod.naive_nsa if self.kind == "naive" else mod.parallel_nsa
        with self._backends(mod, q.device):
            return fn(
                q,
                k,
                v,
                block_indices=block_indices,
                block_counts=block_indices.shape[-1],
                block_size=cfg.sel_block,
                window_size=0,
                scale=scale,
                cu_seqlens=cu_seqlens,
            )


# ---------------------------------------------------------------------------------------------
# flash_nsa (mdy666)


class FlashNsaLimits(ConfigLimits):
    """flash_nsa's asserts: stride a power of two, d | l, d | l', l' >= l; its Triton kernels
    are written for the paper's sizes, so block sizes are kept at powers of two >= 16."""

    def reason(self, cfg) -> str | None:
        """Why flash_nsa cannot run ``cfg``."""
        l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
        if not all(_pow2(x) and x >= 16 for x in (l, d, ls)):
            return f"flash_nsa: l, d, l' must be powers of two >= 16 (got {l}, {d}, {ls})"
        if ls < l:
            return f"flash_nsa: l' >= l required (got l={l}, l'={ls})"
        return None

    def nearest(self, cfg, keep=()):
        """Each block size raised to a power of two >= 16, l' >= l (forced blocks, n, w kept)."""
        d = max(16, _next_pow2(cfg.cmp_stride))
        l = max(d, _next_pow2(cfg.cmp_block))
        ls = max(l, _next_pow2(cfg.sel_block))
        return replace(cfg, cmp_block=l, cmp_stride=d, sel_block=ls)

    def describe(self) -> str:
        """One line for listings."""
        return "l, d, l' powers of two >= 16, l' >= l"


class FlashNsaAdapter(Adapter):
    """``flash_nsa.HFNSACore`` (mdy666), imported from ``$NSA_FLASH_NSA_PATH``; CUDA only."""

    name = "flash_nsa"
    description = "mdy666/Scalable-Flash-Native-Sparse-Attention flash_nsa.HFNSACore"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        backward=True,
        varlen=True,
        decode=False,
        aux=False,
        branch_kv=False,
        phi=False,
        selection=False,
        scale=False,  # HFNSACore uses qk_head_dim ** -0.5, with no argument to change it
        nsa_config=False,
        min_head_dim=16,
        max_head_dim=256,
        pow2_head_dims=True,
        same_head_dims=True,  # its window's flash_attn takes one head dim for q, k and v
        limits=FlashNsaLimits(),
    )
    profile = {
        "layout": "q [B*T, HQ, D], k/v [B*T, G, D] packed with cu_seqlens = [0, T, 2T, ...] "
        "(B sequences), or the given cu_seqlens (B = 1)",
        "gates": "combine_weight = logit(gates): flash_nsa applies a sigmoid to it",
        "window": "window_size = w (flash_nsa calls flash_attn with window_size=(w, -1))",
        "blocks": "kernel_size = l, stride = d, block_size = l'",
        "top-n": "top_n = n",
        "forced blocks": "num_init_blocks = init, num_local_blocks = local",
        "compression": "cmp_k_method = cmp_v_method = 'mean'",
        "scale": "not settable (qk_head_dim ** -0.5)",
    }

    def version(self) -> str | None:
        """The path it was imported from (flash_nsa has no distribution metadata)."""
        path = os.environ.get(ENV_FLASH_NSA_PATH)
        return f"from {path}" if path else None

    def _module(self):
        path = os.environ.get(ENV_FLASH_NSA_PATH)
        if not path:
            return None, f"${ENV_FLASH_NSA_PATH} is not set (the directory holding flash_nsa/)"
        if path not in sys.path:
            sys.path.insert(0, path)
        return _import("flash_nsa")

    def available(self) -> tuple[bool, str]:
        """flash_nsa imports from ``$NSA_FLASH_NSA_PATH``."""
        mod, why = self._module()
        return (mod is not None), why

    def attention(
        self,
        q,
        k,
        v,
        gates,
        cfg,
        *,
        scale=None,
        phi_k=None,
        phi_v=None,
        branch_kv=None,
        cu_seqlens=None,
        return_aux=False,
    ):
        """``HFNSACore(config)(q, k, v, logit(gates), cu_seqlens)`` (profile above)."""
        _unsupported(self.name, scale=scale, phi_k=phi_k, phi_v=phi_v, branch_kv=branch_kv)
        if return_aux:
            raise NotImplementedError("flash_nsa: no aux record")
        mod, why = self._module()
        if mod is None:
            raise RuntimeError(why)
        why = self.capabilities.limits.reason(cfg)
        if why:
            raise ValueError(f"{self.name}: cfg: {why}")
        B, T, H, Dk = q.shape
        G, Dv = k.shape[2], v.shape[-1]
        config = mod.NSAConfig(
            head_dim=Dk,
            qk_head_dim=Dk,
            v_head_dim=Dv,
            num_heads=H,
            num_kv_heads=G,
            kernel_size=cfg.cmp_block,
            stride=cfg.cmp_stride,
            cmp_k_method="mean",
            cmp_v_method="mean",
            block_size=cfg.sel_block,
            top_n=cfg.sel_top_n,
            num_init_blocks=cfg.sel_init_blocks,
            num_local_blocks=cfg.sel_local_blocks,
            window_size=cfg.window,
        )
        core = mod.HFNSACore(config).to(device=q.device, dtype=q.dtype)
        if cu_seqlens is None:
            cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        else:
            cu = cu_seqlens
        weight = gate_logits(gates).to(q.dtype)
        o = core(
            q.reshape(B * T, H, Dk),
            k.reshape(B * T, G, Dk),
            v.reshape(B * T, G, Dv),
            weight.reshape(B * T, H, 3),
            cu,
        )
        return o.reshape(B, T, H, Dv)


# ---------------------------------------------------------------------------------------------
# lucidrains' native-sparse-attention-pytorch


class LucidrainsLimits(ConfigLimits):
    """The module always adds the query's own block to its top-n, and forces no initial block:
    the nearest spec configuration has init = 0, local = 1."""

    def reason(self, cfg) -> str | None:
        """Why the module cannot express ``cfg``'s forced blocks."""
        if (cfg.sel_init_blocks, cfg.sel_local_blocks) != (0, 1):
            return (
                "lucidrains forces exactly the query's own block (init=0, local=1; got "
                f"init={cfg.sel_init_blocks}, local={cfg.sel_local_blocks})"
            )
        return None

    def nearest(self, cfg, keep=()):
        """The same configuration with init = 0, local = 1."""
        return replace(cfg, sel_init_blocks=0, sel_local_blocks=1)

    def describe(self) -> str:
        """One line for listings."""
        return "init=0, local=1 (its own block always added)"


class _MeanPool(torch.nn.Module):
    """``compress_mlp``: phi as the mean of each block (``[b, h, w, n, d] -> [b, h, w, d]``)."""

    def forward(self, x):
        return x.mean(dim=-2)


class _Phi(torch.nn.Module):
    """A given phi (``[..., l, D] -> [..., D]``) as a compress network."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _GivenGateLogits(torch.nn.Module):
    """``strategy_combine_mlp`` returning the logits of the gates given for this call."""

    def __init__(self):
        super().__init__()
        self.logits = None

    def forward(self, _inp):
        return self.logits


class _NoRotary(torch.nn.Module):
    """Identity in place of the module's rotary embedding: the operator takes q, k as given."""

    def rotate_queries_with_cached_keys(self, q, k):
        return q, k


class LucidrainsAdapter(Adapter):
    """``native_sparse_attention_pytorch.SparseAttention`` driven with given q, k, v (CPU/CUDA)."""

    name = "lucidrains"
    description = "lucidrains native-sparse-attention-pytorch SparseAttention (module API)"
    DIST = "native-sparse-attention-pytorch"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float64, torch.float32, torch.bfloat16}),
        backward=True,
        varlen=False,
        decode=False,
        aux=False,
        branch_kv=False,
        phi=True,
        selection=False,
        scale=False,  # the branches use dim_head ** -0.5 (no argument)
        nsa_config=False,
        same_head_dims=True,  # one dim_head for queries, keys and values
        limits=LucidrainsLimits(),
    )
    profile = {
        "layout": "inp = [q | k | v] flattened per token; to_qkv = identity, norm off, "
        "combine_heads = identity onto the first H*D features; kv_heads = G",
        "rotary": "the module's rotary embedding replaced by the identity (q, k given)",
        "gates": "strategy_combine_mlp returns logit(gates): the module applies a sigmoid",
        "window": "sliding_window_size = w (LocalAttention, exact_windowsize, causal)",
        "blocks": "compress_block_size = l, compress_block_sliding_stride = d, "
        "selection_block_size = l'",
        "top-n": "num_selected_blocks = n (the module adds the query's own block on top)",
        "forced blocks": "fixed by the module: the query's own block only (init=0, local=1)",
        "compression": "compress_mlp = mean over the block (phi: the given phi_k/phi_v as the "
        "k/v compress networks); intra-block positions and the compressed memory slot "
        "(num_compressed_mem_kv = 1, the module's minimum) at their initial value 0",
        "scale": "not settable (dim_head ** -0.5)",
    }

    def version(self) -> str | None:
        """native-sparse-attention-pytorch's installed version."""
        return distribution_version(self.DIST)

    def available(self) -> tuple[bool, str]:
        """native-sparse-attention-pytorch imports."""
        mod, why = _import("native_sparse_attention_pytorch")
        return (mod is not None), why

    def attention(
        self,
        q,
        k,
        v,
        gates,
        cfg,
        *,
        scale=None,
        phi_k=None,
        phi_v=None,
        branch_kv=None,
        cu_seqlens=None,
        return_aux=False,
    ):
        """The module's ``forward`` on ``[q | k | v]`` (profile above)."""
        _unsupported(self.name, scale=scale, branch_kv=branch_kv, cu_seqlens=cu_seqlens)
        if return_aux:
            raise NotImplementedError("lucidrains: no aux record")
        mod, why = _import("native_sparse_attention_pytorch")
        if mod is None:
            raise RuntimeError(why)
        why = self.capabilities.limits.reason(cfg)
        if why:
            raise ValueError(f"{self.name}: cfg: {why}")
        B, T, H, D = q.shape
        G = k.shape[2]
        if v.shape[-1] != D:
            raise ValueError(f"{self.name}: one head dim (dim_head): Dk={D} != Dv={v.shape[-1]}")
        dim = (H + 2 * G) * D
        gate_net = _GivenGateLogits()
        module = mod.SparseAttention(
            dim=dim,
            dim_head=D,
            heads=H,
            kv_heads=G,
            sliding_window_size=cfg.window,
            compress_block_size=cfg.cmp_block,
            compress_block_sliding_stride=cfg.cmp_stride,
            selection_block_size=cfg.sel_block,
            num_selected_blocks=cfg.sel_top_n,
            num_compressed_mem_kv=1,
            causal=True,
            norm=False,
            use_diff_topk=False,
            use_triton_kernel=False,
            query_heads_share_selected_kv=True,
            compress_mlp=_MeanPool(),
            strategy_combine_mlp=gate_net,
        )
        if phi_k is not None or phi_v is not None:
            module.k_compress = _Phi(phi_k) if phi_k is not None else _MeanPool()
            module.v_compress = _Phi(phi_v) if phi_v is not None else _MeanPool()
        module.rotary_emb = _NoRotary()
        module = module.to(device=q.device, dtype=q.dtype)
        with torch.no_grad():
            module.to_qkv.weight.copy_(torch.eye(dim, dtype=q.dtype, device=q.device))
            module.combine_heads.weight.zero_()
            module.combine_heads.weight[: H * D].copy_(
                torch.eye(H * D, dtype=q.dtype, device=q.device)
            )
        gate_net.logits = gate_logits(gates).reshape(B, T, H * 3)
        inp = torch.cat(
            [q.reshape(B, T, H * D), k.reshape(B, T, G * D), v.reshape(B, T, G * D)], -1
        )
        out = module(inp)
        return out[..., : H * D].reshape(B, T, H, D)
