"""Unit tests of the exact reference nsa_ref."""
