"""The load-balanced context-parallel layout: which tokens of a (packed) row each rank holds.

Causal attention makes late tokens costlier than early ones (a query at position ``p`` reads
``O(p / d)`` compressed blocks, and the selection's and the window's gathers grow until
``p = n * l'``), so contiguous shards would leave rank 0 idle while the last rank works. The row
is cut into ``2R`` equal chunks for ``R`` ranks and rank ``r`` holds chunks ``r`` and
``2R - 1 - r`` (one early, one late; the pairs' costs sum to about the same on every rank, the
layout of Megatron's and flash_nsa's context parallelism). Locally the two chunks are
concatenated in that order: local rows ``[0, C)`` are chunk ``r``, ``[C, 2C)`` chunk
``2R - 1 - r``, i.e. the rank's global rows ascend.

Uneven lengths: a row of ``T`` tokens is padded at its end to ``T_pad = 2R * C`` with
``C = ceil(T / 2R)`` rounded up to a multiple of ``multiple``. The padding is one more packed
sequence ``[T, T_pad)`` (its own positions, its own compressed blocks, attended only by itself),
so no real token sees a pad token and the real rows' results are exactly those of the unpadded
row. The pad rows' outputs are meaningless: give them ``IGNORE_INDEX`` targets (or drop them
with `CPLayout.unshard`). A sequence shorter than a chunk, a document that crosses a chunk (and a
rank) boundary, or a chunk boundary through a compressed or selection block are all fine: every
rank sees all keys (`nsa_impl.parallel.attention`), only its query rows are its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_ref.scalars import as_int
from nsa_ref.validate import check_cu_seqlens


@dataclass(frozen=True)
class CPLayout:
    """Load-balanced layout of a row of ``T`` tokens over ``world`` ranks (module docstring).

    Attributes:
        world: ranks ``R``.
        T: real tokens of the row.
        chunk: ``C``, tokens per chunk (``2R`` chunks).
        bounds: sequence boundaries of the padded row ``(0, ..., T[, T_pad])``: the caller's
            ``cu_seqlens`` (or one sequence), plus the pad sequence when ``T_pad > T``.
    """

    world: int
    T: int
    chunk: int
    bounds: tuple[int, ...]

    @classmethod
    def build(cls, T: int, world: int, *, cu_seqlens: torch.Tensor | None = None,
              multiple: int = 1) -> CPLayout:  # fmt: skip
        """The layout of ``T`` tokens (``cu_seqlens``: int32 ``[N+1]`` boundaries of packed
        sequences, read once on the host) over ``world`` ranks; ``multiple`` rounds the chunk
        size up (e.g. to a kernel tile)."""
        T = as_int("T", T, minimum=1)
        world = as_int("world", world, minimum=1)
        multiple = as_int("multiple", multiple, minimum=1)
        bounds = [0, T] if cu_seqlens is None else check_cu_seqlens(cu_seqlens, 1, T)
        chunks = 2 * world
        chunk = -(-T // chunks)
        chunk = -(-chunk // multiple) * multiple
        if chunk * chunks > T:
            bounds.append(chunk * chunks)  # the pad sequence
        return cls(world, T, chunk, tuple(bounds))

    @property
    def T_pad(self) -> int:
        """Padded length ``2R * C``."""
        return 2 * self.world * self.chunk

    @property
    def local_len(self) -> int:
        """Rows per rank ``2C``."""
        return 2 * self.chunk

    def chunks_of(self, rank: int) -> tuple[int, int]:
        """The two chunks rank ``rank`` holds: ``(rank, 2R - 1 - rank)``."""
        rank = as_int("rank", rank, minimum=0)
        if rank >= self.world:
            raise ValueError(f"rank must be < world={self.world}, got {rank}")
        return rank, 2 * self.world - 1 - rank

    def rows(self, rank: int) -> torch.Tensor:
        """Host int64 ``[2C]``: the global (padded) rows rank ``rank`` holds, ascending."""
        C = self.chunk
        return torch.cat([torch.arange(j * C, (j + 1) * C) for j in self.chunks_of(rank)])

    def cu_seqlens(self, device=None) -> torch.Tensor:
        """int32 boundaries of the padded row (the pad sequence included): the single-process
        ``cu_seqlens`` of the same problem."""
        return torch.tensor(self.bounds, dtype=torch.int32, device=device)

    def pad(self, x: torch.Tensor, value: float | int = 0, dim: int = 1) -> torch.Tensor:
        """``x`` with ``T`` (or already ``T_pad``) entries along ``dim``, padded to ``T_pad``
        with ``value``."""
        n = x.shape[dim]
        if n not in (self.T, self.T_pad):
            raise ValueError(f"x must have T={self.T} or T_pad={self.T_pad} entries along dim "
                             f"{dim}, got {n}")  # fmt: skip
        if n == self.T_pad:
            return x
        shape = list(x.shape)
        shape[dim] = self.T_pad - n
        return torch.cat([x, x.new_full(shape, value)], dim=dim)

    def shard(self, x: torch.Tensor, rank: int, *, value: float | int = 0,
              dim: int = 1) -> torch.Tensor:  # fmt: skip
        """Rank ``rank``'s rows of a whole row ``x`` (``T`` or ``T_pad`` entries along ``dim``;
        padded with ``value``): ``[..., 2C, ...]``, chunk ``r`` then chunk ``2R - 1 - r``."""
        x = self.pad(x, value, dim)
        C = self.chunk
        return torch.cat([x.narrow(dim, j * C, C) for j in self.chunks_of(rank)], dim=dim)

    def unshard(self, parts, *, dim: int = 1, keep_padding: bool = False) -> torch.Tensor:
        """The whole row from every rank's part (``parts[r]``: rank ``r``'s ``[..., 2C, ...]``),
        without the padding unless ``keep_padding``."""
        parts = list(parts)
        if len(parts) != self.world:
            raise ValueError(f"parts must hold one tensor per rank ({self.world}), got "
                             f"{len(parts)}")  # fmt: skip
        C = self.chunk
        pieces = [None] * (2 * self.world)
        for r, part in enumerate(parts):
            if part.shape[dim] != 2 * C:
                raise ValueError(f"parts[{r}] must have 2C={2 * C} entries along dim {dim}, "
                                 f"got {part.shape[dim]}")  # fmt: skip
            first, second = self.chunks_of(r)
            pieces[first], pieces[second] = part.narrow(dim, 0, C), part.narrow(dim, C, C)
        whole = torch.cat(pieces, dim=dim)
        return whole if keep_padding else whole.narrow(dim, 0, self.T)
