"""The pytest side of the suite: options, header, clause markers, capability skips, fixtures.

``conformance/tests/conftest.py`` star-imports this module. Options:

``--impl NAME``     implementation adapter (default ``$NSA_CONFORMANCE_IMPL`` or ``nsa_ref``)
``--device DEV``    ``cpu`` or ``cuda`` (default ``$NSA_CONFORMANCE_DEVICE`` or ``cpu``)
``--mutant NAME``   wrap the adapter with a broken reference variant (`conformance.mutants`)
``--clause ID``     run only the tests of this clause (repeatable)
``--lanes LIST``    dtypes to run in, e.g. ``float32,bfloat16`` (default: float64, float32 and
                    bfloat16 where declared, plus float16 on a GPU; env ``NSA_CONFORMANCE_LANES``)
``--examples N``    cases per numeric clause test: its own fixed case, then N-1 drawn by
                    hypothesis (seed, batch, head dims; `conformance.checks.Subject.vary`);
                    default 3, or 12 under the ``deep`` hypothesis profile; env
                    ``NSA_CONFORMANCE_EXAMPLES``

Every clause test carries ``@pytest.mark.clause("NSA-...")``. The ids are checked against
`conformance.clauses` at collection, attached to each test's ``user_properties`` (so JUnit and
the report collector see them), and a clause's ``needs`` that the adapter does not declare
skip the test with the reason. The ``lane`` fixture is parametrized with the adapter's precision
lanes (`conformance.checks.lanes_for`); ``subject`` is the adapter bound to the test's recorder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import adapters, clauses, mutants
from .checks import Subject, lanes_for

_TESTS_DIR = Path(__file__).parent / "tests"


@dataclass
class SuiteState:
    """The implementation under test for this session."""

    adapter: object
    device: str
    mutant: str | None
    unavailable: str | None  # why nothing can run (skip reason), or None
    lanes: list = field(default_factory=list)  # precision lanes (`conformance.checks.Lane`)
    examples: int = 1  # cases per numeric clause test (``--examples``)


_STATE = pytest.StashKey[SuiteState]()


def pytest_addoption(parser):
    """``--impl``, ``--device``, ``--mutant``, ``--clause``, ``--lanes``."""
    group = parser.getgroup("nsa-conformance", "NSA conformance suite")
    group.addoption(
        "--impl",
        default=None,
        metavar="NAME",
        help=f"implementation adapter (default ${adapters.ENV_IMPL} or nsa_ref)",
    )
    group.addoption(
        "--device",
        default=None,
        choices=adapters.DEVICES,
        help=f"device of the tensors (default ${adapters.ENV_DEVICE} or cpu)",
    )
    group.addoption(
        "--mutant",
        default=None,
        metavar="NAME",
        help="run against a deliberately broken reference (conformance.mutants)",
    )
    group.addoption(
        "--clause",
        action="append",
        default=[],
        metavar="ID",
        help="run only the tests of this clause id (repeatable)",
    )
    group.addoption(
        "--lanes",
        default=None,
        metavar="LIST",
        help="comma-separated dtypes to run in (default: float64, float32, bfloat16 where "
        "declared, + float16 on GPU)",
    )
    group.addoption(
        "--examples",
        default=None,
        type=int,
        metavar="N",
        help="cases per numeric clause test: its own + N-1 hypothesis-drawn (default 3; 12 "
        "under the deep profile)",
    )


def pytest_configure(config):
    """Resolve the adapter once; register the clause marker (harmless if pyproject has it)."""
    config.addinivalue_line("markers", "clause(id): the conformance clause a test checks")
    config.addinivalue_line(
        "markers", "draws_own_cases: the test draws its cases itself (no drawn-case wrapper)"
    )
    try:
        adapter = adapters.get_adapter(config.getoption("--impl"))
        device = adapters.resolve_device(config.getoption("--device"))
        name = config.getoption("--mutant")
        if name:
            adapter = mutants.MutantAdapter(adapter, mutants.get(name))
        unavailable = adapters.device_reason(adapter, device)
        names = config.getoption("--lanes") or os.environ.get("NSA_CONFORMANCE_LANES")
        lanes = (
            []
            if unavailable
            else lanes_for(adapter.capabilities, device, names.split(",") if names else None)
        )
        examples = _examples(config.getoption("--examples"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_STATE] = SuiteState(adapter, device, name, unavailable, lanes, examples)


DEFAULT_EXAMPLES, DEEP_EXAMPLES = 3, 12


def _examples(option: int | None) -> int:
    """``--examples``, else ``$NSA_CONFORMANCE_EXAMPLES``, else 3 (12 under a deep profile)."""
    raw = option if option is not None else os.environ.get("NSA_CONFORMANCE_EXAMPLES")
    if raw is None:
        from hypothesis import settings

        return DEEP_EXAMPLES if settings.default.max_examples > 100 else DEFAULT_EXAMPLES
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"--examples must be an integer >= 1, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"--examples must be an integer >= 1, got {n}")
    return n


def state(config) -> SuiteState:
    """This session's `SuiteState`."""
    return config.stash[_STATE]


