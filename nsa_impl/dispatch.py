"""The dispatcher: the one capability table and the one place that picks a path per branch.

Three pieces, each asked instead of repeating conditions elsewhere:

* `PATHS`: xformers-style declarations, one `PathDecl` per execution path. Each says which
  branches it implements (and where: ``impls``), which devices, dtypes and head dims it serves,
  whether it has a backward and takes ``cu_seqlens``, how to probe the optional software it needs
  (``probe``, lazily, never at import), what its kernels decline (``supports``, asked with an
  `Inputs` built from shapes only) and which layouts a plan prepares for it (``layouts``).
  Adding a path is one more `PathDecl` (and its files).
* `choose`: one `Decision` per branch ("cmp", "sel", "win") for given `Inputs`, with the reason
  and the candidates it skipped. Precedence: `force_path` (innermost context wins) >
  ``NSA_FORCE_PARITY`` > ``NSA_TRITON_SEL_FORCE`` (selection only) > each branch's preference
  list filtered by the flags (`nsa_impl.routing`), the device profile and the declarations. A
  forced path that cannot serve the inputs is an error (never a silent fallback). One case needs
  no kernel and is not an error: when every sequence is shorter than ``l`` the compressed
  branch is "masked" (exact zeros, the forced selection) whatever was forced but "reference",
  and `explain` says so. `nsa_impl.plan` calls it once per plan; `explain` prints it, with the
  profile it used.
* The device profile (`nsa_impl.kernels.tuning`, one JSON file per GPU class) holds the
  router's data: the order in which the compressed and window branches try their paths
  (``cmp``, ``win``: "triton" is tried only where the profile lists it, e.g. on sm90 but not on
  Ampere/Ada until measured; "flash" and "masked" always, after the listed ones), whether the
  Triton selection is preferred (``sel_triton``) and from which longest sequence
  (``sel_triton_min_len``, a `PathDecl.min_seqlen` entry), and whether the gate of a route that
  runs cmp or win on "triton" is the fused Triton kernel (``gate_triton``; `gate`). CPU tensors
  reach the "triton" path only when it is forced (`force_path("triton")` or
  ``NSA_TRITON_SEL_FORCE``) under ``TRITON_INTERPRET=1``.
* `compressed`, `selection`, `window`: run a branch on its planned path, and own every fallback
  that is decided while running: with ``validate=True``, a path declaring ``finite_fallback``
  (the FlashAttention paths) whose output holds NaN/Inf although its inputs are finite is re-run
  on that fallback path (logged once; the check costs a device sync, hence only then). Static
  limits (no compressed block yet, too many packed heads, ...) are declined by the kernels'
  ``supports`` when the plan is built, so the router picks the next path instead.

Path names (one per path, used by the router, `explain`, the conformance adapters and the docs):

=============  ==============================================================================
``reference``  `nsa_ref` evaluated once; its per-branch outputs are used (exact, slow)
``masked``     explicit masked softmax: cmp/win over row key ranges, sel over gathered blocks
``packed``     selection rows bucketed by selected length, one SDPA call per bucket
``varlen``     selection flat-packed with cu_seqlens (FA-2 varlen on GPU, dense buckets else)
``triton``     Triton kernels: sel (group-centric, shared KV fetch), cmp (compressed attention
               with its log-sum-exp + fused scores/top-n), win (row-range window attention)
``flash``      FlashAttention-2 varlen (win: left window; cmp: causal over query groups, with
               Triton scores from its log-sum-exp)
=============  ==============================================================================

A plan built for a subset of the query rows (``nsa_impl.plan(..., rows=)``, the shards of
context parallelism in `nsa_impl.parallel`) routes only to paths declaring ``rows``: the torch
paths "masked", "packed" and "varlen"; the others decline with "no row-subset support".

A branch implementation named in ``impls`` has the branch's signature (``plan`` is a
`nsa_impl.plan.Plan`, read for its layouts):

* cmp: ``(q, k_cmp, v_cmp, plan, scale, *, want_aux) -> nsa_impl.scoring.Scores``
* sel: ``(q, k, v, block_indices, plan, scale, *, canonical) -> o_sel`` (``canonical``: the
  indices are in the fused top-n kernel's form, `nsa_impl.scoring.Scores.canonical`)
* win: ``(q, k, v, plan, scale) -> o_win``

The "reference" path has no implementation functions: its branch outputs come from one
evaluation of `nsa_ref` (`ReferenceDelegate`). For the selection entry point alone (given block
indices), which `nsa_ref` does not offer, "reference" runs the exact "masked" selection.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

import nsa_ref
from nsa_ref.reference import NSAAux
from nsa_ref.reference import gate as ref_gate

from . import routing
from .kernels import triton_gate, tuning
from .kernels.ops import Inputs
from .scoring import Scores

log = logging.getLogger(__name__)

BRANCHES = ("cmp", "sel", "win")
_ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_WARNED: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    """Log ``msg`` as a warning the first time ``key`` is seen (fallback notices)."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


