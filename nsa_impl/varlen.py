"""Variable-length batches: ``cu_seqlens`` helpers, length bucketing, pad/unpad (spec I.1).

A packed batch holds ``N`` sequences back to back in one row (``B = 1``, ``T = total``) with
boundaries ``cu_seqlens = [0, c_1, ..., c_N = total]`` (int32). Positions restart at 0 at every
boundary and nothing crosses one. `PackedLayout` turns the boundaries into per-token local
positions and sequence ids once, so the branches build their masks from tensors instead of
looping over sequences or tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nsa_ref.scalars import as_int
from nsa_ref.validate import check_cu_seqlens


def _positive_ints(name: str, values: object) -> list[int]:
    """``values`` (a sequence of ints or a 1-D integer tensor) as a non-empty list of positive
    ints; ``ValueError``/``TypeError`` naming ``name``. numpy integers are accepted."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(values.shape)}")
        if values.is_floating_point() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {values.dtype}")
        values = values.tolist()
    elif not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise TypeError(
            f"{name} must be a sequence of ints or a 1-D tensor, got {type(values).__name__}"
        )
    out = [as_int(f"{name}[{i}]", x) for i, x in enumerate(values)]
    if not out:
        raise ValueError(f"{name} must hold at least one value")
    bad = [x for x in out if x <= 0]
    if bad:
        raise ValueError(f"{name} must be positive, got {bad[:5]}")
    return out


def _check_lengths(lengths: object) -> list[int]:
    """Sequence lengths as a list of positive ints (`_positive_ints` naming ``lengths``)."""
    return _positive_ints("lengths", lengths)


def cu_seqlens_from_lengths(lengths, *, device: torch.device | str | None = None) -> torch.Tensor:
    """``[l_1, ..., l_N]`` -> int32 ``cu_seqlens = [0, l_1, l_1 + l_2, ..., total]``."""
    values = _check_lengths(lengths)
    bounds = [0]
    for x in values:
        bounds.append(bounds[-1] + x)
    if bounds[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"lengths sum to {bounds[-1]}, beyond int32 cu_seqlens")
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]`` sequence lengths of a validated ``cu_seqlens``."""
    bounds = _check_cu(cu_seqlens)
    return torch.tensor([b - a for a, b in zip(bounds, bounds[1:], strict=False)], dtype=torch.long)


def _check_cu(cu_seqlens: object) -> list[int]:
    """Validate ``cu_seqlens`` on its own (no ``T`` to compare with); return it as a list."""
    return check_cu_seqlens(cu_seqlens)


@dataclass(frozen=True)
class Bucket:
    """Sequences whose lengths fall in ``(previous edge, max_len]``.

    Attributes:
        max_len: the bucket's upper edge (pad every member to this length).
        indices: int64 positions of the member sequences in the input order.
    """

    max_len: int
    indices: torch.Tensor


def bucket_by_length(lengths, edges: Sequence[int] | None = None) -> list[Bucket]:
    """Group sequences of similar length so padding each group wastes little.

    ``edges`` are ascending upper bucket edges; by default the powers of two up to the longest
    length (a sequence of length ``L`` goes to the smallest edge ``>= L``). Empty buckets are
    dropped; the result is ordered by ``max_len``. Raises ``ValueError`` if a length exceeds the
    largest given edge.
    """
    values = _check_lengths(lengths)
    longest = max(values)
    if edges is None:
        edges, e = [], 1
        while True:
            edges.append(e)
            if e >= longest:
                break
            e *= 2
    edges = _positive_ints("edges", edges)
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"edges must be positive and strictly increasing, got {edges}")
    if longest > edges[-1]:
        raise ValueError(
            f"edges must cover the longest length {longest}, largest edge is {edges[-1]}"
        )
    lens = torch.tensor(values, dtype=torch.long)
    slot = torch.bucketize(lens, torch.tensor(edges, dtype=torch.long))  # first edge >= length
    return [
        Bucket(edges[b], torch.nonzero(slot == b).flatten()) for b in sorted(set(slot.tolist()))
    ]


def unpad(x: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``[N, T_max, ...]`` -> packed ``([1, total, ...], cu_seqlens)``.

    Sequence ``i`` keeps its first ``lengths[i]`` positions. Differentiable (an index select).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor [N, T_max, ...] with at least 2 dims")
    values = _check_lengths(lengths)
    if len(values) != x.shape[0]:
        raise ValueError(f"lengths has {len(values)} entries, x has N={x.shape[0]} sequences")
    if max(values) > x.shape[1]:
        raise ValueError(f"lengths must be <= T_max={x.shape[1]}, got max {max(values)}")
    lens = torch.tensor(values, dtype=torch.long, device=x.device)
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]  # [N, T_max]
    packed = x[keep]  # row-major: sequence by sequence
    return packed[None], cu_seqlens_from_lengths(values, device=x.device)


def pad(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None, value: float = 0.0):
    """Packed ``[1, total, ...]`` -> padded ``[N, max_len, ...]`` filled with ``value``.

    ``max_len`` defaults to the longest sequence. Differentiable with respect to ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != 1:
        raise ValueError("x must be a packed tensor [1, total, ...]")
    bounds = _check_cu(cu_seqlens)
    if bounds[-1] != x.shape[1]:
        raise ValueError(f"cu_seqlens must end at x's total length {x.shape[1]}, got {bounds[-1]}")
    lens = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    longest = max(lens)
    max_len = longest if max_len is None else as_int("max_len", max_len)
    if max_len < longest:
        raise ValueError(f"max_len must be >= the longest sequence {longest}, got {max_len}")
    out = x.new_full((len(lens), max_len, *x.shape[2:]), value)
    lens_t = torch.tensor(lens, dtype=torch.long, device=x.device)
    keep = torch.arange(max_len, device=x.device)[None, :] < lens_t[:, None]
    out[keep] = x[0]
    return out


