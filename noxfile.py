"""Nox sessions: ``cpu_parity`` (the default), ``conformance``, ``lint``, ``gpu_matrix``, ``bench``.

    python -m pip install nox && python -m nox -s cpu_parity   # the tests (README, .ci/run)
    python -m nox -s conformance -- nsa_impl                     # the conformance report
    python -m nox -s lint
    python -m nox -s gpu_matrix                                  # GPU machines; skips elsewhere
    python -m nox -s bench

Every session reuses its virtualenv; arguments after ``--`` pass through (to pytest, to the
conformance CLI, to ruff, to the benchmark). Environment knobs:

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

import os
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

REPORTS = ROOT / "reports"
TORCH_SPEC = os.environ.get("NSA_TORCH_SPEC", "torch==2.13.0")


def _triton_spec() -> str | None:
    """The triton requirement for this run (see ``NSA_TRITON_SPEC``); ``None``: do not install."""
    spec = os.environ.get("NSA_TRITON_SPEC", "").strip()
    if spec.lower() == "none":
        return None
    return spec or triton_requirement(TORCH_SPEC) or "triton"


def _install_project(session: nox.Session, extras: str = "test") -> None:
    """torch (``NSA_TORCH_SPEC``), then triton when pip can get it, then the project, editable."""
    session.install(*shlex.split(TORCH_SPEC))
    triton = _triton_spec()
    if triton is None:
        session.log("NSA_TRITON_SPEC=none: no triton; the Triton interpreter tests will skip")
    else:
        try:
            session.install(triton)
        except CommandFailed as exc:
            session.log(
                f"continuing without triton: pip could not install {triton!r} ({exc.reason}); "
                "the Triton interpreter tests will skip"
            )
    session.install("-e", f".[{extras}]" if extras else ".")


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
    ``reports/nsa_impl/``.
    """
    _install_project(session)
    # No GPU here: triton can only run in its interpreter, so the kernel tests use it.
    env = {"TRITON_INTERPRET": "1"}
    junit = f"--junitxml={REPORTS / 'pytest.xml'}"
    session.run("python", "-m", "pytest", "-n", "2", junit, *session.posargs, env=env)
    for impl in ("nsa_ref", "nsa_impl"):
        _conformance(session, impl, REPORTS / impl)


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
    session.install(*project["optional-dependencies"]["lint"])
    session.run("ruff", "check", *(session.posargs or ["."]))


@nox.session(reuse_venv=True)
def bench(session: nox.Session) -> None:
    """The CPU benchmark bench/cpu_bench.py (arguments after ``--`` go to it)."""
    _install_project(session, extras="")
    session.run("python", "bench/cpu_bench.py", *session.posargs)


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
    else:
        cell = pair.cell_id
        python = "python"
        try:
            session.install(*pair.requirements())
            session.install("-e", ".[test]")
        except CommandFailed as exc:
            session.skip(
                f"pip could not install {' '.join(pair.requirements())} ({exc.reason}; pip's "
                "output above says why: no network, or no wheel for this Python or platform)"
            )
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
