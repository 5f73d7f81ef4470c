"""Per-clause results of a pytest run, and the reports: JSON (API.md schema), markdown, stdout.

`Collector` is a pytest plugin object: pass it to ``pytest.main(..., plugins=[collector])``. It
records every clause test's outcome, skip reason, failure message and the worst error/tolerance
the test recorded (``user_properties`` set by `conformance.checks.Subject.record`).
`summarize` folds tests into clauses: a clause fails when any of its tests fails, is skipped
only when all its tests skip (with their reasons), and passes otherwise. `build` adds the run's
verdict: ``pass``, ``fail``, or ``empty`` when no clause was graded (every test skipped or
deselected), which never reads as a pass.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata

from .clauses import CLAUSES, Clause


@dataclass
class TestResult:
    """One clause test's outcome."""

    nodeid: str
    clauses: tuple[str, ...]
    outcome: str = "pass"  # pass | fail | skip
    reason: str | None = None
    message: str | None = None
    worst_error: float | None = None
    tolerance: float | None = None
    check: str | None = None
    cases: int = 1  # cases the test ran (fixed + drawn; `conformance.checks.Subject.count_case`)


class Collector:
    """pytest plugin collecting `TestResult` per test and collection errors."""

    def __init__(self) -> None:
        self.tests: dict[str, TestResult] = {}
        self.errors: list[str] = []

    def pytest_collectreport(self, report) -> None:
        """Remember collection errors (they fail the run)."""
        if report.failed:
            self.errors.append(f"{report.nodeid}: {_last_line(report.longreprtext)}")

    def pytest_runtest_logreport(self, report) -> None:
        """Fold the setup/call/teardown reports of a clause test into one `TestResult`."""
        props = dict(report.user_properties)
        if "clause" not in props:
            return
        res = self.tests.setdefault(
            report.nodeid, TestResult(report.nodeid, tuple(props["clause"].split(",")))
        )
        if "cases" in props:
            res.cases = int(props["cases"])
        if "worst_error" in props:
            res.worst_error, res.tolerance = float(props["worst_error"]), float(props["tolerance"])
            res.check = props.get("worst_check")
        if report.skipped and res.outcome != "fail":
            res.outcome, res.reason = "skip", _skip_reason(report)
        elif report.failed:
            res.outcome = "fail"
            res.message = res.message or _failure_line(report)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _failure_line(report) -> str:
    """The assertion/exception line of a failure (``E   ...``), else its last line."""
    text = report.longreprtext or ""
    errors = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    line = errors[0] if errors else _last_line(text)
    where = {"setup": "error in setup: ", "teardown": "error in teardown: "}.get(report.when, "")
    return where + line


@dataclass
class ClauseResult:
    """One clause's row of the report."""

    clause: Clause
    status: str
    tests: int
    passed: int
    failed: int
    skipped: int
    worst_error: float | None
    tolerance: float | None
    reason: str | None
    failures: list[str] = field(default_factory=list)
    cases: int = 0  # cases run by the tests that were not skipped

    def to_json(self) -> dict:
        """The API.md clause object (plus extra fields)."""
        c = self.clause
        return {
            "id": c.id,
            "title": c.title,
            "paper": c.paper,
            "spec": c.spec,
            "status": self.status,
            "tests": self.tests,
            "cases": self.cases,
            "worst_error": _num(self.worst_error),
            "tolerance": _num(self.tolerance),
            "reason": self.reason,
            "tolerance_class": c.tolerance,
            "needs": list(c.needs),
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "failures": self.failures[:5],
            "statement": c.statement,
        }


def _num(x):
    return None if x is None else (x if math.isfinite(x) else str(x))


def summarize(collector: Collector, only: set[str] | None = None) -> list[ClauseResult]:
    """Fold tests into clauses (all registered clauses, or the ``only`` ids)."""
    rows = []
    for clause in CLAUSES:
        if only and clause.id not in only:
            continue
        tests = [t for t in collector.tests.values() if clause.id in t.clauses]
        fails = [t for t in tests if t.outcome == "fail"]
        skips = [t for t in tests if t.outcome == "skip"]
        if not tests:
            status, reason = "fail", "no test of this clause ran"
        elif fails:
            status, reason = "fail", None
        elif len(skips) == len(tests):
            reasons = ((t.reason or "skipped").removeprefix(f"{clause.id}: ") for t in skips)
            status, reason = "skip", "; ".join(dict.fromkeys(reasons))
        else:
            status, reason = "pass", None
        worst = max((t for t in tests if t.worst_error is not None), key=_ratio, default=None)
        rows.append(
            ClauseResult(
                clause,
                status,
                len(tests),
                sum(t.outcome == "pass" for t in tests),
                len(fails),
                len(skips),
                None if worst is None else worst.worst_error,
                None if worst is None else worst.tolerance,
                reason,
                [f"{t.nodeid}: {t.message}" for t in fails],
                sum(t.cases for t in tests if t.outcome != "skip"),
            )
        )
    return rows


