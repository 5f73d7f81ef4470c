"""Read and write the pinned test toolchain, ``constraints/ci.txt`` (stdlib only).

The noxfile loads this file by path (it is not part of the installed package) to pick the
constraints a session installs under, to check an environment against them, and to write them
anew in ``nox -s refresh_constraints``. The format is a pip constraints file cut into sections
by comment lines::

    # python: 3.11                                  (the Python the pins were resolved on)
    # [tests] what the test extra pulls             (a section)
    pytest==9.2.0
    # [torch-deps for torch==2.13.0] ...            (bound to one torch requirement)
    sympy==1.14.0

A section bound to a torch requirement (``for torch==...``) holds what that torch (or the
triton paired with it) pulls; it applies only when that torch is the one being installed, so a
session installing another torch (``NSA_TORCH_SPEC``, a ``gpu_matrix`` pair) leaves it out.
``HAND_SECTIONS`` are written by people (the peer packages graded by the conformance suite):
the refresh copies them as they are.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CI = HERE / "ci.txt"
NOX = HERE / "nox.txt"
#: Sections pinned by hand; the refresh keeps their lines verbatim.
HAND_SECTIONS = ("peers",)
#: Never pinned in ci.txt: torch comes from NSA_TORCH_SPEC, pip from the virtualenv.
UNPINNED = ("torch", "pip")

_SECTION_RE = re.compile(r"^# \[(?P<name>[a-z][a-z0-9-]*)(?: for (?P<torch>\S+))?\](?P<note>.*)$")
_PIN_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)\s*(?:#.*)?$")
_PYTHON_RE = re.compile(r"^# python: (?P<python>\d+\.\d+)\s*$", re.MULTILINE)


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (``Jinja2`` -> ``jinja2``, ``typing_extensions`` ->
    ``typing-extensions``), so pins and installed names compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Section:
    """One ``# [name]`` block of a constraints file: its header line and the lines under it."""

    name: str
    torch: str | None  # the torch requirement it is bound to, or None
    header: str
    note: str = ""  # the header's text after the brackets
    lines: list[str] = field(default_factory=list)

    @property
    def pins(self) -> dict[str, str]:
        """``{normalized name: version}`` of the ``name==version`` lines."""
        return {normalize(m["name"]): m["version"] for m in map(_PIN_RE.match, self.lines) if m}


def parse(text: str, source: str = "constraints") -> tuple[list[str], list[Section]]:
    """``(preamble lines, sections)`` of a constraints file.

    Raises ``ValueError`` naming ``source`` and the line for a requirement that is not an exact
    ``name==version`` pin, a pin outside any section, a name pinned twice, or a section name
    used twice.
    """
    preamble: list[str] = []
    sections: list[Section] = []
    seen: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        match = _SECTION_RE.match(line)
        if match:
            if any(s.name == match["name"] for s in sections):
                raise ValueError(f"{source}:{number}: a second section [{match['name']}]")
            sections.append(Section(match["name"], match["torch"], line, match["note"].strip()))
            continue
        if line and not line.startswith("#"):
            pin = _PIN_RE.match(line)
            if pin is None:
                raise ValueError(
                    f"{source}:{number}: expected an exact pin name==version: {line!r}"
                )
            if not sections:
                raise ValueError(f"{source}:{number}: pin {line!r} before the first # [section]")
            name = normalize(pin["name"])
            if name in seen:
                raise ValueError(f"{source}:{number}: {name} pinned twice (also in [{seen[name]}])")
            seen[name] = sections[-1].name
        (sections[-1].lines if sections else preamble).append(line)
    return preamble, sections


def python_of(text: str) -> str | None:
    """The ``major.minor`` Python the pins were resolved on (the ``# python:`` line), or None."""
    match = _PYTHON_RE.search(text)
    return match["python"] if match else None


def all_pins(text: str) -> dict[str, str]:
    """Every ``{normalized name: version}`` pin of the file."""
    return {k: v for s in parse(text)[1] for k, v in s.pins.items()}


def torch_bound(text: str) -> set[str]:
    """The torch requirements that sections of the file are bound to."""
    return {s.torch for s in parse(text)[1] if s.torch}


