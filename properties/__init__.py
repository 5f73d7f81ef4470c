"""Property tests of the NSA spec (Part II §6, P1-P29) on the exact reference `nsa_ref`.

`properties.strategies` draws structure (sizes, config, value regime, seed) with hypothesis and
builds tensors from ``torch.Generator``; `properties.oracles` are thin calls of the project's
independent dense-mask formulation, `conformance.dense`. Profiles (``dev``, ``ci``, ``deep``)
live in the repository-root conftest.
"""
