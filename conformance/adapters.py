"""Implementation adapters: how the suite calls the implementation under test.

Pick one with ``--impl NAME`` (pytest and ``python -m conformance run``) or the environment
variable ``NSA_CONFORMANCE_IMPL`` (default ``nsa_ref``); pick the device with ``--device
cpu|cuda`` or ``NSA_CONFORMANCE_DEVICE`` (default ``cpu``). Built-in names:

* ``nsa_ref``: the exact reference.
* ``nsa_impl``: the library, each branch on the path its router chooses.
* ``nsa_impl:<path>`` for ``reference``, ``masked``, ``packed``, ``varlen``, ``triton``,
  ``flash`` (the dispatcher's path names): the library inside
  ``nsa_impl.dispatch.force_path(<path>)``, with the capabilities of
  ``nsa_impl.dispatch.PATHS[<path>]``; an unavailable path (no triton, no GPU) makes every test
  skip with the path's own reason. ``nsa_impl:parity`` is kept as an alias of
  ``nsa_impl:reference`` (its former name).
* ``fla:naive``, ``fla:parallel``, ``flash_nsa``, ``lucidrains``: public NSA implementations
  (`conformance.peers`), each with its declared capabilities and translation profile.

Third-party adapters (point the suite at your own kernel)
---------------------------------------------------------
Register an entry point in the group ``nsa_conformance.adapters``; its name is the ``--impl``
name and it loads either an adapter object or a zero-argument callable returning one::

    # pyproject.toml of your package
    [project.entry-points."nsa_conformance.adapters"]
    my_kernel = "my_pkg.nsa_adapter:make_adapter"

An adapter is any object with these attributes (duck-typed; subclassing `Adapter` is optional):

``name: str``, ``description: str``
    Shown in the pytest header and the report.
``capabilities: Capabilities``
    What it supports. A test needing something undeclared is skipped with the reason, never
    failed: devices, dtypes, backward, varlen (``cu_seqlens``), decode, aux (``return_aux``),
    branch_kv, phi, selection (attention given block indices), group sizes, head dims, longest
    sequence.
``available() -> tuple[bool, str]``
    ``(False, reason)`` when it cannot run here (missing software or hardware).
``attention(q, k, v, gates, cfg, *, scale=None, phi_k=None, phi_v=None, branch_kv=None,
cu_seqlens=None, return_aux=False)``
    The contract of ``nsa_ref.nsa_attention`` (API.md): ``o [B, T, H, Dv]`` or ``(o, aux)`` where
    ``aux`` has ``block_indices [B, T, G, n]`` (int64, ascending, -1 padded), ``p_slc [B, T, G,
    ceil(T/l')]``, ``p_cmp [B, T, H, num_cmp(T-1)]``, ``o_cmp``, ``o_sel``, ``o_win``.
``new_cache(cfg, *, scale=None, phi_k=None, phi_v=None)`` (when ``decode``)
    An object with ``step(q_t, k_t, v_t, gates_t, branch_kv=None) -> [B, 1, H, Dv]``, a
    ``reads`` dict ``{"cmp", "sel", "win"}`` for the last step (max over batch and groups) and
    ``length``, like ``nsa_ref.NSARefCache``.
``selection(q, k, v, block_indices, cfg, scale, cu_seqlens=None) -> o_sel`` (when ``selection``)
    Selection attention (Eq. 12) over the given blocks; ``-1`` and duplicates must be ignored.

Tensors arrive on the device of ``--device`` in one of the declared dtypes. The suite never
patches an adapter; `conformance.mutants` wraps the ``nsa_ref`` adapter to show that the suite
rejects broken references.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import torch

ENV_IMPL = "NSA_CONFORMANCE_IMPL"
ENV_DEVICE = "NSA_CONFORMANCE_DEVICE"
DEFAULT_IMPL = "nsa_ref"
DEVICES = ("cpu", "cuda")
ENTRY_POINT_GROUP = "nsa_conformance.adapters"
IMPL_PATHS = ("reference", "masked", "packed", "varlen", "triton", "flash")
#: Former adapter path names, still accepted.
PATH_ALIASES = {"parity": "reference"}
ALL_FLOATS = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


class ConfigLimits:
    """The configurations an adapter can run; the default accepts every valid `NSAConfig`.

    Peers with fixed conventions (e.g. one block size for l, d and l', or always-forced blocks)
    subclass it. A clause whose configuration the adapter cannot run either skips with
    `reason` or, when the clause is about a property that holds for every configuration, runs
    with `adapt` (the nearest configuration the adapter can run, keeping the fields the test
    names): the oracle then uses the same adapted configuration.
    """

    def reason(self, cfg) -> str | None:
        """Why ``cfg`` cannot run, or ``None``."""
        return None

    def nearest(self, cfg, keep: tuple[str, ...] = ()):
        """The nearest runnable configuration, preferring to keep the fields in ``keep``
        (``None``: none). Called only when `reason` is set."""
        return None

    def adapt(self, cfg, keep: tuple[str, ...] = ()):
        """``cfg`` itself when it runs, else `nearest` unless it changes a field in ``keep``."""
        if self.reason(cfg) is None:
            return cfg
        new = self.nearest(cfg, keep)
        if new is None or self.reason(new) is not None:
            return None
        if any(getattr(new, f) != getattr(cfg, f) for f in keep):
            return None
        return new

    def describe(self) -> str:
        """One line for listings."""
        return "any valid configuration"


@dataclass(frozen=True)
class Capabilities:
    """What an adapter supports; the suite skips (with a reason) what is not declared.

    Attributes:
        devices: device types (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes.
        backward: autograd through ``attention``.
        varlen: ``cu_seqlens``.
        decode: ``new_cache`` with ``step``/``reads``/``length``.
        aux: ``return_aux=True`` with every field (``block_indices``, ``p_slc``, ``p_cmp``,
            ``o_cmp``, ``o_sel``, ``o_win``).
        indices: ``return_aux=True`` gives at least ``block_indices`` (implied by ``aux``).
        branch_kv: per-branch ``(k, v)``.
        phi: custom ``phi_k``/``phi_v``.
        selection: ``selection(...)`` given block indices.
        scale: accepts a softmax ``scale`` other than ``1/sqrt(Dk)``.
        nsa_config: configured through `nsa_ref.NSAConfig` itself, so NSA-I2-CONFIG (the
            configuration's own validation) is about this implementation.
        min_group_size, max_group_size: supported ``h = H / G`` (``None``: no bound).
        pow2_group_size: ``h`` must be a power of two.
        min_head_dim, max_head_dim: supported ``Dk`` and ``Dv`` (``None``: no bound).
        pow2_head_dims: ``Dk`` and ``Dv`` must be powers of two.
        same_head_dims: ``Dk`` must equal ``Dv``.
        max_seqlen: longest sequence it can run in reasonable time (``None``: no bound).
        exact_causality: rows before a perturbation are bit-identical (spec P1 for the
            reference); otherwise they must agree within the class tolerance.
        limits: the configurations it can run (`ConfigLimits`).
    """

    devices: frozenset[str] = frozenset(DEVICES)
    dtypes: frozenset[torch.dtype] = ALL_FLOATS
    backward: bool = True
    varlen: bool = True
    decode: bool = True
    aux: bool = True
    indices: bool = False
    branch_kv: bool = True
    phi: bool = True
    selection: bool = False
    scale: bool = True
    nsa_config: bool = True
    min_group_size: int = 1
    max_group_size: int | None = None
    pow2_group_size: bool = False
    min_head_dim: int = 1
    max_head_dim: int | None = None
    pow2_head_dims: bool = False
    same_head_dims: bool = False
    max_seqlen: int | None = None
    exact_causality: bool = False
    limits: ConfigLimits = field(default_factory=ConfigLimits)

    def missing(self, need: str, device: str) -> str | None:
        """Why capability ``need`` (a clause's ``needs`` entry) is unavailable, or ``None``."""
        if need == "cuda":
            return None if device == "cuda" else f"needs --device cuda (running on {device})"
        if need == "long_context":
            ok = self.max_seqlen is None or self.max_seqlen >= 65536
            return None if ok else f"declares max_seqlen={self.max_seqlen} (< 65536)"
        if need == "indices":
            ok = self.aux or self.indices
            return None if ok else "returns no block_indices (capability 'indices')"
        if not hasattr(self, need):
            return f"unknown capability {need!r}"
        return None if getattr(self, need) else f"does not declare capability {need!r}"

    def shape_reason(self, *, h: int, Dk: int, Dv: int, T: int | None = None) -> str | None:
        """Why a (group size, head dims, length) combination is unsupported, or ``None``."""
        if h < self.min_group_size or (self.max_group_size is not None and h > self.max_group_size):
            return f"group size h={h} outside [{self.min_group_size}, {self.max_group_size}]"
        if self.pow2_group_size and h & (h - 1):
            return f"group size h={h} is not a power of two"
        for label, dim in (("Dk", Dk), ("Dv", Dv)):
            if dim < self.min_head_dim or (
                self.max_head_dim is not None and dim > self.max_head_dim
            ):
                return f"{label}={dim} outside [{self.min_head_dim}, {self.max_head_dim}]"
            if self.pow2_head_dims and dim & (dim - 1):
                return f"{label}={dim} is not a power of two"
        if self.same_head_dims and Dk != Dv:
            return f"Dk={Dk} != Dv={Dv} (one head dim for keys and values)"
        if T is not None and self.max_seqlen is not None and T > self.max_seqlen:
            return f"T={T} above max_seqlen={self.max_seqlen}"
        return None

    def config_reason(self, cfg) -> str | None:
        """Why configuration ``cfg`` cannot run (`ConfigLimits.reason`), or ``None``."""
        return self.limits.reason(cfg)

    def adapt_config(self, cfg, keep: tuple[str, ...] = ()):
        """``cfg``, or the nearest runnable configuration keeping ``keep`` (``None``: none)."""
        return self.limits.adapt(cfg, keep)

    def summary(self) -> str:
        """One line for the pytest header."""
        flags = [
            n
            for n in (
                "backward",
                "varlen",
                "decode",
                "aux",
                "indices",
                "branch_kv",
                "phi",
                "selection",
                "scale",
            )
            if getattr(self, n)
        ]
        dts = sorted(str(d).replace("torch.", "") for d in self.dtypes)
        h = f"h=[{self.min_group_size},{self.max_group_size}]" + (
            " pow2" if self.pow2_group_size else ""
        )
        dims = f"D=[{self.min_head_dim},{self.max_head_dim}]" + (
            " pow2" if self.pow2_head_dims else ""
        ) + (" Dk=Dv" if self.same_head_dims else "")
        return (
            f"devices={sorted(self.devices)} dtypes={dts} {h} {dims} max_T={self.max_seqlen} "
            f"+{','.join(flags)}; configs: {self.limits.describe()}"
        )


class Adapter:
    """Base class of the built-in adapters (the protocol is in the module docstring)."""

    name: str = "?"
    description: str = ""
    capabilities: Capabilities = Capabilities()
    #: The conventions the adapter assumes to translate the spec's call (third-party adapters:
    #: layout, gates, window, blocks, forced blocks, ...), shown in the report.
    profile: dict[str, str] = {}

    def version(self) -> str | None:
        """The version of the implementation under test, for the report (``None``: unknown)."""
        return None

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when it can run here, else ``(False, reason)``."""
        return True, ""

    def attention(self, q, k, v, gates, cfg, **kwargs):
        """``nsa_attention`` with the API.md contract."""
        raise NotImplementedError

    def new_cache(self, cfg, *, scale=None, phi_k=None, phi_v=None):
        """A decode cache (``step``/``reads``/``length``)."""
        raise NotImplementedError(f"{self.name} has no decode cache")

    def selection(self, q, k, v, block_indices, cfg, scale, cu_seqlens=None):
        """Selection attention over given block indices (Eq. 12)."""
        raise NotImplementedError(f"{self.name} has no selection entry point")


# ---------------------------------------------------------------------------------------------
# nsa_ref


class NsaRefAdapter(Adapter):
    """The exact reference, `nsa_ref` (row by row; float64-capable; the gradient oracle).

    Functions are looked up on their modules at call time so that `conformance.mutants` can
    swap one rule (``nsa_ref.rules.<fn>``) for a broken twin around a call.
    """

    name = "nsa_ref"
    description = "the exact reference (nsa_ref, row by row)"
    # Row-by-row Python: a 64k sequence would take hours, so the long-context clauses skip.
    capabilities = Capabilities(selection=True, max_seqlen=4096, exact_causality=True)

    def attention(self, q, k, v, gates, cfg, **kwargs):
        """`nsa_ref.reference.nsa_attention`."""
        reference = importlib.import_module("nsa_ref.reference")
        return reference.nsa_attention(q, k, v, gates, cfg, **kwargs)

    def new_cache(self, cfg, *, scale=None, phi_k=None, phi_v=None):
        """`nsa_ref.decode.NSARefCache`."""
        decode = importlib.import_module("nsa_ref.decode")
        return decode.NSARefCache(cfg, scale=scale, phi_k=phi_k, phi_v=phi_v)

    def selection(self, q, k, v, block_indices, cfg, scale, cu_seqlens=None):
        """Eq. 12 with the reference's own rules (`rules.selected_keys`, `rules.attend`)."""
        rules = importlib.import_module("nsa_ref.rules")
        B, T, H, _ = q.shape
        h = H // k.shape[2]
        bounds = [0, T] if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
        out = q.new_zeros(B, T, H, v.shape[-1])
        for b in range(B):
            for s, e in zip(bounds, bounds[1:], strict=False):
                for p in range(e - s):
                    for g in range(k.shape[2]):
                        blocks = block_indices[b, s + p, g].tolist()
                        keys = (
                            torch.tensor(
                                rules.selected_keys(blocks, p, cfg),
                                dtype=torch.long,
                                device=q.device,
                            )
                            + s
                        )
                        heads = slice(g * h, (g + 1) * h)
                        kg = k[b, keys, g].unsqueeze(1).expand(-1, h, -1)
                        vg = v[b, keys, g].unsqueeze(1).expand(-1, h, -1)
                        out[b, s + p, heads] = rules.attend(q[b, s + p, heads], kg, vg, scale)[0]
        return out


# ---------------------------------------------------------------------------------------------
# nsa_impl


def _import_impl():
    """``(nsa_impl, "")`` or ``(None, reason)``: imported lazily so nsa_ref runs never need it."""
    try:
        return importlib.import_module("nsa_impl"), ""
    except Exception as exc:  # a half-written or broken library must not break nsa_ref runs
        return None, f"nsa_impl does not import ({type(exc).__name__}: {exc})"


class NsaImplAdapter(Adapter):
    """`nsa_impl.nsa_attention`, on the router's choice or inside ``force_path(<path>)``."""

    def __init__(self, path: str | None = None):
        path = PATH_ALIASES.get(path, path)
        if path is not None and path not in IMPL_PATHS:
            raise ValueError(f"unknown nsa_impl path {path!r}; known: {', '.join(IMPL_PATHS)}")
        self.path = self.route_name = path
        self.name = "nsa_impl" if path is None else f"nsa_impl:{path}"
        self.description = (
            "nsa_impl, each branch on the router's choice"
            if path is None
            else f"nsa_impl inside dispatch.force_path({path!r})"
        )
        self._caps: Capabilities | None = None

    @property
    def capabilities(self) -> Capabilities:
        """Read from ``nsa_impl.dispatch.PATHS`` (the union of all paths for the router)."""
        if self._caps is None:
            impl, _ = _import_impl()
            if impl is None:
                return Capabilities()
            decls = (
                list(impl.dispatch.PATHS.values())
                if self.route_name is None
                else [impl.dispatch.PATHS[self.route_name]]
            )
            min_dim = min(d.min_head_dim for d in decls)
            maxes = [d.max_head_dim for d in decls]
            self._caps = Capabilities(
                # A path that CPU tensors may run in Triton's interpreter when forced serves
                # "cpu" too (nsa_impl:triton under TRITON_INTERPRET=1).
                devices=frozenset().union(*(d.served_devices() for d in decls)),
                dtypes=frozenset().union(*(d.dtypes for d in decls)),
                backward=any(d.backward for d in decls),
                varlen=any(d.varlen for d in decls),
                selection=True,
                min_head_dim=min_dim,
                max_head_dim=None if None in maxes else max(maxes),
            )
        return self._caps

    def available(self) -> tuple[bool, str]:
        """nsa_impl imports, and the forced path's `available()` says yes."""
        impl, why = _import_impl()
        if impl is None:
            return False, why
        if self.route_name is None:
            return True, ""
        if self.route_name not in impl.dispatch.PATHS:
            return False, f"nsa_impl.dispatch.PATHS has no path {self.route_name!r}"
        ok, reason = impl.dispatch.PATHS[self.route_name].available()
        return bool(ok), "" if ok else f"path {self.route_name!r} unavailable: {reason}"

    def _context(self):
        impl, _ = _import_impl()
        if self.route_name is None:
            import contextlib

            return contextlib.nullcontext()
        return impl.dispatch.force_path(self.route_name)

    def attention(self, q, k, v, gates, cfg, **kwargs):
        """`nsa_impl.nsa_attention`, inside the forced path when one is named."""
        impl, _ = _import_impl()
        with self._context():
            return impl.nsa_attention(q, k, v, gates, cfg, **kwargs)

    def new_cache(self, cfg, *, scale=None, phi_k=None, phi_v=None):
        """`nsa_impl.NSACache`, whose steps run inside the forced path."""
        impl, _ = _import_impl()
        return _ContextCache(
            impl.NSACache(cfg, scale=scale, phi_k=phi_k, phi_v=phi_v), self._context
        )

    def selection(self, q, k, v, block_indices, cfg, scale, cu_seqlens=None):
        """`nsa_impl.api.selection_attention`, inside the forced path when one is named."""
        impl, _ = _import_impl()
        with self._context():
            return impl.api.selection_attention(
                q, k, v, block_indices, cfg, scale, cu_seqlens=cu_seqlens
            )


class _ContextCache:
    """A decode cache whose ``step`` runs inside a context (a forced path, a mutant)."""

    def __init__(self, cache, context: Callable):
        self._cache, self._context = cache, context

    def step(self, *args, **kwargs):
        """One decode step of the wrapped cache, inside the context."""
        with self._context():
            return self._cache.step(*args, **kwargs)

    @property
    def reads(self) -> dict:
        """The wrapped cache's read counters of the last step."""
        return self._cache.reads

    @property
    def length(self) -> int:
        """Tokens decoded so far."""
        return self._cache.length


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass
class Registry:
    """Adapter factories by name: the built-ins plus entry points (loaded on first use)."""

    factories: dict[str, Callable[[], object]] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every known adapter name (built-ins first)."""
        return list(self.factories) + [n for n in _entry_points() if n not in self.factories]

    def create(self, name: str):
        """A fresh adapter for ``name`` (``ValueError`` listing the known names otherwise)."""
        if name in self.factories:
            return self.factories[name]()
        eps = _entry_points()
        if name in eps:
            obj = eps[name].load()
            return obj() if callable(obj) and not hasattr(obj, "attention") else obj
        raise ValueError(f"unknown implementation {name!r}; known: {', '.join(self.names())}")


def _entry_points() -> dict:
    try:
        return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution's metadata must not hide the built-ins
        return {}


REGISTRY = Registry({"nsa_ref": NsaRefAdapter, "nsa_impl": NsaImplAdapter})
for _path in IMPL_PATHS:
    REGISTRY.factories[f"nsa_impl:{_path}"] = lambda p=_path: NsaImplAdapter(p)
for _alias in PATH_ALIASES:
    REGISTRY.factories[f"nsa_impl:{_alias}"] = lambda p=_alias: NsaImplAdapter(p)

#: Public NSA implementations graded by the suite (`conformance.peers`, imported on first use;
#: each peer package itself is imported only when its adapter runs).
PEERS = {
    "fla:naive": ("FlaAdapter", "naive"),
    "fla:parallel": ("FlaAdapter", "parallel"),
    "flash_nsa": ("FlashNsaAdapter",),
    "lucidrains": ("LucidrainsAdapter",),
}


def _peer_factory(cls_name: str, *args) -> Callable[[], object]:
    def make():
        return getattr(importlib.import_module("conformance.peers"), cls_name)(*args)

    return make


for _name, (_cls, *_args) in PEERS.items():
    REGISTRY.factories[_name] = _peer_factory(_cls, *_args)


def get_adapter(name: str | None = None):
    """The adapter called ``name`` (default: ``$NSA_CONFORMANCE_IMPL`` or ``nsa_ref``)."""
    return REGISTRY.create(name or os.environ.get(ENV_IMPL) or DEFAULT_IMPL)


def resolve_device(device: str | None = None) -> str:
    """``cpu`` or ``cuda`` (default: ``$NSA_CONFORMANCE_DEVICE`` or ``cpu``)."""
    device = device or os.environ.get(ENV_DEVICE) or "cpu"
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def device_reason(adapter, device: str) -> str | None:
    """Why the adapter cannot run on ``device`` here, or ``None``."""
    ok, why = adapter.available()
    if not ok:
        return f"{adapter.name} unavailable: {why}"
    if device not in adapter.capabilities.devices:
        declared = sorted(adapter.capabilities.devices)
        return f"{adapter.name} does not run on {device} (declares {declared})"
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but torch.cuda.is_available() is False"
    return None


def default_scale(Dk: int) -> float:
    """``1/sqrt(Dk)`` (Eq. 2)."""
    return 1.0 / math.sqrt(Dk)
