"""`NSACache`: NSA decoding with a cache, for ragged batches (spec I.9).

A step, for every sequence ``b`` at its own position ``p = lengths[b]``: append the new token's
raw K/V, emit compressed block ``i`` when ``i*d + l == p + 1`` (pooling only the newest ``l`` raw
keys), score the selection blocks from the compressed attention probabilities (Eqs. 8-10, Eq. 9
as a banded overlap weight), pick top-n (Eq. 11), attend over exactly the keys each branch reads
(the visible compressed blocks, the selected keys ``<= p``, the last ``min(w, p+1)`` keys) and
gate (Eq. 5). Nothing is recomputed over the whole history.

Two paths compute the rows, chosen once per cache (`NSACache.path`):

* ``"triton"``: `nsa_impl.kernels.decode_step`, four launches per step whatever the batch;
  lengths live in a device tensor and nothing is read back, so a step never syncs the host and
  with ``max_len`` (static buffers) it can be captured in a CUDA graph: `NSACache.capture`
  returns a `DecodeGraph` (static inputs, ``replay()``), ``cuda_graph=True`` does that at the
  first step, or capture a whole model step yourself and call `NSACache.note_replay` after
  each replay.
  Mean pooling only; fp16, bf16 and float32; CUDA (CPU only under ``TRITON_INTERPRET=1``).
* ``"torch"``: the reference and fallback path (any device, float64, a custom ``phi``): small
  PyTorch ops in `nsa_impl.numerics.compute_dtype`, one group of ops per distinct position.

Both paths fill the same buffers through the same calls: `step` (one token per sequence),
`extend` (a chunk of tokens with their outputs, equal to that many steps), `append` (K/V only,
no outputs: the cheap way to load a long context) and `prefill` (a prompt into an empty cache,
computed by `nsa_impl.nsa_attention` in one call).
"""

from __future__ import annotations

import math

import torch

from nsa_ref.config import NSAConfig
from nsa_ref.reference import gate
from nsa_ref.scalars import as_int, as_positive_float
from nsa_ref.validate import BRANCHES, check_inputs, check_phi, check_phi_output

from . import amp
from .kernels import decode_step
from .numerics import compute_dtype
from .scoring import overlap_scores, top_n

#: Tokens a fresh cache holds before its first doubling (when no ``max_len`` is given).
INITIAL_CAPACITY = 256

#: Values of ``NSACache(path=...)``.
PATHS = ("auto", "triton", "torch")

#: Bytes of compressed logits one kernel launch may hold (`extend` splits longer chunks).
ROW_LOGITS_BUDGET = 256 * 2**20


