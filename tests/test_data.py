"""`nsa_impl.data`: packing, labels that never cross a document, bucketing bounds, padding.

Every label is checked against a plain per-document loop (`expected_rows`), never against the
vectorised code it tests.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from nsa_impl.data import (
    IGNORE_INDEX,
    bucket_batches,
    length_histogram,
    pack,
    split_document,
)

V = 50


def random_docs(seed: int, n: int, max_len: int = 30, min_len: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def expected_rows(docs, pad: int, pad_id: int = 0, ignore: int = IGNORE_INDEX):
    """Tokens, labels and boundaries by a loop over documents and positions."""
    tokens, labels, bounds = [], [], [0]
    for doc in docs:
        for i, tok in enumerate(doc):
            tokens.append(tok)
            labels.append(doc[i + 1] if i + 1 < len(doc) else ignore)
        bounds.append(bounds[-1] + len(doc))
    if pad:
        tokens += [pad_id] * pad
        labels += [ignore] * pad
        bounds.append(bounds[-1] + pad)
    return tokens, labels, bounds


def check_batch(batch, docs, pad: int = 0, pad_id: int = 0, ignore: int = IGNORE_INDEX):
    tokens, labels, bounds = expected_rows(docs, pad, pad_id, ignore)
    assert batch.tokens.shape == (1, len(tokens)) and batch.tokens.dtype == torch.long
    assert batch.tokens[0].tolist() == tokens
    assert batch.labels[0].tolist() == labels  # every label, position by position
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == bounds
    assert batch.num_docs == len(docs) and batch.pad == pad
    assert batch.num_labels == sum(len(d) - 1 for d in docs)
    assert batch.num_labels == sum(1 for x in labels if x != ignore)


@pytest.mark.parametrize("seed", range(5))
def test_pack_labels_match_a_per_document_loop(seed):
    docs = random_docs(seed, n=1 + seed * 3)
    check_batch(pack(docs, vocab_size=V), docs)


def test_pack_accepts_bytes_tensors_and_lists():
    docs = [b"hello", torch.tensor([1, 2, 3], dtype=torch.int32), [7], bytearray(b"ab")]
    batch = pack(docs, vocab_size=256)
    as_lists = [list(b"hello"), [1, 2, 3], [7], list(b"ab")]
    check_batch(batch, as_lists)


@pytest.mark.parametrize("multiple", [1, 7, 16, 64])
def test_padding_is_its_own_sequence_and_masked(multiple):
    docs = random_docs(11, n=5)
    total = sum(map(len, docs))
    batch = pack(docs, vocab_size=V, pad_to_multiple=multiple, pad_id=3)
    pad = -total % multiple
    check_batch(batch, docs, pad=pad, pad_id=3)
    assert batch.num_tokens % multiple == 0
    if pad:  # the pad is one extra cu_seqlens segment: nothing can attend across it
        assert len(batch.lengths) == len(docs) + 1 and batch.lengths[-1] == pad


def test_padding_does_not_change_the_loss():
    docs = random_docs(4, n=6)
    logits_fn = torch.nn.Embedding(V, V)  # any per-token model
    losses = []
    for multiple in (None, 32):
        b = pack(docs, vocab_size=V, pad_to_multiple=multiple)
        logits = logits_fn(b.tokens[0])
        losses.append(F.cross_entropy(logits, b.labels[0], reduction="sum"))
    assert torch.equal(losses[0], losses[1])


def test_custom_ignore_index():
    docs = random_docs(2, n=4)
    check_batch(pack(docs, vocab_size=V, ignore_index=-1, pad_to_multiple=8), docs,
                pad=-sum(map(len, docs)) % 8, ignore=-1)  # fmt: skip


@pytest.mark.parametrize("max_tokens,multiple", [(40, None), (64, 16), (50, 7), (30, 30)])
def test_bucket_batches_bounds_and_coverage(max_tokens, multiple):
    docs = random_docs(5, n=40, max_len=30)
    batches = bucket_batches(docs, max_tokens, vocab_size=V, pad_to_multiple=multiple)
    seen = []
    for b in batches:
        assert b.num_tokens <= max_tokens
        if multiple is not None:
            assert b.num_tokens % multiple == 0
        # Rebuild the batch's documents from its boundaries and check every label by the loop.
        bounds = b.cu_seqlens.tolist()
        members = [
            b.tokens[0, s:e].tolist()
            for s, e in zip(bounds, bounds[1 : b.num_docs + 1], strict=False)
        ]
        check_batch(b, members, pad=b.pad)
        seen += [tuple(m) for m in members]
    assert sorted(seen) == sorted(tuple(d) for d in docs)  # every document exactly once


def test_bucket_batches_groups_by_length():
    docs = [[1] * n for n in (3, 17, 4, 18, 2, 30)]
    batches = bucket_batches(docs, 100, vocab_size=V, edges=[4, 32])
    assert [list(b.lengths) for b in batches] == [[3, 4, 2], [17, 18, 30]]


def test_bucket_batches_closes_a_batch_before_it_overflows():
    docs = [[1] * 10] * 5
    batches = bucket_batches(docs, 25, vocab_size=V, edges=[16])
    assert [b.lengths for b in batches] == [(10, 10), (10, 10), (10,)]


@pytest.mark.parametrize("n,max_len", [(1, 4), (4, 4), (5, 4), (100, 8), (17, 2), (33, 9)])
def test_split_document_keeps_every_pair_once(n, max_len):
    doc = list(range(n))
    pieces = split_document(doc, max_len, vocab_size=max(n, 2))
    assert all(1 <= p.numel() <= max_len for p in pieces)
    pairs = [(int(a), int(b)) for p in pieces for a, b in zip(p[:-1], p[1:], strict=True)]
    assert pairs == [(i, i + 1) for i in range(n - 1)]  # all pairs, in order, none twice
    batch = pack(pieces, vocab_size=max(n, 2))
    assert batch.num_labels == n - 1


def test_length_histogram_uses_the_varlen_buckets():
    assert length_histogram([1, 2, 3, 5, 8, 9]) == {1: 1, 2: 1, 4: 1, 8: 2, 16: 1}
    assert length_histogram([10, 20], edges=[16, 32]) == {16: 1, 32: 1}


def test_to_device_keeps_the_layout():
    b = pack([[1, 2], [3]], vocab_size=V).to("cpu")
    assert b.lengths == (2, 1) and b.max_seqlen == 2


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(documents=[]), ValueError, "at least one document"),
        (dict(documents=[[1], []]), ValueError, r"documents\[1\] is empty"),
        (dict(documents=[b""]), ValueError, r"documents\[0\] is empty"),
        (dict(documents=[[1, V]]), ValueError, rf"token id {V} outside \[0, vocab_size={V}\)"),
        (dict(documents=[[-1]]), ValueError, "token id -1 outside"),
        (dict(documents=[torch.tensor([0.5])]), TypeError, "integer token ids"),
        (dict(documents=[torch.zeros(2, 2, dtype=torch.long)]), ValueError, "must be 1-D"),
        (dict(documents=[[1, True]]), TypeError, "must hold ints"),
        (dict(documents=["abc"]), TypeError, "bytes or a sequence of ints"),
        (dict(documents=torch.tensor([1, 2])), TypeError, "list of documents"),
        (dict(documents=[[1]], vocab_size=0), ValueError, "vocab_size must be >= 1"),
        (dict(documents=[[1]], pad_to_multiple=0), ValueError, "pad_to_multiple must be >= 1"),
        (dict(documents=[[1]], pad_id=V), ValueError, "pad_id must be an int in"),
        (dict(documents=[[1]], ignore_index=3), ValueError, "ignore_index=3 is a real token"),
    ],
)
def test_pack_rejects_bad_input(kwargs, error, match):
    kwargs = {"vocab_size": V, **kwargs}
    with pytest.raises(error, match=match):
        pack(**kwargs)


def test_bucket_batches_and_split_reject_bad_sizes():
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        bucket_batches([[1]], 0, vocab_size=V)
    with pytest.raises(ValueError, match=r"documents\[1\] has 5 tokens, more than max_tokens=4"):
        bucket_batches([[1], [1] * 5], 4, vocab_size=V)
    with pytest.raises(ValueError, match="pad_to_multiple=8 exceeds max_tokens=4"):
        bucket_batches([[1]], 4, vocab_size=V, pad_to_multiple=8)
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        split_document([1, 2, 3], 1, vocab_size=V)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        bucket_batches([[1]], 4.0, vocab_size=V)
