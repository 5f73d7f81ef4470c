"""The rules of NSA, one small function each (spec Part I).

`nsa_ref.reference` composes these; nothing here is clever. Each function is a single decision of
the spec so that the conformance suite can swap one for a deliberately broken twin (a "mutant")
and show that some clause rejects it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import NSAConfig
from .validate import check_phi_output

Phi = Callable[[torch.Tensor], torch.Tensor]


def visible_cmp_blocks(p: int, cfg: NSAConfig) -> int:
    """Eq. 7 visibility: compressed block ``i`` is visible to ``p`` iff ``i*d + l <= p + 1``."""
    return cfg.num_cmp(p)


def mean_pool(blocks: torch.Tensor) -> torch.Tensor:
    """Default ``phi`` (spec I.3): mean over a block's ``l`` keys, ``[..., l, D] -> [..., D]``."""
    return blocks.mean(dim=-2)


def compress(
    x: torch.Tensor, num_blocks: int, cfg: NSAConfig, phi: Phi | None, *, name: str = "phi"
) -> torch.Tensor:
    """Eq. 7: ``x [T, G, D] -> [num_blocks, G, D]``, block ``i`` = ``phi(x[i*d : i*d + l])``.

    ``phi``'s result is checked (`validate.check_phi_output`, errors name ``name``).
    """
    l, d = cfg.cmp_block, cfg.cmp_stride
    if num_blocks == 0:
        return x.new_zeros(0, x.shape[1], x.shape[2])
    blocks = torch.stack([x[i * d : i * d + l] for i in range(num_blocks)])  # [N, l, G, D]
    blocks = blocks.permute(2, 0, 1, 3)  # [G, N, l, D]
    pooled = check_phi_output(name, (phi or mean_pool)(blocks), blocks)  # [G, N, D]
    return pooled.permute(1, 0, 2)


def overlap_weights(
    num_sel: int, num_cmp: int, cfg: NSAConfig, dtype=torch.float64
) -> torch.Tensor:
    """Eq. 9 as overlap weights (spec I.4): ``W[j, i] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d``."""
    l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    W = torch.zeros(num_sel, num_cmp, dtype=dtype)
    for j in range(num_sel):
        for i in range(num_cmp):
            overlap = min(i * d + l, (j + 1) * ls) - max(i * d, j * ls)
            if overlap > 0:
                W[j, i] = overlap / d
    return W


def group_scores(p_slc_heads: torch.Tensor, h: int) -> torch.Tensor:
    """Eq. 10: sum the ``h`` query heads of each group, ``[H, S] -> [G, S]``."""
    H, S = p_slc_heads.shape
    return p_slc_heads.reshape(H // h, h, S).sum(dim=1)


def forced_blocks(b: int, cfg: NSAConfig) -> list[int]:
    """Spec I.5: initial blocks and the current/previous local blocks, within ``0 .. b``."""
    init = range(min(cfg.sel_init_blocks, b + 1))
    local = range(max(0, b - cfg.sel_local_blocks + 1), b + 1)
    return sorted(set(init) | set(local))


def top_n_blocks(scores: list[float], b: int, cfg: NSAConfig) -> list[int]:
    """Eq. 11 (spec I.5): forced blocks, then the best-scored candidates up to ``min(n, b+1)``.

    ``scores[j]`` is the group score of candidate ``j = 0 .. b``. Ties: higher score first, then
    the lower block index. Returns the selected blocks in ascending order.
    """
    forced = forced_blocks(b, cfg)
    rest = sorted((j for j in range(b + 1) if j not in forced), key=lambda j: (-scores[j], j))
    budget = min(cfg.sel_top_n, b + 1) - len(forced)
    return sorted(forced + rest[:budget])


def selected_keys(blocks: list[int], p: int, cfg: NSAConfig) -> list[int]:
    """Eq. 12 + token causality (spec I.6): the keys of the selected blocks that are ``<= p``.

    A duplicated or ``-1`` index never changes the set.
    """
    ls = cfg.sel_block
    keys = set()
    for j in blocks:
        if j >= 0:
            keys.update(range(j * ls, min((j + 1) * ls, p + 1)))
    return sorted(keys)


def window_keys(p: int, cfg: NSAConfig) -> list[int]:
    """Sliding window (spec I.7): keys ``p - w < s <= p``, exactly ``min(w, p+1)`` of them."""
    return list(range(max(0, p - cfg.window + 1), p + 1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Eq. 2 over exactly the given keys: ``q [H, Dk]``, ``k [n, H, Dk]``, ``v [n, H, Dv]``.

    Returns ``(o [H, Dv], probs [H, n])``. An empty key set gives exact zeros (spec I.3).
    float32 inputs are computed in float64 and ``o`` is rounded to float32 once (spec I.10:
    the float32 reference is the rounding of the exact result, so the ``fp32`` class measures
    the path under test, not float32 reductions here); ``probs`` stay in the wider dtype.
    float16/bfloat16 inputs are computed in float32 the same way: an fp16 ``q.k`` may overflow
    although the scaled logit is moderate (spec I.10, NSA-LOWP-LARGE-LOGITS), and their ``o``
    stays in float32: the callers combine the branches by Eq. 5 in float32 and round once
    (`nsa_ref.reference`, `nsa_ref.decode`), and the gradients run in float32 too.
    """
    H, Dv = q.shape[0], v.shape[-1]
    wide = {torch.float32: torch.float64, torch.float16: torch.float32,
            torch.bfloat16: torch.float32}.get(q.dtype, q.dtype)  # fmt: skip
    half = q.dtype in (torch.float16, torch.bfloat16)
    if k.shape[0] == 0:
        return q.new_zeros(H, Dv, dtype=wide if half else q.dtype), q.new_zeros(H, 0)
    logits = torch.einsum("hd,nhd->hn", q.to(wide), k.to(wide)) * scale
    probs = torch.softmax(logits, dim=-1)
    o = torch.einsum("hn,nhd->hd", probs, v.to(wide))
    if half:  # kept in float32: `nsa_ref.reference` rounds after Eq. 5 (spec I.10)
        return o, probs
    return o.to(q.dtype), probs
