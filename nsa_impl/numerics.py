"""The library's one precision rule: in which dtype attention is computed for each input dtype.

* float64 and float32 inputs: logits, softmax and ``probabilities @ values`` run in **float64**,
  and each branch output is rounded to the input dtype once. float32 is the parity dtype (spec
  I.10, ``fp32`` class: 1e-6 against the reference): a float32 softmax over a few hundred keys
  followed by a float32 ``p @ v`` already costs several ulps (measured 4e-7 per branch and 1e-6
  between decode and prefill at T = 2048), whereas computing in float64 leaves only the final
  rounding, so two paths that compute the same row (prefill and decode, masked and packed)
  agree to about one ulp.
* float16 / bfloat16 inputs: float32 softmax and accumulation; logits are scaled before they are
  formed (``(q * scale) @ k^T``) so a finite scaled logit never overflows float16. The matrix
  products (`product_dtype`) run in the input dtype where tensor cores make that faster (CUDA),
  and in float32 on devices without them (the CPU): there a bfloat16 ``matmul`` is no faster,
  and rounding the probabilities to bfloat16 before ``p @ v`` (8 mantissa bits) costs accuracy
  for nothing.

The gate combine (Eq. 5) is `nsa_ref.reference.gate` on every path: float32/float64 in the
input dtype (decode and prefill then agree bit for bit), float16/bfloat16 in float32 rounded
once, as the fused Triton gate and the decode kernel do (three products and two sums rounded
to bfloat16 one by one cost more than the branch outputs' own rounding).
The rule reaches past the products (`work_dtype`): where half-precision products run in float32,
`nsa_impl.nsa_attention` hands the torch paths float32 copies of ``q``, ``k``, ``v`` and the
gates (each input cast once, so the gradients that several branches send it meet in float32),
keeps the branch outputs in float32 through the gate, and rounds the output (and the aux
fields) to the input dtype once. A branch on a kernel path (triton, flash) still gets its
inputs in the input dtype. Compression by a user ``phi`` sees the input dtype (its parameters
are in it); the default mean pools in float32.
The Triton and FlashAttention kernels keep their own (float32-accumulating) arithmetic.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype attention is computed in for inputs of ``dtype`` (see the module docstring)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


#: Device types whose half-precision matrix products run on tensor cores (faster than float32).
TENSOR_CORE_DEVICES = frozenset({"cuda"})


def product_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """Dtype of the matrix products for ``dtype`` inputs on ``device``: float64 at full
    precision (float32, float64); for float16/bfloat16 the input's own dtype on a device with
    tensor cores (`TENSOR_CORE_DEVICES`), float32 elsewhere (the module docstring says why)."""
    if dtype in (torch.float32, torch.float64):
        return compute_dtype(dtype)
    return dtype if torch.device(device).type in TENSOR_CORE_DEVICES else torch.float32


def work_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """Dtype the torch paths receive and the branch outputs are carried in for ``dtype`` inputs
    on ``device``: float32 for half precision where its products run in float32
    (`product_dtype`), else ``dtype`` itself (module docstring)."""
    if dtype in (torch.float16, torch.bfloat16) and product_dtype(dtype, device) != dtype:
        return product_dtype(dtype, device)
    return dtype