@functools.cache
def resolve(spec: str) -> Callable:
    """``"package.module:name"`` -> the object (imported on first use, then cached)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _call_guarded(spec: str, *args) -> tuple[bool, str]:
    """``resolve(spec)(*args)`` as ``(ok, reason)``; an import error is a reason, not a crash."""
    try:
        fn = resolve(spec)
    except Exception as exc:  # a broken optional dependency must not break routing
        return False, f"{spec.partition(':')[0]} cannot be imported ({type(exc).__name__}: {exc})"
    ok, why = fn(*args)
    return bool(ok), str(why)


# ---------------------------------------------------------------------------------------------
# Path declarations.


@dataclass(frozen=True)
class PathDecl:
    """What one execution path supports; the router only asks these.

    Attributes:
        name: the path name (module docstring).
        branches: subset of ``{"cmp", "sel", "win"}`` the path implements.
        devices: device types (``"cpu"``, ``"cuda"``).
        dtypes: supported input dtypes.
        backward: whether gradients flow through it.
        varlen: whether it accepts ``cu_seqlens``.
        min_head_dim, max_head_dim: supported ``Dk``/``Dv`` (``None``: no upper bound).
        doc: one line on what the path does.
        impls: branch -> ``"module:function"`` implementing that branch (module docstring).
        probe: ``"module:function"`` ``() -> (ok, why)``: is the software it needs present
            (``None``: pure PyTorch)? Asked lazily, cached per `routing.Settings`.
        supports: branch -> ``"module:function"`` ``(Inputs) -> (ok, why)``: the kernel's own
            limits for that branch (asked once per plan).
        layouts: branch -> what the implementation reads from the plan: a
            `nsa_impl.plan.Plan` attribute name, or ``"module:function"`` ``(plan) -> layout``;
            built once per plan (eagerly for its route) and read with ``plan.layout_of(branch,
            path)``.
        min_seqlen: branch -> the device profile's routing key holding the longest sequence from
            which the router prefers this path for that branch (a preference, not a capability:
            forcing the path ignores it), e.g. ``{"sel": "sel_triton_min_len"}``.
        interpretable: CPU tensors may run its Triton kernels in Triton's interpreter when the
            path is forced and ``TRITON_INTERPRET=1``.
        finite_fallback: with ``validate=True``, a non-finite output from finite inputs is
            recomputed on this path (``None``: no check).
        own_dtype: the path's kernels compute in the plan's dtype themselves, so the runners
            cast its inputs to it; torch paths take the plan's `nsa_impl.plan.Plan.work_dtype`
            (`nsa_impl.numerics.work_dtype`).
        rows: serves a subset of the query rows against all ``T`` keys (`Inputs.row_subset`:
            the context-parallel shards of `nsa_impl.parallel`); the torch paths do, from the
            plan's per-row layouts.
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
    impls: Mapping[str, str] = field(default_factory=dict, compare=False)
    probe: str | None = field(default=None, compare=False)
    supports: Mapping[str, str] = field(default_factory=dict, compare=False)
    layouts: Mapping[str, str] = field(default_factory=dict, compare=False)
    min_seqlen: Mapping[str, str] = field(default_factory=dict, compare=False)
    interpretable: bool = False
    finite_fallback: str | None = None
    own_dtype: bool = False
    rows: bool = False

    def served_devices(self) -> frozenset[str]:
        """Device types a forced run may use: ``devices``, plus ``cpu`` for an `interpretable`
        path while ``TRITON_INTERPRET=1`` (what the conformance adapters declare)."""
        if self.interpretable and routing.settings().triton_interpret:
            return self.devices | {"cpu"}
        return self.devices

    def available(self) -> tuple[bool, str]:
        """``(True, why)`` when the software it needs is present, else ``(False, reason)``."""
        if self.probe is None:
            return True, "pure PyTorch"
        return _probe(self.probe, routing.settings())

    def can_run(self, branch: str, inp: Inputs, *, any_device: bool = False) -> tuple[bool, str]:
        """Whether this path can run ``branch`` on ``inp``; the reason when it cannot.

        ``any_device`` (``NSA_TRITON_SEL_FORCE``) lets an `interpretable` path take CPU tensors
        when ``TRITON_INTERPRET=1``.
        """
        if branch not in self.branches:
            return False, f"no {branch} implementation"
        if inp.device_type not in self.devices:
            interpret = routing.settings().triton_interpret
            if not (any_device and self.interpretable and inp.device_type == "cpu" and interpret):
                why = f"device {inp.device_type} not in {sorted(self.devices)}"
                if any_device and self.interpretable and inp.device_type == "cpu":
                    why = "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1)"
                return False, why
        if inp.dtype not in self.dtypes:
            return False, f"dtype {inp.dtype} not supported"
        for label, dim in (("Dk", inp.Dk), ("Dv", inp.Dv)):
            if dim < self.min_head_dim or (
                self.max_head_dim is not None and dim > self.max_head_dim
            ):
                return False, f"{label}={dim} outside [{self.min_head_dim}, {self.max_head_dim}]"
        if inp.backward and not self.backward:
            return False, "no backward and gradients are needed"
        if inp.varlen and not self.varlen:
            return False, "no cu_seqlens support"
        if inp.row_subset and not self.rows:
            return False, "no row-subset support (context parallelism runs the torch paths)"
        ok, why = self.available()
        if not ok:
            return False, f"unavailable: {why}"
        if branch in self.supports:
            ok, why = _call_guarded(self.supports[branch], inp)
            if not ok:
                return False, f"kernel declines: {why}"
        return True, "supported"

    def impl(self, branch: str) -> Callable:
        """The function implementing ``branch`` on this path."""
        if branch not in self.impls:
            raise RuntimeError(f"path {self.name!r} has no {branch} implementation function")
        return resolve(self.impls[branch])


