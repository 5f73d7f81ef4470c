"""``python -m conformance``: every bad argument is one line and an exit code, never a traceback,
and a run that grades nothing is never a pass.

Errors found before pytest starts are checked in-process through `main`; runs that start
pytest go through a subprocess (the real entry point) with one cheap clause and no mutants.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance import report
from conformance.__main__ import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from conformance.clauses import BY_ID

ROOT = Path(__file__).resolve().parents[2]
CHEAP = "NSA-I2-CONFIG"  # structural, tiny: about a second
CUDA_ONLY = "NSA-LONG-CAUSAL-64K"  # needs --device cuda: skips on a CPU run anywhere
_ENV_KNOBS = (
    "NSA_CONFORMANCE_IMPL",
    "NSA_CONFORMANCE_DEVICE",
    "NSA_CONFORMANCE_LANES",
    "GITHUB_STEP_SUMMARY",
    report.ENV_CONSTRAINTS,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The CLI reads these; the caller's values must not change what a test sees."""
    for name in _ENV_KNOBS:
        monkeypatch.delenv(name, raising=False)


def _one_error_line(err: str) -> str:
    """The single ``conformance: error:`` line of stderr (and nothing else there)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("conformance: error: "), lines[0]
    return lines[0]


def _run_in_process(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out
    return code, _one_error_line(err) if code else err


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["run", "--impl", "bogus"], {}, ["--impl: unknown implementation 'bogus'", "nsa_ref"]),
        (["run", "--impl", "nsa_imp"], {}, ["did you mean 'nsa_impl'?", "nsa_impl:flash"]),
        (["run"], {"NSA_CONFORMANCE_IMPL": "bogus"}, ["$NSA_CONFORMANCE_IMPL: unknown"]),
        (
            ["run", "--clause", "NSA-BOGUS"],
            {},
            ["unknown clause id 'NSA-BOGUS'", "NSA-EQ9-OVERLAP", "NSA-I2-CONFIG"],
        ),
        (["run", "--clause", "NSA-EQ9-OVERLAPP"], {}, ["did you mean 'NSA-EQ9-OVERLAP'?"]),
        (["run", "--lanes", "float8"], {}, ["--lanes: unknown dtype 'float8'", "bfloat16"]),
        (["run", "--lanes", "float32,"], {}, ["an empty dtype name in 'float32,'"]),
        (["run"], {"NSA_CONFORMANCE_LANES": "fp32"}, ["$NSA_CONFORMANCE_LANES: unknown dtype"]),
        (["run", "--threads", "-3"], {}, ["argument --threads: must be an integer >= 0, got '-3'"]),
        (["run", "--threads", "two"], {}, ["argument --threads: must be an integer >= 0"]),
        (["run", "--device", "tpu"], {}, ["argument --device: invalid choice: 'tpu'"]),
        (["run"], {"NSA_CONFORMANCE_DEVICE": "tpu"}, ["$NSA_CONFORMANCE_DEVICE: device must"]),
        (["run", "--mutant", "nope"], {}, ["--mutant: unknown mutant 'nope'", "window-w-plus-1"]),
        (
            ["run", "--impl", "nsa_impl", "--mutant", "window-w-plus-1"],
            {},
            ["--impl nsa_ref only (got --impl nsa_impl)"],
        ),
        (["run", "--mutant", "window-w-plus-1", "--no-mutants"], {}, ["contradict"]),
        (["adapters", "--device", "tpu"], {}, ["argument --device: invalid choice"]),
        (["adapters"], {"NSA_CONFORMANCE_DEVICE": "tpu"}, ["$NSA_CONFORMANCE_DEVICE"]),
        (["frobnicate"], {}, ["argument command: invalid choice: 'frobnicate'"]),
        ([], {}, ["the following arguments are required: command"]),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, monkeypatch, tmp_path, argv, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if argv[:1] == ["run"]:  # a check that let it through would then run only one cheap clause
        argv = [*argv, "--report", str(tmp_path / "r")]
        argv += [] if "--clause" in argv else ["--clause", CHEAP]
        argv += [] if "--mutant" in argv else ["--no-mutants"]
    code, line = _run_in_process(capsys, *argv)
    assert code == EXIT_USAGE
    for text in expected:
        assert text in line
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_unknown_clause_lists_every_valid_id(capsys, tmp_path):
    _, line = _run_in_process(capsys, "run", "--clause", "NSA-BOGUS", "--report", str(tmp_path))
    assert all(cid in line for cid in BY_ID)


def test_lanes_the_adapter_declares_none_of(capsys, monkeypatch, tmp_path):
    from conformance import adapters

    narrow = adapters.NsaRefAdapter()
    narrow.name = "narrow"
    narrow.capabilities = adapters.Capabilities(dtypes=frozenset({torch.float64}))
    monkeypatch.setitem(adapters.REGISTRY.factories, "narrow", lambda: narrow)
    code, line = _run_in_process(
        capsys, "run", "--impl", "narrow", "--lanes", "float16", "--report", str(tmp_path)
    )
    assert code == EXIT_USAGE and "narrow declares none of float16 (it declares float64)" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_cuda_is_refused_up_front(capsys, tmp_path):
    code, line = _run_in_process(
        capsys, "run", "--impl", "nsa_impl", "--device", "cuda", "--report", str(tmp_path / "r")
    )
    assert code == EXIT_USAGE
    assert "--device cuda: no CUDA device (torch.cuda.is_available() is False)" in line
    assert not (tmp_path / "r").exists()  # said before pytest, not after a run of skips


@pytest.mark.parametrize("where", ["proc", "under-a-file", "a-file"])
def test_report_directory_that_cannot_be_made(capsys, tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this system")
        path, reason = "/proc/x", "--report /proc/x: cannot create or write it: No such file"
    elif where == "under-a-file":
        path, reason = str(blocker / "sub"), "cannot create or write it: Not a directory"
    else:
        path, reason = str(blocker), "exists and is not a directory"
    code, line = _run_in_process(capsys, "run", "--clause", CHEAP, "--no-mutants", "--report", path)
    assert code == EXIT_USAGE and reason in line and path in line


def test_help_documents_the_exit_codes(capsys):
    assert main(["run", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "--allow-empty" in out and "exit codes: 0 passed; 1 did not pass" in out


# --- runs that start pytest: the real entry point, one cheap clause, no mutants ---------------


def _cli(tmp_path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in _ENV_KNOBS}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "conformance", *argv],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _doc(report_dir: Path) -> dict:
    return json.loads((report_dir / "conformance.json").read_text())


def test_unknown_impl_through_the_entry_point(tmp_path):
    proc = _cli(tmp_path, "run", "--impl", "bogus")
    assert proc.returncode == EXIT_USAGE
    assert "unknown implementation 'bogus'" in _one_error_line(proc.stderr)


def test_all_skipped_run_fails_and_its_report_does_not_pass(tmp_path):
    out = tmp_path / "r"
    proc = _cli(tmp_path, "run", "--clause", CUDA_ONLY, "--no-mutants", "--report", str(out))
    assert proc.returncode == EXIT_FAILED, proc.stdout
    line = _one_error_line(proc.stderr)
    assert "0 clauses graded: every clause skipped: nsa_ref needs --device cuda" in line
    doc = _doc(out)
    assert doc["verdict"] == "empty" and doc["summary"]["graded"] == 0
    md = (out / "conformance.md").read_text()
    assert md.splitlines()[2].startswith("**NOT GRADED: 0 clauses graded") and "PASS" not in md
    assert "verdict: NOT GRADED" in proc.stdout


def test_allow_empty_keeps_exit_0_for_an_all_skipped_run(tmp_path):
    out = tmp_path / "r"
    proc = _cli(
        tmp_path, "run", "--clause", CUDA_ONLY, "--no-mutants", "--allow-empty", "--report", out
    )
    assert proc.returncode == EXIT_OK and proc.stderr == "", proc.stderr
    assert "(--allow-empty: exit 0)" in proc.stdout
    assert _doc(out)["verdict"] == "empty"  # still not called a pass


def test_unavailable_adapter_grades_nothing(tmp_path):
    from conformance.adapters import get_adapter

    ok, why = get_adapter("nsa_impl:flash").available()
    if ok:
        pytest.skip("the flash path is available here")
    proc = _cli(tmp_path, "run", "--impl", "nsa_impl:flash", "--clause", CHEAP, "--report", "r")
    assert proc.returncode == EXIT_FAILED
    line = _one_error_line(proc.stderr)
    assert "0 clauses graded: every clause skipped: nsa_impl:flash unavailable" in line


def test_everything_deselected_grades_nothing(tmp_path):
    argv = ["run", "--clause", CHEAP, "--no-mutants", "--report", "r", "--", "-k", "no_such_test"]
    proc = _cli(tmp_path, *argv)
    assert proc.returncode == EXIT_FAILED
    assert "0 clauses graded: no clause test ran" in _one_error_line(proc.stderr)


def test_pytest_argument_that_pytest_rejects(tmp_path):
    proc = _cli(tmp_path, "run", "--clause", CHEAP, "--report", "r", "--", "--no-such-option")
    assert proc.returncode == EXIT_USAGE
    assert "unrecognized arguments: --no-such-option" in _one_error_line(proc.stderr)


def test_report_file_that_cannot_be_written_after_the_run(tmp_path):
    # $GITHUB_STEP_SUMMARY naming a directory: the append fails once the run is over
    proc = _cli(
        tmp_path,
        *("run", "--clause", CHEAP, "--no-mutants", "--report", "r"),
        env={"GITHUB_STEP_SUMMARY": str(tmp_path)},
    )
    assert proc.returncode == EXIT_USAGE
    line = _one_error_line(proc.stderr)
    assert f"cannot write $GITHUB_STEP_SUMMARY ({tmp_path}): Is a directory" in line


def test_graded_run_passes_and_records_the_toolchain(tmp_path):
    constraints = tmp_path / "ci.txt"
    constraints.write_bytes(b"# [tests] t\npytest==0\n")
    out = tmp_path / "r"
    proc = _cli(
        tmp_path,
        *("run", "--clause", CHEAP, "--no-mutants", "--report", str(out)),
        env={report.ENV_CONSTRAINTS: str(constraints)},
    )
    assert proc.returncode == EXIT_OK and proc.stderr == "", proc.stderr
    doc = _doc(out)
    assert doc["verdict"] == "pass" and doc["summary"]["graded"] == 1
    env = doc["environment"]
    assert env["pytest"] == pytest.__version__ and env["torch"] == str(torch.__version__)
    assert env["hypothesis"] and env["numpy"]
    assert env["constraints"] == str(constraints)
    assert env["constraints_sha256"] == hashlib.sha256(constraints.read_bytes()).hexdigest()[:12]
    md = (out / "conformance.md").read_text()
    assert f"pytest {pytest.__version__}" in md and env["constraints_sha256"] in md


# --- the verdict and the environment block, without a run ------------------------------------


def _rows(*outcomes: str, reason: str = "no GPU"):
    col = report.Collector()
    ids = list(BY_ID)[: len(outcomes)]
    col.tests = {
        f"t{i}": report.TestResult(f"t{i}", (cid,), o, reason if o == "skip" else None)
        for i, (cid, o) in enumerate(zip(ids, outcomes, strict=True))
    }
    return report.summarize(col, set(ids))


def test_verdicts():
    killed = [{"name": "m", "killed": True}]
    assert report.verdict(_rows("pass", "skip"), killed, []) == ("pass", None)
    assert report.verdict(_rows("skip", "skip"), None, [])[0] == "empty"
    assert report.verdict(_rows("skip", "skip"), None, [])[1] == (
        "0 clauses graded: every clause skipped: no GPU"
    )
    assert report.verdict(_rows("pass", "fail"), None, [])[0] == "fail"
    assert report.verdict(_rows("pass"), [{"name": "m", "killed": False}], [])[0] == "fail"
    assert report.verdict(_rows("pass"), None, ["x.py: boom"])[0] == "fail"
    assert report.verdict(_rows("pass"), None, [], pytest_exit=3)[0] == "fail"
    # a clause with no test run beside graded ones fails; with nothing graded it is empty
    assert report.verdict(report.summarize(report.Collector(), {CHEAP}), None, [])[0] == "empty"


def test_environment_names_the_constraints(monkeypatch, tmp_path):
    monkeypatch.delenv(report.ENV_CONSTRAINTS, raising=False)
    env = report.environment("cpu")
    assert env["constraints"] is None and env["constraints_sha256"] is None
    assert env["pytest"] == pytest.__version__  # imported here: the imported version
    monkeypatch.setenv(report.ENV_CONSTRAINTS, "none (Python 3.10, pins are for 3.11)")
    assert report.environment("cpu")["constraints"] == "none (Python 3.10, pins are for 3.11)"
    monkeypatch.setenv(report.ENV_CONSTRAINTS, str(tmp_path / "missing.txt"))
    env = report.environment("cpu")
    assert "No such file" in env["constraints"] and env["constraints_sha256"] is None