def attend(q, k, v, scale: float, valid: torch.Tensor | None = None):
    """Eq. 2 per group: ``q [B, G, h, Dk]``, ``k [B, G, n, Dk]``, ``v [B, G, n, Dv]``.

    All in one dtype (the caller's `compute_dtype`). ``valid [B, G, n]`` excludes keys exactly
    (``-inf``). Returns ``(o [B, G, h, Dv], probs)``; callers never pass an empty or all-invalid
    key set except the compressed branch, which handles ``n = 0`` itself.
    """
    logits = (q * scale) @ k.transpose(-1, -2)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return probs @ v, probs


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _is_capturing(t: torch.Tensor) -> bool:
    """Is ``t``'s CUDA stream being captured into a graph (replays do not run Python)?"""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class NSACache:
    """Decode state of `nsa_impl` for a batch of ``B`` sequences, each at its own length.

    Same contract as `nsa_ref.NSARefCache` (which decodes in lock step), plus ragged lengths:
    raw K/V per branch (one shared buffer while the branches share K/V), the compressed K/V
    cache (block ``i`` emitted when ``i*d + l == p + 1`` by pooling only the newest ``l`` raw
    keys), and the read counters of the last computed row of every sequence.

    Args:
        cfg: the `NSAConfig`.
        scale: softmax scale, default ``1/sqrt(Dk)``.
        phi_k, phi_v: compression functions ``[..., l, D] -> [..., D]`` (default: mean), the
            same callables a prefill would get. A custom phi runs on the torch path.
        batch_size: if given, every call must have this batch size.
        max_len: if given, buffers are allocated once for ``max_len`` tokens per sequence (static
            memory) and a call past it raises ``ValueError``; otherwise they start at
            `INITIAL_CAPACITY` tokens and double when full.
        path: ``"auto"`` (the Triton kernels for CUDA tensors they support with mean pooling,
            else torch), ``"triton"`` (a ``ValueError`` at the first call where the kernels
            cannot run) or ``"torch"``.
        cuda_graph: capture the Triton step in a CUDA graph at the first `step` and replay it
            afterwards (needs ``max_len``, CUDA tensors and the Triton path; a ``ValueError``
            otherwise, on the CPU too). Each step then costs one copy of its inputs and one
            replay; the returned tensor is a static buffer that the next step overwrites.
        splits: ``(cmp, win, sel)`` programs per (row, group) for the Triton kernels
            (`nsa_impl.kernels.decode_step.Splits`); default from the batch and the GPU.

    Buffers live on the device and dtype of the first call's tensors; later calls must match
    (``ValueError`` for a device, ``TypeError`` for a dtype). Decoding is inference only: a call
    whose inputs require grad (with grad mode on) raises ``ValueError``; run it under
    ``torch.no_grad()``. Under ``torch.autocast`` every call casts its inputs to the autocast
    dtype first (`nsa_impl.amp`).

    Attributes (read without a device sync unless said otherwise):
        length: the longest sequence's length (tokens decoded so far, in lock step).
        lengths: every sequence's length, a list of ints.
        reads: ``{"cmp", "sel", "win"}`` key reads of the last computed row, per (sequence, KV
            group), maximum over the batch and groups: ``cmp = num_cmp(p)``, ``sel`` = selected
            keys ``<= p``, ``win = min(w, p+1)`` (spec I.9). Reading ``sel`` syncs the device.
    """

    def __init__(
        self,
        cfg: NSAConfig,
        *,
        scale: float | None = None,
        phi_k=None,
        phi_v=None,
        batch_size: int | None = None,
        max_len: int | None = None,
        path: str = "auto",
        cuda_graph: bool = False,
        splits=None,
    ):
        if not isinstance(cfg, NSAConfig):
            raise TypeError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
        scale = None if scale is None else as_positive_float("scale", scale)
        check_phi("phi_k", phi_k)
        check_phi("phi_v", phi_v)
        batch_size = None if batch_size is None else as_int("batch_size", batch_size, minimum=1)
        max_len = None if max_len is None else as_int("max_len", max_len, minimum=1)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        custom_phi = phi_k is not None or phi_v is not None
        if path == "triton" and custom_phi:
            raise ValueError("path='triton' pools by the mean only; a custom phi_k/phi_v needs "
                             "path='torch' (or 'auto')")
        if cuda_graph and (max_len is None or path == "torch" or custom_phi):
            raise ValueError("cuda_graph=True needs max_len (static buffers) and the Triton path "
                             "(path 'auto' or 'triton', no custom phi)")
        if splits is not None and not isinstance(splits, decode_step.Splits):
            if not (isinstance(splits, tuple | list) and len(splits) == 3):
                raise TypeError(f"splits must be a (cmp, win, sel) tuple, got {splits!r}")
            splits = decode_step.Splits(*splits)
        self.cfg, self.scale, self.phi_k, self.phi_v = cfg, scale, phi_k, phi_v
        self.batch_size, self.max_len = batch_size, max_len
        self._path, self.cuda_graph, self._splits = path, cuda_graph, splits
        self.reset()

    def reset(self, sequences=None) -> None:
        """Forget every token (keeps the configuration); with ``sequences`` (batch indices, a
        list of ints) empty only those sequences, for continuous batching: a finished request's
        slot takes a new one. Their lengths go to 0, the next `append`, `extend` or `step`
        writes them from position 0, and their read counters read 0 until they compute a row
        again; the other sequences, the buffers and a captured CUDA graph (which reads the
        lengths from the device) stay as they were. Old tokens past a sequence's length are
        never read (every key range is bounded by the position)."""
        if sequences is not None:
            self._reset_sequences(sequences)
            return
        self._raw: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._cmp: tuple[torch.Tensor, torch.Tensor] | None = None
        self._shared = True
        self._cap = 0
        self._sig: tuple | None = None  # (B, G, Dk, Dv, dtype, device) of the first call
        self._heads: int | None = None  # H, known at the first call that has queries
        self._kernel = False  # the Triton path, decided at the first call
        self._host_len: list[int] = []
        self._dev_len: torch.Tensor | None = None  # int32 [B], the Triton path's lengths
        self._seq: torch.Tensor | None = None  # int32 arange(B): row r of a step is sequence r
        self._workspaces: dict[int, decode_step.Workspace] = {}
        self._last = None  # (positions, sel counts [B, G], blocks [B, G, n]) of the last rows
        self._graph: DecodeGraph | None = None  # the step ``cuda_graph=True`` replays
        self._captured = False  # a DecodeGraph holds these buffers' addresses

    def _reset_sequences(self, sequences) -> None:
        if self._raw is None:
            raise ValueError("reset(sequences) needs a cache that holds a batch (call prefill, "
                             "append or step first); reset() empties a cache")
        B = len(self._host_len)
        if not isinstance(sequences, list | tuple) or any(
                isinstance(b, bool) or not isinstance(b, int) for b in sequences):
            raise TypeError(f"sequences must be a list of ints, got {sequences!r}")
        if any(not 0 <= b < B for b in sequences) or len(set(sequences)) != len(sequences):
            raise ValueError(f"sequences must be distinct indices in 0..{B - 1}, got "
                             f"{list(sequences)}")
        if not sequences:
            return
        for b in sequences:
            self._host_len[b] = 0
        self._sync_device_lengths()
        if self._last is not None:  # no row computed yet: counters 0, no selected blocks
            positions, sel, blocks = self._last
            rows = torch.tensor(sequences, device=sel.device)
            self._last = ([-1 if b in sequences else p for b, p in enumerate(positions)],
                          sel.index_fill(0, rows, 0), blocks.index_fill(0, rows, -1))

    # ------------------------------------------------------------------ state

    @property
    def path(self) -> str:
        """The path in use: ``"triton"`` or ``"torch"`` (the requested one before a first call)."""
        if self._raw is None:
            return self._path
        return "triton" if self._kernel else "torch"

    @property
    def length(self) -> int:
        """Tokens of the longest sequence (in lock step: tokens decoded so far)."""
        return max(self._host_len, default=0)

    @property
    def lengths(self) -> list[int]:
        """Tokens of every sequence (host-side bookkeeping: no device sync)."""
        return list(self._host_len)

    def positions(self, T: int = 1) -> torch.Tensor:
        """int64 ``[B, T]``: the positions of each sequence's next ``T`` tokens, on the cache's
        device; on the Triton path computed from the device lengths (graph-safe)."""
        if self._raw is None:
            raise ValueError("positions() needs a cache that holds tokens (call prefill first)")
        device = self._sig[5]
        offsets = torch.arange(T, device=device)
        if self._kernel:
            return self._dev_len.long()[:, None] + offsets
        return torch.tensor(self._host_len, device=device)[:, None] + offsets

    @property
    def reads(self) -> dict[str, int]:
        """Key reads of the last computed row (spec I.9), max over sequences and groups."""
        per_seq = self.reads_per_sequence
        return {name: max((r[name] for r in per_seq), default=0) for name in ("cmp", "sel", "win")}

    @property
    def reads_per_sequence(self) -> list[dict[str, int]]:
        """Spec I.9 reads of each sequence's last computed row (max over its groups)."""
        if self._last is None:
            return []
        positions, sel, _ = self._last
        sel = sel.amax(dim=-1).tolist()
        cfg = self.cfg
        return [
            {"cmp": cfg.num_cmp(p), "sel": int(s), "win": min(cfg.window, p + 1)}
            for p, s in zip(positions, sel, strict=True)
        ]

    @property
    def splits(self) -> decode_step.Splits | None:
        """The Triton kernels' splits of a ``B``-row step (``None`` on the torch path or before
        the first call)."""
        if not self._kernel or self._heads is None:
            return None
        return self._workspace(len(self._host_len)).splits

    @property
    def selected_blocks(self) -> torch.Tensor | None:
        """int64 ``[B, G, n]``: the blocks each sequence's last row selected (Eq. 11), ascending,
        ``-1`` padded; ``None`` before the first computed row."""
        if self._last is None:
            return None
        blocks = self._last[2][..., : self.cfg.sel_top_n].to(torch.int64)
        big = torch.iinfo(torch.int64).max  # the kernels keep selection order: sort, -1 last
        ordered = blocks.masked_fill(blocks < 0, big).sort(dim=-1).values
        return ordered.masked_fill(ordered == big, -1)

    # ------------------------------------------------------------------ input handling

    def _check(self, q, k, v, gates, branch_kv, validate: bool, one_row: bool):
        """Validate a call with queries against nsa_ref's rules and the cache's first call."""
        dims, _ = check_inputs(
            q, k, v, gates, self.cfg, branch_kv=branch_kv, validate_gates=validate
        )
        if one_row and dims.T != 1:
            raise ValueError(f"q_t must hold exactly one position (T=1), got T={dims.T}")
        pairs = {name: tuple((branch_kv or {}).get(name, (k, v))) for name in BRANCHES}
        self._refuse_grad([("q_t", q), ("gates_t", gates)], pairs)
        self._check_signature(dims.B, dims.G, dims.Dk, dims.Dv, q.dtype, q.device, "q_t/k_t/v_t")
        if self._heads is not None and dims.H != self._heads:
            raise ValueError(f"q_t has H={dims.H} heads, the cache's earlier calls had "
                             f"H={self._heads}: sizes do not match the cache")
        return dims, pairs

    def _check_kv(self, k, v, branch_kv):
        """Validate an `append` (K/V only): per-branch pairs of ``[B, C, G, D]`` tensors."""
        if branch_kv is not None and not isinstance(branch_kv, dict):
            raise TypeError(f"branch_kv must be a dict, got {type(branch_kv).__name__}")
        unknown = set(branch_kv or {}) - set(BRANCHES)
        if unknown:
            raise ValueError(f"branch_kv keys must be among {BRANCHES}, got {sorted(unknown)}")
        pairs = {name: tuple((branch_kv or {}).get(name, (k, v))) for name in BRANCHES}
        first = None
        for name, (kk, vv) in pairs.items():
            prefix = "" if kk is k and vv is v else f"branch_kv[{name!r}] "
            for label, t in ((f"{prefix}k", kk), (f"{prefix}v", vv)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
                if t.dim() != 4 or not t.is_floating_point():
                    raise ValueError(f"{label} must be a floating-point [B, C, G, D] tensor, "
                                     f"got shape {list(t.shape)} and dtype {t.dtype}")
            if first is None:
                first = (kk, vv)
            k0, v0 = first
            if kk.shape != k0.shape or vv.shape[:3] != k0.shape[:3] or vv.shape != v0.shape:
                raise ValueError(f"{prefix}k/v shapes {list(kk.shape)}/{list(vv.shape)} must be "
                                 f"[B, C, G, Dk]/[B, C, G, Dv] like {list(k0.shape)}/"
                                 f"{list(v0.shape)}")
            for label, t in ((f"{prefix}k", kk), (f"{prefix}v", vv)):
                if t.dtype != k0.dtype:
                    raise TypeError(f"{label} dtype {t.dtype} does not match {k0.dtype}")
                if t.device != k0.device:
                    raise ValueError(f"{label} device {t.device} does not match {k0.device}")
        k0, v0 = first
        B, C, G, Dk = k0.shape
        if 0 in (B, G, Dk, v0.shape[3]):
            raise ValueError(f"k/v must have non-empty B, G, D, got {list(k0.shape)}")
        self._refuse_grad([], pairs)
        self._check_signature(B, G, Dk, v0.shape[3], k0.dtype, k0.device, "k/v")
        return pairs, B, C

    @staticmethod
    def _refuse_grad(named, pairs) -> None:
        if not torch.is_grad_enabled():
            return
        named = list(named) + [(f"{n} k/v", t) for n, pair in pairs.items() for t in pair]
        for label, t in named:
            if t.requires_grad:
                raise ValueError(
                    f"{label} requires grad: NSACache decoding is inference only; "
                    "run it under torch.no_grad()"
                )

    def _check_signature(self, B, G, Dk, Dv, dtype, device, what: str) -> None:
        if self.batch_size is not None and B != self.batch_size:
            raise ValueError(f"{what} batch B={B} does not match batch_size={self.batch_size}")
        if self._sig is None:
            return
        B0, G0, Dk0, Dv0, dtype0, device0 = self._sig
        if dtype != dtype0:
            raise TypeError(f"{what} dtype {dtype} does not match the cache's {dtype0}")
        if device != device0:
            raise ValueError(f"{what} device {device} does not match the cache's {device0}")
        if (B, G, Dk, Dv) != (B0, G0, Dk0, Dv0):
            raise ValueError(
                f"{what} sizes (B={B}, G={G}, Dk={Dk}, Dv={Dv}) do not match the cache's "
                f"(B={B0}, G={G0}, Dk={Dk0}, Dv={Dv0})"
            )

    @staticmethod
    def _counts(lengths, B: int, C: int, low: int) -> list[int]:
        """Per-sequence token counts (``lengths``, host ints ``low..C``) or ``C`` for each."""
        if lengths is None:
            return [C] * B
        if isinstance(lengths, torch.Tensor):
            if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.is_complex():
                raise TypeError(f"lengths must be a 1-D integer tensor, got {lengths.dtype} "
                                f"shape {list(lengths.shape)}")
            lengths = lengths.tolist()  # once per prefill/append, never in a step
        if not isinstance(lengths, list | tuple) or any(
            isinstance(c, bool) or not isinstance(c, int) for c in lengths
        ):
            raise TypeError(f"lengths must be a list of ints or an integer tensor, got {lengths!r}")
        if len(lengths) != B or any(not low <= c <= C for c in lengths):
            raise ValueError(f"lengths must hold B={B} counts in {low}..{C}, got {list(lengths)}")
        return list(lengths)

    # ------------------------------------------------------------------ buffers

    def _use_kernels(self, dtype, device, Dk: int, Dv: int) -> bool:
        """Decide the path at the first call (the buffers' device, dtype and sizes)."""
        if self._path == "torch" or self.phi_k is not None or self.phi_v is not None:
            return False
        ok, why = decode_step.supports(dtype, device, Dk, Dv)
        if self._path == "triton" and not ok:
            raise ValueError(f"path='triton' cannot run here: {why}")
        if self.cuda_graph and (not ok or device.type != "cuda"):
            raise ValueError(f"cuda_graph=True needs CUDA tensors the Triton decode kernels "
                             f"support (got {device.type}: {why})")
        # "auto" never picks the interpreter: it is for tests, far too slow to serve.
        return ok and (self._path == "triton" or device.type == "cuda")

    def _prepare(self, pairs, B: int, H: int | None, counts: list[int]) -> None:
        """Allocate at the first call, split shared buffers when per-branch K/V appear, and
        make room for ``counts[b]`` more tokens of every sequence (or raise at ``max_len``)."""
        first = pairs["cmp"]
        shared = all(pairs[n][0] is first[0] and pairs[n][1] is first[1] for n in BRANCHES)
        k0, v0 = first
        _, _, G, Dk = k0.shape
        Dv = v0.shape[3]
        if self._raw is None:
            self._sig = (B, G, Dk, Dv, k0.dtype, k0.device)
            self._kernel = self._use_kernels(k0.dtype, k0.device, Dk, Dv)
            need = max(counts)
            cap = self.max_len if self.max_len is not None else max(
                INITIAL_CAPACITY, _next_pow2(need))
            self._cap = cap
            def new(D: int) -> torch.Tensor:
                return k0.new_zeros(B, G, cap, D)

            if shared:  # one buffer serves the three branches
                self._raw = dict.fromkeys(BRANCHES, (new(Dk), new(Dv)))
            else:
                self._raw = {name: (new(Dk), new(Dv)) for name in BRANCHES}
            self._shared = shared
            ncmp = max(1, self.cfg.num_cmp(cap - 1))
            self._cmp = (k0.new_zeros(B, G, ncmp, Dk), k0.new_zeros(B, G, ncmp, Dv))
            self._host_len = [0] * B
            if self._kernel:
                self._dev_len = torch.zeros(B, dtype=torch.int32, device=k0.device)
                self._seq = torch.arange(B, dtype=torch.int32, device=k0.device)
        elif not shared and self._shared:
            if self._captured:
                raise ValueError("branch_kv appeared after the step was captured in a CUDA "
                                 "graph; give per-branch K/V from the first step")
            k, v = self._raw["cmp"]
            self._raw = {name: (k.clone(), v.clone()) for name in BRANCHES}
            self._shared = False
        if H is not None:
            self._heads = H
        need = max(n + c for n, c in zip(self._host_len, counts, strict=True))
        if need > self._cap:
            if self.max_len is not None:
                raise ValueError(f"NSACache max_len={self.max_len} exceeded: a sequence of "
                                 f"{max(self._host_len)} tokens cannot take {max(counts)} more")
            self._grow(need)

    def _grow(self, need: int) -> None:
        """Double the buffers until ``need`` tokens fit (kept contents; no ``max_len``)."""
        cap = self._cap
        while cap < need:
            cap *= 2
        length = max(self._host_len)

        def grown(t: torch.Tensor, size: int, keep: int) -> torch.Tensor:
            out = t.new_zeros(*t.shape[:2], size, t.shape[3])
            out[:, :, :keep] = t[:, :, :keep]
            return out

        done: dict[int, torch.Tensor] = {}
        raw = {}
        for name in BRANCHES:  # a shared buffer grows once
            raw[name] = tuple(
                done.setdefault(id(t), grown(t, cap, length)) for t in self._raw[name]
            )
        self._raw = raw
        ncmp = max(1, self.cfg.num_cmp(cap - 1))
        kept = self.cfg.num_cmp(length - 1)
        self._cmp = tuple(grown(t, ncmp, kept) for t in self._cmp)
        self._cap = cap
        self._workspaces.clear()

    def _write(self, pairs, starts: list[int], counts: list[int]) -> None:
        """Store ``k/v [B, C, G, D]`` (first ``counts[b]`` tokens) at slots ``starts[b]..``."""
        C = pairs["cmp"][0].shape[1]
        uniform = len(set(starts)) == 1 and all(c == C for c in counts)
        written: list[torch.Tensor] = []
        for name in BRANCHES:
            kb, vb = self._raw[name]
            if any(kb is other for other in written):
                continue  # a shared buffer is written once
            written.append(kb)
            for buf, x in zip((kb, vb), pairs[name], strict=True):
                if uniform:
                    buf[:, :, starts[0] : starts[0] + C] = x.transpose(1, 2)
                else:
                    for b, (s, c) in enumerate(zip(starts, counts, strict=True)):
                        if c:
                            buf[b, :, s : s + c] = x[b, :c].transpose(0, 1)

    @staticmethod
    def _pool(raw: torch.Tensor, phi, label: str) -> torch.Tensor:
        """``phi`` over ``[..., l, D]`` blocks (mean when ``None``); checks its result."""
        if phi is None:
            return raw.mean(dim=-2)
        return check_phi_output(label, amp.user_fn(phi)(raw), raw)

    def _emit(self, starts: list[int], counts: list[int]) -> None:
        """Compress the blocks that complete at positions ``starts[b] .. starts[b]+counts[b]-1``
        (``i*d + l = p + 1``), pooling only their own raw keys (one block per ``d`` steps)."""
        cfg = self.cfg
        pairs = zip(starts, counts, strict=True)
        ranges = [(cfg.num_cmp(s - 1), cfg.num_cmp(s + c - 1)) for s, c in pairs]
        if len(set(ranges)) == 1:  # lock step: one pooling call for the whole batch
            self._emit_rows(slice(None), *ranges[0])
        else:
            for b, (i0, i1) in enumerate(ranges):
                self._emit_rows(slice(b, b + 1), i0, i1)

    def _emit_rows(self, rows: slice, i0: int, i1: int) -> None:
        if i1 == i0:
            return
        l, d = self.cfg.cmp_block, self.cfg.cmp_stride
        phis = ((self.phi_k, "phi_k"), (self.phi_v, "phi_v"))
        for buf, cmp_buf, (phi, label) in zip(self._raw["cmp"], self._cmp, phis, strict=True):
            raw = buf[rows, :, i0 * d : (i1 - 1) * d + l].unfold(2, l, d).transpose(-1, -2)
            cmp_buf[rows, :, i0:i1] = self._pool(raw, phi, label)

    def _sync_device_lengths(self) -> None:
        """After host-side writes: the Triton path's device lengths follow the host's."""
        if self._kernel:
            host = torch.tensor(self._host_len, dtype=torch.int32)
            self._dev_len.copy_(host.to(self._dev_len.device, non_blocking=True))

    # ------------------------------------------------------------------ public calls

    @amp.entry("q_t", "k_t", "v_t", "gates_t", "branch_kv")
    def step(self, q_t, k_t, v_t, gates_t, branch_kv: dict | None = None, *, validate=True):
        """Decode one position for every sequence: ``q_t [B, 1, H, Dk]`` -> ``o_t [B, 1, H, Dv]``.

        ``k_t [B, 1, G, Dk]``, ``v_t [B, 1, G, Dv]`` are the new token's keys and values and
        ``gates_t [B, 1, H, 3]`` its gates; ``branch_kv`` may give the new token's per-branch
        ``(k, v)`` as in `nsa_ref.nsa_attention`. Sequence ``b`` decodes at its own position
        ``lengths[b]``. ``validate=False`` skips the gate-range check (a device sync).
        """
        dims, pairs = self._check(q_t, k_t, v_t, gates_t, branch_kv, validate, one_row=True)
        B = dims.B
        self._prepare(pairs, B, dims.H, [1] * B)
        positions = list(self._host_len)
        if self._kernel:
            if self.cuda_graph:
                if self._graph is None:
                    self._graph = DecodeGraph(self, q_t, gates_t, pairs)
                return self._graph.step(q_t, k_t, v_t, gates_t, branch_kv)
            else:
                out = q_t.new_empty(B, 1, dims.H, dims.Dv)
                self._kernel_step(q_t, gates_t, pairs, out)
            ws = self._workspace(B)
            self._last = (positions, ws.sel_cnt, ws.sel_idx)
        else:
            self._write(pairs, positions, [1] * B)
            self._emit(positions, [1] * B)
            o, cnt, blocks = self._torch_rows(q_t[:, 0], gates_t[:, 0], list(range(B)), positions)
            out = o[:, None]
            self._last = (positions, cnt, blocks)
        if not _is_capturing(q_t):  # a captured step advances on replay (`note_replay`)
            self._host_len = [p + 1 for p in positions]
        return out

    @amp.entry("q", "k", "v", "gates", "branch_kv")
    def extend(self, q, k, v, gates, branch_kv: dict | None = None, *, validate=True):
        """Append ``C`` tokens to every sequence and return their outputs ``[B, C, H, Dv]``.

        The same results as ``C`` calls of `step` (spec I.9): row ``c`` of sequence ``b`` is
        position ``lengths[b] + c`` and reads only keys up to it. For a prompt continuation or
        multi-token verification; an empty cache takes `prefill` (one full forward) instead.
        """
        dims, pairs = self._check(q, k, v, gates, branch_kv, validate, one_row=False)
        B, C = dims.B, dims.T
        self._prepare(pairs, B, dims.H, [C] * B)
        starts = list(self._host_len)
        self._write(pairs, starts, [C] * B)
        self._emit(starts, [C] * B)
        seqs = [b for b in range(B) for _ in range(C)]
        positions = [s + c for s in starts for c in range(C)]
        q_rows = q.reshape(B * C, dims.H, dims.Dk)
        g_rows = gates.reshape(B * C, dims.H, 3)
        out, cnt, blocks = self._rows(q_rows, g_rows, seqs, positions)
        self._host_len = [s + C for s in starts]
        self._sync_device_lengths()
        G = dims.G
        self._last = (
            [s + C - 1 for s in starts],
            cnt.reshape(B, C, G)[:, -1],
            blocks.reshape(B, C, G, -1)[:, -1],
        )
        return out.reshape(B, C, dims.H, dims.Dv)

    @amp.entry("k", "v", "branch_kv")
    def append(self, k, v, branch_kv: dict | None = None, *, lengths=None) -> None:
        """Store K/V ``[B, C, G, D]`` (per branch via ``branch_kv``) without computing outputs.

        ``lengths`` (``B`` ints ``0..C``) appends only the first ``lengths[b]`` tokens of
        sequence ``b`` (ragged). Compressed blocks that complete are emitted as in a step. The
        cheap way to load a long context (the 64k needle test); ``reads`` is cleared (no row was
        computed).
        """
        pairs, B, C = self._check_kv(k, v, branch_kv)
        counts = self._counts(lengths, B, C, low=0)
        self._prepare(pairs, B, None, counts)
        starts = list(self._host_len)
        self._write(pairs, starts, counts)
        self._emit(starts, counts)
        self._host_len = [s + c for s, c in zip(starts, counts, strict=True)]
        self._sync_device_lengths()
        self._last = None

    @amp.entry("q", "k", "v", "gates", "branch_kv")
    def prefill(
        self, q, k, v, gates, branch_kv: dict | None = None, *, validate=True, lengths=None
    ):
        """Fill an empty cache from a prompt and return the prompt's output ``[B, T, H, Dv]``.

        The output is `nsa_impl.nsa_attention` on the prompt (the full forward); the buffers then
        hold the prompt's raw and compressed K/V, so `step` continues at position ``T``. With
        ``lengths`` (``B`` ints ``1..T``) sequence ``b``'s prompt is its first ``lengths[b]``
        tokens (padded inputs, packed into one varlen call); output rows past it are zero.
        ``reads`` describes each sequence's last prompt position.
        """
        if self.length:
            raise ValueError(f"prefill needs an empty cache, this one holds {self.length} tokens")
        dims, pairs = self._check(q, k, v, gates, branch_kv, validate, one_row=False)
        B, T = dims.B, dims.T
        counts = self._counts(lengths, B, T, low=1)
        o = self._prefill_attention(q, gates, pairs, branch_kv, counts, validate)
        self._prepare(pairs, B, dims.H, counts)
        self._write(pairs, [0] * B, counts)
        self._emit([0] * B, counts)
        self._host_len = list(counts)
        self._sync_device_lengths()
        # Each sequence's last position once more through the decode path: it sets `reads`.
        b_idx = torch.arange(B, device=q.device)
        last = torch.tensor([c - 1 for c in counts], device=q.device)
        _, cnt, blocks = self._rows(q[b_idx, last], gates[b_idx, last], list(range(B)),
                                    [c - 1 for c in counts])
        self._last = ([c - 1 for c in counts], cnt, blocks)
        return o

    def capture(self, q_t, k_t, v_t, gates_t, branch_kv: dict | None = None, *,
                validate=True) -> DecodeGraph:
        """Capture the next `step` in a CUDA graph and return it as a `DecodeGraph`.

        The step is recorded with these inputs (copied into the graph's static input buffers)
        but not run: ``graph.replay()`` runs it, ``graph.step(...)`` copies new inputs and
        replays. Needs the Triton path on CUDA and ``max_len``. ``cuda_graph=True`` does this at
        the first `step` and replays from then on.
        """
        if self.max_len is None:
            raise ValueError("capture needs max_len (the graph keeps the buffers' addresses)")
        dims, pairs = self._check(q_t, k_t, v_t, gates_t, branch_kv, validate, one_row=True)
        self._prepare(pairs, dims.B, dims.H, [1] * dims.B)
        if not (self._kernel and q_t.is_cuda):
            raise ValueError("capture needs the Triton decode path on CUDA tensors, this cache "
                             f"runs path={self.path!r} on {q_t.device.type}")
        return DecodeGraph(self, q_t, gates_t, pairs)

    def reserve(self, steps: int) -> None:
        """Raise ``ValueError`` unless every sequence can take ``steps`` more tokens (call it
        before replaying a captured step that many times)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        if self.max_len is not None and self.length + steps > self.max_len:
            raise ValueError(f"NSACache max_len={self.max_len} exceeded: {self.length} tokens "
                             f"cannot take {steps} more steps")

    def note_replay(self, steps: int = 1) -> None:
        """Record ``steps`` replays of a CUDA graph that captured `step` (host bookkeeping only:
        the device lengths advanced inside the graph). Raises ``ValueError`` past ``max_len``
        (the kernels then wrote nothing beyond the buffers, but those rows are not valid)."""
        if not self._kernel:
            raise ValueError("note_replay is for a captured Triton step (path 'triton' on CUDA)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        before = self.length
        self._host_len = [n + steps for n in self._host_len]
        if self._last is not None:
            self._last = ([n - 1 for n in self._host_len], *self._last[1:])
        if self.length > self._cap:
            raise ValueError(f"NSACache max_len={self._cap} exceeded by replays: {before} + "
                             f"{steps} tokens")

    # ------------------------------------------------------------------ computing rows

    def _scale(self) -> float:
        return 1.0 / math.sqrt(self._sig[2]) if self.scale is None else float(self.scale)

    def _cfg_ints(self) -> tuple[int, ...]:
        c = self.cfg
        return (c.cmp_block, c.cmp_stride, c.sel_block, c.sel_top_n, c.sel_init_blocks,
                c.sel_local_blocks, c.window)

    def _raw_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for name in BRANCHES for t in self._raw[name])

    def _workspace(self, rows: int) -> decode_step.Workspace:
        """The Triton workspace for ``rows`` rows (kept per size; reset when buffers grow)."""
        ws = self._workspaces.get(rows)
        if ws is None:
            B, G, Dk, Dv, _, device = self._sig
            ws = decode_step.Workspace.allocate(rows, G, self._heads // G, Dv, self._cap,
                                                self._cfg_ints(), self._splits, device)
            self._workspaces[rows] = ws
        return ws

    def _kernel_step(self, q_t, gates_t, pairs, out) -> None:
        """One step of the Triton path (K1 appends and emits; K4 advances the lengths)."""
        B = q_t.shape[0]
        new = tuple(t[:, 0] for name in BRANCHES for t in pairs[name])
        decode_step.decode_rows(
            _rows_view(q_t[:, 0]), gates_t[:, 0], out[:, 0], self._seq, self._dev_len,
            self._raw_tuple(), *self._cmp, self._workspace(B), self._cfg_ints(), self._scale(),
            new=new, lengths=self._dev_len,
        )

    def _rows(self, q, gates, seqs: list[int], positions: list[int]):
        """Rows ``q [R, H, Dk]`` at ``positions`` of ``seqs`` over the cached K/V (already
        appended): ``(o [R, H, Dv], sel counts [R, G], blocks [R, G, >= n])``."""
        if not self._kernel:
            return self._torch_rows(q, gates, seqs, positions)
        R, H, _ = q.shape
        B, G, Dk, Dv, _, device = self._sig
        per = max(1, ROW_LOGITS_BUDGET // (4 * H * self._cmp[0].shape[2]))
        out = q.new_empty(R, H, Dv)
        cnt = torch.empty(R, G, dtype=torch.int32, device=device)
        blocks = torch.empty(R, G, _next_pow2(self.cfg.sel_top_n), dtype=torch.int32,
                             device=device)
        for r0 in range(0, R, per):  # bounded logits memory for long chunks
            r1 = min(R, r0 + per)
            ws = self._workspace(r1 - r0)
            seq = torch.tensor(seqs[r0:r1], dtype=torch.int32).to(device, non_blocking=True)
            pos = torch.tensor(positions[r0:r1], dtype=torch.int32).to(device, non_blocking=True)
            decode_step.decode_rows(
                _rows_view(q[r0:r1]), gates[r0:r1], out[r0:r1], seq, pos, self._raw_tuple(),
                *self._cmp, ws, self._cfg_ints(), self._scale(),
            )
            cnt[r0:r1] = ws.sel_cnt[: r1 - r0]
            blocks[r0:r1] = ws.sel_idx[: r1 - r0]
        return out, cnt, blocks

    def _torch_rows(self, q, gates, seqs: list[int], positions: list[int]):
        """The torch path of `_rows`: one group of small ops per distinct position."""
        R, H, _ = q.shape
        G, Dv, n = self._sig[1], self._sig[3], self.cfg.sel_top_n
        out = q.new_empty(R, H, Dv)
        cnt = torch.zeros(R, G, dtype=torch.long, device=q.device)
        blocks = torch.full((R, G, n), -1, dtype=torch.long, device=q.device)
        by_pos: dict[int, list[int]] = {}
        for r, p in enumerate(positions):
            by_pos.setdefault(p, []).append(r)
        for p, rows in by_pos.items():
            idx = torch.tensor(rows, device=q.device)
            sq = torch.tensor([seqs[r] for r in rows], device=q.device)
            o, c, blk = self._torch_position(q[idx], gates[idx], sq, p)
            out[idx], cnt[idx] = o, c
            blocks[idx, :, : blk.shape[-1]] = blk
        return out, cnt, blocks

    def _torch_position(self, q_rows, gates_rows, sq: torch.Tensor, p: int):
        """The three branches and Eq. 5 for rows of sequences ``sq`` all at position ``p``."""
        cfg = self.cfg
        R, H, Dk = q_rows.shape
        G, Dv = self._sig[1], self._sig[3]
        h = H // G
        acc = compute_dtype(q_rows.dtype)
        scale = self._scale()
        q = q_rows.reshape(R, G, h, Dk).to(acc)

        # Compression branch (Eqs. 7-8): the M visible compressed blocks.
        M = cfg.num_cmp(p)
        if M:
            kc, vc = (buf[sq, :, :M].to(acc) for buf in self._cmp)
            o_cmp, p_cmp = attend(q, kc, vc, scale)
        else:  # empty row: exact zeros (spec I.3)
            o_cmp, p_cmp = q.new_zeros(R, G, h, Dv), q.new_zeros(R, G, h, 0)

        # Selection (Eqs. 9-12): score blocks 0 .. b(p) from p_cmp (the prefill's own helpers:
        # Eq. 10 head sum, Eq. 9 band, Eq. 11 top-n), then gather only the selected keys.
        ls = cfg.sel_block
        b = p // ls
        scores = overlap_scores(p_cmp.sum(dim=2)[:, :, None], b + 1, cfg)  # [R, G, 1, b+1]
        b_t = torch.full((1,), b, dtype=torch.long, device=q.device)
        blocks = top_n(scores, b_t, cfg)[:, :, 0, : min(cfg.sel_top_n, b + 1)]  # no -1 padding
        pos = (blocks[..., None] * ls + torch.arange(ls, device=q.device)).flatten(-2)
        valid = pos <= p  # only the current block reaches past p; its later keys are excluded
        idx = pos.clamp(max=p)  # clamped so no unwritten slot is ever read
        ks, vs = self._raw["sel"]
        groups = torch.arange(G, device=q.device)[None, :, None]
        k_sel = ks[sq[:, None, None], groups, idx].to(acc)
        v_sel = vs[sq[:, None, None], groups, idx].to(acc)
        o_sel, _ = attend(q, k_sel, v_sel, scale, valid)

        # Sliding window (spec I.7): the last min(w, p+1) keys, a contiguous slice.
        start = max(0, p - cfg.window + 1)
        kw, vw = (buf[sq, :, start : p + 1].to(acc) for buf in self._raw["win"])
        o_win, _ = attend(q, kw, vw, scale)

        count = (p + 1 - blocks * ls).clamp(0, ls).sum(-1)  # spec I.9 sel reads per group
        # Each branch rounded once to the input dtype, then Eq. 5 exactly as the prefill does.
        rows = (o.reshape(R, H, Dv).to(q_rows.dtype) for o in (o_cmp, o_sel, o_win))
        return gate(*rows, gates_rows), count, blocks

    def _prefill_attention(self, q, gates, pairs, branch_kv, counts, validate):
        """`nsa_impl.nsa_attention` over the prompts (packed into one varlen call if ragged)."""
        attention = _prefill_attention()
        kwargs = dict(scale=self.scale, phi_k=self.phi_k, phi_v=self.phi_v, validate=validate)
        B, T = q.shape[:2]
        if all(c == T for c in counts):
            k, v = pairs["cmp"]
            return attention(q, k, v, gates, self.cfg, branch_kv=branch_kv, **kwargs)

        def pack(x):
            return torch.cat([x[b, :c] for b, c in enumerate(counts)])[None]

        cu = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32)
        k, v = pack(pairs["cmp"][0]), pack(pairs["cmp"][1])
        packed_kv = None
        if branch_kv is not None:
            packed_kv = {n: (pack(kk), pack(vv)) for n, (kk, vv) in branch_kv.items()}
        o_packed = attention(
            pack(q), k, v, pack(gates), self.cfg, branch_kv=packed_kv,
            cu_seqlens=cu.to(q.device), **kwargs,
        )[0]
        o = q.new_zeros(B, T, q.shape[2], pairs["cmp"][1].shape[3])
        for b, (s, c) in enumerate(zip(cu.tolist(), counts, strict=False)):
            o[b, :c] = o_packed[s : s + c]
        return o


class DecodeGraph:
    """A CUDA graph of one `NSACache.step` (the four Triton launches), replayed with static
    inputs: build it with `NSACache.capture` (or ``NSACache(cuda_graph=True)``).

    Attributes:
        inputs: the static input buffers ``[q_t, gates_t, k_t, v_t]`` (and the ``sel``/``win``
            pairs after them when the branches have their own K/V): write the next token's
            inputs here, then `replay`.
        output: the static ``[B, 1, H, Dv]`` output, overwritten by every replay.
    """

    def __init__(self, cache: NSACache, q_t, gates_t, pairs):
        first = pairs["cmp"]
        self.shared = all(pairs[n][0] is first[0] and pairs[n][1] is first[1] for n in BRANCHES)
        names = ("cmp",) if self.shared else BRANCHES
        inputs = [q_t, gates_t] + [t for n in names for t in pairs[n]]
        self.inputs = [t.clone(memory_format=torch.contiguous_format) for t in inputs]
        q_s, g_s, kv = self.inputs[0], self.inputs[1], self.inputs[2:]
        static = (dict.fromkeys(BRANCHES, (kv[0], kv[1])) if self.shared else
                  {n: (kv[2 * i], kv[2 * i + 1]) for i, n in enumerate(BRANCHES)})
        B, _, H, _ = q_s.shape
        self.output = q_s.new_empty(B, 1, H, cache._sig[3])
        self._cache = cache
        cache._captured = True
        # The graph holds raw addresses: keep the buffers alive and notice a reset.
        self._buffers = (cache._raw, cache._cmp, cache._dev_len, cache._workspace(B))
        # Warm-up (compiles the kernels) for real on a side stream, then restore the lengths:
        # it wrote only row p and the block completing at p, from these same inputs, which the
        # first replay writes again.
        device = q_s.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            saved = cache._dev_len.clone()
            cache._kernel_step(q_s, g_s, static, self.output)
            cache._dev_len.copy_(saved)
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            cache._kernel_step(q_s, g_s, static, self.output)

    def replay(self, steps: int = 1) -> torch.Tensor:
        """Run the captured step ``steps`` times on what `inputs` hold (every sequence advances
        by ``steps`` tokens, all with these inputs: ``steps > 1`` is for benchmarks). Raises
        ``ValueError`` first if that would pass ``max_len``."""
        cache = self._cache
        if cache._raw is not self._buffers[0] or cache._dev_len is not self._buffers[2]:
            raise ValueError("the cache was reset or reallocated after this step was captured")
        cache.reserve(steps)
        for _ in range(steps):
            self._graph.replay()
        cache._host_len = [p + steps for p in cache._host_len]
        ws = cache._workspace(len(cache._host_len))
        cache._last = ([p - 1 for p in cache._host_len], ws.sel_cnt, ws.sel_idx)
        return self.output

    def step(self, q_t, k_t, v_t, gates_t, branch_kv: dict | None = None) -> torch.Tensor:
        """Copy one step's inputs into `inputs` (one launch) and `replay`."""
        pairs = {name: tuple((branch_kv or {}).get(name, (k_t, v_t))) for name in BRANCHES}
        first = pairs["cmp"]
        shared = all(pairs[n][0] is first[0] and pairs[n][1] is first[1] for n in BRANCHES)
        if shared != self.shared:
            raise ValueError(f"the captured step had {'shared' if self.shared else 'per-branch'}"
                             f" K/V; this step has {'shared' if shared else 'per-branch'} K/V")
        names = ("cmp",) if shared else BRANCHES
        torch._foreach_copy_(self.inputs, [q_t, gates_t] + [t for n in names for t in pairs[n]])
        return self.replay()


def _rows_view(q: torch.Tensor) -> torch.Tensor:
    """``q`` with a contiguous last dim (the kernels index rows and heads by stride)."""
    return q if q.stride(-1) == 1 else q.contiguous()


def _prefill_attention():
    """The functional prefill `NSACache.prefill` uses (imported late: `api` may import us)."""
    from .api import nsa_attention

    return nsa_attention
