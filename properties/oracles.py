"""Thin calls of the project's independent oracle, the dense-mask formulation `conformance.dense`.

The properties compare `nsa_ref` against it: it is written from spec Part I with boolean masks
and shares no code with `nsa_ref`'s per-row loops or its `rules`, so a wrong rule there cannot
hide behind the same wrong rule here. Nothing here computes attention itself.
"""

from __future__ import annotations

import torch

from conformance import dense
from nsa_ref import NSAConfig

from .strategies import Inputs, phi_function


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` as a float, 0 for empty tensors (a comparison of nothing passes)."""
    return float((a - b).abs().max()) if a.numel() else 0.0


def overlap_weights(num_sel: int, num_cmp: int, cfg: NSAConfig) -> torch.Tensor:
    """Eq. 9 weights ``W [num_sel, num_cmp]`` (float64), by interval arithmetic."""
    return dense.overlap_matrix(num_sel, num_cmp, cfg)


@torch.no_grad()
def branches(inputs: Inputs, cfg: NSAConfig, block_indices: torch.Tensor) -> dict:
    """``cmp``, ``sel``, ``win`` and causal ``full`` outputs ``[B, T, H, Dv]`` of the dense
    oracle; selection uses the given ``block_indices`` (the reference's choice, checked
    elsewhere); ``full`` is causal attention over the ``sel`` branch's keys."""
    phi = phi_function(inputs.structure.phi)
    out = dense.nsa_dense(
        inputs.q, inputs.k, inputs.v, inputs.gates, cfg, phi_k=phi, phi_v=phi,
        branch_kv=inputs.branch_kv, cu_seqlens=inputs.cu_seqlens, block_indices=block_indices,
    )  # fmt: skip
    k_sel, v_sel = inputs.kv("sel")
    full = dense.causal_attention(inputs.q, k_sel, v_sel, cu_seqlens=inputs.cu_seqlens)
    return {"cmp": out.o_cmp, "sel": out.o_sel, "win": out.o_win, "full": full}


@torch.no_grad()
def selected_key_counts(inputs: Inputs, cfg: NSAConfig, block_indices: torch.Tensor):
    """``[B, T, G]``: keys ``<= p`` in each row's (deduplicated) selected blocks."""
    phi = phi_function(inputs.structure.phi)
    return dense.nsa_dense(
        inputs.q, inputs.k, inputs.v, inputs.gates, cfg, phi_k=phi, phi_v=phi,
        branch_kv=inputs.branch_kv, cu_seqlens=inputs.cu_seqlens, block_indices=block_indices,
    ).reads_sel  # fmt: skip
