"""Deliberately broken variants of the reference: a suite that cannot reject them is worthless.

Each `Mutant` is a context manager (``mutant.patch()``) that swaps one rule of `nsa_ref.rules`
(the reference calls them as ``rules.<fn>`` at run time) or wraps one reference function for
the duration of a call. `MutantAdapter` enters it around every call of the wrapped adapter
only, so the oracles of the suite (`conformance.dense`, and `nsa_ref` itself when it is the
float32 oracle) always run unpatched.

``python -m conformance run --impl nsa_ref`` runs the clause tests once per mutant and reports
which clauses killed it (a mutant is killed when at least one clause fails). ``expected``
records the clauses designed to catch each mutant; the meta tests check a few of them quickly.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .adapters import Adapter, _ContextCache

# Length of the sequence the reference is evaluating (prefill), for rules that need to know
# which raw keys exist; unset during decode, where only keys <= p exist.
_SEQ_LEN: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "nsa_mutant_seq_len", default=None
)


@dataclass(frozen=True)
class Mutant:
    """One broken reference variant.

    Attributes:
        name: short id (CLI ``--mutant``, reports).
        description: the bug, in words.
        expected: clause ids designed to reject it.
        patch: zero-argument callable returning the context manager that breaks the reference.
    """

    name: str
    description: str
    expected: tuple[str, ...]
    patch: Callable[[], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _swap(module: str, attr: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace ``module.attr`` by ``make(original)`` inside the context."""
    mod = importlib.import_module(module)
    original = getattr(mod, attr)
    setattr(mod, attr, make(original))
    try:
        yield
    finally:
        setattr(mod, attr, original)


