"""The clause registry and its tests: ids are unique and well formed, every clause has a test."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import conformance.tests
from conformance import adapters, clauses


def _clause_marks() -> dict[str, list[str]]:
    """clause id -> test functions carrying it, read from the ``clause`` markers of every test."""
    found: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(conformance.tests.__path__):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"conformance.tests.{info.name}")
        for name, fn in vars(module).items():
            if not (name.startswith("test_") and callable(fn)):
                continue
            for mark in getattr(fn, "pytestmark", []):
                if mark.name == "clause":
                    for cid in mark.args:
                        found.setdefault(cid, []).append(f"{info.name}.{name}")
    return found


def test_at_least_thirty_clauses():
    assert len(clauses.CLAUSES) >= 30


def test_clause_ids_are_unique_and_well_formed():
    ids = [c.id for c in clauses.CLAUSES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    for cid in ids:
        assert re.fullmatch(r"NSA(-[A-Z0-9]+)+", cid), cid


def test_every_clause_has_a_test_and_every_marker_a_clause():
    marks = _clause_marks()
    missing = [c.id for c in clauses.CLAUSES if c.id not in marks]
    unknown = sorted(set(marks) - set(clauses.BY_ID))
    assert not missing, f"clauses without a test: {missing}"
    assert not unknown, f"tests marked with unregistered clauses: {unknown}"


def test_clause_fields():
    caps = {f.name for f in dataclasses.fields(adapters.Capabilities)} | {"cuda", "long_context"}
    for c in clauses.CLAUSES:
        assert c.title and c.paper and c.spec and len(c.statement) > 20, c.id
        assert c.tolerance in clauses.TOLERANCE_CLASSES, c.id
        assert set(c.needs) <= caps, (c.id, set(c.needs) - caps)


def test_properties_p1_to_p29_are_covered():
    """Each of the spec's properties P1-P29 appears in some clause's spec reference (P8 and
    P24 are folded into the Eq. 9 overlap and gate-linearity clauses)."""
    text = " ".join(c.spec for c in clauses.CLAUSES)
    covered = {int(n) for n in re.findall(r"\bP(\d+)\b", text)}
    assert set(range(1, 30)) <= covered, sorted(set(range(1, 30)) - covered)


def test_unknown_clause_lookup_names_the_known_ids():
    with pytest.raises(KeyError, match="NSA-EQ9-OVERLAP"):
        clauses.get("NSA-NOPE")


SPEC = Path(__file__).resolve().parents[2] / "docs" / "spec" / "NSA-SPEC.md"


def spec_sections(text: str) -> set[str]:
    """The citable sections of the spec: ``I.n`` headings, ``**Pn`` properties, ``**An`` items."""
    found = set(re.findall(r"^### (I\.\d+) ", text, flags=re.M))
    found |= set(re.findall(r"^\* \*\*([PA]\d+)[ .*]", text, flags=re.M))
    return found


def cited(spec: str) -> list[str]:
    """Section tokens of a clause's ``spec`` field: ``"I.1-I.8, P24"`` -> I.1 ... I.8, P24."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"I\.(\d+)-I\.(\d+)", part)
        out += [f"I.{n}" for n in range(int(m[1]), int(m[2]) + 1)] if m else [part]
    return out


def test_every_cited_spec_section_exists():
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is not here (an installed package without the repository)")
    sections = spec_sections(SPEC.read_text(encoding="utf-8"))
    assert {"I.1", "I.11", "P1", "P29", "A1", "A17"} <= sections
    missing = {c.id: s for c in clauses.CLAUSES for s in cited(c.spec) if s not in sections}
    assert not missing, f"clauses cite sections that docs/spec/NSA-SPEC.md does not have: {missing}"
