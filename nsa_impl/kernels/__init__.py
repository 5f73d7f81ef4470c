"""The bottom layer: GPU kernels and their launchers (imports nothing above ``kernels/``).

* `nsa_impl.kernels.ops`: what every kernel shares: the problem description (`Inputs`) their
  ``supports`` answers, the custom-op helper (every kernel call is a
  ``torch.library.custom_op`` with ``register_fake``), NaN containment helpers, the explicit
  tuning object (`TUNING`) for benchmarks and tests.
* `nsa_impl.kernels.triton_sel`: Triton selection attention (forward + backward), spec I.6.
* `nsa_impl.kernels.flash`: FlashAttention-2 varlen with a left window (the sliding-window
  branch, spec I.7, and the causal call with its log-sum-exp that the compressed branch uses).
* `nsa_impl.kernels.flash_cmp`: the compressed branch (FA-2 over query groups) with the
  selection scores and top-n as Triton kernels (`_cmp_kernels`), spec I.3-I.5.
* `nsa_impl.kernels.triton_attn`: Triton row-range attention, forward + backward: the compressed
  branch with its log-sum-exp (spec I.3, Eq. 8) and the sliding window (spec I.7), v4.
* `nsa_impl.kernels.triton_topn`: the fused selection scores + top-n (spec I.4-I.5, Eqs. 9-11).
* `nsa_impl.kernels.triton_gate`: the gate combine (Eq. 5), forward + backward.
* `nsa_impl.kernels.tuning`: launch shapes (explicit tuning objects) and the per-GPU-class
  profiles (``profiles/*.json``) that hold their defaults and the router's thresholds.
* `nsa_impl.kernels._loader`: loads a kernel file compiled or interpreted (``TRITON_INTERPRET``).

Which kernel runs, and every fallback, is decided above, in `nsa_impl.dispatch`. Importing this
package imports neither triton nor CUDA; each module loads what it needs lazily.
"""
