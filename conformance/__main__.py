"""Command line: ``python -m conformance list | adapters | mutants | run | summary``.

``run --impl NAME [--device cpu|cuda] --report DIR [--no-mutants]`` runs the clause tests through
``pytest.main`` (in this process), then, for ``nsa_ref``, once more per mutant (quietly, with a
progress line each), and writes ``DIR/conformance.json``, ``DIR/conformance.md``,
``DIR/junit.xml`` (and ``DIR/pytest.log``, the main run's pytest output). It prints a short
table, appends the markdown to ``$GITHUB_STEP_SUMMARY`` when set, and exits non-zero when a
clause fails, a test cannot be collected, or a mutant survives. With ``--peer`` (grading a
third-party implementation) failed clauses are its table, and the exit code is non-zero only when
the adapter crashes, a test cannot be collected, the adapter cannot run or nothing was graded
(`conformance.grading`). ``summary REPORT.json...`` prints the implementation x clause group
table of committed reports.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

TESTS_DIR = Path(__file__).parent / "tests"


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


def cmd_list(_args) -> int:
    """Print every clause: id, paper reference, title, tolerance class and needs."""
    from .clauses import CLAUSES

    width = max(len(c.id) for c in CLAUSES)
    for c in CLAUSES:
        needs = f" [needs {', '.join(c.needs)}]" if c.needs else ""
        print(f"{c.id:<{width}}  {c.paper:<32}  {c.title} ({c.tolerance}){needs}")
    print(f"\n{len(CLAUSES)} clauses")
    return 0


def cmd_adapters(args) -> int:
    """Print every adapter name with its availability on the device."""
    from .adapters import REGISTRY, device_reason, resolve_device

    device = resolve_device(args.device)
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
    return 0


def cmd_mutants(_args) -> int:
    """Print every mutant and the clauses designed to reject it."""
    from .mutants import MUTANTS

    for m in MUTANTS:
        print(f"{m.name:<28} {m.description}  (expected: {', '.join(m.expected)})")
    return 0


def cmd_run(args) -> int:
    """Run the suite (and the mutants for nsa_ref); write and print the reports."""
    import torch

    from . import grading, report
    from .adapters import get_adapter, resolve_device
    from .mutants import MUTANTS
    from .mutants import get as get_mutant

    impl = args.impl or os.environ.get("NSA_CONFORMANCE_IMPL") or "nsa_ref"
    device = resolve_device(args.device)
    adapter = get_adapter(impl)
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)  # tiny tensors: threads cost more than they give
    start = time.perf_counter()
    print(f"conformance: {adapter.name} ({adapter.description}) on {device}", flush=True)

    collector = grading.CrashCollector(adapter)
    main_args = _base_args(impl, device, args.clause, args.lanes, args.examples) + [
        f"--junitxml={out / 'junit.xml'}",
        "-o",
        "junit_suite_name=nsa-conformance",
        "-o",
        "junit_family=xunit1",
        *args.pytest_args,
    ]
    code = _pytest(main_args, collector, quiet=not args.verbose, log=out / "pytest.log")
    rows = report.summarize(collector, set(args.clause) or None)
    print(
        f"clause tests: {len(collector.tests)} run in {time.perf_counter() - start:.1f} s "
        f"(pytest exit code {code}; output in {out / 'pytest.log'})",
        flush=True,
    )

    mutant_rows = None
    if args.no_mutants:
        pass
    elif impl != "nsa_ref":
        print("mutants: skipped (they are broken variants of nsa_ref; run with --impl nsa_ref)")
    else:
        chosen = [get_mutant(n) for n in args.mutant] if args.mutant else list(MUTANTS)
        mutant_rows = []
        for i, m in enumerate(chosen, 1):
            t0 = time.perf_counter()
            col = report.Collector()
            # Each mutant is judged on the clause tests' own fixed cases in the float64 lane
            # (what they were designed with): the drawn cases and other lanes add run time,
            # not kills.
            _pytest(
                _base_args(impl, device, args.clause, args.lanes or "float64", 1)
                + [f"--mutant={m.name}", "-x" if args.fast else "-q"],
                col,
                quiet=True,
            )
            by = [
                r.clause.id
                for r in report.summarize(col, set(args.clause) or None)
                if r.status == "fail"
            ]
            mutant_rows.append(
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

    doc = report.build(
        adapter.name,
        adapter.description,
        report.environment(device),
        rows,
        mutant_rows,
        collector.errors,
        time.perf_counter() - start,
    )
    doc["adapter"] = grading.adapter_info(adapter, device)
    doc["adapter_crashes"] = collector.crashes
    md = report.markdown(doc) + grading.adapter_markdown(doc)
    import json

    (out / "conformance.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "conformance.md").write_text(md)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        with open(summary_path, "a") as fh:
            fh.write(md + "\n")
    print()
    print(report.table(doc))
    for r in rows:
        for f in r.failures[:3]:
            print(f"  FAIL {f}")
    print(
        f"\nreports: {out / 'conformance.md'}, {out / 'conformance.json'}, {out / 'junit.xml'} "
        f"({doc['seconds']:.1f} s)"
    )

    if args.peer:
        peer_code, why = grading.peer_exit_code(doc, code)
        print(f"--peer: exit {peer_code}: {why}")
        return peer_code
    failed = doc["summary"]["fail"] > 0 or bool(collector.errors) or code not in (0, 1, 5)
    crashed = bool(collector.crashes)
    survived = mutant_rows is not None and not all(m["killed"] for m in mutant_rows)
    return 1 if failed or crashed or survived or not rows else 0


def cmd_summary(args) -> int:
    """Print the implementation x clause group table of the given ``conformance.json`` files."""
    from .grading import summary_table

    print(summary_table(args.reports), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m conformance``."""
    parser = argparse.ArgumentParser(
        prog="python -m conformance", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="clause ids, paper references, titles").set_defaults(func=cmd_list)
    p = sub.add_parser("adapters", help="implementation adapters and their availability")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.set_defaults(func=cmd_adapters)
    sub.add_parser("mutants", help="the broken references the suite must reject").set_defaults(
        func=cmd_mutants
    )
    p = sub.add_parser("run", help="run the clause tests (and mutants) and write the reports")
    p.add_argument(
        "--impl", default=None, help="adapter name (default $NSA_CONFORMANCE_IMPL or nsa_ref)"
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("cpu", "cuda"),
        help="default $NSA_CONFORMANCE_DEVICE or cpu",
    )
    p.add_argument("--report", default="reports", help="output directory (default: reports)")
    p.add_argument("--no-mutants", action="store_true", help="skip the mutant runs")
    p.add_argument(
        "--mutant", action="append", default=[], help="run only this mutant (repeatable)"
    )
    p.add_argument("--clause", action="append", default=[], help="only this clause id (repeatable)")
    p.add_argument("--lanes", default=None, help="comma-separated dtypes (pytest --lanes)")
    p.add_argument(
        "--examples",
        type=int,
        default=None,
        help="cases per numeric clause test (pytest --examples; default 3, deep profile 12)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = leave)"
    )
    p.add_argument("--fast", action="store_true", help="stop each mutant run at its first failure")
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
