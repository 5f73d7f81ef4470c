"""Comparison machinery of the clause tests: precision lanes, oracles, tolerances, recording.

A *lane* is the dtype the implementation under test runs in and the spec I.10 class that judges
it:

* ``exact``: float64 (when the adapter declares it), against `conformance.dense` in float64,
  ``EXACT_ATOL``; block indices must be equal.
* ``fp32``: float32 (adapters without float64), against `nsa_ref` in float32 on the same inputs
  (on the CPU),
  ``FP32_OUT_ATOL`` / ``FP32_GRAD_ATOL``; block indices equal except at near-ties
  (``NEAR_TIE_RTOL``), where the selected scores must match as a multiset and the outputs are
  then checked against the dense formulation given the implementation's own indices.
* ``low-precision``: bf16 (and fp16 on a GPU), against the dense formulation in float32 on the same
  rounded inputs: ``max|out - ref| <= lowp_bound(max|naive - ref|)`` where ``naive`` is the
  dense formulation run in the low dtype, both given the implementation's indices; the
  implementation's selection may lose at most ``lowp_bound`` of the naive selection's score.

Tolerances are imported from `nsa_impl.tolerances` (the one definition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from . import dense
from .inputs import Inputs, local_positions, output_weights


def _load_tolerances():
    """`nsa_impl.tolerances`, by file path while the rest of `nsa_impl` does not import."""
    try:
        return importlib.import_module("nsa_impl.tolerances")
    except ImportError:
        spec = importlib.util.find_spec("nsa_impl")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations:
            raise
        path = Path(next(iter(spec.submodule_search_locations))) / "tolerances.py"
        file_spec = importlib.util.spec_from_file_location("_nsa_impl_tolerances", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module


TOL = _load_tolerances()
#: What `Subject.vary` draws by default in a drawn case.
VARIED_FIELDS = ("seed", "B", "dims")
LOWP = (torch.float16, torch.bfloat16)
_AUX_FIELDS = ("o_cmp", "o_sel", "o_win", "p_cmp", "p_slc")


@dataclass(frozen=True)
class Lane:
    """A dtype and the tolerance class that judges it."""

    dtype: torch.dtype
    klass: str  # "exact" | "fp32" | "low-precision"

    @property
    def name(self) -> str:
        """``float64``, ``float32``, ``bfloat16`` ..."""
        return str(self.dtype).replace("torch.", "")

    def __str__(self) -> str:
        return f"{self.name}[{self.klass}]"


_CLASS_OF = {torch.float64: "exact", torch.float32: "fp32"}
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def lanes_for(caps, device: str, names: list[str] | None = None) -> list[Lane]:
    """An adapter's lanes on ``device``: float64, float32 and bfloat16 where it declares them,
    plus float16 on a GPU.

    ``names`` (``--lanes``) picks dtypes explicitly instead, among those the adapter declares
    (e.g. ``float32,bfloat16`` to run a kernel's own precisions on a CPU interpreter).
    """
    if names:
        unknown = [n for n in names if n not in DTYPES]
        if unknown:
            raise ValueError(f"--lanes: unknown dtype(s) {unknown}; known: {', '.join(DTYPES)}")
        chosen = [DTYPES[n] for n in names if DTYPES[n] in caps.dtypes]
        return [Lane(dt, _CLASS_OF.get(dt, "low-precision")) for dt in chosen]
    lanes = [Lane(dt, _CLASS_OF[dt]) for dt in (torch.float64, torch.float32) if dt in caps.dtypes]
    low = LOWP[::-1] if device == "cuda" or not lanes else (torch.bfloat16,)
    lanes += [Lane(dt, "low-precision") for dt in low if dt in caps.dtypes]
    return lanes


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want|`` in float64; ``inf`` on a shape mismatch or any non-finite ``got``."""
    if tuple(got.shape) != tuple(want.shape):
        return math.inf
    if got.numel() == 0:
        return 0.0
    g, w = got.detach().double(), want.detach().double().to(got.device)
    if not bool(torch.isfinite(g).all()):
        return math.inf  # NaN never passes (spec I.10)
    return float((g - w).abs().max())


def index_problems(idx: torch.Tensor, cfg, positions: torch.Tensor) -> dict[str, int]:
    """Violations of spec I.5 in ``block_indices`` (format, bounds, count, forced blocks).

    ``positions`` are the local positions ``[T]`` of the rows. Returns ``{problem: rows}`` with
    only the non-zero entries; empty when the indices are well-formed.
    """
    if idx.dtype != torch.int64:
        return {f"dtype {idx.dtype} (expected int64)": 1}
    pos = positions.to(idx.device).view(1, -1, 1)
    if idx.dim() != 4 or idx.shape[1] != pos.shape[1]:
        return {f"shape {list(idx.shape)}": 1}
    n, ls = cfg.sel_top_n, cfg.sel_block
    if idx.shape[-1] != n:
        return {f"last dim {idx.shape[-1]} (expected n={n})": 1}
    b = pos // ls  # [1, T, 1]
    valid = idx >= 0
    out = {
        "index below -1": (idx < -1).any(-1),
        "index above b(p)": (idx > b[..., None]).any(-1),
        "-1 padding before a block": (valid[..., 1:] & ~valid[..., :-1]).any(-1),
        "not strictly ascending": (
            valid[..., 1:] & valid[..., :-1] & (idx[..., 1:] <= idx[..., :-1])
        ).any(-1),
        "count != min(n, b(p)+1)": valid.sum(-1) != torch.clamp(b + 1, max=n),
    }
    num_blocks = int(b.max()) + 1
    member = torch.zeros(*idx.shape[:3], num_blocks + 1, dtype=torch.bool, device=idx.device)
    member.scatter_(-1, (idx + 1).clamp(0, num_blocks), True)
    member = member[..., 1:]
    j = torch.arange(num_blocks, device=idx.device).view(1, 1, 1, -1)
    forced = (j <= b[..., None]) & (
        (j < cfg.sel_init_blocks) | (j > b[..., None] - cfg.sel_local_blocks)
    )
    out["forced block missing"] = (forced & ~member).any(-1)
    return {k: int(v.sum()) for k, v in out.items() if bool(v.any())}


def selection_slack(idx: torch.Tensor, scores: torch.Tensor, cfg, positions) -> float:
    """How far an excluded candidate outscores a selected one, by ``scores`` (0 when maximal).

    Per row: ``max(score of an unselected unforced candidate) - min(score of a selected unforced
    block)``, clamped at 0; the maximum over rows. A selection made from scores accurate to
    ``e`` has slack at most ``2e`` (the low-precision form of spec P16).
    """
    S = scores.shape[-1]
    P = scores.double()
    member = torch.zeros(*idx.shape[:3], S + 1, dtype=torch.bool, device=idx.device)
    member = member.scatter(-1, (idx.long() + 1).clamp(0, S), True)[..., 1:].to(P.device)
    b = (positions.to(P.device) // cfg.sel_block).view(1, -1, 1, 1)
    j = torch.arange(S, device=P.device).view(1, 1, 1, -1)
    free = (j <= b) & (j >= cfg.sel_init_blocks) & (j <= b - cfg.sel_local_blocks)
    low = torch.where(member & free, P, torch.full_like(P, float("inf"))).amin(-1)
    high = torch.where(~member & free, P, torch.full_like(P, float("-inf"))).amax(-1)
    gap = (high - low).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    return float(gap.max()) if gap.numel() else 0.0


def near_tie_mismatches(got, want, scores, cfg, positions, rtol) -> list[str]:
    """Rows where ``got`` and ``want`` indices differ *not* explained by a near-tie (spec I.10).

    At a differing row both must hold the forced blocks and the same number of blocks, and the
    sorted scores of their unforced blocks must agree within ``rtol`` of the row's top score.
    """
    problems = []
    rows = (got != want).any(-1).nonzero().tolist()
    for b_, t, g in rows:
        p = int(positions[t])
        bp = p // cfg.sel_block
        forced = {
            j for j in range(bp + 1) if j < cfg.sel_init_blocks or j > bp - cfg.sel_local_blocks
        }
        gs = {int(j) for j in got[b_, t, g].tolist() if j >= 0}
        ws = {int(j) for j in want[b_, t, g].tolist() if j >= 0}
        row = scores[b_, t, g].double()
        ref = max(float(row.abs().max()), 1e-30)
        sg = sorted(float(row[j]) for j in gs - forced if j < row.numel())
        sw = sorted(float(row[j]) for j in ws - forced)
        ok = (
            forced <= gs
            and len(gs) == len(ws)
            and len(sg) == len(sw)
            and all(abs(a - c) <= rtol * ref for a, c in zip(sg, sw, strict=False))
        )
        if not ok:
            problems.append(f"(b={b_}, t={t}, g={g}) got {sorted(gs)} want {sorted(ws)}")
    return problems


def aux_fields(o: torch.Tensor, aux) -> dict[str, torch.Tensor]:
    """``{"o", "o_cmp", ..., "block_indices"}`` from an output and an aux record (may be None)."""
    out = {"o": o}
    if aux is not None:
        for name in (*_AUX_FIELDS, "block_indices"):
            if hasattr(aux, name):
                out[name] = getattr(aux, name)
    return out


@dataclass
class Parity:
    """What `Subject.check_parity` computed: the implementation's fields and the oracle's."""

    got: dict[str, torch.Tensor]
    want: dict[str, torch.Tensor]
    lane: Lane


class Subject:
    """The implementation under test on one device, with its oracles and an error recorder.

    Tests get one from the ``subject`` fixture. Every numeric comparison goes through `record`,
    which keeps the worst error relative to its tolerance for the report and fails the test with
    a message naming the clause when the tolerance is exceeded.
    """

    def __init__(
        self,
        adapter,
        device: str,
        *,
        clauses=(),
        node=None,
        mutant: str | None = None,
        examples: int = 1,
    ):
        self.adapter, self.device, self.node, self.mutant = adapter, device, node, mutant
        self.caps = adapter.capabilities
        self.clauses = tuple(clauses)
        self.worst: tuple[float, float, float, str] | None = None  # (ratio, err, tol, what)
        self.examples = max(1, int(examples))  # the per-test case budget (``--examples``)
        self.cases = 0  # cases this test ran (reported per clause)
        self._data = None  # hypothesis ``st.data()`` while a drawn case runs

    # --- drawn cases ---------------------------------------------------------------------------

    def count_case(self) -> None:
        """One more case run by this test (the report states the count per clause)."""
        self.cases += 1
        if self.node is not None:
            props = [p for p in self.node.user_properties if p[0] != "cases"]
            self.node.user_properties[:] = props + [("cases", self.cases)]

    @contextlib.contextmanager
    def drawing(self, data):
        """Inside: `vary` draws the structure of every case from hypothesis ``data``."""
        self._data = data
        try:
            yield
        finally:
            self._data = None

    def vary(self, case, fields: tuple[str, ...] = VARIED_FIELDS):
        """``case`` with ``fields`` drawn (seed, batch, head dims) while a drawn case runs.

        Outside `drawing` (the test's own fixed case) ``case`` comes back unchanged. The rest
        of the structure (T, G, h, configuration) is what the test is about and stays.
        """
        if self._data is None:
            return case
        from hypothesis import strategies as st

        draw, changes = self._data.draw, {}
        if "seed" in fields:
            changes["seed"] = draw(st.integers(0, 2**31 - 1), label="seed")
        if "B" in fields and case.cu_seqlens is None:
            changes["B"] = draw(st.integers(1, 2), label="B")
        if "dims" in fields:
            changes["Dk"] = draw(st.sampled_from([4, 8, 16]), label="Dk")
            changes["Dv"] = draw(st.sampled_from([4, 6, 8]), label="Dv")
        return dataclasses.replace(case, **changes)

    # --- capability gates ---------------------------------------------------------------------

    def has(self, need: str) -> bool:
        """Whether the adapter declares capability ``need`` on this device."""
        return self.caps.missing(need, self.device) is None

    def require(self, *needs: str) -> None:
        """Skip the test (with the reason) unless every capability in ``needs`` is declared."""
        for need in needs:
            why = self.caps.missing(need, self.device)
            if why:
                pytest.skip(f"{self.adapter.name} {why}")

    def config(self, cfg, keep: tuple[str, ...] = ()):
        """The configuration a test runs: ``cfg``, or the nearest one the adapter can run.

        A test about a property that holds for every configuration passes ``keep=()``; one about
        particular fields (e.g. ``l = d = 1``) names them in ``keep``, and skips with the
        adapter's reason when the nearest runnable configuration would change them.
        """
        got = self.caps.adapt_config(cfg, keep)
        if got is None:
            pytest.skip(f"{self.adapter.name}: {self.caps.config_reason(cfg)}")
        return got

    def require_shape(self, inp: Inputs) -> None:
        """Skip when the adapter does not declare this group size / head dims / length."""
        _, T, _, h, Dk, Dv = inp.shape
        why = self.caps.shape_reason(h=h, Dk=Dk, Dv=Dv, T=T)
        if why:
            pytest.skip(f"{self.adapter.name}: {why}")

    # --- recording ----------------------------------------------------------------------------

    def _context(self) -> str:
        if not self.clauses:
            return ""
        c = self.clauses[0]
        return f"[{', '.join(x.id for x in self.clauses)}] {c.statement} -- "

    def record(self, what: str, err: float, tol: float) -> None:
        """Keep ``err`` against ``tol`` for the report; fail when ``err > tol`` (or NaN)."""
        err = math.inf if math.isnan(err) else float(err)
        ratio = (0.0 if err == 0 else math.inf) if tol == 0 else err / tol
        if self.worst is None or ratio > self.worst[0]:
            self.worst = (ratio, err, float(tol), what)
            if self.node is not None:
                props = [
                    p
                    for p in self.node.user_properties
                    if p[0] not in ("worst_error", "tolerance", "worst_check")
                ]
                props += [("worst_error", err), ("tolerance", float(tol)), ("worst_check", what)]
                self.node.user_properties[:] = props
        assert err <= tol, f"{self._context()}{what}: max error {err:.3g} > tolerance {tol:.3g}"

    def record_identity(self, what: str, lane: Lane, err: float, naive_err, *, kind="out") -> None:
        """Record ``err``, the implementation's violation of an identity the spec states exactly.

        Exact class: ``EXACT_ATOL``; fp32: ``FP32_OUT_ATOL``/``FP32_GRAD_ATOL``; low precision:
        ``lowp_bound(naive_err())``, the same identity's violation by the naive low-dtype run.
        """
        if lane.klass == "exact":
            tol = TOL.EXACT_ATOL
        elif lane.klass == "fp32":
            tol = TOL.FP32_OUT_ATOL if kind == "out" else TOL.FP32_GRAD_ATOL
        else:
            tol = TOL.lowp_bound(naive_err(), kind)
        self.record(what, err, tol)

    def invariance_tol(self, lane: Lane, inp: Inputs, cfg, **kwargs) -> float:
        """Tolerance between two runs of the implementation that must agree (P4, P6, P12).

        Each run may be off by its class tolerance (spec I.10), so two runs may differ by twice
        it: ``2 * EXACT_ATOL``, ``2 * FP32_OUT_ATOL``, or ``2 * lowp_bound(naive error)`` with
        the naive low-dtype formulation measured against float32 on these inputs.
        """
        if lane.klass == "exact":
            return 2 * TOL.EXACT_ATOL
        if lane.klass == "fp32":
            return 2 * TOL.FP32_OUT_ATOL
        low = inp.to(lane.dtype, self.device)
        ref = self.dense(low.to(torch.float32, self.device), cfg, **kwargs).o
        return 2 * TOL.lowp_bound(max_err(self.dense(low, cfg, **kwargs).o, ref))

    def record_selection_slack(
        self, idx, inp: Inputs, cfg, lane: Lane, *, positions=None, **kwargs
    ) -> None:
        """Low-precision selection check: maximal up to twice the bound on score error.

        Scores ``P`` are the dense formulation's in float32 on the rounded inputs; the bound is
        ``lowp_bound(max|P_naive - P|)`` with ``P_naive`` from the same formulation in the low
        dtype (the I.10 criterion applied to Eq. 9-10 scores).
        """
        low = inp.to(lane.dtype, self.device)
        ref = self.dense(low.to(torch.float32, self.device), cfg, positions=positions, **kwargs)
        naive = self.dense(low, cfg, positions=positions, **kwargs)
        pos = local_positions(inp.q.shape[1], inp.cu_seqlens)
        if positions is not None:
            pos = pos[positions]
        bound = TOL.lowp_bound(max_err(naive.p_slc, ref.p_slc))
        self.record(
            f"selection slack vs float32 scores ({lane})",
            selection_slack(idx, ref.p_slc, cfg, pos),
            2 * bound,
        )

    def expect_same_selection(self, got, want, want_scores, cfg, inp: Inputs, lane: Lane) -> None:
        """Two runs' ``block_indices`` agree: exactly in the exact class, else up to near-ties
        (spec I.10) judged on ``want_scores`` (the second run's ``p_slc`` for the same rows)."""
        if lane.klass == "exact":
            return self.expect_indices_equal(got, want)
        self.expect(
            tuple(got.shape) == tuple(want.shape),
            f"block_indices shapes {list(got.shape)} vs {list(want.shape)}",
        )
        pos = local_positions(inp.q.shape[1], inp.cu_seqlens)[: want.shape[1]]
        bad = near_tie_mismatches(
            got.cpu(), want.cpu(), want_scores.cpu(), cfg, pos, TOL.NEAR_TIE_RTOL
        )
        self.expect(not bad, f"selections differ beyond near-ties: {bad[:3]} ({len(bad)} rows)")

    def scores_of(self, aux, inp: Inputs, cfg) -> torch.Tensor:
        """The block scores that judge near-ties of ``aux.block_indices``: the implementation's
        own ``p_slc`` when it reports them, else the dense oracle's (float64)."""
        if getattr(aux, "p_slc", None) is not None:
            return aux.p_slc
        return self.dense(inp.to(torch.float64, "cpu"), cfg).p_slc

    def expect(self, ok: bool, what: str) -> None:
        """A structural check: fail with the clause context when ``ok`` is false."""
        assert ok, f"{self._context()}{what}"

    def expect_indices_ok(self, idx: torch.Tensor, cfg, inp: Inputs, *, only=None) -> None:
        """Spec I.5 format/bounds/count/forced checks (`index_problems`), optionally a subset."""
        problems = index_problems(idx, cfg, local_positions(inp.q.shape[1], inp.cu_seqlens))
        if only is not None:
            problems = {k: v for k, v in problems.items() if any(o in k for o in only)}
        self.expect(not problems, f"block_indices violate spec I.5: {problems}")

    # --- calls ----------------------------------------------------------------------------------

    def run(self, x: Inputs, cfg, *, aux: bool = False, **kwargs):
        """Call the implementation on converted inputs ``x``; ``(o, aux or None)``."""
        want_aux = aux and (self.caps.aux or self.caps.indices)
        out = self.adapter.attention(
            x.q, x.k, x.v, x.gates, cfg, return_aux=want_aux, **x.kwargs(), **kwargs
        )
        return out if want_aux else (out, None)

    def hypothesis_settings(self, max_examples: int):
        """Local hypothesis settings for ``max_examples`` drawn cases (the ``--examples`` budget).

        Nothing is registered globally: derandomization and the example database come from the
        profile the root conftest loaded (``ci`` is derandomized). No deadline (the reference
        is row-by-row Python) and no shrinking: a failing case is reported as drawn, since a
        shrink would rerun an implementation under test hundreds of times. Mutant runs keep no
        example database.
        """
        from hypothesis import HealthCheck, Phase, settings

        kwargs = dict(
            max_examples=max(1, int(max_examples)),
            deadline=None,
            phases=(Phase.explicit, Phase.reuse, Phase.generate),
            suppress_health_check=[
                HealthCheck.function_scoped_fixture,
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
            ],
        )
        if self.mutant is not None:
            kwargs["database"] = None
        return settings(**kwargs)

    # --- oracles -------------------------------------------------------------------------------

    def compare_to(self, what: str, got: torch.Tensor, inp: Inputs, lane: Lane, fn, *, kind="out"):
        """Compare ``got`` (computed on ``inp`` in ``lane``) with ``fn(inputs) -> tensor``.

        ``fn`` is an oracle formula evaluated on converted inputs (e.g. dense full attention):
        float64 in the exact class, float32 in the fp32 class, float32 vs the low dtype (naive)
        in the low-precision class.
        """
        if lane.klass == "exact":
            want = fn(inp.to(torch.float64, self.device))
            return self.record(what, max_err(got, want), TOL.EXACT_ATOL)
        if lane.klass == "fp32":
            want = fn(inp.to(torch.float32, self.device))
            tol = TOL.FP32_OUT_ATOL if kind == "out" else TOL.FP32_GRAD_ATOL
            return self.record(what, max_err(got, want), tol)
        low = inp.to(lane.dtype, self.device)
        ref = fn(low.to(torch.float32, self.device))
        naive = fn(low)
        return self.record(what, max_err(got, ref), TOL.lowp_bound(max_err(naive, ref), kind))

    def dense(self, x: Inputs, cfg, **kwargs) -> dense.DenseOut:
        """The dense formulation on converted inputs ``x`` (any dtype/device)."""
        return dense.nsa_dense(x.q, x.k, x.v, x.gates, cfg, **x.kwargs(), **kwargs)

    def check_parity(
        self, inp: Inputs, cfg, lane: Lane, *, fields=("o",), indices=False, grads=False, **kwargs
    ) -> Parity:
        """Run the implementation and the lane's oracle on ``inp``; compare ``fields``.

        ``fields`` are among ``o, o_cmp, o_sel, o_win, p_cmp, p_slc`` (all but ``o`` need the
        ``aux`` capability); ``indices`` compares ``block_indices`` (needs ``aux``); ``grads``
        compares the gradients of ``sum(o * w)`` for a fixed random ``w`` (needs ``backward``).
        ``kwargs`` (``scale``, ``phi_k``, ``phi_v``) go to both sides.
        """
        if grads:
            self.require("backward")
        if indices:
            self.require("indices")
        if any(f != "o" for f in fields):
            self.require("aux")
        self.require_shape(inp)
        x = inp.to(lane.dtype, self.device, requires_grad=grads)
        o, aux = self.run(x, cfg, aux=True, **kwargs)
        got = aux_fields(o, aux)
        w = output_weights(inp)
        if grads:
            got.update(self._grads(o, x, w))
        impl_idx = got.get("block_indices")

        if lane.klass == "exact":
            want = self._oracle_dense(
                inp.to(torch.float64, self.device, requires_grad=grads), cfg, w, grads, **kwargs
            )
            if indices:
                self.expect_indices_equal(impl_idx, want["block_indices"])
            tols = dict.fromkeys(want, TOL.EXACT_ATOL)
        elif lane.klass == "fp32":
            want, tols = self._oracle_fp32(inp, cfg, w, grads, impl_idx, indices, **kwargs)
        else:
            want, tols = self._oracle_lowp(inp, cfg, lane, w, grads, impl_idx, indices, **kwargs)

        names = list(fields) + ([n for n in got if n.startswith("grad.")] if grads else [])
        for name in names:
            if name not in got:
                self.expect(False, f"the implementation's aux has no field {name!r}")
            self.record(f"{name} ({lane})", max_err(got[name], want[name]), tols[name])
        return Parity(got, want, lane)

    def _grads(self, o, x: Inputs, w) -> dict[str, torch.Tensor]:
        leaves = x.leaves()
        grads = torch.autograd.grad(
            (o * w.to(o.dtype).to(o.device)).sum(), list(leaves.values()), allow_unused=True
        )
        return {
            f"grad.{n}": (torch.zeros_like(t) if g is None else g)
            for (n, t), g in zip(leaves.items(), grads, strict=False)
        }

    def _oracle_dense(self, x: Inputs, cfg, w, grads, block_indices=None, **kwargs):
        out = self.dense(x, cfg, block_indices=block_indices, **kwargs)
        want = {f: getattr(out, f) for f in ("o", *_AUX_FIELDS, "block_indices")}
        if grads:
            want.update(self._grads(out.o, x, w))
        return want

    def expect_indices_equal(self, got, want) -> None:
        """Block indices equal exactly (shape and values); names the first differing row."""
        self.expect(got is not None, "no block_indices to compare")
        same = tuple(got.shape) == tuple(want.shape) and torch.equal(got.cpu(), want.cpu())
        if not same and tuple(got.shape) == tuple(want.shape):
            rows = (got.cpu() != want.cpu()).any(-1).nonzero().tolist()
            b, t, g = rows[0]
            detail = (
                f"{len(rows)} (b, t, g) rows differ; first (b={b}, t={t}, g={g}): "
                f"got {got[b, t, g].tolist()} want {want[b, t, g].tolist()}"
            )
        else:
            detail = f"shape {list(got.shape)} vs oracle {list(want.shape)}"
        self.expect(same, f"block_indices differ from the oracle: {detail}")

    def _oracle_fp32(self, inp, cfg, w, grads, impl_idx, indices, **kwargs):
        """`nsa_ref` in float32; the dense formulation with the impl's indices after a near-tie.

        Both run on the CPU whatever ``--device``: the reference is row-by-row Python (slow on a
        GPU), and "the reference" is the same function on any device.
        """
        import nsa_ref

        xr = inp.to(torch.float32, "cpu", requires_grad=grads)
        o_r, aux_r = nsa_ref.nsa_attention(
            xr.q, xr.k, xr.v, xr.gates, cfg, return_aux=True, **xr.kwargs(), **kwargs
        )
        want = aux_fields(o_r, aux_r)
        if grads:
            want.update(self._grads(o_r, xr, w))
        if impl_idx is not None and not (
            tuple(impl_idx.shape) == tuple(want["block_indices"].shape)
            and torch.equal(impl_idx.cpu(), want["block_indices"].cpu())
        ):
            self.expect(
                tuple(impl_idx.shape) == tuple(want["block_indices"].shape),
                f"block_indices shape {list(impl_idx.shape)} "
                f"vs {list(want['block_indices'].shape)}",
            )
            pos = local_positions(inp.q.shape[1], inp.cu_seqlens)
            bad = near_tie_mismatches(
                impl_idx.cpu(),
                want["block_indices"].cpu(),
                want["p_slc"].cpu(),
                cfg,
                pos,
                TOL.NEAR_TIE_RTOL,
            )
            self.expect(
                not bad, f"block_indices differ beyond near-ties: {bad[:3]} ({len(bad)} rows)"
            )
            # Near-ties only: judge outputs against the dense formulation given the impl's blocks.
            xd = inp.to(torch.float32, "cpu", requires_grad=grads)
            dense_want = self._oracle_dense(
                xd, cfg, w, grads, block_indices=impl_idx.cpu(), **kwargs
            )
            want.update({k: v for k, v in dense_want.items() if k != "block_indices"})
        elif indices and impl_idx is None:
            self.expect(False, "no block_indices to compare")
        tols = {
            k: (TOL.FP32_GRAD_ATOL if k.startswith("grad.") else TOL.FP32_OUT_ATOL) for k in want
        }
        return want, tols

    def _oracle_lowp(self, inp, cfg, lane, w, grads, impl_idx, indices, **kwargs):
        """Dense float32 (reference) and dense low dtype (naive), given the impl's indices.

        Both differentiate ``sum(o * w)`` with ``w`` rounded to the lane's dtype: that rounded
        ``w`` is the output gradient a low-precision implementation receives (its ``o`` is in
        that dtype), so the reference runs on the same rounded inputs, ``dO`` included (spec
        I.10), instead of charging every implementation the rounding of ``w``.
        """
        low = inp.to(lane.dtype, self.device)
        w = w.to(lane.dtype).to(w.dtype)
        ref = self._oracle_dense(
            low.to(torch.float32, self.device, requires_grad=grads),
            cfg,
            w,
            grads,
            block_indices=impl_idx,
            **kwargs,
        )
        naive = self._oracle_dense(
            low.to(lane.dtype, self.device, requires_grad=grads),
            cfg,
            w,
            grads,
            block_indices=impl_idx,
            **kwargs,
        )
        tols = {
            k: TOL.lowp_bound(max_err(naive[k], ref[k]), "grad" if k.startswith("grad.") else "out")
            for k in ref
            if k != "block_indices"
        }
        if indices:
            self.expect(impl_idx is not None, "no block_indices to compare")
            self.expect_indices_ok(impl_idx, cfg, inp)
            self.record_selection_slack(impl_idx, inp, cfg, lane, **kwargs)
        return ref, tols