@functools.cache
def _probe(spec: str, settings: routing.Settings) -> tuple[bool, str]:
    return _call_guarded(spec, settings)


#: Bumped by `clear_caches`: part of the key of the plans kept for plan-free calls
#: (`nsa_impl.plan.cached_plan`), so that those are not reused either.
_GENERATION = [0]


def clear_caches() -> None:
    """Forget the availability probes' answers, and with them the plans of plan-free calls
    (tests that change what is installed)."""
    _probe.cache_clear()
    _GENERATION[0] += 1


def generation() -> int:
    """How many times `clear_caches` ran (a key of `nsa_impl.plan.cached_plan`)."""
    return _GENERATION[0]


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
            doc="explicit masked softmax (cmp, win: row key ranges; sel: gathered blocks)",
            impls={
                "cmp": "nsa_impl.scoring:compressed_and_select",
                "sel": "nsa_impl.branches.selection:masked",
                "win": "nsa_impl.branches.sliding:masked",
            },
            layouts={"cmp": "cmp_masked", "win": "win_masked"},
            rows=True,
        ),
        PathDecl(
            "packed",
            frozenset({"sel"}),
            frozenset({"cpu", "cuda"}),
            _ALL_FLOATS,
            True,
            True,
            doc="selection rows bucketed by selected length, one SDPA call per bucket",
            impls={"sel": "nsa_impl.branches.selection:packed"},
            rows=True,
        ),
        PathDecl(
            "varlen",
            frozenset({"sel"}),
            frozenset({"cpu", "cuda"}),
            _ALL_FLOATS,
            True,
            True,
            doc="selection flat-packed with cu_seqlens (FA-2 varlen on GPU, dense buckets else)",
            impls={"sel": "nsa_impl.branches.selection:varlen"},
            layouts={"sel": "sel_varlen_flash"},
            rows=True,
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
            impls={
                "cmp": "nsa_impl.branches.compressed:triton",
                "sel": "nsa_impl.branches.selection:triton",
                "win": "nsa_impl.branches.sliding:triton",
            },
            probe="nsa_impl.dispatch:triton_available",
            supports={
                "cmp": "nsa_impl.kernels.triton_attn:supports_cmp",
                "sel": "nsa_impl.kernels.triton_sel:supports",
                "win": "nsa_impl.kernels.triton_attn:supports_win",
            },
            layouts={"cmp": "cmp_triton", "sel": "sel_tokens", "win": "win_triton"},
            # below ~n*l' every query sees all its keys: packed is as fast (profile's value)
            min_seqlen={"sel": "sel_triton_min_len"},
            interpretable=True,
            own_dtype=True,
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
            impls={
                "cmp": "nsa_impl.branches.compressed:flash",
                "win": "nsa_impl.branches.sliding:flash",
            },
            probe="nsa_impl.dispatch:flash_available",
            supports={
                "win": "nsa_impl.kernels.flash:supports",
                "cmp": "nsa_impl.kernels.flash_cmp:supports",
            },
            layouts={"cmp": "cmp_flash", "win": "win_flash"},
            finite_fallback="masked",
            own_dtype=True,
        ),
    )
}


