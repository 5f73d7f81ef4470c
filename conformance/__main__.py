"""Command line: ``python -m conformance list | adapters | mutants | run | summary``.

``run --impl NAME [--device cpu|cuda] --report DIR [--no-mutants]`` runs the clause tests through
``pytest.main`` (in this process), then, for ``nsa_ref``, once more per mutant (quietly, with a
progress line each), and writes ``DIR/conformance.json``, ``DIR/conformance.md``,
``DIR/junit.xml`` (and ``DIR/pytest.log``, the main run's pytest output). It prints a short
table with the run's verdict and appends the markdown to ``$GITHUB_STEP_SUMMARY`` when set.
``summary REPORT.json...`` prints the implementation x clause group table of committed reports.

Every argument is checked before anything runs: an unknown ``--impl`` (the registered adapters
are listed), ``--clause`` (the valid ids are listed), ``--lanes`` dtype or ``--mutant``,
``--device cuda`` without a CUDA device, a negative ``--threads``, a ``--report`` directory that
cannot be created or written. A run that grades no clause (every test skipped or deselected)
fails: an empty report is not a pass. Problems are one line on stderr,
``conformance: error: ...``, never a traceback.

Exit codes:

* 0: the run passed: at least one clause graded, none failed, every mutant killed (with
  ``--allow-empty``, also a run that graded nothing);
* 1: the run did not pass: a clause failed, the adapter crashed, a test could not be collected,
  a mutant survived, pytest stopped, or no clause was graded;
* 2: usage error: a bad argument or environment variable, ``--device cuda`` without CUDA, an
  unusable ``--report`` directory, a pytest argument pytest rejects; nothing was graded.

With ``--peer`` (grading a third-party implementation) failed clauses are its table, and the exit
code is 1 only when the adapter crashes, a test cannot be collected, the adapter cannot run or
nothing was graded (`conformance.grading`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import sys
import time
from pathlib import Path

TESTS_DIR = Path(__file__).parent / "tests"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_EPILOG = (
    "exit codes: 0 passed; 1 did not pass (a clause failed, a mutant survived, or no clause "
    "was graded); 2 usage error (bad argument, --device cuda without CUDA, unusable --report)"
)


class CliError(Exception):
    """A problem reported as one ``conformance: error: ...`` line and exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) raised as `CliError`."""

    def error(self, message: str):
        """Raise instead of printing the usage and exiting (`main` prints the line)."""
        raise CliError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    """``--examples``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """``--threads``: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


class _Tee(io.TextIOBase):
    """Write to several streams at once (live output and a log file)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def _pytest(args: list[str], collector, *, quiet: bool, log: Path | None = None) -> int:
    """Run pytest in-process with ``collector``; its output goes to ``log`` and, unless
    ``quiet``, live to stdout too."""
    import pytest

    with contextlib.ExitStack() as stack:
        sinks = [] if quiet else [sys.stdout]
        if log is not None:
            sinks.append(stack.enter_context(open(log, "w")))
        out = _Tee(*sinks)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(out))
        return int(pytest.main(args, plugins=[collector]))


def _base_args(
    impl: str, device: str, clauses: list[str], lanes: str | None, examples: int | None = None
) -> list[str]:
    args = [str(TESTS_DIR), f"--impl={impl}", f"--device={device}", "-p", "no:cacheprovider", "-q"]
    args += [f"--clause={c}" for c in clauses] + ([f"--lanes={lanes}"] if lanes else [])
    return args + ([f"--examples={examples}"] if examples else [])


def _source(flag: str, value, env: str) -> str:
    """How a message names where a value came from: the flag, or the environment variable."""
    return flag if value is not None else f"${env}"


def _resolve_device(device: str | None) -> str:
    """`adapters.resolve_device`, with a bad ``$NSA_CONFORMANCE_DEVICE`` as a `CliError`."""
    from .adapters import ENV_DEVICE, resolve_device

    try:
        return resolve_device(device)
    except ValueError as exc:
        raise CliError(f"{_source('--device', device, ENV_DEVICE)}: {exc}") from None


def cmd_list(_args) -> int:
    """Print every clause: id, paper reference, title, tolerance class and needs."""
    from .clauses import CLAUSES

    width = max(len(c.id) for c in CLAUSES)
    for c in CLAUSES:
        needs = f" [needs {', '.join(c.needs)}]" if c.needs else ""
        print(f"{c.id:<{width}}  {c.paper:<32}  {c.title} ({c.tolerance}){needs}")
    print(f"\n{len(CLAUSES)} clauses")
    return EXIT_OK


