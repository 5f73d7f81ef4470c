"""Clause tests of the conformance suite (run with ``--impl NAME --device cpu|cuda``)."""