def pytest_report_header(config):
    """The implementation under test, its device, lanes and capabilities."""
    st = state(config)
    lines = [
        f"nsa-conformance: implementation under test = {st.adapter.name} "
        f"({st.adapter.description}); device = {st.device}"
    ]
    if st.unavailable:
        lines.append(f"nsa-conformance: every clause test skips: {st.unavailable}")
    else:
        lanes = ", ".join(str(lane) for lane in st.lanes) or "none"

        lines.append(f"nsa-conformance: lanes = {lanes}; {st.adapter.capabilities.summary()}")
        lines.append(f"nsa-conformance: {st.examples} case(s) per numeric clause test")
    return lines


def clause_ids(item) -> list[str]:
    """The clause ids of a test (all its ``clause`` markers)."""
    return [cid for m in item.iter_markers("clause") for cid in m.args]


def pytest_collection_modifyitems(config, items):
    """Check clause ids, attach them to ``user_properties``, apply ``--clause``."""
    wanted = set(config.getoption("--clause") or [])
    unknown = wanted - set(clauses.BY_ID)
    if unknown:
        raise pytest.UsageError(f"--clause: unknown id(s) {sorted(unknown)}")
    keep, drop = [], []
    for item in items:
        ids = clause_ids(item)
        if not ids:
            keep.append(item)
            continue
        for cid in ids:
            if cid not in clauses.BY_ID:
                raise pytest.UsageError(f"{item.nodeid}: unknown clause id {cid!r}")
        item.user_properties.append(("clause", ",".join(ids)))
        (keep if not wanted or wanted & set(ids) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item):
    """Skip (with the reason) when the adapter cannot run or lacks a clause's capability."""
    ids = clause_ids(item)
    if not ids:
        return
    st = state(item.config)
    if st.unavailable:
        pytest.skip(st.unavailable)
    for cid in ids:
        for need in clauses.BY_ID[cid].needs:
            why = st.adapter.capabilities.missing(need, st.device)
            if why:
                pytest.skip(f"{cid}: {st.adapter.name} {why}")


def pytest_generate_tests(metafunc):
    """Parametrize ``lane`` with the adapter's precision lanes on this device."""
    if "lane" not in metafunc.fixturenames:
        return
    st = state(metafunc.config)
    lanes = st.lanes
    if lanes:
        metafunc.parametrize("lane", lanes, ids=[lane.name for lane in lanes])
    else:
        reason = st.unavailable or f"{st.adapter.name} declares no dtype usable on {st.device}"
        metafunc.parametrize(
            "lane", [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ids=["no-lane"]
        )


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Clause tests use tiny tensors: torch's intra-op threads only add contention (measured
    8x slower on a busy 2-core machine). Restored after each test, so nothing else changes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def subject(request) -> Subject:
    """The implementation under test, recording errors into this test's report properties."""
    st = state(request.config)
    ids = clause_ids(request.node)
    return Subject(
        st.adapter,
        st.device,
        clauses=[clauses.BY_ID[c] for c in ids],
        node=request.node,
        mutant=st.mutant,
        examples=st.examples,
    )


def _numeric(item) -> bool:
    return any(clauses.BY_ID[c].tolerance != "structural" for c in clause_ids(item))


def pytest_pyfunc_call(pyfuncitem):
    """A numeric clause test runs its own fixed case, then ``examples - 1`` drawn cases.

    The drawn cases rerun the test body with `Subject.drawing`: every `fit` in it draws the
    seed, batch and head dims (`Subject.vary`) from hypothesis, derandomized under the ``ci``
    profile. A drawn case that the adapter cannot run (a skip) is rejected, not counted.
    Structural clauses and tests marked ``draws_own_cases`` run as written.
    """
    subject = pyfuncitem.funcargs.get("subject")
    if not isinstance(subject, Subject) or not clause_ids(pyfuncitem):
        return None
    fn = pyfuncitem.obj
    kwargs = {a: pyfuncitem.funcargs[a] for a in pyfuncitem._fixtureinfo.argnames}
    if pyfuncitem.get_closest_marker("draws_own_cases"):
        fn(**kwargs)
        return True
    subject.count_case()
    fn(**kwargs)
    if subject.examples > 1 and _numeric(pyfuncitem):
        from hypothesis import given, reject
        from hypothesis import strategies as hst

        @given(hst.data())
        @subject.hypothesis_settings(subject.examples - 1)
        def drawn(data):
            with subject.drawing(data):
                try:
                    fn(**kwargs)
                except pytest.skip.Exception:
                    reject()
            subject.count_case()

        drawn()
    return True