@contextlib.contextmanager
def _swaps(*swaps: tuple[str, str, Callable[[Callable], Callable]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for module, attr, make in swaps:
            stack.enter_context(_swap(module, attr, make))
        yield


def _track_length(original):
    """``reference._sequence`` wrapper recording the evaluated sequence's length in `_SEQ_LEN`."""

    def _sequence(q, *args, **kwargs):
        token = _SEQ_LEN.set(q.shape[0])
        try:
            return original(q, *args, **kwargs)
        finally:
            _SEQ_LEN.reset(token)

    return _sequence


def _available(p: int) -> int:
    """Raw keys that exist: the whole sequence in prefill, ``p + 1`` in decode."""
    length = _SEQ_LEN.get()
    return p + 1 if length is None else length


def _rules():
    return importlib.import_module("nsa_ref.rules")


# --- the broken rules -------------------------------------------------------------------------


def _eq9_plus(_original):
    """Eq. 9 read as in arXiv v1, index ``(l'/d) j + m + n`` (0-based): l/d - 1 blocks off."""

    def overlap_weights(num_sel, num_cmp, cfg, dtype=torch.float64):
        r, c = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
        W = torch.zeros(num_sel, num_cmp, dtype=dtype)
        for j in range(num_sel):
            for m in range(r):
                for n in range(c):
                    if r * j + m + n < num_cmp:
                        W[j, r * j + m + n] += 1
        return W

    return overlap_weights


def _window_plus_one(_original):
    def window_keys(p, cfg):
        return list(range(max(0, p - cfg.window), p + 1))

    return window_keys


def _window_late_start(_original):
    def window_keys(p, cfg):
        return list(range(max(0, p - cfg.window + 2), p + 1))

    return window_keys


def _no_causal_current_block(_original):
    def selected_keys(blocks, p, cfg):
        ls, end = cfg.sel_block, _available(p)
        keys = set()
        for j in blocks:
            if j >= 0:
                keys.update(range(j * ls, min((j + 1) * ls, end)))
        return sorted(keys)

    return selected_keys


def _cmp_visible_early(_original):
    def visible_cmp_blocks(p, cfg):
        return min(cfg.num_cmp(p + 1), cfg.num_cmp(_available(p) - 1))

    return visible_cmp_blocks


def _ties_high(_original):
    def top_n_blocks(scores, b, cfg):
        forced = _rules().forced_blocks(b, cfg)
        rest = sorted((j for j in range(b + 1) if j not in forced), key=lambda j: (-scores[j], -j))
        return sorted(forced + rest[: min(cfg.sel_top_n, b + 1) - len(forced)])

    return top_n_blocks


def _no_init_block(_original):
    def forced_blocks(b, cfg):
        return list(range(max(0, b - cfg.sel_local_blocks + 1), b + 1))

    return forced_blocks


def _empty_cmp_nan(original):
    def attend(q, k, v, scale):
        if k.shape[0] == 0:  # softmax over an all-masked row: 0/0
            return q.new_full((q.shape[0], v.shape[-1]), float("nan")), q.new_zeros(q.shape[0], 0)
        return original(q, k, v, scale)

    return attend


def _scale_ignored(original):
    def attend(q, k, v, scale):
        return original(q, k, v, 1.0 / math.sqrt(q.shape[-1]))

    return attend


def _duplicates_counted(_original):
    def selected_keys(blocks, p, cfg):
        ls = cfg.sel_block
        return [s for j in blocks if j >= 0 for s in range(j * ls, min((j + 1) * ls, p + 1))]

    return selected_keys


def _forced_not_counted_attention(original):
    def nsa_attention(q, k, v, gates, cfg, **kwargs):
        return original(q, k, v, gates, _more_blocks(cfg), **kwargs)

    return nsa_attention


def _forced_not_counted_cache(original):
    def cache(cfg, **kwargs):
        return original(_more_blocks(cfg), **kwargs)

    return cache


def _more_blocks(cfg):
    """n score-chosen blocks *plus* the forced ones: the forced blocks are not counted in n."""
    return dataclasses.replace(cfg, sel_top_n=cfg.sel_top_n + cfg.forced_blocks)


# --- row rewrites (selection/window attention recomputed the broken way) ------------------------


def _sentinel_attend(q, k, v, allowed, scale):
    """Attention over a full row with excluded logits set to a finite -1e4 (the bug)."""
    logits = (q @ k.T) * scale
    logits = logits.masked_fill(~allowed[None, :], -1e4)
    return torch.softmax(logits, dim=-1) @ v


def _finite_sentinel(original):
    def nsa_row(p, q_p, seq, scale, W):
        row = original(p, q_p, seq, scale, W)
        rules, cfg, h = _rules(), seq.cfg, seq.h
        groups = q_p.shape[0] // h
        out = {}
        for branch, keys_of in (
            ("sel", lambda g: rules.selected_keys(row.blocks[g], p, cfg)),
            ("win", lambda g: rules.window_keys(p, cfg)),
        ):
            k_all, v_all = seq.raw[branch]
            parts = []
            for g in range(groups):
                allowed = torch.zeros(k_all.shape[0], dtype=torch.bool, device=q_p.device)
                allowed[keys_of(g)] = True
                parts.append(
                    _sentinel_attend(
                        q_p[g * h : (g + 1) * h], k_all[:, g], v_all[:, g], allowed, scale
                    )
                )
            out[branch] = torch.cat(parts)
        return dataclasses.replace(row, o_sel=out["sel"], o_win=out["win"])

    return nsa_row


def _mean_per_head(original):
    def nsa_row(p, q_p, seq, scale, W):
        row = original(p, q_p, seq, scale, W)
        rules, cfg, h = _rules(), seq.cfg, seq.h
        b, M = p // cfg.sel_block, row.p_cmp.shape[1]
        p_heads = row.p_cmp @ W[: b + 1, :M].T.to(row.p_cmp.dtype)  # [H, b+1]
        k_sel, v_sel = seq.raw["sel"]
        outs, blocks = [], []
        for i in range(q_p.shape[0]):  # every head selects for itself
            chosen = rules.top_n_blocks(p_heads[i].detach().tolist(), b, cfg)
            keys = torch.tensor(
                rules.selected_keys(chosen, p, cfg), dtype=torch.long, device=q_p.device
            )
            g = i // h
            outs.append(
                rules.attend(
                    q_p[i : i + 1], k_sel[keys, g][:, None], v_sel[keys, g][:, None], scale
                )[0]
            )
            if i % h == 0:
                blocks.append(chosen)
        mean = rules.group_scores(p_heads, h) / h
        return dataclasses.replace(row, o_sel=torch.cat(outs), p_slc=mean, blocks=blocks)

    return nsa_row


def _gates_sigmoid(original):
    """Eq. 5 with ``sigmoid(g)``: gates in [0, 1] handed to a combine that applies the sigmoid."""

    def gate(o_cmp, o_sel, o_win, gates):
        return original(o_cmp, o_sel, o_win, torch.sigmoid(gates))

    return gate


def _empty_cmp_mean_v(original):
    """Rows with no visible compressed block return the mean of the values ``v[0..p]`` (what a
    softmax over an all-masked row with a finite fill gives), instead of 0."""

    def nsa_row(p, q_p, seq, scale, W):
        row = original(p, q_p, seq, scale, W)
        if _rules().visible_cmp_blocks(p, seq.cfg) > 0:
            return row
        v = seq.heads(seq.raw["cmp"][1][: p + 1])  # [p+1, H, Dv]
        return dataclasses.replace(row, o_cmp=v.mean(dim=0).to(row.o_cmp.dtype))

    return nsa_row


def _zero_weights_over_the_packed_row(original):
    """Every output row gets ``0 * (sum of every value of its batch row)``: nothing on finite
    inputs, NaN everywhere once any value is NaN (probability 0 times a masked NaN value)."""

    def nsa_attention(q, k, v, gates, cfg, **kwargs):
        out = original(q, k, v, gates, cfg, **kwargs)
        o = out[0] if isinstance(out, tuple) else out
        values = (kwargs.get("branch_kv") or {}).get("win", (k, v))[1]
        leak = 0.0 * values.sum(dim=(1, 2), keepdim=True).sum(-1, keepdim=True)  # [B, 1, 1, 1]
        o = o + leak
        return (o, out[1]) if isinstance(out, tuple) else o

    return nsa_attention


def _empty_cmp_zero_weights(original):
    """A row that sees no compressed block attends its raw values with zero weights."""

    def nsa_row(p, q_p, seq, scale, W):
        row = original(p, q_p, seq, scale, W)
        if row.p_cmp.shape[1]:
            return row
        v = seq.heads(seq.raw["cmp"][1][: p + 1])  # [p+1, H, Dv]
        leak = 0.0 * v.sum(dim=0)  # zero weights, not an excluded set
        return dataclasses.replace(row, o_cmp=row.o_cmp + leak.to(row.o_cmp.dtype))

    return nsa_row


def _window_scale_ignored(original):
    """The window branch at 1/sqrt(Dk) whatever the given scale (a kernel called without it)."""

    def nsa_row(p, q_p, seq, scale, W):
        row = original(p, q_p, seq, scale, W)
        rules = _rules()
        k_win, v_win = seq.raw["win"]
        keys = torch.tensor(rules.window_keys(p, seq.cfg), dtype=torch.long, device=q_p.device)
        o_win, _ = rules.attend(
            q_p, seq.heads(k_win[keys]), seq.heads(v_win[keys]), 1.0 / math.sqrt(q_p.shape[-1])
        )
        return dataclasses.replace(row, o_win=o_win)

    return nsa_row


def _cmp_visible_late(original):
    """Compressed block i visible only from p = i*d + l (one token after its last key)."""

    def visible_cmp_blocks(p, cfg):
        return original(p - 1, cfg) if p > 0 else 0

    return visible_cmp_blocks


def _half_product_before_scale(original):
    """Half precision: ``q.k`` formed in the input dtype, scaled afterwards (it overflows)."""

    def attend(q, k, v, scale):
        if q.dtype not in (torch.float16, torch.bfloat16) or k.shape[0] == 0:
            return original(q, k, v, scale)
        logits = torch.einsum("hd,nhd->hn", q, k.to(q.dtype)) * scale  # q.k in the input dtype
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.einsum("hn,nhd->hd", probs, v.float()).to(q.dtype), probs

    return attend


def _row_swaps(make):
    return (("nsa_ref.reference", "nsa_row", make), ("nsa_ref.decode", "nsa_row", make))


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "eq9-plus-m-plus-n",
        "Eq. 9 read as in arXiv v1 (index l'/d*j + m + n)",
        ("NSA-EQ9-OVERLAP", "NSA-P9-MASS"),
        lambda: _swap("nsa_ref.rules", "overlap_weights", _eq9_plus),
    ),
    Mutant(
        "window-w-plus-1",
        "sliding window of w+1 keys (the paper's inclusive slice; FlashAttention's "
        "window_size=(w, 0))",
        ("NSA-I7-WINDOW-KEYS",),
        lambda: _swap("nsa_ref.rules", "window_keys", _window_plus_one),
    ),
    Mutant(
        "window-start-late",
        "sliding window starting one key late (w-1 keys)",
        ("NSA-I7-WINDOW-KEYS",),
        lambda: _swap("nsa_ref.rules", "window_keys", _window_late_start),
    ),
    Mutant(
        "forced-not-counted",
        "forced blocks added on top of n instead of counted in n",
        ("NSA-P14-CARDINALITY", "NSA-EQ11-INDICES"),
        lambda: _swaps(
            ("nsa_ref.reference", "nsa_attention", _forced_not_counted_attention),
            ("nsa_ref.decode", "NSARefCache", _forced_not_counted_cache),
        ),
    ),
    Mutant(
        "no-causal-in-current-block",
        "selection reads keys after p in the current block",
        ("NSA-P19-SEL-TOKEN-CAUSAL", "NSA-P1-CAUSAL-OUTPUT"),
        lambda: _swaps(
            ("nsa_ref.reference", "_sequence", _track_length),
            ("nsa_ref.rules", "selected_keys", _no_causal_current_block),
        ),
    ),
    Mutant(
        "finite-mask-sentinel",
        "selection/window mask a full row with a finite -1e4",
        ("NSA-I6-EXACT-EXCLUSION",),
        lambda: _swaps(*_row_swaps(_finite_sentinel)),
    ),
    Mutant(
        "eq10-mean-per-head",
        "Eq. 10 as a mean, and every head selects its own blocks",
        ("NSA-EQ10-GROUP-SUM", "NSA-P11-SHARED-SELECTION"),
        lambda: _swaps(*_row_swaps(_mean_per_head)),
    ),
    Mutant(
        "cmp-visible-early",
        "compressed block visible one token before its last key",
        ("NSA-P3-CMP-VISIBILITY", "NSA-P1-CAUSAL-OUTPUT"),
        lambda: _swaps(
            ("nsa_ref.reference", "_sequence", _track_length),
            ("nsa_ref.rules", "visible_cmp_blocks", _cmp_visible_early),
        ),
    ),
    Mutant(
        "ties-high-index",
        "score ties broken toward the higher block index",
        ("NSA-P17-TIE-BREAK",),
        lambda: _swap("nsa_ref.rules", "top_n_blocks", _ties_high),
    ),
    Mutant(
        "init-block-not-forced",
        "the initial block is not forced",
        ("NSA-P15-FORCED",),
        lambda: _swap("nsa_ref.rules", "forced_blocks", _no_init_block),
    ),
    Mutant(
        "empty-cmp-nan",
        "an empty compressed row gives NaN (softmax of nothing)",
        ("NSA-P21-EMPTY-CMP",),
        lambda: _swap("nsa_ref.rules", "attend", _empty_cmp_nan),
    ),
    Mutant(
        "scale-ignored",
        "a given softmax scale is ignored (1/sqrt(Dk) always)",
        ("NSA-I1-SCALE",),
        lambda: _swap("nsa_ref.rules", "attend", _scale_ignored),
    ),
    Mutant(
        "gates-sigmoid",
        "gates passed through a sigmoid (a combine that expects logits given the gates)",
        ("NSA-EQ5-GATE-LINEARITY",),
        lambda: _swaps(
            ("nsa_ref.reference", "gate", _gates_sigmoid),
            ("nsa_ref.decode", "gate", _gates_sigmoid),
        ),
    ),
    Mutant(
        "empty-cmp-mean-v",
        "rows with no visible compressed block return the mean of V instead of 0",
        ("NSA-P21-EMPTY-CMP", "NSA-P22-FIRST-TOKEN"),
        lambda: _swaps(*_row_swaps(_empty_cmp_mean_v)),
    ),
    Mutant(
        "window-scale-ignored",
        "the window branch ignores a given softmax scale (1/sqrt(Dk) always)",
        ("NSA-I1-SCALE",),
        lambda: _swaps(*_row_swaps(_window_scale_ignored)),
    ),
    Mutant(
        "cmp-visible-late",
        "compressed block visible one token after its last key",
        ("NSA-P3-CMP-VISIBILITY",),
        lambda: _swap("nsa_ref.rules", "visible_cmp_blocks", _cmp_visible_late),
    ),
    Mutant(
        "duplicates-counted",
        "a duplicated block index counts its keys twice",
        ("NSA-P20-DUPLICATES",),
        lambda: _swap("nsa_ref.rules", "selected_keys", _duplicates_counted),
    ),
    Mutant(
        "masked-by-zero-weights",
        "masked keys get probability 0 and are multiplied in (0 * NaN = NaN), over the packed row",
        ("NSA-NAN-ROWS", "NSA-NAN-VARLEN-ISOLATION"),
        lambda: _swap("nsa_ref.reference", "nsa_attention", _zero_weights_over_the_packed_row),
    ),
    Mutant(
        "empty-cmp-zero-weights",
        "a row with no compressed block multiplies its raw values by zero weights",
        ("NSA-NAN-EMPTY-CMP",),
        lambda: _swaps(*_row_swaps(_empty_cmp_zero_weights)),
    ),
    Mutant(
        "half-product-before-scale",
        "float16/bfloat16 logits formed as q.k in the input dtype, scaled afterwards",
        ("NSA-LOWP-LARGE-LOGITS",),
        lambda: _swap("nsa_ref.rules", "attend", _half_product_before_scale),
    ),
)

