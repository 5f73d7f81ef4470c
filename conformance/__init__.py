"""conformance: the NSA spec as data, and the machinery that checks an implementation against it.

* `conformance.clauses`: the clause registry (id, title, paper reference, statement, needs,
  tolerance class).
* `conformance.adapters`: how the implementation under test is called (``--impl``), with its
  declared capabilities; third parties plug in through the ``nsa_conformance.adapters`` entry
  point group.
* `conformance.peers`: adapters for public NSA implementations (fla-core, flash_nsa,
  lucidrains), each with its capabilities, configuration limits and translation profile.
* `conformance.dense`: an independent dense-mask formulation of spec Part I (the oracle).
* `conformance.mutants`: deliberately broken references the suite must reject.
* `conformance.report` and ``python -m conformance``: run the clause tests, write
  ``conformance.json``, ``conformance.md`` and ``junit.xml``; `conformance.grading`: adapter
  crashes, the adapter block of a report, the summary table across reports.

The clause tests live in ``conformance/tests`` (pytest, ``--impl``/``--device``), the suite's own
checks in ``conformance/meta_tests``.
"""

from .clauses import CLAUSES, Clause

__all__ = ["CLAUSES", "Clause"]
