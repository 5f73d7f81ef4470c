"""gpu_matrix: the supported Torch <-> Triton pairs, an environment probe and the GPU lanes.

The pairs live in one data file, ``matrix.toml`` beside this module; the probe
(``python -m gpu_matrix probe``), the nox cells (``nox -s gpu_matrix``) and
``docs/gpu_matrix.md`` (``python -m gpu_matrix doc --write``) all read it through this module.

This module and ``gpu_matrix.probe`` import neither torch nor triton at module level, and nothing
here touches CUDA on import: the probe must still explain a machine where torch is missing or
broken, and the noxfile imports this module from an interpreter that has neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: nox depends on tomli there, the probe needs it too
    import tomli as tomllib

__all__ = [
    "MATRIX_FILE",
    "Pair",
    "Verdict",
    "check_pair",
    "load_matrix",
    "markdown_table",
    "minor_version",
    "pair_for_torch",
    "sync_doc",
    "triton_requirement",
]

#: The data file (package data of ``gpu_matrix``).
MATRIX_FILE = "matrix.toml"

#: Markers in docs/gpu_matrix.md between which `sync_doc` writes the generated table.
DOC_BEGIN = "<!-- BEGIN GENERATED MATRIX (python -m gpu_matrix doc --write) -->"
DOC_END = "<!-- END GENERATED MATRIX -->"

# "2.13.0+cpu", "2.6.0a0+ecf3bae40a.nv25.01", "3.2.0+git35c6c7c6", "v3.1": major.minor lead.
_VERSION_RE = re.compile(r"^\s*v?(\d+)\.(\d+)")
# A data-file version is exactly "major.minor", so a typo such as "2.1O" or "2.13.0" is caught.
_MINOR_RE = re.compile(r"^\d+\.\d+$")
# The torch version a pip requirement pins: "torch==2.13.0", "torch ~= 2.12.1", "torch===2.14".
_TORCH_PIN_RE = re.compile(r"(?:^|\s)torch\s*(?:===|==|~=)\s*v?(\d+\.\d+)")


def minor_version(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string: ``"2.13.0+cpu"`` -> ``(2, 13)``.

    Patch numbers, pre-release suffixes and local tags (``+cpu``, ``+git...``, ``.nv25.01``) are
    ignored; a string without a leading ``major.minor`` raises ``ValueError``.
    """
    match = _VERSION_RE.match(str(version))
    if match is None:
        raise ValueError(f"not a version with a major.minor prefix: {version!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class Pair:
    """One supported pair: a torch minor release and the triton minor release it goes with.

    Attributes:
        torch: torch ``major.minor`` (e.g. ``"2.13"``).
        triton: triton ``major.minor`` (e.g. ``"3.7"``).
    """

    torch: str
    triton: str

    @property
    def cell_id(self) -> str:
        """The id of this pair's nox cell: ``nox -s "gpu_matrix(torch2.13-triton3.7)"``."""
        return f"torch{self.torch}-triton{self.triton}"

    def requirements(self) -> tuple[str, str]:
        """pip requirements installing this pair, any patch release: ``("torch==2.13.*", ...)``."""
        return f"torch=={self.torch}.*", f"triton=={self.triton}.*"


@dataclass(frozen=True)
class Verdict:
    """Whether an installed torch/triton pair is supported, and why (printed by the probe)."""

    supported: bool
    reason: str


def _parse_matrix(text: str, source: str) -> tuple[Pair, ...]:
    """Validate the data file: rows ``{torch, triton}``, exact ``major.minor``, torch unique."""
    data = tomllib.loads(text)
    rows = data.get("pair")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{source}: expected a non-empty [[pair]] array")
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != {"torch", "triton"}:
            raise ValueError(f"{source}: pair #{i + 1} must have exactly the keys torch, triton")
        for key in ("torch", "triton"):
            if not isinstance(row[key], str) or not _MINOR_RE.match(row[key]):
                raise ValueError(
                    f"{source}: pair #{i + 1}: {key} must be a 'major.minor' string, "
                    f"got {row[key]!r}"
                )
        pairs.append(Pair(torch=row["torch"], triton=row["triton"]))
    torches = [minor_version(p.torch) for p in pairs]
    if len(set(torches)) != len(torches):
        raise ValueError(f"{source}: a torch release appears in more than one pair")
    if torches != sorted(torches):
        raise ValueError(f"{source}: pairs must be sorted by torch version")
    return tuple(pairs)


@cache
def load_matrix(path: str | None = None) -> tuple[Pair, ...]:
    """The supported pairs, in ascending torch order, from ``matrix.toml`` (or ``path``).

    Raises ``ValueError`` naming the row when the file is malformed.
    """
    if path is None:
        text = resources.files(__name__).joinpath(MATRIX_FILE).read_text(encoding="utf-8")
        return _parse_matrix(text, MATRIX_FILE)
    return _parse_matrix(Path(path).read_text(encoding="utf-8"), str(path))


def pair_for_torch(torch_version: str) -> Pair | None:
    """The pair whose torch minor release matches ``torch_version`` (any patch), else ``None``."""
    wanted = minor_version(torch_version)
    for pair in load_matrix():
        if minor_version(pair.torch) == wanted:
            return pair
    return None


def check_pair(torch_version: str, triton_version: str) -> Verdict:
    """Judge an installed pair against the matrix (minor releases compared, patches ignored)."""
    pairs = load_matrix()
    pair = pair_for_torch(torch_version)
    if pair is None:
        known = f"{pairs[0].torch} .. {pairs[-1].torch}"
        return Verdict(False, f"torch {torch_version} is not in the matrix (supported: {known})")
    if minor_version(triton_version) != minor_version(pair.triton):
        return Verdict(
            False,
            f"torch {torch_version} goes with triton {pair.triton}.x, but triton "
            f"{triton_version} is installed (pip install '{pair.requirements()[1]}')",
        )
    return Verdict(True, f"torch {pair.torch} <-> triton {pair.triton} is a supported pair")


def triton_requirement(torch_requirement: str) -> str | None:
    """The triton pip requirement matching a pinned torch requirement, else ``None``.

    ``"torch==2.13.0"`` -> ``"triton==3.7.*"``; a range (``"torch>=2.4"``) or a torch outside the
    matrix pins nothing. Used by the noxfile to install the triton that goes with its torch.
    """
    match = _TORCH_PIN_RE.search(torch_requirement)
    if match is None:
        return None
    pair = pair_for_torch(match.group(1))
    return None if pair is None else pair.requirements()[1]


def markdown_table() -> str:
    """The matrix as a markdown table: torch, triton, the nox cell that installs the pair."""
    lines = ["| torch | triton | nox cell |", "|---|---|---|"]
    for pair in load_matrix():
        lines.append(f"| {pair.torch} | {pair.triton} | `gpu_matrix({pair.cell_id})` |")
    return "\n".join(lines) + "\n"


def sync_doc(text: str) -> str:
    """``text`` (docs/gpu_matrix.md) with the generated table between the markers replaced.

    Raises ``ValueError`` when a marker is missing, so a doc cannot silently lose its table.
    """
    start, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if start < 0 or end < start:
        raise ValueError(f"the document needs the markers {DOC_BEGIN!r} and {DOC_END!r}")
    head = text[: start + len(DOC_BEGIN)]
    return f"{head}\n{markdown_table()}{text[end:]}"
