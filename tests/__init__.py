"""Unit tests of nsa_impl (mirroring its modules) and nsa_ref (tests/nsa_ref)."""