def triton_available(settings: routing.Settings) -> tuple[bool, str]:
    """The "triton" path's probe: triton importable, and a GPU or Triton's interpreter."""
    from .kernels.triton_sel import triton_available as importable

    ok, why = importable()
    if not ok:
        return False, why
    if not (torch.cuda.is_available() or settings.triton_interpret):
        return False, "no CUDA GPU and TRITON_INTERPRET is not set"
    return True, "triton importable"


def flash_available(settings: routing.Settings) -> tuple[bool, str]:
    """The "flash" path's probe: PyTorch's built-in FlashAttention-2 on a capable GPU."""
    from .kernels.flash import available

    return available()


# ---------------------------------------------------------------------------------------------
# The router.


@dataclass(frozen=True)
class Decision:
    """One branch's path, why it was chosen, and an error when a forced path cannot run.

    ``skipped`` lists the preferred ``(path, reason)`` pairs passed over before ``path`` (what
    `nsa_impl.observe` counts as fallbacks).
    """

    branch: str
    path: str
    reason: str
    error: str | None = None
    impl: Callable | None = field(default=None, compare=False, repr=False)
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def decl(self) -> PathDecl:
        """The chosen path's declaration."""
        return PATHS[self.path]


class Route(dict):
    """``branch -> Decision`` for the three branches; ``str()`` renders the `explain` table.

    ``profile`` names the device profile whose routing data was used; ``gate`` says how Eq. 5
    is computed (``"triton"``: the fused kernel, ``"torch"``: `nsa_ref.reference.gate`) and
    ``gate_reason`` why.
    """

    profile: str = "none (built-in order)"
    gate: str = "torch"
    gate_reason: str = "nsa_ref.reference.gate"

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
        rows.append(("gate", self.gate, self.gate_reason))
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        lines = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * max(len(s) for s in lines))
        lines.append(f"profile: {self.profile}")
        return "\n".join(lines)


_FORCED: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "nsa_forced_paths", default=None
)


@contextlib.contextmanager
def force_path(name: str | None = None, **per_branch: str) -> Iterator[None]:
    """Make branches use a given path inside the context (plans built inside route so).

    ``force_path("flash")`` forces every branch that has a "flash" implementation (the others
    keep the router's choice); ``force_path(cmp="flash", sel="triton")`` forces per branch. If a
    forced path cannot serve a branch's inputs (device, dtype, missing software), building the
    plan raises instead of falling back. The innermost context wins.
    """
    forced = {}
    if name is not None:
        if name not in PATHS:
            raise ValueError(f"unknown path {name!r}; known paths: {sorted(PATHS)}")
        forced = {b: name for b in PATHS[name].branches}
    for branch, path in per_branch.items():
        if branch not in BRANCHES:
            raise ValueError(f"unknown branch {branch!r}; branches: {BRANCHES}")
        if path not in PATHS or branch not in PATHS[path].branches:
            known = sorted(PATHS)
            raise ValueError(f"path {path!r} has no {branch} implementation; paths: {known}")
        forced[branch] = path
    token = _FORCED.set(forced)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_paths() -> Mapping[str, str]:
    """``branch -> path`` forced by the innermost `force_path` in effect (empty when none)."""
    return _FORCED.get() or {}


def _decision(branch: str, name: str, why: str) -> Decision:
    """A decision for a path that can run, with its implementation resolved once (plan time)."""
    decl = PATHS[name]
    return Decision(branch, name, why, impl=decl.impl(branch) if branch in decl.impls else None)


