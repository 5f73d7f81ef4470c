"""Grading any implementation: adapter crashes, the adapter block of a report, the summary table.

* `CrashCollector`: the report `Collector` that also tells an *adapter crash* (an exception
  raised by the adapter's own code, e.g. a translation bug or an undeclared argument) from a
  failed clause (the implementation under test computed something else, or raised itself).
  Tests that pass invalid input on purpose (`INVALID_INPUT_CLAUSES`) never count as crashes.
  ``python -m conformance run --peer`` exits non-zero only for crashes, collection errors, an
  unavailable adapter or a run that graded nothing: a peer's failed clauses are its table.
* `adapter_info` / `adapter_markdown`: name, version, availability, capabilities and the
  translation profile of the adapter, for ``conformance.json`` and ``conformance.md``.
* `summary_table`: implementation x clause group -> pass/fail/skip counts from committed
  ``conformance.json`` files
  (``python -m conformance summary docs/conformance/*/conformance.json``).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from .clauses import CLAUSES
from .report import Collector

#: Clauses whose tests hand the implementation invalid input on purpose: where it raises (even
#: inside an adapter's translation) is the implementation's answer, not a crash.
INVALID_INPUT_CLAUSES = frozenset({"NSA-I11-BAD-INPUT", "NSA-P23-GATE-RANGE"})

#: Clause groups of the summary table, in the order of `conformance.clauses`.
GROUPS: dict[str, tuple[str, ...]] = {
    "parity": (
        "NSA-DENSE-CROSSCHECK",
        "NSA-EQ5-SHAPES",
        "NSA-EQ5-GATE-LINEARITY",
        "NSA-P23-GATE-RANGE",
        "NSA-I1-SCALE",
        "NSA-I8-BRANCH-KV",
        "NSA-I3-PHI",
    ),
    "compression": (
        "NSA-EQ7-CMP-OUTPUT",
        "NSA-P3-CMP-VISIBILITY",
        "NSA-EQ8-PCMP",
        "NSA-P21-EMPTY-CMP",
        "NSA-P28-DEGENERATE-CMP",
    ),
    "scores": (
        "NSA-EQ9-OVERLAP",
        "NSA-P7-EQ9-IDENTITY",
        "NSA-P9-MASS",
        "NSA-P10-SUPPORT",
        "NSA-EQ10-GROUP-SUM",
    ),
    "top-n": (
        "NSA-EQ11-INDICES",
        "NSA-P14-CARDINALITY",
        "NSA-P15-FORCED",
        "NSA-P16-MAXIMALITY",
        "NSA-P17-TIE-BREAK",
        "NSA-P18-FEWER-THAN-N",
    ),
    "selection": (
        "NSA-P11-SHARED-SELECTION",
        "NSA-P19-SEL-TOKEN-CAUSAL",
        "NSA-P20-DUPLICATES",
        "NSA-P25-SEL-COVERS-ALL",
        "NSA-I6-EXACT-EXCLUSION",
    ),
    "window": (
        "NSA-I7-WINDOW-KEYS",
        "NSA-P26-WIN-COVERS-ALL",
        "NSA-P27-FULL-LIMIT",
        "NSA-P22-FIRST-TOKEN",
    ),
    "causality": (
        "NSA-P1-CAUSAL-OUTPUT",
        "NSA-P1-CAUSAL-GRAD",
        "NSA-P2-SELECTION-CAUSAL",
        "NSA-P4-PREFIX",
        "NSA-P12-HEAD-PERMUTATION",
        "NSA-P13-GROUP-INDEPENDENCE",
    ),
    "gradients": ("NSA-GRAD-PARITY",),
    "varlen": ("NSA-P6-VARLEN-PACKING", "NSA-I1-VARLEN-ORACLE"),
    "decode": ("NSA-P5-DECODE-PREFILL", "NSA-I9-CMP-EMIT", "NSA-I9-READS", "NSA-P29-READ-BOUND"),
    "errors": ("NSA-I11-BAD-INPUT", "NSA-I2-CONFIG"),
    "64k": ("NSA-LONG-CAUSAL-64K", "NSA-LONG-INDEX-BOUNDS-64K"),
    "non-finite": ("NSA-NAN-ROWS", "NSA-NAN-VARLEN-ISOLATION", "NSA-NAN-EMPTY-CMP"),
    "low precision": ("NSA-LOWP-LARGE-LOGITS",),
}


def group_of(clause_id: str) -> str:
    """The summary group of a clause (``KeyError`` for a clause no group lists)."""
    for name, ids in GROUPS.items():
        if clause_id in ids:
            return name
    raise KeyError(f"clause {clause_id!r} is in no group of conformance.grading.GROUPS")


def _source_file(obj) -> str | None:
    try:
        return inspect.getsourcefile(type(obj))
    except TypeError:
        return None


class CrashCollector(Collector):
    """`Collector` that also records exceptions raised by the adapter's own code (`crashes`)."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter_file = _source_file(adapter)
        self.crashes: list[str] = []

    def pytest_exception_interact(self, node, call, report) -> None:
        """An exception whose innermost frame is in the adapter's module is a crash."""
        ids = {cid for m in node.iter_markers("clause") for cid in m.args}
        if not ids or ids & INVALID_INPUT_CLAUSES or self.adapter_file is None:
            return
        tb = call.excinfo.traceback if call.excinfo is not None else None
        if not tb:
            return
        try:
            inside = os.path.samefile(str(tb[-1].path), self.adapter_file)
        except OSError:
            inside = False
        if inside:
            self.crashes.append(f"{node.nodeid}: {call.excinfo.typename}: {call.excinfo.value}")


