"""Variable-length training batches: documents -> packed tokens, ``cu_seqlens`` and labels.

A packed batch holds documents back to back in one row (``[1, total]``, spec I.1) with int32
``cu_seqlens`` boundaries, so attention never crosses a document. Labels are the next token
*within the document*; the last token of every document has no next token and gets the ignore
index (-100, the default of ``torch.nn.functional.cross_entropy``). Padding, when asked for, is
appended as one more sequence of its own (its own ``cu_seqlens`` segment, so no real token can
attend to it or it to them) whose labels are all ignored.

* `pack`: one batch from a list of documents (optionally padded to a multiple);
* `bucket_batches`: documents grouped by length (`nsa_impl.varlen.bucket_by_length`) and packed
  into several batches of at most ``max_tokens`` each;
* `split_document`: a long document cut into pieces of at most ``max_len`` tokens that overlap by
  one token, so every next-token pair of the document is in exactly one piece;
* `length_histogram`: documents per length bucket (what the training log shows).

Documents are 1-D integer tensors, ``bytes``/``bytearray`` (byte-level tokens), or sequences of
ints. Everything here runs on the host; `PackedBatch.to` moves a batch to a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .varlen import bucket_by_length, cu_seqlens_from_lengths

#: Label of positions that have no next token in their document, and of padding.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackedBatch:
    """Documents packed into one row.

    Attributes:
        tokens: int64 ``[1, total]``.
        labels: int64 ``[1, total]``: ``tokens[0, i + 1]`` when ``i + 1`` is in the same
            document, else ``ignore_index`` (last token of a document, and every pad token).
        cu_seqlens: int32 ``[S + 1]`` boundaries; the pad, when present, is the last sequence.
        lengths: host tuple of the ``S`` sequence lengths (documents, then the pad if any).
        num_docs: real documents (``S`` or ``S - 1``).
        pad: pad tokens at the end (``0``: none).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    num_docs: int
    pad: int

    @property
    def num_tokens(self) -> int:
        """Tokens in the row, padding included."""
        return sum(self.lengths)

    @property
    def num_labels(self) -> int:
        """Positions with a real label: ``sum(length - 1)`` over the documents."""
        return sum(n - 1 for n in self.lengths[: self.num_docs])

    @property
    def max_seqlen(self) -> int:
        """The longest sequence (documents and pad)."""
        return max(self.lengths)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PackedBatch:
        """The same batch with its tensors on ``device``."""
        move = dict(device=device, non_blocking=non_blocking)
        return PackedBatch(
            self.tokens.to(**move),
            self.labels.to(**move),
            self.cu_seqlens.to(**move),
            self.lengths,
            self.num_docs,
            self.pad,
        )


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_document(doc: object, vocab_size: int, *, index: int = 0) -> torch.Tensor:
    """One document as an int64 CPU tensor ``[n]``, checked: ``n >= 1``, ids in ``[0, vocab)``.

    ``index`` names the document in error messages.
    """
    where = f"documents[{index}]"
    if isinstance(doc, bytes | bytearray | memoryview):
        t = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long() if len(doc) else None
    elif isinstance(doc, torch.Tensor):
        if doc.dim() != 1:
            raise ValueError(f"{where} must be 1-D, got shape {list(doc.shape)}")
        if doc.is_floating_point() or doc.is_complex() or doc.dtype == torch.bool:
            raise TypeError(f"{where} must hold integer token ids, got dtype {doc.dtype}")
        t = doc.detach().to("cpu", torch.long) if doc.numel() else None
    elif isinstance(doc, Sequence) and not isinstance(doc, str):
        for x in doc:
            if isinstance(x, bool) or not isinstance(x, int):
                raise TypeError(f"{where} must hold ints, got {type(x).__name__}")
        t = torch.tensor(list(doc), dtype=torch.long) if len(doc) else None
    else:
        raise TypeError(
            f"{where} must be a 1-D integer tensor, bytes or a sequence of ints, "
            f"got {type(doc).__name__}"
        )
    if t is None:
        raise ValueError(f"{where} is empty: every document needs at least one token")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where} holds token id {bad} outside [0, vocab_size={vocab_size})")
    return t


def _documents(docs: object, vocab_size: int) -> list[torch.Tensor]:
    _positive_int("vocab_size", vocab_size)
    if isinstance(docs, torch.Tensor | bytes | bytearray | str) or not isinstance(docs, Sequence):
        raise TypeError(f"documents must be a list of documents, got {type(docs).__name__}")
    if not docs:
        raise ValueError("documents must hold at least one document")
    return [as_document(d, vocab_size, index=i) for i, d in enumerate(docs)]