def _forced(branch: str, name: str, inp: Inputs, why: str, *, any_device=False) -> Decision:
    """A forced path's decision; ``any_device``: an `interpretable` path may take CPU tensors
    under ``TRITON_INTERPRET=1`` (every forced path, ``NSA_TRITON_SEL_FORCE``)."""
    ok, reason = PATHS[name].can_run(branch, inp, any_device=any_device)
    if ok:
        return _decision(branch, name, why)
    return Decision(branch, name, why, error=f"{why}, but {name} cannot run: {reason}")


def device_profile(device: torch.device):
    """The device's `nsa_impl.kernels.tuning.Profile` as routing sees it (`_profile`)."""
    return _profile(device)


def _profile(device: torch.device):
    """The device's `nsa_impl.kernels.tuning.Profile` (or the one `tuning.use_profile` set);
    ``None`` when it cannot be read (no GPU to ask, a broken file): the built-in order."""
    try:
        return tuning.profile_for(device)
    except Exception:  # routing must not fail because a profile cannot be read
        return None


def profile_name(prof) -> str:
    """``name (measured|predicted)`` of a profile, for `explain`."""
    if prof is None:
        return "none (built-in order)"
    return f"{prof.name} ({'measured' if prof.measured else 'predicted, not measured'})"


def _preferences(branch: str, s: routing.Settings, prof) -> list[tuple[str, str]]:
    """Candidate paths for ``branch`` in order, each with the flag (or profile) that allows it.

    cmp/win: the profile's order for the branch ("triton" only where it is listed), then
    "flash" and "masked" where the profile does not list them; each only if its flag allows.
    """
    if branch in ("cmp", "win"):
        allowed = {}
        if prof is not None:
            allowed["triton"] = f"profile {prof.name} lists triton"
        if s.fa2_cmp if branch == "cmp" else s.fa2_win:
            allowed["flash"] = f"NSA_USE_FA2_{branch.upper()}/NSA_USE_FA2 on"
        if s.use_cmp_mask if branch == "cmp" else s.use_win_mask:
            allowed["masked"] = f"NSA_USE_{branch.upper()}_MASK=1"
        order = [p for p in (prof.route(branch, []) if prof is not None else []) if p in PATHS]
        order += [p for p in ("flash", "masked") if p not in order]
        prefs = [(p, allowed[p]) for p in order if p in allowed]
    else:
        sel_triton = prof is None or bool(prof.route("sel_triton", True))
        prefs = [("triton", "NSA_USE_TRITON_SEL=1")] if s.use_triton_sel and sel_triton else []
        prefs += [("varlen", "NSA_SEL_VARLEN_V2=1")] if s.sel_varlen_v2 else []
        prefs += [("packed", "NSA_USE_SEL_PACK=1")] if s.use_sel_pack else []
        prefs += [("masked", "exact fallback")]
    return prefs + [("reference", "last resort")]


#: ``min_seqlen`` when no profile can be read (the value of every shipped profile).
DEFAULT_MIN_SEQLEN = 1024


def _long_enough(decl: PathDecl, branch: str, inp: Inputs, prof) -> tuple[bool, str]:
    """The path's length guard for ``branch`` (`PathDecl.min_seqlen`, value from the profile)."""
    key = decl.min_seqlen.get(branch)
    if key is None:
        return True, "no length guard"
    min_len = DEFAULT_MIN_SEQLEN if prof is None else int(prof.route(key, DEFAULT_MIN_SEQLEN))
    if inp.max_seqlen < min_len:
        return False, f"longest sequence {inp.max_seqlen} < {min_len} ({key} guard)"
    return True, "long enough"


#: Why the compressed branch of inputs whose sequences are all shorter than ``l`` runs "masked".
NO_CMP_BLOCK = (
    "every sequence shorter than l: no row sees a compressed block, nothing to attend (exact "
    "zeros and the forced selection, on the masked path)"
)