BY_NAME: dict[str, Mutant] = {m.name: m for m in MUTANTS}


def get(name: str) -> Mutant:
    """The mutant called ``name`` (``ValueError`` listing the known names otherwise)."""
    if name not in BY_NAME:
        raise ValueError(f"unknown mutant {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


class MutantAdapter(Adapter):
    """``base`` with ``mutant`` patched in around each of its calls (and nowhere else)."""

    def __init__(self, base, mutant: Mutant):
        self.base, self.mutant = base, mutant
        self.name = f"{base.name}~{mutant.name}"
        self.description = f"{base.name} broken on purpose: {mutant.description}"
        self.capabilities = base.capabilities

    def available(self):
        """The wrapped adapter's availability."""
        return self.base.available()

    def attention(self, q, k, v, gates, cfg, **kwargs):
        """The wrapped attention, with the mutant in place."""
        with self.mutant.patch():
            return self.base.attention(q, k, v, gates, cfg, **kwargs)

    def new_cache(self, cfg, **kwargs):
        """The wrapped cache; its steps run with the mutant in place."""
        with self.mutant.patch():
            cache = self.base.new_cache(cfg, **kwargs)
        return _ContextCache(cache, self.mutant.patch)

    def selection(self, *args, **kwargs):
        """The wrapped selection entry point, with the mutant in place."""
        with self.mutant.patch():
            return self.base.selection(*args, **kwargs)