def for_torch(text: str, torch: str | None) -> tuple[str, list[str]]:
    """The file with the sections bound to a torch other than ``torch`` left out.

    ``torch`` is the torch requirement being installed (``torch==2.13.0``), or ``None`` to leave
    out every torch-bound section. Returns ``(text, names of the sections left out)``.
    """
    preamble, sections = parse(text)
    kept = [s for s in sections if s.torch is None or s.torch == torch]
    dropped = [s.name for s in sections if s.torch is not None and s.torch != torch]
    lines = preamble + [ln for s in kept for ln in [s.header, *s.lines]]
    return "\n".join(lines) + "\n", dropped


def mismatches(text: str, installed: dict[str, str]) -> list[str]:
    """``name: installed X, pinned Y`` for each pinned distribution installed at another version.

    ``installed`` maps distribution names (any spelling) to versions, e.g. from ``pip freeze``.
    """
    have = {normalize(k): v for k, v in installed.items()}
    pins = all_pins(text)
    return [
        f"{name}: installed {have[name]}, pinned {pins[name]}"
        for name in sorted(pins)
        if name in have and have[name] != pins[name]
    ]


def parse_freeze(output: str) -> dict[str, str]:
    """``{name: version}`` from ``pip freeze`` output (editable and URL lines are skipped)."""
    return {m["name"]: m["version"] for m in map(_PIN_RE.match, output.splitlines()) if m}


def short_hash(path: str | Path) -> str:
    """The first 12 hex digits of the sha256 of a file's bytes (how reports name a version)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


_CI_HEADER = """\
# constraints/ci.txt: the pinned test toolchain. Every pip install of a nox session runs under it
# (`pip install -c constraints/ci.txt ...`, see noxfile.py), so a fresh clone resolves the same
# versions on every machine and every day. The conformance report's environment block names the
# file and the first 12 hex digits of its sha256, beside the versions actually imported.
#
# Refresh (re-resolves the unpinned requirements in fresh virtualenvs and rewrites this file and
# constraints/nox.txt; then review the diff, run the tests, commit both files):
#
#     python -m nox -s refresh_constraints
#
# Sections: the one named tests is what the test extra pulls; those named torch-deps and triton
# are what one torch and the triton paired with it pull, and are bound to that torch (nox applies
# them only when it installs it: another NSA_TORCH_SPEC or a gpu_matrix pair leaves them out);
# lint is the lint extra; peers pins the peer packages graded by the conformance suite, by hand,
# and the refresh keeps it as written. torch itself is pinned by NSA_TORCH_SPEC (noxfile.py).
# Generated by refresh_constraints except [peers]; the pins hold on the Python named below
# (nox installs unpinned, and says so, on another one).
#
# python: {python}
"""

_NOX_HEADER = """\
# constraints/nox.txt: nox and what it pulls, for the interpreter that runs nox (.ci/run does
# `python -m pip install -c constraints/nox.txt nox`). Written by `python -m nox -s
# refresh_constraints` together with constraints/ci.txt (see there).
#
# python: {python}
"""

_PEERS_DEFAULT = [
    "# [peers] peer packages graded by the conformance suite (pinned by hand; kept by the refresh)",
    "# One name==version line per peer NSA package whose conformance adapter the suite runs, plus",
    "# whatever it pulls that no section above pins.",
]


def render_ci(
    python: str, resolved: list[tuple[str, str | None, str, dict[str, str]]], old: str | None
) -> str:
    """A new ci.txt: the header, the ``resolved`` sections ``(name, torch, note, pins)`` in
    order, then the hand sections of ``old`` (the current file) as they are."""
    lines = _CI_HEADER.format(python=python).splitlines()
    assert not parse("\n".join(lines))[1], "a header line reads as a section"
    for name, torch, note, pins in resolved:
        bound = f" for {torch}" if torch else ""
        lines += ["", f"# [{name}{bound}] {note}"]
        lines += [f"{k}=={v}" for k, v in sorted(pins.items(), key=lambda kv: normalize(kv[0]))]
    hand = [s for s in parse(old)[1] if s.name in HAND_SECTIONS] if old else []
    for section in hand or [None]:
        block = _PEERS_DEFAULT if section is None else [section.header, *section.lines]
        while block and not block[-1].strip():
            block = block[:-1]
        lines += ["", *block]
    return "\n".join(lines) + "\n"


def render_nox(python: str, pins: dict[str, str]) -> str:
    """A new nox.txt: its header and one section of pins."""
    lines = _NOX_HEADER.format(python=python).splitlines() + [
        "",
        "# [nox] nox and its dependencies",
    ]
    lines += [f"{k}=={v}" for k, v in sorted(pins.items(), key=lambda kv: normalize(kv[0]))]
    return "\n".join(lines) + "\n"