def _choose(branch: str, inp: Inputs, s: routing.Settings, prof) -> Decision:
    forced = forced_paths().get(branch)
    if branch == "cmp" and inp.cfg.num_cmp(inp.max_seqlen - 1) == 0:
        # No kernel is needed, whatever was asked for (except the reference itself).
        if forced != "reference" and not (forced is None and s.force_parity):
            return _decision(branch, "masked", NO_CMP_BLOCK)
    if forced is not None:
        return _forced(branch, forced, inp, f"force_path({forced!r})", any_device=True)
    if s.force_parity:
        return _forced(branch, "reference", inp, "NSA_FORCE_PARITY=1")
    if branch == "sel" and s.triton_sel_force:
        return _forced(branch, "triton", inp, "NSA_TRITON_SEL_FORCE=1", any_device=True)
    skipped: list[tuple[str, str]] = []
    for name, flag in _preferences(branch, s, prof):
        decl = PATHS[name]
        ok, reason = decl.can_run(branch, inp)
        if ok:
            ok, reason = _long_enough(decl, branch, inp, prof)
        if ok:
            why = f"{flag}; {decl.doc}"
            listed = "; ".join(f"{n}: {r}" for n, r in skipped)
            return dataclasses.replace(
                _decision(branch, name, why + (f" [skipped {listed}]" if skipped else "")),
                skipped=tuple(skipped),
            )
        skipped.append((name, reason))
    listed = "; ".join(f"{n}: {r}" for n, r in skipped)
    return Decision(branch, "reference", "", error="no path supports these inputs: " + listed,
                    skipped=tuple(skipped))  # fmt: skip


def _gate_route(route: Route, inp: Inputs, prof) -> tuple[str, str]:
    """``(gate, reason)``: the fused Triton gate when cmp or win runs on "triton", the profile
    says ``gate_triton`` and the kernel takes the inputs; `nsa_ref.reference.gate` otherwise."""
    if "triton" not in (route["cmp"].path, route["win"].path):
        return "torch", "nsa_ref.reference.gate (no branch on the triton path)"
    if prof is not None and not prof.route("gate_triton", True):
        return "torch", f"nsa_ref.reference.gate (profile {prof.name}: gate_triton off)"
    ok, why = triton_gate.supports(inp)
    if not ok:
        return "torch", f"nsa_ref.reference.gate (fused gate declines: {why})"
    return "triton", "fused Triton gate (Eq. 5), the triton route's"


def choose(inp: Inputs) -> Route:
    """One `Decision` per branch for ``inp`` (precedence: module docstring), the gate's choice
    and the profile that informed them."""
    s = routing.settings()
    prof = _profile(inp.device)
    route = Route({b: _choose(b, inp, s, prof) for b in BRANCHES})
    route.profile = profile_name(prof)
    route.gate, route.gate_reason = _gate_route(route, inp, prof)
    return route


def explain(q, cfg=None, *, k=None, v=None, cu_seqlens=None, backward=None,
            row_subset: bool = False) -> Route:  # fmt: skip
    """The routing table for ``q`` (optionally ``k``, ``v``, ``cu_seqlens``): branch -> path, why.

    ``cfg`` defaults to the paper configuration; ``k``/``v`` give the KV groups and ``Dv``
    (default: as many groups as heads, ``Dv = Dk``); ``backward`` defaults to whether autograd
    will need gradients; ``row_subset`` asks for a context-parallel shard's rows (only the torch
    paths serve them: `PathDecl.rows`). The same decision `nsa_impl.plan` makes for these
    inputs. Print the result for a table; index it by branch for the `Decision`.
    """
    cfg = nsa_ref.NSAConfig() if cfg is None else cfg
    B, T, H, Dk = q.shape
    G = H if k is None else k.shape[2]
    Dv = Dk if v is None else v.shape[-1]
    if backward is None:
        backward = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v)
        )
    max_seqlen = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    inp = Inputs(q.device, q.dtype, B, T, H, G, Dk, Dv, max_seqlen, cu_seqlens is not None,
                 bool(backward), cfg, bool(row_subset))  # fmt: skip
    return choose(inp)


# ---------------------------------------------------------------------------------------------
# Running the branches on their planned paths.


class ReferenceDelegate:
    """`nsa_ref` evaluated at most once per call, for the branches routed to "reference"."""

    def __init__(self, args: tuple, kwargs: dict):
        self._args, self._kwargs, self._aux = args, kwargs, None

    @property
    def aux(self) -> NSAAux:
        """The reference's `NSAAux` (branch outputs with autograd, indices, scores)."""
        if self._aux is None:
            _, self._aux = nsa_ref.nsa_attention(
                *self._args, **self._kwargs, return_aux=True, validate=False
            )
        return self._aux


def _nonfinite(out: torch.Tensor, inputs) -> bool:
    """True when ``out`` holds NaN/Inf although every tensor of ``inputs`` is finite (a sync)."""
    if bool(torch.isfinite(out).all()):
        return False
    return all(bool(torch.isfinite(t).all()) for t in inputs)