def cmd_adapters(args) -> int:
    """Print every adapter name with its availability on the device."""
    from .adapters import REGISTRY, device_reason

    device = _resolve_device(args.device)
    for name in REGISTRY.names():
        caps, version = None, None
        try:
            adapter = REGISTRY.create(name)
            importable, why_not = adapter.available()
            why = device_reason(adapter, device)
            caps = adapter.capabilities.summary()
            version = adapter.version() if hasattr(adapter, "version") else None
            if why is None:
                state = f"ok (runs on {device})"
            elif importable:
                state = f"importable; not on {device}: {why}"
            else:
                state = f"not importable: {why_not}"
        except Exception as exc:  # a broken third-party adapter is reported, not fatal
            state = f"cannot be created: {type(exc).__name__}: {exc}"
        print(f"{name:<18} {state}" + (f" [version {version}]" if version else ""))
        if caps:
            print(f"{'':<18} {caps}")
    return EXIT_OK


def cmd_mutants(_args) -> int:
    """Print every mutant and the clauses designed to reject it."""
    from .mutants import MUTANTS

    for m in MUTANTS:
        print(f"{m.name:<28} {m.description}  (expected: {', '.join(m.expected)})")
    return EXIT_OK


def _adapter(impl: str | None):
    """The adapter of ``--impl`` (or ``$NSA_CONFORMANCE_IMPL``, or nsa_ref), as a `CliError`
    listing the registered names when unknown or naming the error when it cannot be created."""
    from .adapters import DEFAULT_IMPL, ENV_IMPL, REGISTRY

    name = impl or os.environ.get(ENV_IMPL) or DEFAULT_IMPL
    where = f"${ENV_IMPL}" if not impl and os.environ.get(ENV_IMPL) else "--impl"
    names = REGISTRY.names()
    if name not in names:
        raise CliError(
            f"{where}: unknown implementation {name!r}{_did_you_mean(name, names)}; "
            f"registered adapters: {', '.join(names)}"
        )
    try:
        return name, REGISTRY.create(name)
    except Exception as exc:  # a third-party adapter that does not load is the user's to fix
        raise CliError(
            f"{where}: adapter {name!r} cannot be created: {type(exc).__name__}: {exc}"
        ) from None


