"""GPU kernels behind the ``triton`` and ``flash`` routing paths.

* `nsa_impl.kernels.triton_sel`: Triton selection attention (forward + backward), spec I.6.
* `nsa_impl.kernels.flash`: the sliding-window branch through FlashAttention-2, spec I.7.
* `nsa_impl.kernels.naive`: plain-PyTorch twins of both (tests, low-precision criterion).

Importing this package imports neither triton nor CUDA; each module loads what it needs lazily.
"""
