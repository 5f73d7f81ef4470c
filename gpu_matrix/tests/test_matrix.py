"""The data file and the functions that read it (CPU, no torch needed)."""

from __future__ import annotations

import pytest

import gpu_matrix
from gpu_matrix import (
    Pair,
    check_pair,
    load_matrix,
    markdown_table,
    minor_version,
    pair_for_torch,
    sync_doc,
    triton_requirement,
)
from gpu_matrix.__main__ import DEFAULT_DOC

# The pairs issue 4 asks for, written out independently of matrix.toml on purpose: editing the
# data file by mistake must fail here.
ISSUE_PAIRS = {
    "2.4": "3.0", "2.5": "3.1", "2.6": "3.2", "2.7": "3.3", "2.8": "3.4", "2.9": "3.5",
    "2.10": "3.6", "2.11": "3.6", "2.12": "3.7", "2.13": "3.7", "2.14": "3.8",
}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.13.0+cpu", (2, 13)),
        ("2.6.0a0+ecf3bae40a.nv25.01", (2, 6)),
        ("3.2.0+git35c6c7c6", (3, 2)),
        ("2.10", (2, 10)),
        ("v3.1.0", (3, 1)),
        ("2.14.0.dev20261101+cu128", (2, 14)),
    ],
)
def test_minor_version_ignores_patch_and_local_tags(text, expected):
    assert minor_version(text) == expected


@pytest.mark.parametrize("text", ["", "unknown", "2", "two.13", ".13"])
def test_minor_version_rejects_non_versions(text):
    with pytest.raises(ValueError, match="major.minor"):
        minor_version(text)


def test_matrix_is_exactly_the_issue_pairs():
    pairs = load_matrix()
    assert {p.torch: p.triton for p in pairs} == ISSUE_PAIRS
    assert len(pairs) == len(ISSUE_PAIRS)  # no duplicate rows hiding behind the dict
    assert [minor_version(p.torch) for p in pairs] == sorted(minor_version(t) for t in ISSUE_PAIRS)


def test_cell_ids_and_requirements():
    pair = Pair("2.13", "3.7")
    assert pair.cell_id == "torch2.13-triton3.7"
    assert pair.requirements() == ("torch==2.13.*", "triton==3.7.*")
    assert len({p.cell_id for p in load_matrix()}) == len(load_matrix())


@pytest.mark.parametrize(
    ("torch", "triton"),
    [("2.4.1", "3.0.0"), ("2.10.0+cu128", "3.6.0"), ("2.11.0", "3.6.1"), ("2.13.0+cpu", "3.7.1")],
)
def test_supported_pairs(torch, triton):
    verdict = check_pair(torch, triton)
    assert verdict.supported, verdict.reason


def test_wrong_triton_is_unsupported_and_names_the_right_one():
    verdict = check_pair("2.13.0+cpu", "3.9.0")
    assert not verdict.supported
    assert "triton==3.7.*" in verdict.reason and "3.9.0" in verdict.reason


@pytest.mark.parametrize("torch", ["2.3.1", "2.15.0", "3.0.0"])
def test_torch_outside_the_matrix_is_unsupported(torch):
    verdict = check_pair(torch, "3.0.0")
    assert not verdict.supported
    assert "not in the matrix" in verdict.reason and "2.4 .. 2.14" in verdict.reason


def test_pair_for_torch():
    assert pair_for_torch("2.12.1") == Pair("2.12", "3.7")
    assert pair_for_torch("2.1.0") is None


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        ("torch==2.13.0", "triton==3.7.*"),
        ("torch == 2.9.1 --index-url https://example.invalid/cpu", "triton==3.5.*"),
        ("torch~=2.4.0", "triton==3.0.*"),
        ("torch>=2.4", None),  # a range pins no triton
        ("torch==2.2.0", None),  # outside the matrix
        ("pytorch-lightning==2.13.0", None),  # not torch itself
    ],
)
def test_triton_requirement(requirement, expected):
    assert triton_requirement(requirement) == expected


BAD_FILES = [
    ("", "non-empty"),
    ('[[pair]]\ntorch = "2.4"\n', "exactly the keys"),
    ('[[pair]]\ntorch = "2.4"\ntriton = "3.0"\nnote = "x"\n', "exactly the keys"),
    ('[[pair]]\ntorch = "2.4.0"\ntriton = "3.0"\n', "major.minor"),
    ('[[pair]]\ntorch = 2.4\ntriton = "3.0"\n', "major.minor"),
    ('[[pair]]\ntorch = "2.4"\ntriton = "3.0"\n[[pair]]\ntorch = "2.4"\ntriton = "3.1"\n', "more"),
    ('[[pair]]\ntorch = "2.10"\ntriton = "3.6"\n[[pair]]\ntorch = "2.9"\ntriton = "3.5"\n', "sort"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_malformed_matrix_is_rejected(tmp_path, text, message):
    path = tmp_path / "matrix.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_matrix(str(path))


def test_markdown_table_lists_every_pair():
    lines = markdown_table().splitlines()
    assert lines[0] == "| torch | triton | nox cell |"
    rows = lines[2:]
    assert len(rows) == len(load_matrix())
    for pair, row in zip(load_matrix(), rows, strict=True):
        assert row == f"| {pair.torch} | {pair.triton} | `gpu_matrix({pair.cell_id})` |"


def test_doc_is_in_sync_with_the_data_file():
    text = DEFAULT_DOC.read_text(encoding="utf-8")
    assert sync_doc(text) == text, "docs/gpu_matrix.md is stale: python -m gpu_matrix doc --write"


def test_sync_doc_replaces_only_between_markers():
    stale = f"head\n{gpu_matrix.DOC_BEGIN}\n| old |\n{gpu_matrix.DOC_END}\ntail\n"
    fresh = sync_doc(stale)
    assert fresh.startswith(f"head\n{gpu_matrix.DOC_BEGIN}\n| torch |")
    assert fresh.endswith(f"{gpu_matrix.DOC_END}\ntail\n") and "| old |" not in fresh
    with pytest.raises(ValueError, match="markers"):
        sync_doc("no markers here")


def test_doc_check_cli(tmp_path, run_python):
    stale = tmp_path / "doc.md"
    stale.write_text(f"{gpu_matrix.DOC_BEGIN}\n{gpu_matrix.DOC_END}\n")
    check = run_python("-m", "gpu_matrix", "doc", "--check", "--path", str(stale))
    assert check.returncode == 1 and "out of date" in check.stdout
    write = run_python("-m", "gpu_matrix", "doc", "--write", "--path", str(stale))
    assert write.returncode == 0, write.stderr
    assert run_python("-m", "gpu_matrix", "doc", "--check", "--path", str(stale)).returncode == 0
    table = run_python("-m", "gpu_matrix", "table")
    assert table.returncode == 0 and table.stdout == markdown_table()
