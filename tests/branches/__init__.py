"""Tests of nsa_impl.branches (one module per source module)."""