def _ratio(t: TestResult) -> float:
    if t.tolerance == 0:
        return 0.0 if t.worst_error == 0 else math.inf
    return t.worst_error / t.tolerance


#: Set by the nox sessions to the constraints file they installed under (noxfile.py).
ENV_CONSTRAINTS = "NSA_CONSTRAINTS"
#: The toolchain whose versions the environment block records: (module, distribution).
TOOLCHAIN = (("pytest", "pytest"), ("hypothesis", "hypothesis"), ("numpy", "numpy"))


def _version(module: str, dist: str) -> str | None:
    """The version of ``module`` as imported in this process; of its installed distribution
    when it is not imported (nothing is imported here: triton must not be loaded just for
    this); ``None`` when neither exists."""
    version = getattr(sys.modules.get(module), "__version__", None)
    if version is not None:
        return str(version)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def constraints_used() -> tuple[str | None, str | None]:
    """``(file, sha256 prefix)`` of the constraints the environment was installed under.

    From ``$NSA_CONSTRAINTS`` (set by nox): a path, relative to the working directory or
    absolute, gives the first 12 hex digits of its sha256 (a path that cannot be read is named
    with the OS's reason and no hash); ``none (why)`` (nox installed unpinned) is passed on;
    unset gives ``(None, None)``: not known.
    """
    value = os.environ.get(ENV_CONSTRAINTS)
    if not value:
        return None, None
    if value == "none" or value.startswith("none "):
        return value, None  # installed unpinned, and why
    try:
        with open(value, "rb") as fh:
            return value, hashlib.sha256(fh.read()).hexdigest()[:12]
    except OSError as exc:
        return f"{value} ({exc.strerror or type(exc).__name__})", None


def environment(device: str) -> dict:
    """Python, torch, triton (without importing it), the test toolchain (pytest, hypothesis,
    numpy), the constraints file it was installed under, device (and GPU name on CUDA)."""
    import torch

    constraints, digest = constraints_used()
    env = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "triton": _version("triton", "triton"),
        **{module: _version(module, dist) for module, dist in TOOLCHAIN},
        "constraints": constraints,
        "constraints_sha256": digest,
        "device": device,
        "platform": f"{platform.system()} {platform.machine()}",
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def graded(rows: list[ClauseResult]) -> int:
    """How many clauses were graded: at least one of their tests ran and passed or failed."""
    return sum(1 for r in rows if r.passed or r.failed)


def empty_reason(rows: list[ClauseResult]) -> str:
    """Why no clause was graded: the skip reason they share (or the first of several), else that
    no clause test ran at all."""
    reasons = list(dict.fromkeys(r.reason for r in rows if r.status == "skip" and r.reason))
    if not reasons:
        return "no clause test ran (none collected, or every one deselected)"
    more = f" (and {len(reasons) - 1} other skip reasons)" if len(reasons) > 1 else ""
    return f"every clause skipped: {reasons[0]}{more}"


def verdict(
    rows: list[ClauseResult],
    mutants: list[dict] | None,
    errors: list[str],
    pytest_exit: int | None = None,
) -> tuple[str, str | None]:
    """``(verdict, reason)`` of a run: ``fail``, ``empty`` (no clause graded) or ``pass``.

    ``fail``: a clause test failed, a test could not be collected, pytest itself stopped
    (exit codes other than 0, 1, 5), a selected clause had no test run while others were
    graded, or a mutant survived. ``empty`` is never a pass.
    """
    if errors:
        return "fail", f"{len(errors)} collection error(s): {errors[0]}"
    if pytest_exit not in (None, 0, 1, 5):
        return "fail", f"pytest stopped with exit code {pytest_exit}"
    failed = [r.clause.id for r in rows if r.failed]
    if failed:
        return "fail", f"{len(failed)} clause(s) failed: {', '.join(failed[:5])}"
    if not graded(rows):
        return "empty", f"0 clauses graded: {empty_reason(rows)}"
    unrun = [r.clause.id for r in rows if r.status == "fail"]
    if unrun:
        return "fail", f"no test ran for {len(unrun)} clause(s): {', '.join(unrun[:5])}"
    survivors = [m["name"] for m in mutants or [] if not m["killed"]]
    if survivors:
        return "fail", f"{len(survivors)} mutant(s) survived: {', '.join(survivors[:5])}"
    return "pass", None


def build(
    impl: str,
    description: str,
    env: dict,
    rows: list[ClauseResult],
    mutants: list[dict] | None,
    errors: list[str],
    seconds: float,
    pytest_exit: int | None = None,
) -> dict:
    """The ``conformance.json`` document (``verdict``: see `verdict`)."""
    summary = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "skip")}
    summary["graded"] = graded(rows)
    if mutants is not None:
        summary["mutants"] = len(mutants)
        summary["mutants_killed"] = sum(m["killed"] for m in mutants)
    status, reason = verdict(rows, mutants, errors, pytest_exit)
    return {
        "implementation": impl,
        "description": description,
        "verdict": status,
        "verdict_reason": reason,
        "pytest_exit": pytest_exit,
        "environment": env,
        "clauses": [r.to_json() for r in rows],
        "mutants": mutants if mutants is not None else [],
        "mutants_run": mutants is not None,
        "collection_errors": errors,
        "summary": summary,
        "seconds": round(seconds, 2),
        "command": " ".join(sys.argv),
    }


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return "0" if x == 0 else f"{x:.2g}"