def _did_you_mean(value: str, valid) -> str:
    close = difflib.get_close_matches(value, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_clauses(ids: list[str]) -> None:
    """Every ``--clause`` id is registered."""
    from .clauses import BY_ID

    for cid in ids:
        if cid not in BY_ID:
            raise CliError(
                f"--clause: unknown clause id {cid!r}{_did_you_mean(cid, BY_ID)}; valid ids "
                f"(python -m conformance list): {', '.join(BY_ID)}"
            )


def _lanes(value: str | None, adapter) -> str | None:
    """The validated ``--lanes`` (or ``$NSA_CONFORMANCE_LANES``) value, or ``None``.

    Unknown dtypes are a `CliError`; so is a list of which the adapter declares none (no lane
    could run). Declared ones win; the others are named on stdout, not silently dropped.
    """
    from .checks import DTYPES

    where = _source("--lanes", value, "NSA_CONFORMANCE_LANES")
    value = value if value is not None else os.environ.get("NSA_CONFORMANCE_LANES")
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")]
    for n in names:
        if n not in DTYPES:
            what = f"unknown dtype {n!r}" if n else "an empty dtype name"
            raise CliError(f"{where}: {what} in {value!r}; valid dtypes: {', '.join(DTYPES)}")
    declared = {str(d).removeprefix("torch.") for d in adapter.capabilities.dtypes}
    undeclared = [n for n in names if n not in declared]
    if len(undeclared) == len(names):
        raise CliError(
            f"{where}: {adapter.name} declares none of {', '.join(names)} "
            f"(it declares {', '.join(sorted(declared)) or 'no dtype'})"
        )
    if undeclared:
        print(
            f"conformance: note: {adapter.name} does not declare {', '.join(undeclared)}: "
            "those lanes are not run",
            flush=True,
        )
    return ",".join(names)


def _mutants(args, impl: str) -> list | None:
    """The mutants to run (``None``: none), checking ``--mutant`` against the registry."""
    from .mutants import MUTANTS
    from .mutants import get as get_mutant

    if args.mutant and args.no_mutants:
        raise CliError("--mutant and --no-mutants contradict each other")
    if args.mutant and impl != "nsa_ref":
        raise CliError(
            f"--mutant: mutants are broken variants of nsa_ref; they run with --impl nsa_ref "
            f"only (got --impl {impl})"
        )
    try:
        chosen = [get_mutant(n) for n in args.mutant] if args.mutant else list(MUTANTS)
    except ValueError as exc:
        raise CliError(f"--mutant: {exc}") from None
    return None if args.no_mutants or impl != "nsa_ref" else chosen


def _report_dir(path: str) -> Path:
    """``--report``: created (with parents) and shown writable by creating ``pytest.log``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"--report {path}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pytest.log").write_text("")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) != str(out):  # the OS names the part that failed
            reason += f" ({exc.filename})"
        raise CliError(f"--report {path}: cannot create or write it: {reason}") from None
    return out


def _write(path: Path, text: str, *, append: bool = False, what: str | None = None) -> None:
    """Write a report file; an OS error becomes a `CliError` naming the file and the reason."""
    try:
        with open(path, "a" if append else "w") as fh:
            fh.write(text)
    except OSError as exc:
        name = f"{what} ({path})" if what else str(path)
        raise CliError(f"cannot write {name}: {exc.strerror or exc}") from None


def _pytest_usage_error(log: Path) -> str:
    """pytest's own error line from the log of a run that exited 4 (usage error)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower() and not ln.startswith("ERROR: usage:")]
    return errors[0] if errors else (lines[-1] if lines else "no output")


def cmd_run(args) -> int:
    """Check the arguments, run the suite (and the mutants for nsa_ref), write the reports."""
    import torch

    from . import grading, report
    from .adapters import device_reason

    # Everything is checked before pytest starts: a typo must not cost a run, nor hide in a log.
    impl, adapter = _adapter(args.impl)
    device = _resolve_device(args.device)
    no_cuda = device == "cuda" and not torch.cuda.is_available()
    if no_cuda and not args.allow_empty:
        raise CliError(
            "--device cuda: no CUDA device (torch.cuda.is_available() is False); nothing could "
            "be graded (--allow-empty runs anyway and reports every clause skipped)"
        )
    _check_clauses(args.clause)
    lanes = _lanes(args.lanes, adapter)
    chosen = _mutants(args, impl)
    out = _report_dir(args.report)
    if args.threads:
        torch.set_num_threads(args.threads)  # tiny tensors: threads cost more than they give
    start = time.perf_counter()
    print(f"conformance: {adapter.name} ({adapter.description}) on {device}", flush=True)
    unavailable = device_reason(adapter, device)
    if unavailable:
        print(f"conformance: every clause test will skip: {unavailable}", flush=True)

    collector = grading.CrashCollector(adapter)
    log = out / "pytest.log"
    main_args = _base_args(impl, device, args.clause, lanes, args.examples) + [
        f"--junitxml={out / 'junit.xml'}",
        "-o",
        "junit_suite_name=nsa-conformance",
        "-o",
        "junit_family=xunit1",
        *args.pytest_args,
    ]
    code = _pytest(main_args, collector, quiet=not args.verbose, log=log)
    if code == 4:  # pytest rejected its arguments (an extra one after --): nothing ran
        raise CliError(f"pytest rejected the arguments: {_pytest_usage_error(log)}")
    rows = report.summarize(collector, set(args.clause) or None)
    print(
        f"clause tests: {len(collector.tests)} run in {time.perf_counter() - start:.1f} s "
        f"(pytest exit code {code}; output in {log})",
        flush=True,
    )

    mutant_rows = None
    if chosen is None:
        if impl != "nsa_ref" and not args.no_mutants:
            print("mutants: skipped (they are broken variants of nsa_ref; run with --impl nsa_ref)")
    elif not report.graded(rows):
        print("mutants: not run (the main run graded no clause, so no mutant could be killed)")
    else:
        mutant_rows = _run_mutants(chosen, impl, device, args, lanes)

    doc = report.build(
        adapter.name,
        adapter.description,
        report.environment(device),
        rows,
        mutant_rows,
        collector.errors,
        time.perf_counter() - start,
        pytest_exit=code,
    )
    doc["adapter"] = grading.adapter_info(adapter, device)
    doc["adapter_crashes"] = collector.crashes
    md = report.markdown(doc) + grading.adapter_markdown(doc)
    _write(out / "conformance.json", json.dumps(doc, indent=2) + "\n")
    _write(out / "conformance.md", md)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        _write(Path(summary_path), md + "\n", append=True, what="$GITHUB_STEP_SUMMARY")
    print()
    print(report.table(doc))
    for r in rows:
        for f in r.failures[:3]:
            print(f"  FAIL {f}")
    print(
        f"\nreports: {out / 'conformance.md'}, {out / 'conformance.json'}, {out / 'junit.xml'} "
        f"({doc['seconds']:.1f} s)",
        flush=True,
    )

    if args.peer:
        peer_code, why = grading.peer_exit_code(doc, code)
        print(f"--peer: exit {peer_code}: {why}")
        return peer_code
    if collector.crashes:
        raise CliError(f"{len(collector.crashes)} adapter crash(es): see {log}", EXIT_FAILED)
    if doc["verdict"] == "pass":
        return EXIT_OK
    if doc["verdict"] == "empty" and args.allow_empty:
        print(f"conformance: {doc['verdict_reason']} (--allow-empty: exit 0)")
        return EXIT_OK
    raise CliError(doc["verdict_reason"], EXIT_FAILED)


def _run_mutants(chosen, impl: str, device: str, args, lanes: str | None) -> list[dict]:
    """Run the clause tests once per mutant (quietly); one row per mutant for the report.

    Each mutant is judged on the clause tests' own fixed cases in the float64 lane (what they
    were designed with): the drawn cases and other lanes add run time, not kills.
    """
    from . import report

    rows = []
    for i, m in enumerate(chosen, 1):
        t0 = time.perf_counter()
        col = report.Collector()
        _pytest(
            _base_args(impl, device, args.clause, lanes or "float64", 1)
            + [f"--mutant={m.name}", "-x" if args.fast else "-q"],
            col,
            quiet=True,
        )
        by = [
            r.clause.id
            for r in report.summarize(col, set(args.clause) or None)
            if r.status == "fail"
        ]
        rows.append(
            {
                "name": m.name,
                "description": m.description,
                "killed": bool(by),
                "by": by,
                "expected": list(m.expected),
                "tests_failed": sum(t.outcome == "fail" for t in col.tests.values()),
            }
        )
        shown = ", ".join(by[:3]) + (f" (+{len(by) - 3})" if len(by) > 3 else "")
        print(
            f"mutant [{i:>2}/{len(chosen)}] {m.name:<28} "
            f"{'killed by ' + shown if by else 'SURVIVED'}  ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return rows


def cmd_summary(args) -> int:
    """Print the implementation x clause group table of the given ``conformance.json`` files."""
    from .grading import summary_table

    print(summary_table(args.reports), end="")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m conformance``: the exit code (see the module docstring)."""
    parser = _Parser(
        prog="python -m conformance", description=__doc__.split("\n")[0], epilog=_EPILOG
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="clause ids, paper references, titles").set_defaults(func=cmd_list)
    p = sub.add_parser("adapters", help="implementation adapters and their availability")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.set_defaults(func=cmd_adapters)
    sub.add_parser("mutants", help="the broken references the suite must reject").set_defaults(
        func=cmd_mutants
    )
    p = sub.add_parser(
        "run",
        help="run the clause tests (and mutants) and write the reports",
        description="Run the clause tests (and, for nsa_ref, the mutants); write the reports.",
        epilog=_EPILOG,
    )
    p.add_argument(
        "--impl", default=None, help="adapter name (default $NSA_CONFORMANCE_IMPL or nsa_ref)"
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("cpu", "cuda"),
        help="default $NSA_CONFORMANCE_DEVICE or cpu; cuda without a CUDA device is an error",
    )
    p.add_argument("--report", default="reports", help="output directory (default: reports)")
    p.add_argument("--no-mutants", action="store_true", help="skip the mutant runs")
    p.add_argument(
        "--mutant", action="append", default=[], help="run only this mutant (repeatable)"
    )
    p.add_argument("--clause", action="append", default=[], help="only this clause id (repeatable)")
    p.add_argument(
        "--lanes",
        default=None,
        help="comma-separated dtypes (float64, float32, bfloat16, float16); default "
        "$NSA_CONFORMANCE_LANES or the adapter's float64, float32 and bfloat16 (+ float16 on a "
        "GPU) where declared",
    )
    p.add_argument(
        "--examples",
        type=_positive_int,
        default=None,
        help="cases per numeric clause test (pytest --examples; default 3, deep profile 12)",
    )
    p.add_argument(
        "--threads",
        type=_non_negative_int,
        default=1,
        help="torch CPU threads (default 1; 0 = leave)",
    )
    p.add_argument("--fast", action="store_true", help="stop each mutant run at its first failure")
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="exit 0 when no clause is graded (every test skipped), e.g. --device cuda on a "
        "machine without one, instead of failing",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show the main run's pytest output")
    p.add_argument(
        "--peer",
        action="store_true",
        help="grading a third party: exit non-zero only when the adapter crashes or nothing ran",
    )
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("summary", help="implementation x clause group table of reports")
    p.add_argument("reports", nargs="+", help="conformance.json files")
    p.set_defaults(func=cmd_summary)
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except CliError as exc:
        sys.stdout.flush()
        print(f"conformance: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except SystemExit as exc:  # --help (0); argparse exits only there now
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
