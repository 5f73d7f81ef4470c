"""The repository is self-contained: every relative link in README.md and docs/ resolves inside
it (files and, for markdown targets, heading anchors), and no tracked text points outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def _links(text: str) -> list[str]:
    """Markdown link targets outside fenced code blocks and inline code."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            anchors.add(base if n == 0 else f"{base}-{n}")
    anchors.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', path.read_text(encoding="utf-8")))
    return anchors


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """Relative link targets of ``doc`` that do not resolve inside ``root``."""
    broken = []
    for target in _links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists() or root not in (dest, *dest.parents):
            broken.append(f"{target} (no such file inside the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    return broken


def test_github_anchor_rules():
    assert github_anchor("I.3 Compression branch (Eqs. 7–8)") == "i3-compression-branch-eqs-78"
    assert (
        github_anchor("Part I — the normative contract (0-based, as code sees it)")
        == "part-i--the-normative-contract-0-based-as-code-sees-it"
    )


def test_the_checker_finds_broken_links(tmp_path: Path):
    (tmp_path / "a.md").write_text("# Title\n\n## Second part\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](a.md) [ok](a.md#second-part) [web](https://example.org/x)\n"
        "[gone](b.md) [bad anchor](a.md#third) [out](../elsewhere.md)\n"
        "```\n[in a fence](nowhere.md)\n```\n"
    )
    assert broken_links(doc, tmp_path) == [
        "b.md (no such file inside the repository)",
        "a.md#third (no heading with anchor #third)",
        "../elsewhere.md (no such file inside the repository)",
    ]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_resolve(doc: Path):
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_docs_exist():
    for name in ("NSA-SPEC.md", "API.md"):
        assert (ROOT / "docs" / "spec" / name).is_file(), name


def test_no_tracked_file_points_outside_the_repository():
    # spelled in parts so that this file does not match itself
    outside = ["/".join(["..", "shared"]), "/".join(["", "work", "shared"])]
    try:
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    hits = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if path.is_file() and path.stat().st_size < 2**22:
            text = path.read_text(encoding="utf-8", errors="ignore")
            if any(o in text for o in outside):
                hits.append(name.decode())
    assert not hits, f"tracked files mention {outside}: {hits}"
