"""How close the CPU low-precision lane of conformance comes to its bound: a seeded hypothesis hunt.

Runs conformance clause tests in one lane (default bfloat16) with many hypothesis-drawn cases and
a fixed ``--hypothesis-seed`` under the random ``dev`` profile, and prints, per test, the worst
``error / tolerance`` the suite recorded (``Subject.worst``), the check it came from, and whether
the test passed. A hunt, run by hand when the precision rule changes (`nsa_impl.numerics`); never
part of CI (it takes minutes, and a bench never asserts)::

    PYTHONPATH=$PWD python bench/lowp_margin.py --impl nsa_impl --examples 500
    PYTHONPATH=$PWD python bench/lowp_margin.py --impl nsa_ref --seed 1 --lane bfloat16

``--examples N`` is the number of drawn cases per test: NSA-DENSE-CROSSCHECK draws 4 per
``--examples`` unit, so it gets ``N / 4`` there (N cases in both tests). Tests: the random-structure
cross-check against the dense formulation (NSA-DENSE-CROSSCHECK) and the packed-sequence oracle
(NSA-I1-VARLEN-ORACLE, ``test_packed_against_the_oracle``); ``--test`` takes other node ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_TESTS = {
    "conformance/tests/test_parity.py::test_equals_dense_formulation_on_random_structures": 4,
    "conformance/tests/test_varlen.py::test_packed_against_the_oracle": 1,
}


class _Worst:
    """pytest plugin: the worst recorded ratio of every test (from its user properties)."""

    def __init__(self):
        self.rows: list[tuple[str, float, float, float, str, str, int]] = []

    def pytest_runtest_makereport(self, item, call):
        if call.when != "call":
            return
        props = dict(item.user_properties)
        err, tol = props.get("worst_error"), props.get("tolerance")
        ratio = float("nan") if err is None else (err / tol if tol else float("inf") * (err > 0))
        status = "passed" if call.excinfo is None else f"FAILED ({call.excinfo.typename})"
        self.rows.append((item.nodeid, ratio, err or 0.0, tol or 0.0,
                          str(props.get("worst_check", "")), status,
                          int(props.get("cases", 0))))  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="nsa_impl", help="adapter (default nsa_impl)")
    parser.add_argument("--lane", default="bfloat16", help="dtype lane (default bfloat16)")
    parser.add_argument("--examples", type=int, default=500, help="drawn cases per test")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--test", action="append", default=[], help="test node id (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["HYPOTHESIS_PROFILE"] = "dev"  # random draws (ci is derandomized), seeded below
    import pytest

    tests = {t: 1 for t in args.test} if args.test else DEFAULT_TESTS
    plugin = _Worst()
    start = time.perf_counter()
    for node, per_unit in tests.items():
        examples = max(2, -(-args.examples // per_unit) + (per_unit == 1))  # own case + N drawn
        pytest.main([node, "-q", "-p", "no:cacheprovider", f"--impl={args.impl}",
                     f"--lanes={args.lane}", f"--examples={examples}",
                     f"--hypothesis-seed={args.seed}", "--no-header", "-rN"],
                    plugins=[plugin])  # fmt: skip
    print(f"\n{args.impl}, lane {args.lane}, {args.examples} drawn cases per test, hypothesis "
          f"seed {args.seed}, {time.perf_counter() - start:.0f} s")  # fmt: skip
    print("| test | cases | worst error / tolerance | error | tolerance | check | status |")
    print("|---|---|---|---|---|---|---|")
    for node, ratio, err, tol, what, status, cases in plugin.rows:
        print(f"| {node.split('::')[-1]} | {cases} | {ratio:.3f} | {err:.3g} | {tol:.3g} | {what} "
              f"| {status} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
