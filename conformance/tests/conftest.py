"""Options, header, clause markers and fixtures of the clause tests: see `conformance.plugin`."""

from conformance.plugin import (  # noqa: F401  (pytest finds hooks and fixtures by name)
    _one_cpu_thread,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_generate_tests,
    pytest_pyfunc_call,
    pytest_report_header,
    pytest_runtest_setup,
    subject,
)