def adapter_info(adapter, device: str) -> dict:
    """The adapter block of ``conformance.json``."""
    from .adapters import device_reason

    why = device_reason(adapter, device)
    version = getattr(adapter, "version", None)
    return {
        "name": adapter.name,
        "description": adapter.description,
        "version": version() if callable(version) else None,
        "runs_here": why is None,
        "unavailable": why,
        "capabilities": adapter.capabilities.summary(),
        "profile": dict(getattr(adapter, "profile", {}) or {}),
    }


def adapter_markdown(doc: dict) -> str:
    """``## Adapter`` section of ``conformance.md``: version, capabilities, profile, crashes."""
    info = doc.get("adapter")
    if not info:
        return ""
    lines = [
        "",
        f"## Adapter `{info['name']}`",
        "",
        f"Graded version: {info['version'] or 'unknown'}. Capabilities: {info['capabilities']}.",
    ]
    if info["profile"]:
        lines += ["", "| convention | how the adapter translates the spec's call |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in info["profile"].items()]
    crashes = doc.get("adapter_crashes") or []
    if crashes:
        lines += ["", "**Adapter crashes** (exceptions in the adapter's own code):", ""]
        lines += [f"- `{c}`" for c in crashes[:20]]
    return "\n".join(lines) + "\n"


def peer_exit_code(doc: dict, pytest_code: int) -> tuple[int, str]:
    """``(code, why)`` for ``run --peer``: 0 unless the run itself is broken (see module doc)."""
    if doc["collection_errors"]:
        return 1, "collection errors"
    if doc.get("adapter_crashes"):
        return 1, f"{len(doc['adapter_crashes'])} adapter crash(es)"
    info = doc.get("adapter") or {}
    if not info.get("runs_here", True):
        return 1, f"adapter unavailable: {info.get('unavailable')}"
    if pytest_code not in (0, 1, 5):
        return 1, f"pytest exit code {pytest_code}"
    graded = doc["summary"]["pass"] + doc["summary"]["fail"]
    if graded == 0:
        return 1, "no clause was graded"
    return (
        0,
        f"{graded} clauses graded ({doc['summary']['fail']} failed: the implementation's table)",
    )


def summary_table(paths: list[str | os.PathLike]) -> str:
    """Markdown: one row per report, one column per clause group, cells ``pass/fail/skip``."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    groups = list(GROUPS)
    head = ["implementation", "version", "device", *groups, "total"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for doc in docs:
        counts = {g: [0, 0, 0] for g in groups}
        for c in doc["clauses"]:
            slot = ("pass", "fail", "skip").index(c["status"])
            counts[group_of(c["id"])][slot] += 1
        info = doc.get("adapter") or {}
        total = [sum(counts[g][i] for g in groups) for i in range(3)]
        cells = [
            f"`{doc['implementation']}`",
            str(info.get("version") or "-"),
            doc["environment"].get("gpu") or doc["environment"]["device"],
            *("/".join(map(str, counts[g])) for g in groups),
            "/".join(map(str, total)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: clauses passed/failed/skipped (a skip states the missing capability or "
        "configuration in the implementation's report).",
    ]
    return "\n".join(lines) + "\n"


def _check_groups() -> None:
    """Every clause is in exactly one group (the meta tests call this)."""
    listed = [cid for ids in GROUPS.values() for cid in ids]
    known = [c.id for c in CLAUSES]
    if sorted(listed) != sorted(known):
        missing = set(known) - set(listed)
        extra = set(listed) - set(known)
        dup = {c for c in listed if listed.count(c) > 1}
        raise AssertionError(f"GROUPS: missing {missing}, unknown {extra}, duplicated {dup}")
