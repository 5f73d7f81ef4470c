"""Mutants: a fast check that some are rejected by the clauses designed for them (the full
matrix is run by ``python -m conformance run --impl nsa_ref``), and that patches never leak."""

from __future__ import annotations

import pytest

import nsa_ref.decode
import nsa_ref.reference
import nsa_ref.rules
from conformance import adapters, clauses, mutants
from conformance.checks import Lane, Subject
from conformance.tests import (
    test_compression,
    test_low_precision,
    test_nonfinite,
    test_parity,
    test_scoring,
    test_selection,
    test_window,
)

EXACT = Lane(__import__("torch").float64, "exact")


def _subject(adapter, clause_id: str) -> Subject:
    return Subject(adapter, "cpu", clauses=[clauses.BY_ID[clause_id]])


# (mutant, clause, the clause test run directly with its parameters)
CASES = [
    (
        "window-w-plus-1",
        "NSA-I7-WINDOW-KEYS",
        lambda s: test_window.test_window_has_exactly_w_keys(s, EXACT, 5),
    ),
    (
        "eq9-plus-m-plus-n",
        "NSA-EQ9-OVERLAP",
        lambda s: test_scoring.test_block_scores_are_overlap_weighted(s, EXACT, "l<l'"),
    ),
    (
        "ties-high-index",
        "NSA-P17-TIE-BREAK",
        lambda s: test_selection.test_ties_go_to_the_lower_index(s, EXACT, 1),
    ),
    (
        "finite-mask-sentinel",
        "NSA-I6-EXACT-EXCLUSION",
        lambda s: test_selection.test_masked_keys_get_exactly_zero_weight(s, EXACT, "sel"),
    ),
    (
        "gates-sigmoid",
        "NSA-EQ5-GATE-LINEARITY",
        lambda s: test_parity.test_output_is_linear_in_the_gates(s, EXACT),
    ),
    (
        "empty-cmp-mean-v",
        "NSA-P21-EMPTY-CMP",
        lambda s: test_compression.test_empty_compressed_rows_are_exact_zeros(s, EXACT),
    ),
    (
        "window-scale-ignored",
        "NSA-I1-SCALE",
        lambda s: test_parity.test_given_scale_is_used_everywhere(s, EXACT, 0.5),
    ),
    (
        "cmp-visible-late",
        "NSA-P3-CMP-VISIBILITY",
        lambda s: test_compression.test_visibility_boundary(s, EXACT),
    ),
    (
        "masked-by-zero-weights",
        "NSA-NAN-VARLEN-ISOLATION",
        lambda s: test_nonfinite.test_a_nan_in_one_packed_sequence_leaves_the_other_bit_identical(
            s, EXACT, 0
        ),
    ),
    (
        "half-product-before-scale",
        "NSA-LOWP-LARGE-LOGITS",
        lambda s: test_low_precision.test_float16_large_unscaled_logits(s),
    ),
]


@pytest.mark.parametrize("mutant,clause,run", CASES, ids=[c[0] for c in CASES])
def test_expected_clause_kills_the_mutant_and_passes_the_reference(mutant, clause, run):
    assert clause in mutants.get(mutant).expected
    run(_subject(adapters.NsaRefAdapter(), clause))  # the real reference passes
    broken = mutants.MutantAdapter(adapters.NsaRefAdapter(), mutants.get(mutant))
    with pytest.raises(AssertionError, match=clause):
        run(_subject(broken, clause))


def test_at_least_eight_mutants_with_known_expected_clauses():
    assert len(mutants.MUTANTS) >= 8
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        assert m.expected and set(m.expected) <= set(clauses.BY_ID), m.name


def test_patches_are_undone():
    modules = (nsa_ref.rules, nsa_ref.reference, nsa_ref.decode)
    before = [dict(vars(m)) for m in modules]
    for m in mutants.MUTANTS:
        with m.patch():
            pass
        with pytest.raises(RuntimeError), m.patch():
            raise RuntimeError("a failing call must not leave the mutant in place")
    assert [dict(vars(m)) for m in modules] == before


def test_mutant_adapter_patches_only_inside_calls():
    m = mutants.get("window-w-plus-1")
    adapter = mutants.MutantAdapter(adapters.NsaRefAdapter(), m)
    original = nsa_ref.rules.window_keys
    assert adapter.name == "nsa_ref~window-w-plus-1"
    assert nsa_ref.rules.window_keys is original
    with m.patch():
        assert nsa_ref.rules.window_keys is not original
    assert nsa_ref.rules.window_keys is original