@dataclass(frozen=True)
class PackedLayout:
    """Per-token view of a (possibly packed) row of ``T`` tokens, on the host.

    Without ``cu_seqlens`` the row is a single sequence ``[0, T)`` (the same layout serves every
    batch row). Built once per call from the already validated boundaries.

    Attributes:
        bounds: ``(0, c_1, ..., T)``.
        pos: int64 ``[T]`` position of each token inside its sequence.
        seq_id: int64 ``[T]`` index of each token's sequence.
        seq_start: int64 ``[T]`` first token of each token's sequence.
    """

    bounds: tuple[int, ...]
    pos: torch.Tensor = field(repr=False)
    seq_id: torch.Tensor = field(repr=False)
    seq_start: torch.Tensor = field(repr=False)

    @classmethod
    def build(cls, T: int, bounds: Sequence[int] | None = None) -> PackedLayout:
        """Layout of ``T`` tokens split at ``bounds`` (``None``: one sequence)."""
        bounds = (0, T) if bounds is None else tuple(int(b) for b in bounds)
        if (
            bounds[0] != 0
            or bounds[-1] != T
            or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False))
        ):
            raise ValueError(
                f"bounds must run strictly increasing from 0 to T={T}, got {bounds[:8]}"
            )
        lens = torch.tensor(bounds, dtype=torch.long).diff()
        seq_id = torch.repeat_interleave(torch.arange(len(lens)), lens)
        seq_start = torch.tensor(bounds[:-1], dtype=torch.long)[seq_id]
        pos = torch.arange(T) - seq_start
        return cls(bounds, pos, seq_id, seq_start)

    @property
    def T(self) -> int:
        """Tokens in the row."""
        return self.bounds[-1]

    @property
    def num_seqs(self) -> int:
        """Sequences in the row."""
        return len(self.bounds) - 1

    @property
    def lengths(self) -> list[int]:
        """Length of each sequence."""
        return [b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False)]
