"""Tests of the conformance suite's own helpers, registry and mutants."""
