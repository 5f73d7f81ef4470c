"""The library's one precision rule: in which dtype attention is computed for each input dtype.

* float64 and float32 inputs: logits, softmax and ``probabilities @ values`` run in **float64**,
  and each branch output is rounded to the input dtype once. float32 is the parity dtype (spec
  I.10, ``fp32`` class: 1e-6 against the reference): a float32 softmax over a few hundred keys
  followed by a float32 ``p @ v`` already costs several ulps (measured 4e-7 per branch and 1e-6
  between decode and prefill at T = 2048), whereas computing in float64 leaves only the final
  rounding, so two paths that compute the same row (prefill and decode, masked and packed)
  agree to about one ulp.
* float16 / bfloat16 inputs: matrix products in the input dtype (tensor cores) with float32
  softmax and accumulation; logits are scaled before they are formed (``(q * scale) @ k^T``) so a
  finite scaled logit never overflows float16.

The gate combine (Eq. 5) runs in the input dtype, by `nsa_ref.reference.gate`, on every path.
The Triton and FlashAttention kernels keep their own (float32-accumulating) arithmetic.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype attention is computed in for inputs of ``dtype`` (see the module docstring)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the matrix products for ``dtype`` inputs: float64 at full precision (float32,
    float64), the input's own dtype for float16/bfloat16 (tensor cores)."""
    return compute_dtype(dtype) if dtype in (torch.float32, torch.float64) else dtype