def _round_up(n: int, multiple: int | None) -> int:
    return n if multiple is None else -(-n // multiple) * multiple


def _pack_checked(
    docs: list[torch.Tensor], pad_to_multiple: int | None, pad_id: int, ignore_index: int
) -> PackedBatch:
    """`pack` on already checked documents."""
    lengths = [int(d.numel()) for d in docs]
    total = sum(lengths)
    pad = _round_up(total, pad_to_multiple) - total
    tokens = torch.cat(docs + ([torch.full((pad,), pad_id, dtype=torch.long)] if pad else []))
    seq_lengths = lengths + ([pad] if pad else [])
    cu = cu_seqlens_from_lengths(seq_lengths)
    # Next token everywhere, then the ignore index at each document's last token and the pad.
    labels = torch.full_like(tokens, ignore_index)
    labels[:-1] = tokens[1:]
    labels[cu[1 : len(docs) + 1].long() - 1] = ignore_index
    labels[total:] = ignore_index
    return PackedBatch(tokens[None], labels[None], cu, tuple(seq_lengths), len(docs), pad)


def pack(
    documents: Sequence,
    *,
    vocab_size: int,
    pad_to_multiple: int | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> PackedBatch:
    """Pack ``documents`` into one `PackedBatch`, in order.

    Args:
        documents: a non-empty list of documents (module docstring), each with >= 1 token.
        vocab_size: token ids must lie in ``[0, vocab_size)``.
        pad_to_multiple: pad the row to a multiple of this many tokens (``None``: no padding).
            The pad is a sequence of its own in ``cu_seqlens`` and all its labels are ignored.
        pad_id: token id of the padding (in ``[0, vocab_size)``).
        ignore_index: label of positions without a next token (and of padding).

    Raises:
        TypeError / ValueError: naming the offending argument or document.
    """
    docs = _documents(documents, vocab_size)
    if pad_to_multiple is not None:
        _positive_int("pad_to_multiple", pad_to_multiple)
    _check_ids(pad_id, ignore_index, vocab_size)
    return _pack_checked(docs, pad_to_multiple, pad_id, ignore_index)


def _check_ids(pad_id: object, ignore_index: object, vocab_size: int) -> None:
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must be an int in [0, vocab_size={vocab_size}), got {pad_id!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if 0 <= ignore_index < vocab_size:
        raise ValueError(f"ignore_index={ignore_index} is a real token id (vocab {vocab_size})")


def bucket_batches(
    documents: Sequence,
    max_tokens: int,
    *,
    vocab_size: int,
    edges: Sequence[int] | None = None,
    pad_to_multiple: int | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> list[PackedBatch]:
    """Group documents by length and pack each group into batches of at most ``max_tokens``.

    Documents go to length buckets by `nsa_impl.varlen.bucket_by_length` (``edges``: ascending
    upper bucket edges; default powers of two), so a batch holds documents of similar length.
    Within a bucket, documents are taken in input order and a batch is closed when the next
    document would push its (padded) size above ``max_tokens``. Every document lands in exactly
    one batch; batches are ordered by bucket, then by first document.

    Raises:
        ValueError: ``max_tokens`` not positive, or a document longer than ``max_tokens`` (cut it
            first with `split_document`), besides the checks of `pack`.
    """
    _positive_int("max_tokens", max_tokens)
    if pad_to_multiple is not None:
        _positive_int("pad_to_multiple", pad_to_multiple)
        if pad_to_multiple > max_tokens:
            raise ValueError(
                f"pad_to_multiple={pad_to_multiple} exceeds max_tokens={max_tokens}: "
                "no batch could be padded within the bound"
            )
    docs = _documents(documents, vocab_size)
    _check_ids(pad_id, ignore_index, vocab_size)
    lengths = [int(d.numel()) for d in docs]
    for i, n in enumerate(lengths):
        if _round_up(n, pad_to_multiple) > max_tokens:
            raise ValueError(
                f"documents[{i}] has {n} tokens, more than max_tokens={max_tokens} fit "
                "(cut long documents with split_document first)"
            )
    batches = []
    for bucket in bucket_by_length(lengths, edges):
        current: list[torch.Tensor] = []
        size = 0
        for i in bucket.indices.tolist():
            if current and _round_up(size + lengths[i], pad_to_multiple) > max_tokens:
                batches.append(_pack_checked(current, pad_to_multiple, pad_id, ignore_index))
                current, size = [], 0
            current.append(docs[i])
            size += lengths[i]
        batches.append(_pack_checked(current, pad_to_multiple, pad_id, ignore_index))
    return batches


def split_document(document: object, max_len: int, *, vocab_size: int) -> list[torch.Tensor]:
    """Cut one document into pieces of at most ``max_len`` tokens overlapping by one token.

    Piece ``i`` starts at ``i * (max_len - 1)``; each piece's last token is the next piece's
    first, so every next-token pair ``(t, t+1)`` of the document lies in exactly one piece and
    packing the pieces loses no label and repeats none. A document of ``<= max_len`` tokens is
    returned as one piece. ``max_len >= 2``.
    """
    _positive_int("max_len", max_len, minimum=2)
    doc = as_document(document, vocab_size)
    n, stride = doc.numel(), max_len - 1
    if n <= max_len:
        return [doc]
    return [doc[s : s + max_len] for s in range(0, n - 1, stride)]


def length_histogram(lengths: Sequence[int], edges: Sequence[int] | None = None) -> dict[int, int]:
    """``{bucket upper edge: number of sequences}`` by `nsa_impl.varlen.bucket_by_length`."""
    return {b.max_len: int(b.indices.numel()) for b in bucket_by_length(list(lengths), edges)}
