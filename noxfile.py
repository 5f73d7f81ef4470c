"""Nox sessions: ``cpu_parity`` (the default), ``conformance``, ``lint``, ``gpu_matrix``, ``bench``,
``refresh_constraints``.

    python -m pip install -c constraints/nox.txt nox && python -m nox -s cpu_parity   # .ci/run
    python -m nox -s conformance -- nsa_impl                     # the conformance report
    python -m nox -s lint
    python -m nox -s gpu_matrix                                  # GPU machines; skips elsewhere
    python -m nox -s bench
    python -m nox -s refresh_constraints                         # re-pin the test toolchain

Every session reuses its virtualenv; arguments after ``--`` pass through (to pytest, to the
conformance CLI, to ruff, to the benchmark).

Pinned toolchain: every install runs under ``constraints/ci.txt`` (``pip install -c``; its
header says what is pinned and how), so pytest, pytest-xdist, hypothesis, numpy, triton, ruff
and what they pull resolve to the same versions on every machine; nox itself is pinned by
``constraints/nox.txt`` (``.ci/run``). Sections of ci.txt bound to a torch requirement apply
only when that torch is installed. After the installs a session checks that each pinned package
is installed at its pin, and exports ``NSA_CONSTRAINTS`` (the file it installed under), which the
conformance report records with a hash of the file. ``python -m nox -s refresh_constraints``
re-resolves everything unpinned in a fresh virtualenv and rewrites both files.

Environment knobs:

- ``NSA_TORCH_SPEC`` (default ``torch==2.13.0``): the pip arguments installing torch, split like a
  shell line, e.g. ``"torch==2.13.0 --index-url <a CPU wheel index>"``. Installed before the
  project so that the project's ``torch>=2.4`` is already satisfied and pip takes no other build.
- ``NSA_TRITON_SPEC``: the triton requirement; default: the triton that ``gpu_matrix/matrix.toml``
  pairs with the pinned torch (``triton==3.7.*`` for 2.13). ``none`` installs no triton. Triton is
  optional on the CPU: when pip cannot install it the session goes on and says why (its
  interpreter tests then skip).
- ``NSA_GPU_MATRIX_PYTHON``: the interpreter of the ``gpu_matrix(installed)`` cell (default: the
  ``python`` on ``PATH``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).resolve().parent
# gpu_matrix is stdlib-only at import, so the noxfile reads the matrix through it without torch.
sys.path.insert(0, str(ROOT))
from gpu_matrix import load_matrix, triton_requirement  # noqa: E402
from gpu_matrix.probe import nvidia_smi  # noqa: E402

nox.options.sessions = ["cpu_parity"]
nox.options.error_on_external_run = True


def _load_pins():
    """``constraints/pins.py``, loaded by path: it is a helper of this file, not a package."""
    spec = importlib.util.spec_from_file_location("nsa_pins", ROOT / "constraints" / "pins.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pins = _load_pins()

REPORTS = ROOT / "reports"
DEFAULT_TORCH_SPEC = "torch==2.13.0"
TORCH_SPEC = os.environ.get("NSA_TORCH_SPEC", DEFAULT_TORCH_SPEC)
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"  # the sessions' (nox's own)


def _torch_requirement(spec: str) -> str | None:
    """The torch requirement among the pip arguments of a torch spec (``torch==2.13.0``)."""
    for arg in shlex.split(spec):
        if not arg.startswith("-") and pins.normalize(re.split(r"[<>=!~;\[ ]", arg)[0]) == "torch":
            return arg
    return None


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (how logs and reports name files)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _constraints(session: nox.Session, torch: str | None) -> list[str]:
    """The ``-c FILE`` arguments of this session's installs; the file is exported as
    ``NSA_CONSTRAINTS`` for the conformance report.

    ``torch`` is the torch requirement the session installs (``None``: a gpu_matrix pair).
    The file is constraints/ci.txt, or a copy in the session's tmp folder without the sections
    bound to another torch. On a Python other than the one the pins were resolved on there is
    none (the pins may not exist for it): the session installs unpinned and says so.
    """
    text = pins.CI.read_text(encoding="utf-8")
    resolved_on = pins.python_of(text)
    if resolved_on != PYTHON:
        why = f"constraints/ci.txt holds pins for Python {resolved_on}, this is Python {PYTHON}"
        session.warn(f"{why}: installing unpinned")
        session.env["NSA_CONSTRAINTS"] = f"none ({why})"
        return []
    bound = pins.torch_bound(text)
    if "NSA_TORCH_SPEC" not in os.environ and torch not in bound:
        session.error(
            f"constraints/ci.txt was resolved for {', '.join(sorted(bound))}, but the noxfile's "
            f"default torch is {torch}: run python -m nox -s refresh_constraints"
        )
    kept, dropped = pins.for_torch(text, torch)
    path = pins.CI
    if dropped:
        path = Path(session.create_tmp()) / f"ci-without-{'-'.join(dropped)}.txt"
        path.write_text(kept, encoding="utf-8")
        session.log(
            f"constraints: {_rel(path)}, i.e. constraints/ci.txt without [{'], ['.join(dropped)}] "
            f"(bound to {', '.join(sorted(bound))}; this session installs {torch or 'its pair'})"
        )
    session.env["NSA_CONSTRAINTS"] = _rel(path)
    return ["-c", str(path)]


def _check_pins(session: nox.Session, pin: list[str]) -> None:
    """Fail unless every pinned package that is installed has its pinned version."""
    if not pin:
        return
    frozen = session.run("python", "-m", "pip", "freeze", "--all", silent=True)
    bad = pins.mismatches(Path(pin[1]).read_text(encoding="utf-8"), pins.parse_freeze(frozen))
    if bad:
        session.error(f"installed versions differ from {_rel(Path(pin[1]))}: {'; '.join(bad)}")


def _triton_spec() -> str | None:
    """The triton requirement for this run (see ``NSA_TRITON_SPEC``); ``None``: do not install."""
    spec = os.environ.get("NSA_TRITON_SPEC", "").strip()
    if spec.lower() == "none":
        return None
    return spec or triton_requirement(TORCH_SPEC) or "triton"


def _install_project(session: nox.Session, extras: str = "test") -> None:
    """torch (``NSA_TORCH_SPEC``), then triton when pip can get it, then the project, editable;
    all but torch under the constraints, then checked against them."""
    pin = _constraints(session, _torch_requirement(TORCH_SPEC))
    # torch alone, without the constraints: NSA_TORCH_SPEC may name an index of its own (the CPU
    # wheels) that lacks the pinned versions of torch's dependencies; the project's install below
    # resolves torch's dependencies again, under the constraints, and moves them to their pins.
    session.install(*shlex.split(TORCH_SPEC))
    triton = _triton_spec()
    if triton is None:
        session.log("NSA_TRITON_SPEC=none: no triton; the Triton interpreter tests will skip")
    else:
        try:
            session.install(triton, *pin)
        except CommandFailed as exc:
            session.log(
                f"continuing without triton: pip could not install {triton!r} ({exc.reason}); "
                "the Triton interpreter tests will skip"
            )
    session.install("-e", f".[{extras}]" if extras else ".", *pin)
    _check_pins(session, pin)


def _conformance(
    session: nox.Session, impl: str, report_dir: Path, *args: str, python: str = "python", **kw
) -> None:
    """``python -m conformance run --impl IMPL --report DIR [args]`` (fails on a failed clause)."""
    cmd = ["-m", "conformance", "run", "--impl", impl, "--report", str(report_dir), *args]
    session.run(python, *cmd, **kw)


@nox.session(reuse_venv=True)
def cpu_parity(session: nox.Session) -> None:
    """The CPU test suite (-n 2), then conformance reports for nsa_ref and nsa_impl (default).

    Installs CPU torch and triton, runs the unit, conformance-clause and property tests with
    ``TRITON_INTERPRET=1`` (pytest's exit 5, "no tests collected", fails the session like any
    failure; ``reports/pytest.xml`` records the run), then writes ``reports/nsa_ref/`` and
    ``reports/nsa_impl/``. Each mutant run stops at its first failed clause (``--fast``: a
    mutant is killed by one; the full kill table is the conformance session's), which keeps
    the session inside CI's 10 minutes on 2 cores.
    """
    _install_project(session)
    # No GPU here: triton can only run in its interpreter, so the kernel tests use it.
    env = {"TRITON_INTERPRET": "1"}
    junit = f"--junitxml={REPORTS / 'pytest.xml'}"
    session.run("python", "-m", "pytest", "-n", "2", junit, *session.posargs, env=env)
    for impl in ("nsa_ref", "nsa_impl"):
        _conformance(session, impl, REPORTS / impl, "--fast")


@nox.session(reuse_venv=True)
def conformance(session: nox.Session) -> None:
    """The conformance report in reports/ for IMPL (``-- IMPL [CLI args]``; default nsa_ref).

    Further arguments go to the CLI, e.g. ``nox -s conformance -- nsa_impl --device cuda``.
    """
    impl, *rest = session.posargs or ["nsa_ref"]
    _install_project(session)
    _conformance(session, impl, REPORTS, *rest)


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """ruff check over the repository (ruff from the lint extra; no torch installed)."""
    project = nox.project.load_toml(str(ROOT / "pyproject.toml"))["project"]
    pin = _constraints(session, _torch_requirement(TORCH_SPEC))
    session.install(*project["optional-dependencies"]["lint"], *pin)
    _check_pins(session, pin)
    session.run("ruff", "check", *(session.posargs or ["."]))


@nox.session(reuse_venv=True)
def bench(session: nox.Session) -> None:
    """The CPU benchmark bench/cpu_bench.py (arguments after ``--`` go to it)."""
    _install_project(session, extras="")
    session.run("python", "bench/cpu_bench.py", *session.posargs)


@nox.session(reuse_venv=False)
def refresh_constraints(session: nox.Session) -> None:
    """Rewrite constraints/ci.txt and constraints/nox.txt from fresh, unpinned resolutions.

    In this session's virtualenv (created anew every time), one step after another, unpinned:
    ``NSA_TORCH_SPEC``, its triton, the project's test extra, the lint extra. Each package goes
    to the section of the step that first added or changed it, at its final version (torch,
    pip and the project are left out). nox.txt: ``pip install nox`` in a new stdlib venv. The
    hand-written ``[peers]`` section is kept. Review ``git diff constraints/`` afterwards.
    """
    torch = _torch_requirement(TORCH_SPEC)
    triton = _triton_spec()
    if torch is None or triton is None:
        session.error(f"cannot pin: NSA_TORCH_SPEC={TORCH_SPEC!r} names no torch, or no triton")

    def freeze(python: str = "python") -> dict[str, str]:
        args = ("-m", "pip", "freeze", "--all", "--exclude-editable")
        return pins.parse_freeze(session.run(python, *args, silent=True, external=True))

    project = nox.project.load_toml(str(ROOT / "pyproject.toml"))["project"]
    steps = [
        ("torch-deps", torch, f"what {torch} pulls", shlex.split(TORCH_SPEC)),
        ("triton", torch, f"{triton}, the triton paired with {torch}", [triton]),
        (
            "tests",
            None,
            "the test extra (pytest, pytest-xdist, hypothesis, numpy) and what it pulls",
            ["-e", ".[test]"],
        ),
        ("lint", None, "the lint extra", project["optional-dependencies"]["lint"]),
    ]
    skip = {*pins.UNPINNED, pins.normalize(project["name"])}
    before, first_seen = freeze(), {}
    for name, _, _, args in steps:
        session.install(*args)
        after = freeze()
        for pkg, version in after.items():
            if before.get(pkg) != version and pins.normalize(pkg) not in skip:
                first_seen.setdefault(pkg, name)
        before = after
    resolved = [
        (
            name,
            bound,
            note,
            {p: before[p] for p, s in first_seen.items() if s == name and p in before},
        )
        for name, bound, note, _ in steps
    ]
    # The [tests] section first: it is what most readers come for.
    resolved.sort(key=lambda r: r[0] != "tests")
    old = pins.CI.read_text(encoding="utf-8") if pins.CI.exists() else None
    pins.CI.write_text(pins.render_ci(PYTHON, resolved, old), encoding="utf-8")

    venv = Path(session.create_tmp()) / "nox-venv"
    shutil.rmtree(venv, ignore_errors=True)
    session.run("python", "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    base = freeze(python)
    session.run(python, "-m", "pip", "install", "nox", external=True)
    added = {p: v for p, v in freeze(python).items() if base.get(p) != v and p != "pip"}
    pins.NOX.write_text(pins.render_nox(PYTHON, added), encoding="utf-8")
    session.log(f"wrote {_rel(pins.CI)} and {_rel(pins.NOX)}: review git diff constraints/")


# --- gpu_matrix: one cell per row of gpu_matrix/matrix.toml, plus "installed" -----------------

#: Cells that got past their skips in this nox process (nox runs sessions one after another in
#: one process, and "installed" is the last cell): lets "installed" fail a GPU run in which no
#: cell ran at all, instead of reporting a green session that tested nothing.
_GPU_CELLS_RAN: list[str] = []

_CELLS = [nox.param(None, pair, id=pair.cell_id) for pair in load_matrix()] + [
    nox.param(False, None, id="installed")  # python=False: no virtualenv, the host's packages
]


def _host_python(session: nox.Session) -> str:
    """The ``installed`` cell's interpreter: ``NSA_GPU_MATRIX_PYTHON``, else ``python`` on PATH.

    Skips (or, when no other cell ran, fails) when it lacks what the cell runs.
    """
    python = os.environ.get("NSA_GPU_MATRIX_PYTHON") or shutil.which("python") or sys.executable
    # the root conftest imports hypothesis, so pytest needs it as much as torch
    code = (
        "import importlib.util as u; "
        "print(' '.join(m for m in ('torch', 'pytest', 'hypothesis') if u.find_spec(m) is None))"
    )
    missing = session.run(python, "-c", code, external=True, silent=True).strip()
    if missing:
        why = f"{python} lacks {missing}"
        if _GPU_CELLS_RAN:
            session.skip(f"{why} (cells that ran: {', '.join(_GPU_CELLS_RAN)})")
        session.error(
            f"no gpu_matrix cell ran on this GPU machine: {why}, and no pair cell could install "
            "its pair (set NSA_GPU_MATRIX_PYTHON to an interpreter with torch, pytest, hypothesis)"
        )
    return python


@nox.session(name="gpu_matrix", reuse_venv=True)
@nox.parametrize(("python", "pair"), _CELLS)
def gpu_matrix_cell(session: nox.Session, pair) -> None:
    """One torch/triton pair on the GPU: probe, pytest -m gpu, GPU conformance of nsa_impl.

    The probe must call the pair supported; the conformance report goes to
    ``reports/gpu_matrix/<cell>/``. Pair cells install their pair and skip when pip cannot;
    ``installed`` uses the host interpreter as it is. No GPU: every cell skips.
    """
    smi = nvidia_smi()
    if not smi["gpus"]:
        session.skip(f"no NVIDIA GPU on this machine ({smi['error']})")
    env = {}
    if pair is None:
        cell = "installed"
        python = _host_python(session)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env["NSA_CONSTRAINTS"] = f"none (the packages of {python} as they are)"
    else:
        cell = pair.cell_id
        python = "python"
        pin = _constraints(session, None)  # the pair's own torch: no torch-bound section
        try:
            session.install(*pair.requirements(), *pin)
            session.install("-e", ".[test]", *pin)
        except CommandFailed as exc:
            session.skip(
                f"pip could not install {' '.join(pair.requirements())} ({exc.reason}; pip's "
                "output above says why: no network, or no wheel for this Python or platform)"
            )
        _check_pins(session, pin)
    _GPU_CELLS_RAN.append(cell)
    session.run(python, "-m", "gpu_matrix", "probe", env=env, external=True)
    session.run(python, "-m", "pytest", "-m", "gpu", *session.posargs, env=env, external=True)
    _conformance(
        session,
        "nsa_impl",
        REPORTS / "gpu_matrix" / cell,
        "--device",
        "cuda",
        python=python,
        env=env,
        external=True,
    )


# --- peers: the public NSA implementations, graded on the CPU ---------------------------------

#: Peers with a CPU path, and where their reports go (``docs/conformance/<dir>`` holds the
#: committed copies; fla:parallel and flash_nsa need a GPU: see docs/conformance/README.md).
CPU_PEERS = {"fla:naive": "fla_naive", "lucidrains": "lucidrains"}
PEER_CONSTRAINTS = ROOT / "constraints" / "peers.txt"


@nox.session(reuse_venv=True)
def peers(session: nox.Session) -> None:
    """Conformance reports of fla-core (fla:naive) and lucidrains on the CPU, in reports/peers/.

    Installs the project, then the peers pinned by ``constraints/peers.txt``, and runs
    ``python -m conformance run --impl NAME --peer`` for each (``-- NAME ...`` picks others):
    a peer's failed clauses are its table and do not fail the session; an adapter crash, a
    collection error, an adapter that cannot run or a run that graded nothing does.
    """
    _install_project(session)
    session.install("-c", str(PEER_CONSTRAINTS), "fla-core", "native-sparse-attention-pytorch")
    for impl in session.posargs or list(CPU_PEERS):
        out = REPORTS / "peers" / CPU_PEERS.get(impl, impl.replace(":", "_"))
        _conformance(session, impl, out, "--peer", env={"TRITON_INTERPRET": "1"})
