"""Execution routing: environment flags, path declarations, and one path per branch.

Three pieces, each asked instead of repeating conditions elsewhere:

* `Settings`: the ``NSA_*`` flags of API.md, parsed **once** (on first use) into a frozen
  object; `reload_settings` re-reads them (tests). Unknown ``NSA_*`` variables warn and name the
  known ones; a malformed value raises ``ValueError`` naming the variable.
* `PATHS`: xformers-style declarations. Each `PathDecl` says which branches, devices, dtypes and
  head dims it serves, whether it has a backward and takes ``cu_seqlens``, and `available()`
  probes the optional software it needs (triton, flash-attn, a GPU) lazily, never at import.
* `route` / `explain`: for given inputs pick one path per branch ("cmp", "sel", "win") with the
  reason. Precedence: `force_path` (innermost context wins) > ``NSA_FORCE_PARITY`` >
  ``NSA_TRITON_SEL_FORCE`` (selection only) > each branch's preference list filtered by the
  flags and the declarations. A forced path that cannot serve the inputs is an error (never a
  silent fallback): the decision carries it and `nsa_impl.nsa_attention` raises it.

Flags (boolean values: 1/0, true/false, yes/no, on/off):

=========================  =======  ==========================================================
``NSA_FORCE_PARITY``       0        every branch runs on the reference delegates (`nsa_ref`)
``NSA_USE_CMP_MASK``       1        compressed branch may use "masked" (else: reference)
``NSA_USE_WIN_MASK``       1        window branch may use "masked" (else: flash or reference)
``NSA_USE_SEL_PACK``       1        selection may use "packed" (else: "masked" gather)
``NSA_SEL_VARLEN_V2``      0        selection prefers "varlen" over "packed"
``NSA_SEL_VARLEN_MIN_L``   unset    int, passed to the varlen selection path as its threshold
``NSA_USE_TRITON_SEL``     1        selection may use "triton" on CUDA when available
``NSA_TRITON_SEL_FORCE``   0        selection uses "triton" whatever the device (CPU tensors
                                    need ``TRITON_INTERPRET=1``)
``NSA_USE_FA2``            1        FlashAttention-2 paths may be used when available
``NSA_USE_FA2_CMP``        =FA2     compressed branch may use "flash" (FA-2 + Triton scores)
``NSA_USE_FA2_WIN``        =FA2     window branch may use "flash"
``NSA_DEBUG_TIMING``       0        an active `nsa_impl.observe.Collector` times each branch
                                    (CUDA events on a GPU); not a routing choice
=========================  =======  ==========================================================

Device profiles (`nsa_impl.kernels.tuning`, one JSON file per GPU class) hold the router's
data: whether the Triton selection path is preferred and from which sequence length
(``sel_triton``, ``sel_triton_min_len``), the order in which the compressed and window
branches try their paths (``cmp``, ``win``: a path not listed there is not tried
automatically, e.g. "triton" on Ampere/Ada until measured), and whether the gate is fused
(``gate_triton``).
`explain` names the profile it used. CPU tensors reach the "triton" path only when it is forced
(`force_path("triton")` or ``NSA_TRITON_SEL_FORCE``) under ``TRITON_INTERPRET=1``.

The compressed branch's "flash" path (`nsa_impl.kernels.flash_cmp`) runs Eq. 8 as one causal
FlashAttention-2 call over query groups (rows that see the same compressed blocks) and gets the
selection scores from a Triton kernel that recomputes the logits against FlashAttention's
log-sum-exp; it needs CUDA, fp16/bf16 and triton. float32 keeps the "masked" path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

BRANCHES = ("cmp", "sel", "win")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


def _parse_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a non-negative integer") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected a non-negative integer")
    return value


#: Environment variable -> (Settings field, parser). Defaults live on `Settings`.
FLAGS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "NSA_FORCE_PARITY": ("force_parity", _parse_bool),
    "NSA_USE_WIN_MASK": ("use_win_mask", _parse_bool),
    "NSA_USE_CMP_MASK": ("use_cmp_mask", _parse_bool),
    "NSA_USE_SEL_PACK": ("use_sel_pack", _parse_bool),
    "NSA_SEL_VARLEN_V2": ("sel_varlen_v2", _parse_bool),
    "NSA_SEL_VARLEN_MIN_L": ("sel_varlen_min_len", _parse_int),
    "NSA_USE_TRITON_SEL": ("use_triton_sel", _parse_bool),
    "NSA_TRITON_SEL_FORCE": ("triton_sel_force", _parse_bool),
    "NSA_USE_FA2": ("use_fa2", _parse_bool),
    "NSA_USE_FA2_CMP": ("use_fa2_cmp", _parse_bool),
    "NSA_USE_FA2_WIN": ("use_fa2_win", _parse_bool),
    "NSA_DEBUG_TIMING": ("debug_timing", _parse_bool),
}


@dataclass(frozen=True)
class Settings:
    """The routing flags (module docstring), read once from the environment.

    ``use_fa2_cmp`` / ``use_fa2_win`` are ``None`` when unset (they then follow ``use_fa2``).
    ``triton_interpret`` mirrors ``TRITON_INTERPRET`` (triton's own CPU interpreter switch).
    ``source`` keeps the raw ``NSA_*`` values that were set, for `explain`.
    """

    force_parity: bool = False
    use_win_mask: bool = True
    use_cmp_mask: bool = True
    use_sel_pack: bool = True
    sel_varlen_v2: bool = False
    sel_varlen_min_len: int | None = None
    use_triton_sel: bool = True
    triton_sel_force: bool = False
    use_fa2: bool = True
    use_fa2_cmp: bool | None = None
    use_fa2_win: bool | None = None
    debug_timing: bool = False
    triton_interpret: bool = False
    source: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def fa2_win(self) -> bool:
        """Whether the window branch may use FlashAttention-2."""
        return self.use_fa2 if self.use_fa2_win is None else self.use_fa2_win

    @property
    def fa2_cmp(self) -> bool:
        """Whether FlashAttention-2 was asked for the compressed branch."""
        return self.use_fa2 if self.use_fa2_cmp is None else self.use_fa2_cmp

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Parse ``environ``; warn about unknown ``NSA_*`` names."""
        unknown = sorted(n for n in environ if n.startswith("NSA_") and n not in FLAGS)
        if unknown:
            warnings.warn(
                f"unknown NSA_* environment variable(s) {unknown} ignored; known flags: "
                f"{', '.join(FLAGS)}",
                RuntimeWarning,
                stacklevel=3,
            )
        values, source = {}, {}
        for name, (attr, parse) in FLAGS.items():
            if name in environ:
                values[attr] = parse(name, environ[name])
                source[name] = environ[name]
        interpret = environ.get("TRITON_INTERPRET", "0")
        values["triton_interpret"] = interpret.strip().lower() in _TRUE
        return cls(**values, source=source)


_SETTINGS: Settings | None = None


def settings() -> Settings:
    """The process-wide `Settings`, parsed from ``os.environ`` on first use."""
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = Settings.from_environ(os.environ)
    return _SETTINGS


def reload_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Re-read the flags (from ``environ``, default ``os.environ``) and clear the probes' caches."""
    global _SETTINGS
    _SETTINGS = Settings.from_environ(os.environ if environ is None else environ)
    for probe in (_probe_triton_sel, _probe_flash):
        probe.cache_clear()
    return _SETTINGS


# ---------------------------------------------------------------------------------------------
# Availability probes (lazy, cached; reload_settings clears them).


def _import_kernel(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # a broken optional dependency must not break routing
        return None, f"{module} cannot be imported ({type(exc).__name__}: {exc})"


@functools.cache
def _probe_triton_sel() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not (torch.cuda.is_available() or settings().triton_interpret):
        return False, "no CUDA GPU and TRITON_INTERPRET is not set"
    mod, why = _import_kernel("nsa_impl.kernels.triton_sel")
    return (mod is not None), (why or "triton importable, kernel module loaded")


@functools.cache
def _probe_flash() -> tuple[bool, str]:
    # PyTorch's built-in FA-2 kernels suffice; the flash_attn package is an optional extra.
    mod, why = _import_kernel("nsa_impl.kernels.flash")
    if mod is None:
        return False, why
    return mod.available()


def _kernel_supports(
    module: str,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[bool, str]]:
    def supports(q, k, v):
        mod, why = _import_kernel(module)
        if mod is None:
            return False, why
        ok, reason = mod.supports(q, k, v)
        return bool(ok), str(reason)

    return supports


# ---------------------------------------------------------------------------------------------
# Path declarations.

_ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class PathDecl:
    """What one execution path supports (xformers style); the router only asks these.

    Attributes:
        name: the path name ("reference", "masked", "packed", "varlen", "triton", "flash").
        branches: subset of ``{"cmp", "sel", "win"}`` the path implements.
        devices: device types (``"cpu"``, ``"cuda"``).
        dtypes: supported input dtypes.
        backward: whether gradients flow through it.
        varlen: whether it accepts ``cu_seqlens``.
        min_head_dim, max_head_dim: supported ``Dk``/``Dv`` (``None``: no upper bound).
        doc: one line on what the path does.
        probe: availability of optional software (``None``: always available).
        kernel_supports: optional ``(q, k, v) -> (ok, reason)`` of the kernel itself, or a
            mapping branch -> such a function when the branches run different kernels.
        interpreter_cpu: CPU tensors may run it in Triton's interpreter when it is forced and
            ``TRITON_INTERPRET=1`` (never chosen for CPU tensors otherwise).
    """

    name: str
    branches: frozenset[str]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    backward: bool
    varlen: bool
    min_head_dim: int = 1
    max_head_dim: int | None = None
    doc: str = ""
    probe: Callable[[], tuple[bool, str]] | None = field(default=None, compare=False)
    kernel_supports: Callable | Mapping[str, Callable] | None = field(default=None, compare=False)
    interpreter_cpu: bool = False

    def served_devices(self) -> frozenset[str]:
        """Device types a forced run may use: ``devices``, plus ``cpu`` under the interpreter."""
        if self.interpreter_cpu and settings().triton_interpret:
            return self.devices | {"cpu"}
        return self.devices

    def available(self) -> tuple[bool, str]:
        """``(True, why)`` when the software it needs is present, else ``(False, reason)``."""
        return (True, "pure PyTorch") if self.probe is None else self.probe()

    def supports(self, branch: str, inp: Inputs, *, any_device: bool = False) -> tuple[bool, str]:
        """Whether this path can run ``branch`` on ``inp``; the reason when it cannot.

        ``any_device`` skips the device check (``NSA_TRITON_SEL_FORCE``: CPU tensors under the
        triton interpreter).
        """
        if branch not in self.branches:
            return False, f"no {branch} implementation"
        if not any_device and inp.device not in self.devices:
            return False, f"device {inp.device} not in {sorted(self.devices)}"
        if inp.dtype not in self.dtypes:
            return False, f"dtype {inp.dtype} not supported"
        for label, dim in (("Dk", inp.dk), ("Dv", inp.dv)):
            if dim < self.min_head_dim or (
                self.max_head_dim is not None and dim > self.max_head_dim
            ):
                return False, f"{label}={dim} outside [{self.min_head_dim}, {self.max_head_dim}]"
        if inp.backward and not self.backward:
            return False, "no backward and gradients are needed"
        if inp.varlen and not self.varlen:
            return False, "no cu_seqlens support"
        ok, why = self.available()
        if not ok:
            return False, f"unavailable: {why}"
        kernel_supports = self.kernel_supports
        if isinstance(kernel_supports, Mapping):
            kernel_supports = kernel_supports.get(branch)
        if kernel_supports is not None and inp.tensors is not None:
            ok, why = kernel_supports(*inp.tensors)
            if not ok:
                return False, f"kernel declines: {why}"
        return True, "supported"


PATHS: dict[str, PathDecl] = {
    d.name: d
    for d in (
        PathDecl(
            "reference",
            frozenset(BRANCHES),
            frozenset({"cpu", "cuda"}),
            _ALL_FLOATS,
            True,
            True,
            doc="nsa_ref evaluated once; its per-branch outputs are used (exact, slow)",
        ),
        PathDecl(
            "masked",
            frozenset(BRANCHES),
            frozenset({"cpu", "cuda"}),
            _ALL_FLOATS,
            True,
            True,
            doc="chunked masked softmax (cmp, win: row key ranges; sel: gathered blocks)",
        ),
        PathDecl(
            "packed",
            frozenset({"sel"}),
            frozenset({"cpu", "cuda"}),
            _ALL_FLOATS,
            True,
            True,
            doc="selection rows bucketed by selected length, one SDPA call per bucket",
        ),
        PathDecl(
            "varlen",
            frozenset({"sel"}),
            frozenset({"cpu", "cuda"}),
            _ALL_FLOATS,
            True,
            True,
            doc="selection flat-packed with cu_seqlens (FA-2 varlen on GPU, dense buckets else)",
        ),
        PathDecl(
            "triton",
            frozenset(BRANCHES),
            frozenset({"cuda"}),
            frozenset({torch.float16, torch.bfloat16, torch.float32}),
            True,
            True,
            min_head_dim=16,
            max_head_dim=256,
            doc="Triton kernels (sel: group-centric selection; cmp: compressed attention + "
            "fused scores/top-n; win: sliding window)",
            probe=_probe_triton_sel,
            kernel_supports={
                "sel": _kernel_supports("nsa_impl.kernels.triton_sel"),
                "cmp": _kernel_supports("nsa_impl.kernels.triton_attn"),
                "win": _kernel_supports("nsa_impl.kernels.triton_attn"),
            },
            interpreter_cpu=True,
        ),
        PathDecl(
            "flash",
            frozenset({"cmp", "win"}),
            frozenset({"cuda"}),
            frozenset({torch.float16, torch.bfloat16}),
            True,
            True,
            min_head_dim=8,
            max_head_dim=256,
            doc="FlashAttention-2 varlen (win: left window; cmp: causal over query groups, "
            "Triton scores from its log-sum-exp)",
            probe=_probe_flash,
            kernel_supports={
                "win": _kernel_supports("nsa_impl.kernels.flash"),
                "cmp": _kernel_supports("nsa_impl.kernels.flash_cmp"),
            },
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# The router.


@dataclass(frozen=True)
class Inputs:
    """What routing looks at: device type, dtype, head dims, gradient need, varlen, the longest
    sequence, and the tensors (for kernels' own ``supports``)."""

    device: str
    dtype: torch.dtype
    dk: int
    dv: int
    backward: bool
    varlen: bool
    max_seqlen: int
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, q, k=None, v=None, *, cu_seqlens=None, backward=None, max_seqlen=None) -> Inputs:
        """Describe the call.

        ``backward`` defaults to whether autograd will need gradients; ``max_seqlen`` to ``T``
        or, with ``cu_seqlens``, its longest sequence (read on the host once).
        """
        if backward is None:
            backward = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (q, k, v)
            )
        if max_seqlen is None:
            max_seqlen = q.shape[1] if cu_seqlens is None else int(cu_seqlens.diff().max())
        dv = v.shape[-1] if v is not None else q.shape[-1]
        tensors = (q, k, v) if k is not None and v is not None else None
        return cls(
            q.device.type,
            q.dtype,
            q.shape[-1],
            dv,
            bool(backward),
            cu_seqlens is not None,
            int(max_seqlen),
            tensors,
        )


@dataclass(frozen=True)
class Decision:
    """One branch's path, why it was chosen, and an error when a forced path cannot run.

    ``skipped`` lists the preferred ``(path, reason)`` pairs passed over before ``path``.
    """

    branch: str
    path: str
    reason: str
    error: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()


class Plan(dict):
    """``branch -> Decision`` for the three branches; ``str()`` renders the `explain` table.

    ``profile`` names the device profile whose routing data was used (`profile_of`).
    """

    profile: str = "?"

    def paths(self) -> dict[str, str]:
        """``branch -> path name``."""
        return {b: d.path for b, d in self.items()}

    def raise_errors(self) -> None:
        """Raise ``RuntimeError`` if a forced path cannot serve these inputs."""
        errors = [f"{d.branch}: {d.error}" for d in self.values() if d.error]
        if errors:
            raise RuntimeError("NSA routing failed: " + "; ".join(errors))

    def __str__(self) -> str:
        rows = [("branch", "path", "why")] + [
            (b, d.path + (" (ERROR)" if d.error else ""), d.error or d.reason)
            for b, d in self.items()
        ]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        lines = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * max(len(s) for s in lines))
        lines.append(f"profile: {self.profile}")
        return "\n".join(lines)


_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "nsa_forced_path", default=None
)


@contextlib.contextmanager
def force_path(name: str) -> Iterator[None]:
    """Make every branch that has a path called ``name`` use it (others keep the router's choice).

    Inside the context, if the forced path cannot serve a branch's inputs (device, dtype,
    missing software), the call raises instead of falling back.
    """
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; known paths: {sorted(PATHS)}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_path() -> str | None:
    """The innermost `force_path` name in effect, or None."""
    return _FORCED.get()


def _forced(branch: str, name: str, inp: Inputs, why: str, *, any_device=False) -> Decision:
    ok, reason = PATHS[name].supports(branch, inp, any_device=any_device)
    if ok:
        return Decision(branch, name, why)
    return Decision(branch, name, why, error=f"{why}, but {name} cannot run: {reason}")


def _profile(device: str):
    """The kernel profile of a device type (`nsa_impl.kernels.tuning`), or None if unreadable."""
    try:
        from .kernels import tuning

        return tuning.profile_for(device if device != "cuda" else torch.device("cuda"))
    except Exception:  # no GPU to ask, a broken file: route on the built-in order
        return None


def profile_of(device: str) -> str:
    """``name (measured|predicted)`` of the profile routing uses for ``device``, for `explain`."""
    prof = _profile(device)
    if prof is None:
        return "none (built-in order)"
    return f"{prof.name} ({'measured' if prof.measured else 'predicted, not measured'})"


def _ordered(branch: str, allowed: dict[str, str], prof) -> list[tuple[str, str]]:
    """``allowed`` (path -> flag) in the profile's order for ``branch``.

    "triton" is tried only where the profile lists it; "flash" and "masked" always (after the
    listed ones), as before profiles existed.
    """
    order = [p for p in (prof.route(branch, []) if prof is not None else []) if p in PATHS]
    order += [p for p in ("flash", "masked") if p not in order]
    return [(p, allowed[p]) for p in order if p in allowed]


def _preferences(branch: str, s: Settings, device: str = "cuda") -> list[tuple[str, str]]:
    """Candidate paths for ``branch`` in order, each with the flag that allows it."""
    prof = _profile(device)
    if branch in ("cmp", "win"):
        allowed = {"triton": f"profile {prof.name if prof else '?'} lists triton"}
        if s.fa2_cmp if branch == "cmp" else s.fa2_win:
            allowed["flash"] = f"NSA_USE_FA2_{branch.upper()}/NSA_USE_FA2 on"
        if s.use_cmp_mask if branch == "cmp" else s.use_win_mask:
            allowed["masked"] = f"NSA_USE_{branch.upper()}_MASK=1"
        if prof is None:  # no profile: the FlashAttention order of before
            allowed.pop("triton", None)
        prefs = _ordered(branch, allowed, prof)
    else:
        sel_triton = prof is None or bool(prof.route("sel_triton", True))
        prefs = [("triton", "NSA_USE_TRITON_SEL=1")] if s.use_triton_sel and sel_triton else []
        prefs += [("varlen", "NSA_SEL_VARLEN_V2=1")] if s.sel_varlen_v2 else []
        prefs += [("packed", "NSA_USE_SEL_PACK=1")] if s.use_sel_pack else []
        prefs += [("masked", "gather fallback")]
    return prefs + [("reference", "last resort")]


def _triton_worth_it(inp: Inputs) -> tuple[bool, str]:
    """The selection kernel's length guard (the profile's ``sel_triton_min_len``)."""
    mod, why = _import_kernel("nsa_impl.kernels.triton_sel")
    if mod is None:
        return False, why
    prof = _profile(inp.device)
    min_len = mod.SEL_TRITON_MIN_L if prof is None else int(prof.route("sel_triton_min_len",
                                                                        mod.SEL_TRITON_MIN_L))
    if not mod.long_enough(inp.max_seqlen, min_len):
        return False, f"longest sequence {inp.max_seqlen} < {min_len} (sel_triton_min_len)"
    return True, "long enough"


def _choose(branch: str, inp: Inputs, s: Settings) -> Decision:
    forced = forced_path()
    if forced is not None and branch in PATHS[forced].branches:
        cpu_ok = PATHS[forced].interpreter_cpu and s.triton_interpret
        return _forced(branch, forced, inp, f"force_path({forced!r})", any_device=cpu_ok)
    if s.force_parity:
        return _forced(branch, "reference", inp, "NSA_FORCE_PARITY=1")
    if branch == "sel" and s.triton_sel_force:
        return _forced(branch, "triton", inp, "NSA_TRITON_SEL_FORCE=1", any_device=True)
    skipped: list[tuple[str, str]] = []
    for name, flag in _preferences(branch, s, inp.device):
        ok, reason = PATHS[name].supports(branch, inp)
        if ok and name == "triton" and branch == "sel":
            ok, reason = _triton_worth_it(inp)
        listed = "; ".join(f"{n}: {r}" for n, r in skipped)
        if ok:
            why = f"{flag}; {PATHS[name].doc}"
            return Decision(
                branch,
                name,
                why + (" [skipped " + listed + "]" if skipped else ""),
                skipped=tuple(skipped),
            )
        skipped.append((name, reason))
    listed = "; ".join(f"{n}: {r}" for n, r in skipped)
    return Decision(
        branch,
        "reference",
        "",
        error="no path supports these inputs: " + listed,
        skipped=tuple(skipped),
    )


def route(q, k=None, v=None, *, cu_seqlens=None, backward=None, max_seqlen=None) -> Plan:
    """One `Decision` per branch for these inputs (see the module docstring for precedence)."""
    inp = Inputs.of(q, k, v, cu_seqlens=cu_seqlens, backward=backward, max_seqlen=max_seqlen)
    s = settings()
    plan = Plan({b: _choose(b, inp, s) for b in BRANCHES})
    plan.profile = profile_of(inp.device)
    return plan


def explain(q, cfg=None, *, k=None, v=None, cu_seqlens=None, backward=None) -> Plan:
    """The routing table for ``q`` (optionally ``k``, ``v``, ``cu_seqlens``): branch -> path, why.

    ``cfg`` is accepted for API symmetry (routing does not depend on it today). Print the result
    for a table; index it by branch for the `Decision`.
    """
    return route(q, k, v, cu_seqlens=cu_seqlens, backward=backward)
