"""Workloads for benchmarks and GPU tests: paper-shaped block selections, and the small
command-line helpers the sweep scripts share.

`random_block_indices` draws the selection the Triton kernels see in training without running
the compressed branch (random scores, the forced blocks of spec I.5), so the selection kernels
can be timed and tested at any length on their own. `parse_pair` reads ``--dims 192/128`` and
``--heads 64/4``; `write_rows_csv` writes a sweep's rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def parse_pair(text: str, flag: str) -> tuple[int, int]:
    """``"A/B"`` -> ``(A, B)``, positive ints; ``SystemExit`` naming ``flag`` otherwise."""
    try:
        a, b = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"{flag} takes two ints as A/B, got {text!r}") from None
    if a < 1 or b < 1:
        raise SystemExit(f"{flag} takes positive ints, got {text!r}")
    return a, b


def write_rows_csv(out_dir: str, name: str, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as ``out_dir/name``, the directory made if needed."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir, name), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def random_block_indices(B, T, G, n, sel_block, *, generator=None, device=None, coherent=False,
                         chunk=8192):
    """Paper-shaped selections for tests and benchmarks: ``[B, T, G, n]`` int64, ascending.

    Each (position, group) gets the forced blocks ``0, b(p)-1, b(p)`` and ``n - 3`` further
    distinct candidates ``<= b(p)`` drawn at random, ``-1`` padded when fewer exist (spec I.5's
    shape, random scores). ``coherent=True`` draws one score vector per query block of
    ``sel_block`` positions (neighbours then select the same blocks, as trained models tend to);
    the default draws per position, the worst case for sharing. Memory is bounded by ``chunk``.
    """
    nb = -(-T // sel_block)
    j = torch.arange(nb, device=device)
    out = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        b = torch.arange(t0, t1, device=device) // sel_block
        if coherent:
            draw = torch.rand(B, nb, G, nb, device=device, generator=generator)
            score = draw[:, b]
        else:
            score = torch.rand(B, t1 - t0, G, nb, device=device, generator=generator)
        cand = (j[None, :] <= b[:, None])[None, :, None, :]
        forced = ((j[None, :] == 0) | (j[None, :] >= b[:, None] - 1))[None, :, None, :]
        score = torch.where(cand & forced, 2.0, torch.where(cand, score, -1.0))
        top = torch.topk(score, min(n, nb), dim=-1)
        idx = torch.where(top.values >= 0, top.indices, nb)
        idx = torch.sort(idx, dim=-1).values
        out.append(torch.where(idx == nb, -1, idx))
    idx = torch.cat(out, dim=1)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)], -1)
    return idx
