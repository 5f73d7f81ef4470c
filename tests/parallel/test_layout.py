"""`nsa_impl.parallel.CPLayout`: load-balanced chunks, padding as its own sequence, shard and
unshard."""

from __future__ import annotations

import pytest
import torch

from nsa_impl.parallel import CPLayout


def test_rank_r_holds_chunks_r_and_2R_minus_1_minus_r():
    lay = CPLayout.build(16, 4)
    assert (lay.chunk, lay.T_pad, lay.local_len, lay.bounds) == (2, 16, 4, (0, 16))
    assert [lay.chunks_of(r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert lay.rows(1).tolist() == [2, 3, 12, 13]
    every = torch.cat([lay.rows(r) for r in range(4)]).sort().values
    assert torch.equal(every, torch.arange(16))  # a partition of the row
    # balance: the causal work of the two chunks (sum of positions + 1) is equal on every rank
    work = [int((lay.rows(r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1


def test_uneven_lengths_are_padded_with_a_sequence_of_their_own():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    lay = CPLayout.build(10, 2, cu_seqlens=cu)
    assert (lay.chunk, lay.T_pad, lay.bounds) == (3, 12, (0, 3, 10, 12))
    assert lay.cu_seqlens().tolist() == [0, 3, 10, 12] and lay.cu_seqlens().dtype == torch.int32
    short = CPLayout.build(1, 4)  # shorter than one shard: chunks of 1, seven pad tokens
    assert (short.chunk, short.T_pad, short.bounds) == (1, 8, (0, 1, 8))
    assert CPLayout.build(10, 2, multiple=4).chunk == 4


def test_shard_and_unshard_round_trip_with_padding():
    lay = CPLayout.build(10, 2)
    x = torch.arange(2 * 10 * 3).view(2, 10, 3)
    parts = [lay.shard(x, r, value=-1) for r in range(2)]
    assert parts[0].shape == (2, 6, 3)
    assert parts[0][0, :, 0].tolist() == [0, 3, 6, 27, -1, -1]  # chunk 0, then chunk 3 (+ pad)
    assert parts[1][0, :, 0].tolist() == [9, 12, 15, 18, 21, 24]  # chunks 1 and 2
    assert torch.equal(lay.unshard(parts), x)
    assert lay.unshard(parts, keep_padding=True).shape == (2, 12, 3)
    assert torch.equal(lay.shard(lay.pad(x, -1), 1), parts[1])  # an already padded row
    flat = torch.arange(10)
    assert torch.equal(lay.unshard([lay.shard(flat, r, dim=0) for r in range(2)], dim=0), flat)


def test_bad_layout_arguments_name_the_argument():
    with pytest.raises(ValueError, match="T must be positive"):
        CPLayout.build(0, 2)
    with pytest.raises(ValueError, match="world must be positive"):
        CPLayout.build(8, 0)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        CPLayout.build(8, 2, cu_seqlens=torch.tensor([0, 7], dtype=torch.int32))
    lay = CPLayout.build(8, 2)
    with pytest.raises(ValueError, match="rank must be < world"):
        lay.rows(2)
    with pytest.raises(ValueError, match="T=8 or T_pad=8"):
        lay.shard(torch.zeros(1, 7), 0)
    with pytest.raises(ValueError, match="one tensor per rank"):
        lay.unshard([torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"2C=4"):
        lay.unshard([torch.zeros(1, 4), torch.zeros(1, 3)])
