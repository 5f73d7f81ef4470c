"""The plan: everything about a call that depends on shapes and ``cu_seqlens`` only, built once.

A `Plan` holds the route (one path per branch, from `nsa_impl.dispatch.choose`), ``max_seqlen``
and the layouts those paths read (FLA's cached layout helpers are the model):

* the packed-sequence view (`nsa_impl.varlen.PackedLayout`): bounds, local positions, and their
  device copies (``positions`` also serve RoPE);
* the compressed-block geometry (`nsa_impl.branches.compressed.CmpLayout`);
* per path: the masked paths' chunk tables (`nsa_impl.branches.RangeLayout`,
  `nsa_impl.scoring.CmpMaskedLayout`), FlashAttention's varlen window layout
  (`nsa_impl.kernels.flash.FlashLayout`), the compressed branch's query packing and score tiles
  (`nsa_impl.kernels.flash_cmp.FlashCmpLayout`), the Triton selection's token layout
  (`nsa_impl.kernels.triton_sel.TokenLayout`), the Triton compressed and window kernels'
  sequence starts (`nsa_impl.kernels.triton_attn.SeqStarts`).

Building a plan is host work (and reads ``cu_seqlens`` once, checking its content); using one is
not: ``nsa_attention(..., plan=p)`` only checks shapes, dtypes and devices against it (no sync),
and on the CUDA paths ("flash", "triton", "masked" except for the selection's "packed"/"varlen"
bucketing) a forward and backward then perform no host synchronisation at all. Build one plan
per forward and hand it to every layer (`nsa_impl.model` does); the layouts the route needs are
built eagerly, a fallback's layouts on first use.

Row subsets (context parallelism, `nsa_impl.parallel`): a plan built with ``rows`` serves a
``q`` that holds only those rows of the ``T``-row problem while ``k``/``v`` hold all ``T`` keys.
The per-row layouts (window and compressed ranges, selection positions and key bases) are then
built for those rows at their global positions; only the paths declaring
`nsa_impl.dispatch.PathDecl.rows` (the torch paths "masked", "packed", "varlen") serve it, so
the route says so and a forced FlashAttention/Triton/reference path is an error.

``nsa_impl.plan`` (this module's `plan` function, exported by the package) builds one; import
the class as ``from nsa_impl import Plan``.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import torch

from nsa_ref.config import NSAConfig
from nsa_ref.scalars import as_int
from nsa_ref.validate import check_cu_seqlens

from . import dispatch, routing
from .branches import RangeLayout
from .branches.compressed import CmpLayout
from .branches.selection import DEFAULT_VARLEN_MIN_L, flash_varlen_available
from .branches.sliding import window_ranges
from .kernels.flash import FlashLayout
from .kernels.flash_cmp import FlashCmpLayout
from .kernels.ops import Inputs
from .kernels.triton_attn import SeqStarts
from .kernels.triton_sel import TokenLayout, launch_shape
from .numerics import work_dtype
from .scoring import CmpMaskedLayout
from .varlen import PackedLayout


class Plan:
    """Route and layouts of one problem shape (module docstring); build with `plan`.

    Attributes:
        cfg: the `NSAConfig`.
        B, T, H, G, Dk, Dv: sizes (``q [B, T, H, Dk]``, ``k/v [B, T, G, D]``).
        rows: host int64 ``[T_q]``, the query rows ``q`` holds (``q [B, T_q, H, Dk]``), or
            ``None`` (all ``T``; ``T_q == T``).
        device, dtype: where and in what the inputs are.
        backward: whether the route serves calls that need gradients.
        varlen: ``cu_seqlens`` packs sequences (``B == 1``).
        bounds: host sequence boundaries ``(0, ..., T)``; ``bounds_tensor`` the same as a host
            int64 tensor.
        max_seqlen: the longest sequence.
        route: `nsa_impl.dispatch.Route` (``print(plan.route)`` explains it).
        inputs: the `nsa_impl.kernels.ops.Inputs` the route was chosen for.
        layout: host `PackedLayout`; ``positions``/``seq_start``: its local positions and
            sequence starts (int64 ``[T]``) on the device; ``row_positions``/``row_seq_start``
            the same for the query rows (``[T_q]``; the very same tensors without ``rows``):
            what RoPE of ``q`` and the selection read.
        cu_seqlens: int32 ``[N+1]`` on the device (``None`` without varlen).
        cmp: the `CmpLayout` (compressed-block geometry, with device copies).
        profile: the device's `nsa_impl.kernels.tuning.Profile` when the plan was built
            (``None`` if none could be read); `tuning` gives its launch shapes.
    """

    def __init__(self, cfg, B, T, H, G, Dk, Dv, device, dtype, backward, bounds, varlen,
                 cu_source, budget_bytes, branches=dispatch.BRANCHES, rows=None):  # fmt: skip
        self.cfg, self.B, self.T, self.H, self.G, self.Dk, self.Dv = cfg, B, T, H, G, Dk, Dv
        self.rows = rows
        self.T_q = T if rows is None else rows.numel()
        self.device, self.dtype, self.backward, self.varlen = device, dtype, backward, varlen
        self.bounds = tuple(bounds)
        self.budget_bytes = budget_bytes
        self._cu_source = cu_source
        self.layout = PackedLayout.build(T, self.bounds)
        self.max_seqlen = max(self.layout.lengths)
        self.bounds_tensor = torch.tensor(self.bounds, dtype=torch.int64)
        self.inputs = Inputs(device, dtype, B, T, H, G, Dk, Dv, self.max_seqlen, varlen,
                             backward, cfg, rows is not None)  # fmt: skip
        self.route = dispatch.choose(self.inputs)
        self.route.raise_errors()
        # The device profile, read once: the Triton launches take their shapes from the plan
        # (`tuning`), so a planned call reads no file or context variable (torch.compile traces it).
        self.profile = dispatch.device_profile(device)
        self.positions = self.layout.pos.to(device)
        self.seq_start = self.layout.seq_start.to(device)
        self.row_positions, self.row_seq_start = self.positions, self.seq_start
        if rows is not None:
            self.row_positions = self.layout.pos[rows].to(device)
            self.row_seq_start = self.layout.seq_start[rows].to(device)
        self.cu_seqlens = self.bounds_tensor.to(device, torch.int32) if varlen else None
        self.cmp = CmpLayout.build(cfg, self.layout, device)
        self._built: dict[tuple[str, str], object] = {}
        for branch, decision in self.route.items():  # the layouts the route reads, now
            if branch in branches and branch in decision.decl.layouts:
                self.layout_of(branch, decision.path)

    def tuning(self, kernel: str):
        """The plan's device-profile launch shape of ``kernel`` (``"cmp"``, ``"win"``, ``"topn"``,
        ``"gate"``: `nsa_impl.kernels.tuning.Profile` fields); ``None`` without a profile (the
        launcher then asks `nsa_impl.kernels.tuning.profile_for`)."""
        return None if self.profile is None else getattr(self.profile, kernel)

    def __repr__(self) -> str:
        shape = (self.B, self.T_q, self.H, self.Dk)
        paths = ", ".join(f"{b}={d.path}" for b, d in self.route.items())
        keys = "" if self.rows is None else f", rows {self.T_q} of T={self.T}"
        return (
            f"Plan(q={list(shape)}, G={self.G}, Dv={self.Dv}, {self.dtype}, {self.device}, "
            f"sequences={len(self.bounds) - 1}, max_seqlen={self.max_seqlen}{keys}; {paths})"
        )

    # --- layouts of the paths (built eagerly for the route, lazily for a fallback) ------------

    def layout_of(self, branch: str, path: str):
        """What ``path``'s ``branch`` implementation reads (its declared ``layouts`` entry: an
        attribute of the plan, or a ``"module:function"`` builder called with the plan once)."""
        key = (branch, path)
        if key not in self._built:
            spec = dispatch.PATHS[path].layouts[branch]
            self._built[key] = (
                dispatch.resolve(spec)(self) if ":" in spec else getattr(self, spec)
            )
        return self._built[key]

    @functools.cached_property
    def cmp_masked(self) -> CmpMaskedLayout:
        """The "masked" compressed path's chunk table and scoring sizes."""
        return CmpMaskedLayout.build(self.cfg, self.cmp, self.layout, self.B * self.H,
                                     self.device, self.budget_bytes, self.rows)  # fmt: skip

    @functools.cached_property
    def cmp_flash(self) -> FlashCmpLayout:
        """The "flash" compressed path's query packing and score tiles."""
        r = self.cmp.ranges
        return FlashCmpLayout.build(self.cfg, self.bounds, self.layout.pos, r.lo, r.hi,
                                    B=self.B, G=self.G, device=self.device,
                                    budget_bytes=self.budget_bytes)  # fmt: skip

    @functools.cached_property
    def win_masked(self) -> RangeLayout:
        """The "masked" window path's chunk table."""
        ranges = window_ranges(self.cfg, self.layout)
        if self.rows is not None:
            ranges = ranges.subset(self.rows)
        return RangeLayout.build(ranges, self.B * self.H, self.device, self.budget_bytes)

    @functools.cached_property
    def win_flash(self) -> FlashLayout:
        """FlashAttention's varlen layout of the ``B * T`` rows with the window."""
        rows = (
            self.bounds if self.varlen else tuple(b * self.T for b in range(self.B + 1))
        )
        return FlashLayout.build(rows, self.cfg.window, self.device)

    @functools.cached_property
    def sel_tokens(self) -> TokenLayout:
        """The Triton selection's token layout, with the query tiles of its launch shape."""
        tn = launch_shape(self.H // self.G, self.cfg.sel_block, self.Dk, self.Dv,
                          self.work_dtype == torch.float32)  # fmt: skip
        return TokenLayout.build(self.B, self.T, self.cu_seqlens, self.device, (tn.P,),
                                 self.cfg.sel_block)  # fmt: skip

    @functools.cached_property
    def cmp_triton(self) -> SeqStarts:
        """The "triton" compressed path's token and compressed-block boundaries."""
        cfg = self.cfg
        return SeqStarts.build(self.bounds, self.B, self.T, self.device,
                               cmp=(cfg.cmp_block, cfg.cmp_stride))  # fmt: skip

    @functools.cached_property
    def win_triton(self) -> SeqStarts:
        """The "triton" window path's token boundaries."""
        return SeqStarts.build(self.bounds, self.B, self.T, self.device)

    @functools.cached_property
    def sel_varlen_flash(self) -> bool:
        """Whether the "varlen" selection can use FlashAttention-2 varlen here."""
        return flash_varlen_available(self.inputs)[0]

    @property
    def work_dtype(self) -> torch.dtype:
        """What the torch paths compute on and the branch outputs are carried in
        (`nsa_impl.numerics.work_dtype`: float32 for half precision on the CPU)."""
        return work_dtype(self.dtype, self.device)

    @property
    def sel_varlen_min_len(self) -> int:
        """``NSA_SEL_VARLEN_MIN_L`` (or the default) for the "varlen" selection."""
        value = routing.settings().sel_varlen_min_len
        return DEFAULT_VARLEN_MIN_L if value is None else value

    # --- per-call checks (no device sync) -------------------------------------------------------

    def check(self, q, pairs, cfg, cu_seqlens) -> None:
        """Raise ``ValueError``/``TypeError`` unless this call fits the plan.

        ``pairs`` are the branches' ``(k, v)``. Only shapes, dtypes, devices and identities are
        compared: nothing is read from a device.
        """
        if cfg is not self.cfg and cfg != self.cfg:
            raise ValueError(f"cfg {cfg} differs from the plan's {self.cfg}")
        want = (self.B, self.T_q, self.H, self.Dk)
        if tuple(q.shape) != want:
            raise ValueError(f"q must have the plan's shape {list(want)}, got {list(q.shape)}")
        if q.dtype != self.dtype:
            raise TypeError(f"q dtype {q.dtype} does not match the plan's {self.dtype}")
        if q.device != self.device:
            raise ValueError(f"q device {q.device} does not match the plan's {self.device}")
        for k, v in pairs:
            if k.shape[2] != self.G or v.shape[-1] != self.Dv:
                raise ValueError(
                    f"k/v must have G={self.G} groups and Dv={self.Dv}, got k {list(k.shape)}, "
                    f"v {list(v.shape)}"
                )
            if self.rows is not None and (k.shape[1] != self.T or v.shape[1] != self.T):
                raise ValueError(
                    f"k/v must hold all T={self.T} keys of a row-subset plan, got k "
                    f"{list(k.shape)}, v {list(v.shape)}"
                )
        if cu_seqlens is not None and cu_seqlens is not self._cu_source:
            raise ValueError(
                "cu_seqlens must be omitted or be the very tensor the plan was built from (its "
                "content is checked once, when the plan is built)"
            )