def _fallback(branch: str, decision: Decision, out: torch.Tensor, inputs, validate: bool):
    """The declared finite fallback path when ``out`` is non-finite from finite inputs."""
    fallback = decision.decl.finite_fallback
    if not validate or fallback is None or not _nonfinite(out, inputs):
        return None
    warn_once(
        f"nonfinite-{branch}-{decision.path}",
        f"{decision.path} {branch} output is not finite for finite inputs; recomputing with the "
        f"{fallback} path (logged once)",
    )
    return PATHS[fallback]


def _inputs_for(decl: PathDecl, plan, tensors) -> tuple:
    """The branch inputs (in the plan's work dtype) in the dtype ``decl``'s path computes in."""
    if decl.own_dtype:
        return tuple(t.to(plan.dtype) for t in tensors)
    return tuple(tensors)


def compressed(q, k_cmp, v_cmp, plan, scale: float, *, want_aux: bool, validate: bool,
               reference: ReferenceDelegate) -> Scores:  # fmt: skip
    """The compressed branch and the selection (Eqs. 8-11) on the planned "cmp" path.

    ``q``, ``k_cmp``, ``v_cmp`` in the plan's work dtype; ``o_cmp`` comes back in it.
    """
    decision, work = plan.route["cmp"], plan.work_dtype
    if decision.path == "reference":
        aux = reference.aux
        return Scores(aux.o_cmp.to(work), aux.block_indices, aux.p_slc, aux.p_cmp)
    args = _inputs_for(decision.decl, plan, (q, k_cmp, v_cmp))
    out = decision.impl(*args, plan, scale, want_aux=want_aux)
    fallback = _fallback("cmp", decision, out.o_cmp, args, validate)
    if fallback is not None:
        out = fallback.impl("cmp")(q, k_cmp, v_cmp, plan, scale, want_aux=want_aux)
    return Scores(out.o_cmp.to(work), out.block_indices, out.p_slc, out.p_cmp, out.canonical)


def selection(q, k, v, block_indices, plan, scale: float, *, reference: ReferenceDelegate | None,
              canonical: bool = False) -> torch.Tensor:  # fmt: skip
    """The selection branch (Eq. 12) on the planned "sel" path (inputs and output in the plan's
    work dtype).

    ``reference=None`` (the selection entry point, given indices): "reference" runs "masked".
    ``canonical``: the indices come from a producer that guarantees their form
    (`nsa_impl.scoring.Scores.canonical`); paths that clean indices anyway ignore it.
    """
    decision = plan.route["sel"]
    if decision.path == "reference":
        if reference is not None:
            return reference.aux.o_sel.to(plan.work_dtype)
        decision = _decision("sel", "masked", "given block indices: the exact masked selection")
    args = _inputs_for(decision.decl, plan, (q, k, v))
    return decision.impl(*args, block_indices, plan, scale, canonical=canonical).to(plan.work_dtype)


def window(q, k, v, plan, scale: float, *, validate: bool,
           reference: ReferenceDelegate) -> torch.Tensor:  # fmt: skip
    """The sliding-window branch (spec I.7) on the planned "win" path (inputs and output in the
    plan's work dtype)."""
    decision = plan.route["win"]
    if decision.path == "reference":
        return reference.aux.o_win.to(plan.work_dtype)
    args = _inputs_for(decision.decl, plan, (q, k, v))
    out = decision.impl(*args, plan, scale)
    fallback = _fallback("win", decision, out, args, validate)
    if fallback is not None:
        out = fallback.impl("win")(q, k, v, plan, scale)
    return out.to(plan.work_dtype)


def gate(o_cmp, o_sel, o_win, gates, plan) -> torch.Tensor:
    """Eq. 5 as the plan's route decided (`Route.gate`), in the plan's dtype: the fused Triton
    kernel on the triton route where the profile says so (inputs cast to the plan's dtype),
    else `nsa_ref.reference.gate` in the work dtype (float32 for half precision on the CPU),
    rounded once."""
    if plan.route.gate == "triton":
        return triton_gate.gate_combine(*(t.to(plan.dtype) for t in (o_cmp, o_sel, o_win, gates)),
                                        tuning=plan.tuning("gate"))  # fmt: skip
    return ref_gate(o_cmp, o_sel, o_win, gates.to(plan.work_dtype)).to(plan.dtype)
