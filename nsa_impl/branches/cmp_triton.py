"""The compressed branch and block selection on the Triton kernels: the ``triton`` path of "cmp".

`compressed_and_select` has the contract of `nsa_impl.scoring.compressed_and_select` (spec
I.3-I.5, Eqs. 8-11) and returns the same `nsa_impl.scoring.Scores`, in two launches and no
copies of ``q``:

1. `nsa_impl.kernels.triton_attn.cmp_attention`: ``o_cmp`` (autograd) and the log-sum-exp.
2. `nsa_impl.kernels.triton_topn.select_blocks`: scores and top-n fused; ``p_slc`` is written
   only for ``want_aux`` (then ``p_cmp`` is rebuilt from the log-sum-exp in torch, aux only).

The geometry (token and block boundaries of each sequence) is built from the host-side layouts,
so nothing here waits for the device.
"""

from __future__ import annotations

import torch

from nsa_ref.config import NSAConfig

from .. import scoring
from ..kernels import triton_attn, triton_topn
from ..varlen import PackedLayout
from .compressed import CmpLayout


def boundaries(cfg: NSAConfig, layout: PackedLayout, B: int, device):
    """int64 ``(qstart, kstart)`` of the ``S`` sequences: tokens in ``q``, blocks in ``k_cmp``.

    Without ``cu_seqlens`` (one sequence per batch row) the ``B`` rows are the sequences.
    """
    if layout.num_seqs == 1:
        T, N = layout.T, cfg.num_cmp(layout.T - 1)
        qstart = torch.arange(B + 1, dtype=torch.int64) * T
        kstart = torch.arange(B + 1, dtype=torch.int64) * N
    else:
        counts = [cfg.num_cmp(n - 1) for n in layout.lengths]
        qstart = torch.tensor(layout.bounds, dtype=torch.int64)
        kstart = torch.cumsum(torch.tensor([0] + counts, dtype=torch.int64), 0)
    return qstart.to(device, non_blocking=True), kstart.to(device, non_blocking=True)


def compressed_and_select(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cfg: NSAConfig,
    scale: float,
    layout: PackedLayout,
    cmp_layout: CmpLayout,
    *,
    want_aux: bool = False,
    attn_tuning=None,
    topn_tuning=None,
) -> scoring.Scores:
    """Drop-in for `nsa_impl.scoring.compressed_and_select` on the Triton kernels.

    ``attn_tuning`` / ``topn_tuning`` override the device profile's launch shapes.
    """
    B, T, H, Dk = q.shape
    G, Dv = k_cmp.shape[2], v_cmp.shape[-1]
    if cmp_layout.num_blocks == 0:  # no row sees a compressed block: nothing to attend or score
        return scoring.compressed_and_select(
            q, k_cmp, v_cmp, cfg, scale, layout, cmp_layout, want_aux=want_aux
        )
    qstart, kstart = boundaries(cfg, layout, B, q.device)
    max_len = max(layout.lengths)
    q3 = q.reshape(B * T, H, Dk)
    kc3 = k_cmp.reshape(-1, G, Dk)
    o, lse = triton_attn.cmp_attention(
        q3, kc3, v_cmp.reshape(-1, G, Dv), qstart, kstart, max_len,
        cfg.cmp_block, cfg.cmp_stride, scale, tuning=attn_tuning,
    )  # fmt: skip
    num_scores = cfg.num_sel_blocks(T) if want_aux else 0
    idx, sc = triton_topn.select_blocks(
        q3.detach(), kc3.detach(), lse, qstart, kstart, max_len,
        cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block,
        top_n=cfg.sel_top_n, init_blocks=cfg.sel_init_blocks, local_blocks=cfg.sel_local_blocks,
        scale=scale, num_scores=num_scores, tuning=topn_tuning,
    )  # fmt: skip
    p_slc = p_cmp = None
    if want_aux:
        with torch.no_grad():
            p_slc = sc.reshape(B, T, G, num_scores).to(q.dtype)
            # The flash path's aux helper takes the log-sum-exp as [B, H, T].
            from ..kernels.flash_cmp import _aux_p_cmp

            lse_bht = lse.reshape(B, T, H).transpose(1, 2)
            p_cmp = _aux_p_cmp(q, k_cmp, lse_bht, cmp_layout, cfg, scale)
    return scoring.Scores(o.reshape(B, T, H, Dv), idx.reshape(B, T, G, cfg.sel_top_n), p_slc, p_cmp)