@torch.compiler.disable  # host work: under torch.compile it runs eagerly (one graph break)
def plan(
    q_shape,
    cfg: NSAConfig,
    *,
    kv_heads: int,
    v_head_dim: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    budget_bytes: int | None = None,
    rows: torch.Tensor | None = None,
    _bounds: list[int] | None = None,
    _branches: tuple[str, ...] = dispatch.BRANCHES,
) -> Plan:
    """Build the `Plan` of ``q [B, T, H, Dk] = q_shape`` with ``kv_heads`` KV groups.

    Args:
        q_shape: ``(B, T, H, Dk)``.
        cfg: the `NSAConfig`.
        kv_heads: ``G`` (``H % G == 0``).
        v_head_dim: ``Dv`` (default ``Dk``).
        cu_seqlens: int32 ``[N+1]`` packed-sequence boundaries (``B == 1``), checked here once
            (read on the host: one device sync if it lives on a GPU).
        max_seqlen: the longest sequence, if known; must agree with ``cu_seqlens`` (or ``T``).
        device, dtype: of the inputs the plan will serve.
        backward: the calls will need gradients (the route must have a backward).
        budget_bytes: chunk budget of the masked paths (default: per device; tests shrink it).
        rows: the query rows the calls compute (host int64 ``[T_q]``, strictly increasing, in
            ``[0, T)``): ``q`` is then ``[B, T_q, H, Dk]`` while ``k``/``v`` hold all ``T`` keys
            (``q_shape`` is the whole problem's). Routed to the torch paths (module docstring).
            Only `nsa_impl.parallel` calls the branches with such a plan (`nsa_attention` takes
            ``q`` and ``k`` of one length).

    Under ``torch.compile`` this function is not traced (it is host work with data-dependent
    Python); build the plan outside the compiled function for ``fullgraph=True``.

    Raises:
        ValueError / TypeError: bad sizes or ``cu_seqlens``, naming the argument.
        RuntimeError: a forced path (`nsa_impl.dispatch.force_path`, a flag) cannot run.
    """
    if not isinstance(cfg, NSAConfig):
        raise TypeError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
    if not isinstance(q_shape, tuple | list | torch.Size) or len(q_shape) != 4:
        raise ValueError(f"q_shape must be (B, T, H, Dk), got {q_shape!r}")
    B, T, H, Dk = (as_int(f"q_shape[{i}]", x, minimum=1) for i, x in enumerate(q_shape))
    G = as_int("kv_heads", kv_heads, minimum=1)
    if H % G:
        raise ValueError(f"q heads H={H} must be a multiple of kv_heads={G}")
    Dv = Dk if v_head_dim is None else as_int("v_head_dim", v_head_dim, minimum=1)
    device = _full_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    bounds = _bounds
    if cu_seqlens is not None and bounds is None:
        bounds = check_cu_seqlens(cu_seqlens, B, T, device)
    varlen = cu_seqlens is not None
    bounds = [0, T] if bounds is None else list(bounds)
    if max_seqlen is not None:
        longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        if as_int("max_seqlen", max_seqlen, minimum=1) != longest:
            raise ValueError(f"max_seqlen={max_seqlen} but the longest sequence is {longest}")
    if rows is not None:
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
            raise TypeError(f"rows must be a 1-D int64 tensor, got {rows!r:.80}")
        rows = rows.cpu()
        if rows.numel() == 0 or bool((rows.diff() <= 0).any()) or rows[0] < 0 or rows[-1] >= T:
            raise ValueError(f"rows must be non-empty, strictly increasing and in [0, T={T})")
    return Plan(cfg, B, T, H, G, Dk, Dv, device, dtype, bool(backward), bounds, varlen,
                cu_seqlens, budget_bytes, _branches, rows)  # fmt: skip


