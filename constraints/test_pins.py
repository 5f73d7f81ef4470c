"""The pinned toolchain: the committed constraints files, and the helpers that read and write them.

``constraints/pins.py`` is loaded by path, as the noxfile loads it (it is no package).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load():
    spec = importlib.util.spec_from_file_location("nsa_pins_under_test", HERE / "pins.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pins = _load()
CI_TEXT = pins.CI.read_text(encoding="utf-8")


def test_ci_txt_pins_the_test_toolchain_exactly():
    _, sections = pins.parse(CI_TEXT, "ci.txt")  # raises on anything but exact pins
    by_name = {s.name: s for s in sections}
    assert list(by_name) == ["tests", "torch-deps", "triton", "lint", "peers"]
    tests = by_name["tests"].pins
    for name in ("pytest", "pytest-xdist", "hypothesis", "numpy", "pluggy", "iniconfig"):
        assert re.fullmatch(r"\d+(\.\d+)+", tests.get(name, "")), (name, tests)
    assert "triton" in by_name["triton"].pins
    assert "ruff" in by_name["lint"].pins
    every = pins.all_pins(CI_TEXT)
    assert "torch" not in every and "pip" not in every  # torch: NSA_TORCH_SPEC; pip: the venv
    assert pins.python_of(CI_TEXT) == "3.11"  # CI's Python (.github/workflows/ci.yml)


def test_torch_bound_sections_are_for_the_noxfiles_default_torch():
    # the noxfile refuses to run when they differ; this says so before anyone runs nox
    default = re.search(r'^DEFAULT_TORCH_SPEC = "(.+)"$', (ROOT / "noxfile.py").read_text(), re.M)
    assert default is not None
    assert pins.torch_bound(CI_TEXT) == {default[1]}


def test_nox_txt_pins_nox():
    text = pins.NOX.read_text(encoding="utf-8")
    assert "nox" in pins.all_pins(text) and "virtualenv" in pins.all_pins(text)
    assert pins.python_of(text) == pins.python_of(CI_TEXT)


def test_refresh_rewrites_the_same_file_from_the_same_resolution():
    # render(parse(x)) == x: a refresh that resolves the same versions changes nothing, keeps
    # the hand-written [peers] section, and no header line can be read as a section
    _, sections = pins.parse(CI_TEXT)
    resolved = [
        (s.name, s.torch, s.note, pins.parse_freeze("\n".join(s.lines)))  # names as spelled
        for s in sections
        if s.name != "peers"
    ]
    assert pins.render_ci(pins.python_of(CI_TEXT), resolved, CI_TEXT) == CI_TEXT
    peers = "# [peers] by hand\nfla-core==0.1.0\n"
    again = pins.render_ci("3.11", resolved, CI_TEXT.replace(sections[-1].header + "\n", peers))
    assert pins.all_pins(again)["fla-core"] == "0.1.0"


def test_sections_bound_to_another_torch_are_left_out():
    text = (
        "# python: 3.11\n# [tests] t\npytest==9.2.0\n# [deps for torch==2.13.0] d\nsympy==1.14.0\n"
    )
    same, dropped = pins.for_torch(text, "torch==2.13.0")
    assert dropped == [] and pins.all_pins(same) == {"pytest": "9.2.0", "sympy": "1.14.0"}
    other, dropped = pins.for_torch(text, "torch==2.12.0")
    assert dropped == ["deps"] and pins.all_pins(other) == {"pytest": "9.2.0"}
    assert pins.all_pins(pins.for_torch(text, None)[0]) == {"pytest": "9.2.0"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# [a] x\npytest>=9\n", "exact pin"),
        ("pytest==9.2.0\n", "before the first"),
        ("# [a] x\npytest==9.2.0\n# [b] y\nPyTest==9.1.0\n", "pinned twice"),
        ("# [a] x\n# [a] y\n", "second section"),
    ],
)
def test_malformed_constraints_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        pins.parse(text, "c.txt")


def test_mismatches_compare_normalized_names():
    text = "# [a] x\ntyping_extensions==4.16.0\nJinja2==3.1.6\n"
    assert pins.mismatches(text, {"typing-extensions": "4.16.0", "jinja2": "3.1.6"}) == []
    assert pins.mismatches(text, {"Jinja2": "3.1.5", "other": "1"}) == [
        "jinja2: installed 3.1.5, pinned 3.1.6"
    ]
    assert pins.parse_freeze("-e git+x#egg=nsa\nJinja2==3.1.6\n") == {"Jinja2": "3.1.6"}


def test_installed_environment_matches_its_constraints():
    """In a nox session (NSA_CONSTRAINTS names the file it installed under) the test process
    sees the pinned versions."""
    path = os.environ.get("NSA_CONSTRAINTS")
    if not path or not Path(path).is_file():
        pytest.skip(f"not installed under a constraints file (NSA_CONSTRAINTS={path!r})")
    # the first distribution of a name on sys.path is the one imported; later ones (e.g. the
    # copies setuptools vendors and puts on sys.path once imported) are shadowed by it
    installed: dict[str, str] = {}
    for d in metadata.distributions():
        installed.setdefault(d.metadata["Name"], d.version)
    assert pins.mismatches(Path(path).read_text(encoding="utf-8"), installed) == []
