"""The NSA spec as data: one `Clause` per checkable statement (spec Part I, properties P1-P29).

A clause is what a report row is about. Each test in ``conformance/tests`` carries the ids of the
clauses it checks (``@pytest.mark.clause("NSA-...")``); a clause passes when all its tests pass,
fails when any fails, and is skipped (with the reason) only when all its tests skip. The meta
tests fail when a clause has no test or an id is used twice.

Tolerance classes (spec I.10; the numbers live in `nsa_impl.tolerances`):

* ``exact``: numeric; run in float64 against the dense oracle (`conformance.dense`) at 1e-12.
  The same clause runs in the ``fp32`` class (against `nsa_ref` in float32) or the
  ``low-precision`` class (fp16/bf16, against twice the error of a naive same-dtype run) when
  the implementation under test has no float64, or on the low-precision lanes of a GPU.
* ``structural``: an invariant checked exactly (shapes, index sets, raised errors, exact zeros,
  bit-identical rows under a perturbation).

``needs`` names the adapter capabilities a clause requires (see `conformance.adapters`); a
missing one turns every test of the clause into a skip that says which capability is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE_CLASSES = ("exact", "fp32", "low-precision", "structural")


@dataclass(frozen=True)
class Clause:
    """One checkable statement of the spec.

    Attributes:
        id: stable identifier, ``NSA-<where>-<what>`` (used in markers, reports, CLI filters).
        title: a few words for the report table.
        paper: the paper's equation/section (arXiv:2502.11089).
        spec: the project spec sections (NSA-SPEC.md: ``I.x`` normative, ``Pn`` properties).
        statement: what must hold, in one or two sentences.
        needs: adapter capabilities the clause requires (e.g. ``("aux",)``, ``("decode",)``).
        tolerance: ``exact`` | ``fp32`` | ``low-precision`` | ``structural``.
    """

    id: str
    title: str
    paper: str
    spec: str
    statement: str
    needs: tuple[str, ...] = ()
    tolerance: str = "exact"

    def __post_init__(self) -> None:
        if self.tolerance not in TOLERANCE_CLASSES:
            raise ValueError(f"Clause {self.id}: tolerance must be one of {TOLERANCE_CLASSES}")


def _c(id, title, paper, spec, statement, needs=(), tolerance="exact") -> Clause:
    return Clause(id, title, paper, spec, " ".join(statement.split()), tuple(needs), tolerance)


CLAUSES: tuple[Clause, ...] = (
    # --- whole-output parity ---------------------------------------------------------------
    _c(
        "NSA-DENSE-CROSSCHECK",
        "equals the dense-mask formulation",
        "Eqs. 5, 7-12",
        "I.1-I.8, I.10",
        """The output equals the independent dense-mask formulation of spec Part I on random
       structures (batch, groups, heads, head dims, configuration, length).""",
    ),
    _c(
        "NSA-EQ5-SHAPES",
        "edge shapes",
        "Eq. 5",
        "I.1, I.2",
        """The output is right for T=1, T<l, T not a multiple of d or l', Dk != Dv, group sizes
       h in {1, 2, 4} and B=2.""",
    ),
    _c(
        "NSA-EQ5-GATE-LINEARITY",
        "linear in the gates",
        "Eq. 5",
        "I.8, P24",
        """o = g_cmp*o_cmp + g_sel*o_sel + g_win*o_win per head; one-hot gates recover each branch
       and each branch has its own softmax.""",
    ),
    _c(
        "NSA-P23-GATE-RANGE",
        "gate range",
        "Eq. 5, §3.3 (sigmoid gates)",
        "I.1, I.11, P23",
        """Gates exactly 0 or 1 (a saturated sigmoid) are valid; gates outside [0, 1] or not finite
       raise ValueError naming the gates when validation is on.""",
        tolerance="structural",
    ),
    _c(
        "NSA-I1-SCALE",
        "softmax scale",
        "Eq. 2, Eq. 8",
        "I.1, A9",
        """A given softmax scale is used by every branch and by the scores of Eq. 8; the default is
       1/sqrt(Dk).""",
        needs=("scale",),
    ),
    _c(
        "NSA-I8-BRANCH-KV",
        "independent K/V per branch",
        "§3.3 (independent keys and values)",
        "I.8, A12",
        """With branch_kv each branch reads its own (k, v) pair; the selection scores
       come from the compressed pair.""",
        needs=("branch_kv",),
    ),
    _c(
        "NSA-I3-PHI",
        "pluggable phi",
        "Eq. 7 (phi)",
        "I.3, A2",
        """A given phi_k/phi_v ([..., l, D] -> [..., D]) compresses each block in place of the
       mean.""",
        needs=("phi",),
    ),
    # --- compression --------------------------------------------------------------------------
    _c(
        "NSA-EQ7-CMP-OUTPUT",
        "compressed branch",
        "Eqs. 7-8",
        "I.3",
        """o_cmp[p] is attention over exactly the compressed blocks visible to p (mean pooling of
       keys [i*d, i*d+l)).""",
    ),
    _c(
        "NSA-P3-CMP-VISIBILITY",
        "compressed visibility boundary",
        "Eq. 7",
        "I.3, P3, A11",
        """Compressed block i is visible at p = i*d+l-1 and not at p = i*d+l-2; a block holding any
       key > p never contributes.""",
    ),
    _c(
        "NSA-EQ8-PCMP",
        "compressed probabilities",
        "Eq. 8",
        "I.3, A9",
        """p_cmp[p] is the scaled softmax of the compressed attention, per query head, and 0 for
       blocks not visible to p.""",
        needs=("aux",),
    ),
    _c(
        "NSA-P21-EMPTY-CMP",
        "empty compressed rows",
        "Eq. 7 (t < l)",
        "I.3, P21, A3",
        """Rows with num_cmp(p)=0 give exactly 0 compressed output and no NaN/Inf, forward or
       backward.""",
    ),
    _c(
        "NSA-P28-DEGENERATE-CMP",
        "degenerate compression",
        "Eq. 7",
        "P28",
        """With l = d = 1 and mean pooling the compressed branch equals full causal attention.""",
    ),
    # --- scores (Eqs. 9-10) -------------------------------------------------------------------
    _c(
        "NSA-EQ9-OVERLAP",
        "Eq. 9 as overlap weights",
        "Eq. 9",
        "I.4, P8, A1",
        """p_slc[p, j] = sum_i W[j, i] p_cmp[p, i] with
       W[j, i] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d
       (weights 1,2,2,2,1 for the paper configuration), summed over the heads of the group.""",
        needs=("aux",),
    ),
    _c(
        "NSA-P7-EQ9-IDENTITY",
        "Eq. 9 identity case",
        "Eq. 9 (l = l' = d)",
        "I.4, P7",
        """When l = l' = d the block scores are the group-summed compressed probabilities.""",
        needs=("aux",),
    ),
    _c(
        "NSA-P9-MASS",
        "score mass conservation",
        "Eq. 9",
        "P9",
        """Where num_cmp(p) >= 1 the group scores sum to h*l/d; otherwise to 0.""",
        needs=("aux",),
        tolerance="exact",
    ),
    _c(
        "NSA-P10-SUPPORT",
        "score support",
        "Eq. 9",
        "P10",
        """Block scores are >= 0, 0 for non-candidate blocks and for blocks that meet no visible
       compressed block.""",
        needs=("aux",),
        tolerance="structural",
    ),
    _c(
        "NSA-EQ10-GROUP-SUM",
        "Eq. 10 group sum",
        "Eq. 10",
        "I.4, A8",
        """The group score is the sum (not the mean) over the h query heads of the group of the
       per-head Eq. 9 scores.""",
        needs=("aux",),
    ),
    # --- top-n (Eq. 11) -------------------------------------------------------------------------
    _c(
        "NSA-EQ11-INDICES",
        "block indices equal",
        "Eq. 11",
        "I.5, I.10",
        """block_indices equal the oracle's exactly (exact class); in the fp32 class they may differ
       only at a near-tie (relative gap <= 1e-6), where the selected scores must match as a
       multiset.""",
        needs=("indices",),
        tolerance="exact",
    ),
    _c(
        "NSA-P14-CARDINALITY",
        "index format and count",
        "Eq. 11",
        "I.5, P14, A15",
        """block_indices is int64 [B, T, G, n], ascending, -1 padded, holding min(n, b(p)+1)
       distinct blocks in [0, b(p)].""",
        needs=("indices",),
        tolerance="structural",
    ),
    _c(
        "NSA-P15-FORCED",
        "forced blocks",
        "§4.1 (1 initial + 2 local blocks)",
        "I.5, P15, A4",
        """The initial and local blocks (0..init-1 and b-local+1..b) are always selected and are
       counted in n.""",
        needs=("indices",),
        tolerance="structural",
    ),
    _c(
        "NSA-P16-MAXIMALITY",
        "top-n maximality",
        "Eq. 11",
        "I.5, P16",
        """Every unforced selected block scores >= every unforced unselected candidate (by the
       implementation's own reported scores).""",
        needs=("aux",),
        tolerance="structural",
    ),
    _c(
        "NSA-P17-TIE-BREAK",
        "deterministic tie-break",
        "Eq. 11 (rank)",
        "I.5, P17, A10",
        """Equal scores are broken toward the lower block index.""",
    ),
    _c(
        "NSA-P18-FEWER-THAN-N",
        "fewer than n blocks",
        "Eq. 11",
        "I.5, P18, A15",
        """If b(p)+1 <= n every block 0..b(p) is selected, the rest is -1 padding that is never
       attended.""",
    ),
    # --- selection attention (Eq. 12) ------------------------------------------------------------
    _c(
        "NSA-P11-SHARED-SELECTION",
        "one selection per group",
        "Eq. 10",
        "I.4, P11",
        """All h query heads of a group attend to the same selected blocks (the group's
       block_indices).""",
    ),
    _c(
        "NSA-P19-SEL-TOKEN-CAUSAL",
        "selection causal inside blocks",
        "Eq. 12",
        "I.6, P19, A7",
        """o_sel[p] is attention over exactly the keys s <= p of the selected blocks.""",
    ),
    _c(
        "NSA-P20-DUPLICATES",
        "duplicate and -1 indices",
        "Eq. 12",
        "I.6, P20",
        """Selection attention given indices with duplicates or -1 padding equals the result for
       the deduplicated set.""",
        needs=("selection",),
    ),
    _c(
        "NSA-P25-SEL-COVERS-ALL",
        "selection covers everything",
        "Eq. 12",
        "P25",
        """If n >= b(p)+1 the selection branch equals full causal attention.""",
    ),
    _c(
        "NSA-I6-EXACT-EXCLUSION",
        "exact exclusion of masked keys",
        "Eq. 12, §3.3.3",
        "I.6, A7",
        """Keys outside a branch's key set get exactly zero weight even when every allowed logit
       is below -1e4 (no finite mask sentinel).""",
    ),
    # --- sliding window ------------------------------------------------------------------------
    _c(
        "NSA-I7-WINDOW-KEYS",
        "window of exactly w keys",
        "§3.3.3",
        "I.7, A6",
        """o_win[p] is attention over exactly the keys p-w < s <= p, i.e. min(w, p+1) keys.""",
    ),
    _c(
        "NSA-P26-WIN-COVERS-ALL",
        "window covers everything",
        "§3.3.3",
        "P26",
        """If w >= p+1 the window branch equals full causal attention.""",
    ),
    _c(
        "NSA-P27-FULL-LIMIT",
        "full-attention limit",
        "Eqs. 1, 5",
        "P27",
        """When selection and window both cover every key, gates (0, a, 1-a) give full causal
       attention.""",
    ),
    _c(
        "NSA-P22-FIRST-TOKEN",
        "first token",
        "Eqs. 2, 5",
        "P22",
        """At p = 0: o_sel = o_win = v_0 and o_cmp = 0.""",
    ),
    # --- causality and consistency ----------------------------------------------------------------
    _c(
        "NSA-P1-CAUSAL-OUTPUT",
        "causal outputs",
        "Eq. 1",
        "P1",
        """Changing q, k, v or gates at positions s > t leaves o[:t+1] unchanged (bit-identical for
       the reference).""",
        tolerance="structural",
    ),
    _c(
        "NSA-P1-CAUSAL-GRAD",
        "causal gradients",
        "Eq. 1",
        "P1",
        """d o_t / d (q, k, v, gates)_s = 0 exactly for every s > t.""",
        needs=("backward",),
        tolerance="structural",
    ),
    _c(
        "NSA-P2-SELECTION-CAUSAL",
        "causal selection",
        "Eq. 11",
        "P2",
        """block_indices[:t+1] depend only on inputs at positions <= t.""",
        needs=("indices",),
        tolerance="structural",
    ),
    _c(
        "NSA-P4-PREFIX",
        "prefix invariance",
        "Eq. 1",
        "P4",
        """Outputs at positions < t are the same whether the input has length t or T > t.""",
    ),
    _c(
        "NSA-P12-HEAD-PERMUTATION",
        "head permutation",
        "Eq. 10",
        "P12",
        """Permuting query heads within a group permutes their outputs and keeps block_indices.""",
    ),
    _c(
        "NSA-P13-GROUP-INDEPENDENCE",
        "group independence",
        "Eq. 10",
        "P13",
        """Changing the queries, keys or values of one group leaves other groups' outputs and
       indices unchanged.""",
    ),
    # --- gradients ------------------------------------------------------------------------------
    _c(
        "NSA-GRAD-PARITY",
        "gradient parity",
        "Eqs. 5, 7-12 (backward)",
        "I.10",
        """Gradients with respect to q, k, v and gates equal the oracle's (1e-12 in float64,
       1e-5 in float32).""",
        needs=("backward",),
    ),
    # --- variable length -------------------------------------------------------------------------
    _c(
        "NSA-P6-VARLEN-PACKING",
        "packing equivalence",
        "§3.4 (varlen)",
        "I.1, P6",
        """Packing sequences with cu_seqlens gives the same outputs and indices as running each
       sequence alone.""",
        needs=("varlen",),
    ),
    _c(
        "NSA-I1-VARLEN-ORACLE",
        "varlen against the oracle",
        "§3.4 (varlen)",
        "I.1",
        """Packed outputs (and gradients) equal the oracle's per-sequence semantics: nothing
       crosses a cu_seqlens boundary.""",
        needs=("varlen",),
    ),
    # --- decode ----------------------------------------------------------------------------------
    _c(
        "NSA-P5-DECODE-PREFILL",
        "decode equals prefill",
        "§5.2 (decoding)",
        "I.9, P5",
        """Decoding positions 0..T-1 one at a time reproduces the prefill output row by row.""",
        needs=("decode",),
    ),
    _c(
        "NSA-I9-CMP-EMIT",
        "compressed cache emission",
        "Eq. 7, §5.2",
        "I.9",
        """The decode cache holds num_cmp(p) compressed blocks at step p (block i emitted when
       i*d + l == p + 1).""",
        needs=("decode",),
        tolerance="structural",
    ),
    _c(
        "NSA-I9-READS",
        "decode read counters",
        "§5.2, Table 4",
        "I.9",
        """Per-step reads are cmp = num_cmp(p), sel = selected keys <= p, win = min(w, p+1).""",
        needs=("decode",),
        tolerance="structural",
    ),
    _c(
        "NSA-P29-READ-BOUND",
        "decode read bound",
        "Table 4",
        "I.9, P29",
        """reads(S) <= num_cmp(S-1) + n*l' + min(w, S); 5631 at S = 65536 for the paper
       configuration.""",
        needs=("decode",),
        tolerance="structural",
    ),
    # --- bad input -----------------------------------------------------------------------------
    _c(
        "NSA-I11-BAD-INPUT",
        "bad input raises",
        "-",
        "I.11",
        """Wrong ranks or shapes, H % G != 0, mismatched dtypes or devices, bad cu_seqlens raise
       ValueError/TypeError naming the argument.""",
        tolerance="structural",
    ),
    _c(
        "NSA-I2-CONFIG",
        "invalid configuration raises",
        "§4.1",
        "I.2",
        """d not dividing l or l', n below the forced count and non-positive sizes raise ValueError
       naming the field.""",
        tolerance="structural",
        needs=("nsa_config",),
    ),
    # --- long context (GPU) -----------------------------------------------------------------------
    _c(
        "NSA-LONG-CAUSAL-64K",
        "causality at T=65536",
        "Eq. 1, §5",
        "P1, P2",
        """At T = 65536 changing inputs after t leaves outputs and indices at positions <= t
       unchanged and gives zero gradient to keys after t.""",
        needs=("cuda", "long_context"),
        tolerance="structural",
    ),
    _c(
        "NSA-LONG-INDEX-BOUNDS-64K",
        "index bounds at T=65536",
        "Eq. 11, §5",
        "I.5, P14",
        """At T = 65536 block_indices stay within [0, b(p)], count min(n, b(p)+1), hold the forced
       blocks, and sampled rows match the oracle.""",
        needs=("cuda", "long_context", "aux"),
        tolerance="structural",
    ),
    # --- robustness: non-finite values, low precision (appended) ------------------------------
    _c(
        "NSA-NAN-ROWS",
        "non-finite values stay in the rows that read them",
        "Eqs. 2, 5 (each row attends only its own keys)",
        "I.3, I.6, I.7, I.10",
        """A NaN at token j of one sequence changes only the rows that read j (j in the row's
       window, its selected keys or one of its visible compressed blocks), and those rows are
       not finite; every other row (outputs, branch outputs, dq and dgates) and the dk/dv of
       keys no such row reads are bit-identical to a clean run. Masked keys contribute exactly
       nothing (select, never multiply by zero).""",
        tolerance="structural",
    ),
    _c(
        "NSA-NAN-VARLEN-ISOLATION",
        "one bad packed sequence leaves the others bit-identical",
        "Eq. 1 (per sequence)",
        "I.1, I.10",
        """With cu_seqlens, a NaN in v of one packed sequence leaves every other sequence's
       outputs, branch outputs and gradients bit-identical to a clean run.""",
        needs=("varlen",),
        tolerance="structural",
    ),
    _c(
        "NSA-NAN-EMPTY-CMP",
        "empty compressed rows stay zero next to NaN",
        "Eq. 7 (t < l)",
        "I.3, P21",
        """Rows that see no compressed block keep exact-zero o_cmp (and zero gradient through it)
       when other tokens of the batch hold NaN, in the same sequence or another one.""",
        needs=("aux",),
        tolerance="structural",
    ),
    _c(
        "NSA-LOWP-LARGE-LOGITS",
        "fp16 with large unscaled logits",
        "Eq. 2 (scaled dot product)",
        "I.10",
        """float16 inputs whose unscaled q.k exceeds the float16 range while the scaled logits are
       moderate give finite outputs within the low-precision bound of a same-dtype formulation
       that scales before the product: scale before the matmul (or accumulate in float32).
       Runs wherever the implementation declares float16.""",
        tolerance="low-precision",
    ),
)

BY_ID: dict[str, Clause] = {c.id: c for c in CLAUSES}


def get(clause_id: str) -> Clause:
    """The clause with this id (``KeyError`` naming the known ids otherwise)."""
    try:
        return BY_ID[clause_id]
    except KeyError:
        raise KeyError(f"unknown clause {clause_id!r}; known: {', '.join(BY_ID)}") from None