def _tol(row: dict) -> str:
    if row["tolerance"] is None:
        return "exact check" if row["tolerance_class"] == "structural" else "-"
    return _fmt(row["tolerance"])


_VERDICT = {"pass": "PASS", "fail": "FAIL", "empty": "NOT GRADED"}


def _headline(doc: dict) -> str:
    """``VERDICT: reason`` (the verdict first, so an empty run cannot read as a pass)."""
    reason = doc.get("verdict_reason")
    return _VERDICT[doc["verdict"]] + (f": {reason}" if reason else "")


def _toolchain(env: dict) -> str:
    """The environment block as one sentence: versions, then the constraints file."""
    tools = ", ".join(f"{m} {env.get(m) or 'not installed'}" for m, _ in TOOLCHAIN)
    if env.get("constraints_sha256"):
        pinned = f"installed under `{env['constraints']}` (sha256 {env['constraints_sha256']})"
    elif env.get("constraints"):
        pinned = f"constraints: {env['constraints']}"
    else:
        pinned = f"constraints: not recorded (${ENV_CONSTRAINTS} unset: not installed by nox)"
    return (
        f"Python {env['python']}, torch {env['torch']}, triton {env['triton'] or 'not installed'}"
        + (f", {env['gpu']}" if env.get("gpu") else "")
        + f"; {tools}; {pinned}."
    )


def markdown(doc: dict) -> str:
    """``conformance.md``: the verdict, the clause table, then the mutants."""
    s, env = doc["summary"], doc["environment"]
    lines = [f"# NSA conformance: `{doc['implementation']}` on {env['device']}", ""]
    counts = (
        f"{s['graded']} of {len(doc['clauses'])} clauses graded: "
        f"{s['pass']} pass, {s['fail']} fail, {s['skip']} skip"
    )
    if doc["mutants_run"]:
        counts += f"; mutants killed: {s['mutants_killed']}/{s['mutants']}"
    lines += [
        f"**{_headline(doc)}**",
        "",
        counts + f" ({doc['seconds']:.0f} s)",
        "",
        f"{doc['description']}. {_toolchain(env)}",
        "",
    ]
    if doc["collection_errors"]:
        lines += ["**Collection errors:** " + "; ".join(doc["collection_errors"]), ""]
    lines += [
        "| clause | paper | status | tests | cases | worst error | tolerance |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["clauses"]:
        status = {"pass": "pass", "fail": "**FAIL**", "skip": "skip"}[r["status"]]
        if r["reason"]:
            status += f": {r['reason']}"
        lines.append(
            f"| `{r['id']}` {r['title']} | {r['paper']} | {status} | {r['tests']} | "
            f"{r.get('cases', '-')} | {_fmt(r['worst_error'])} | {_tol(r)} |"
        )
    failures = [f for r in doc["clauses"] for f in r["failures"]]
    if failures:
        lines += ["", "### Failures", ""] + [f"- `{f}`" for f in failures[:30]]
    if doc["mutants_run"]:
        lines += [
            "",
            "## Mutants (deliberately broken references the suite must reject)",
            "",
            "| mutant | bug | killed | by clauses |",
            "|---|---|---|---|",
        ]
        for m in doc["mutants"]:
            # The clauses designed to catch it first, then how many others also did.
            first = [c for c in m["by"] if c in m["expected"]] or m["by"][:2]
            by = ", ".join(f"`{c}`" for c in first) or "-"
            if len(m["by"]) > len(first):
                by += f" (+{len(m['by']) - len(first)} more)"
            killed = "yes" if m["killed"] else "**NO**"
            lines.append(f"| `{m['name']}` | {m['description']} | {killed} | {by} |")
    return "\n".join(lines) + "\n"


def table(doc: dict) -> str:
    """A short fixed-width table for stdout."""
    rows = [("clause", "status", "tests", "cases", "worst", "tol")]
    for r in doc["clauses"]:
        rows.append(
            (
                r["id"],
                r["status"].upper() if r["status"] == "fail" else r["status"],
                str(r["tests"]),
                str(r.get("cases", "-")),
                _fmt(r["worst_error"]),
                _tol(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    out.insert(1, "-" * len(out[0]))
    s = doc["summary"]
    tail = f"{s['graded']} graded: {s['pass']} pass, {s['fail']} fail, {s['skip']} skip"
    if doc["mutants_run"]:
        tail += f"; mutants killed {s['mutants_killed']}/{s['mutants']}"
        survivors = [m["name"] for m in doc["mutants"] if not m["killed"]]
        if survivors:
            tail += f" (SURVIVED: {', '.join(survivors)})"
    return "\n".join(out + ["", tail, f"verdict: {_headline(doc)}"])
