"""Tests of nsa_impl.kernels (CPU: Triton interpreter / dense stand-ins; GPU: marked gpu)."""
