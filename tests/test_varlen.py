"""nsa_impl.varlen: cu_seqlens helpers, bucketing, pad/unpad, PackedLayout (spec I.1).

Packed equals separate (property P6) is a conformance clause (NSA-P6-VARLEN-PACKING, every
adapter) and a property of nsa_ref (properties/test_varlen.py); it is not repeated here."""

from __future__ import annotations

import pytest
import torch

from nsa_impl.varlen import (
    PackedLayout,
    bucket_by_length,
    cu_seqlens_from_lengths,
    lengths_from_cu_seqlens,
    pad,
    unpad,
)


def test_cu_seqlens_round_trip():
    cu = cu_seqlens_from_lengths([3, 1, 4])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 8]
    assert lengths_from_cu_seqlens(cu).tolist() == [3, 1, 4]
    assert cu_seqlens_from_lengths(torch.tensor([2, 5])).tolist() == [0, 2, 7]


@pytest.mark.parametrize(
    "lengths,error",
    [
        ([], ValueError),
        ([3, 0], ValueError),
        ([2.0], TypeError),
        ("12", TypeError),
        (torch.tensor([[1, 2]]), ValueError),
        (torch.tensor([1.5]), TypeError),
    ],
)
def test_bad_lengths_name_the_argument(lengths, error):
    with pytest.raises(error, match="lengths"):
        cu_seqlens_from_lengths(lengths)


@pytest.mark.parametrize(
    "cu,error",
    [
        (torch.tensor([0, 3, 3], dtype=torch.int32), ValueError),
        (torch.tensor([1, 3], dtype=torch.int32), ValueError),
        (torch.tensor([0.0, 3.0]), TypeError),
        ([0, 3], TypeError),
    ],
)
def test_bad_cu_seqlens_name_the_argument(cu, error):
    with pytest.raises(error, match="cu_seqlens"):
        lengths_from_cu_seqlens(cu)


def test_bucket_by_length():
    buckets = bucket_by_length([5, 1, 9, 16, 3, 2])
    assert [(b.max_len, b.indices.tolist()) for b in buckets] == [
        (1, [1]),
        (2, [5]),
        (4, [4]),
        (8, [0]),
        (16, [2, 3]),
    ]
    custom = bucket_by_length([5, 1, 9], edges=[4, 10])
    assert [(b.max_len, b.indices.tolist()) for b in custom] == [(4, [1]), (10, [0, 2])]
    with pytest.raises(ValueError, match="edges"):
        bucket_by_length([5, 20], edges=[4, 10])
    with pytest.raises(ValueError, match="edges"):
        bucket_by_length([5], edges=[8, 4])


def test_pad_unpad_round_trip_and_gradient():
    x = torch.randn(3, 6, 2, requires_grad=True)
    lengths = [2, 6, 1]
    packed, cu = unpad(x, lengths)
    assert packed.shape == (1, 9, 2) and cu.tolist() == [0, 2, 8, 9]
    assert torch.equal(packed[0, 2:8], x[1])
    back = pad(packed, cu, max_len=6, value=-7.0)
    keep = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    assert torch.equal(back[keep], x[keep]) and (back[~keep] == -7.0).all()
    back.sum().backward()
    assert torch.equal(x.grad, keep[..., None].float().expand_as(x))
    with pytest.raises(ValueError, match="max_len"):
        pad(packed, cu, max_len=3)
    with pytest.raises(ValueError, match="lengths"):
        unpad(x, [2, 7, 1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        pad(packed, torch.tensor([0, 4], dtype=torch.int32))


def test_packed_layout():
    layout = PackedLayout.build(7, [0, 3, 4, 7])
    assert layout.pos.tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert layout.seq_id.tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert layout.seq_start.tolist() == [0, 0, 0, 3, 4, 4, 4]
    assert (layout.T, layout.num_seqs, layout.lengths) == (7, 3, [3, 1, 3])
    single = PackedLayout.build(4)
    assert single.pos.tolist() == [0, 1, 2, 3] and single.num_seqs == 1
    with pytest.raises(ValueError, match="bounds"):
        PackedLayout.build(5, [0, 3, 4])