def _full_device(device) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:N``), so it compares equal to tensors'."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


#: How many plans `cached_plan` keeps (least recently used dropped first). A plan holds O(T)
#: host and device integers, so a few shapes cost little.
PLAN_CACHE_SIZE = 8
_PLAN_CACHE: OrderedDict[tuple, tuple[Plan, tuple]] = OrderedDict()
_PLAN_CACHE_LOCK = threading.Lock()


@torch.compiler.disable
def cached_plan(q_shape, cfg: NSAConfig, *, kv_heads: int, v_head_dim: int, device,
                dtype: torch.dtype, backward: bool) -> Plan:  # fmt: skip
    """The `plan` of a plan-free call without ``cu_seqlens``, reused while nothing it was built
    from changes.

    ``nsa_attention(..., plan=None)`` calls this: building a plan is host work (milliseconds on
    a GPU at T = 8192, where the forward's kernels take about 4 ms), and a caller who does not
    build one still calls with the same shapes again and again. The key is everything the
    plan's construction reads: the shapes, ``cfg``, the device, dtype and ``backward``; the
    routing flags object (`nsa_impl.routing.settings`, replaced by ``reload_settings``), the
    forced paths (`nsa_impl.dispatch.force_path`) and the device's tuning profile (a
    ``tuning.use_profile`` override included); the flags and the profile by identity. Packed
    batches (``cu_seqlens``) are not cached: their key would be the tensor's content, a host
    read. After `nsa_impl.dispatch.clear_caches` no kept plan is reused; at most
    `PLAN_CACHE_SIZE` are kept.
    """
    device = _full_device(device)
    state = (routing.settings(), dispatch.device_profile(device))  # compared by identity
    forced = tuple(sorted(dispatch.forced_paths().items()))
    key = (tuple(int(x) for x in q_shape), cfg, int(kv_heads), int(v_head_dim), device, dtype,
           bool(backward), forced, dispatch.generation(), *(id(x) for x in state))  # fmt: skip
    with _PLAN_CACHE_LOCK:
        hit = _PLAN_CACHE.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[1], state, strict=True)):
            _PLAN_CACHE.move_to_end(key)
            return hit[0]
    built = plan(q_shape, cfg, kv_heads=kv_heads, v_head_dim=v_head_dim, device=device,
                 dtype=dtype, backward=backward)  # fmt: skip
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE[key] = (built, state)  # the state objects stay alive: ids not reused
        while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    return built


def clear_plan_cache() -> None:
    """Forget every plan `cached_plan` kept."""
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE.clear()
