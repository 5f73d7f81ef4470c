"""The side-by-side table of one GPU call: ours, dense attention and the peers, from the ``ROW``
lines of ``.peers/peer_bench.py`` (``ours`` and ``peers`` runs of the same call).

    python bench/side_by_side.py ROWS.jsonl [ROWS.jsonl ...] --machine "NVIDIA H200 | torch ..." \
        --out bench/results/h200_2026-12-02/side_by_side

Writes ``<out>.csv`` (every row), ``<out>.md`` (the machine line, then per T: ms forward /
forward+backward and the ratio to the faster dense backend of the same process) and, when
matplotlib is importable, ``<out>.png`` (speedup over dense vs T, forward and forward+backward,
one line per implementation). Dense rows appear once per process: each implementation's ratio
uses the dense rows measured next to it. Never asserts on time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

DENSE = ("dense-flash", "dense-cudnn")


def read_rows(paths: list[str]) -> list[dict]:
    """``ROW {json}`` lines; each file is one process, its dense rows serve its other rows."""
    rows = []
    for i, path in enumerate(paths):
        for line in Path(path).read_text().splitlines():
            if line.startswith("ROW "):
                rows.append(dict(json.loads(line[4:]), process=i))
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each non-dense row with ``fwd_x``/``fwdbwd_x``: the faster dense time of its process over
    its own (> 1: faster than dense)."""
    best = {}
    for r in rows:
        if r["who"] in DENSE:
            key = (r["process"], r["T"])
            for f in ("fwd_ms", "fwdbwd_ms"):
                best.setdefault(key, {}).setdefault(f, r[f])
                best[key][f] = min(best[key][f], r[f])
    out = []
    for r in rows:
        d = best.get((r["process"], r["T"]), {})
        ratio = {f"{f[:-3]}_x": d[f] / r[f] for f in ("fwd_ms", "fwdbwd_ms") if f in d and r[f]}
        out.append(dict(r, **ratio))
    return out


def markdown(rows: list[dict], machine: str) -> str:
    lines = [machine, "", "ms forward / forward+backward; in brackets the speedup over the faster "
             "dense SDPA backend (flash or cuDNN) measured in the same process", "",
             "| T | " + " | ".join(_names(rows)) + " |", "|---|" + "---|" * len(_names(rows))]
    for T in sorted({r["T"] for r in rows}):
        cells = []
        for who in _names(rows):
            r = next((x for x in rows if x["T"] == T and x["who"] == who), None)
            if r is None:
                cells.append("-")
            elif who in DENSE:
                cells.append(f"{r['fwd_ms']:.2f} / {r['fwdbwd_ms']:.2f}")
            else:
                cells.append(f"{r['fwd_ms']:.2f} / {r['fwdbwd_ms']:.2f} "
                             f"({r.get('fwd_x', 0):.2f}x / {r.get('fwdbwd_x', 0):.2f}x)")
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _names(rows: list[dict]) -> list[str]:
    seen = []
    for r in rows:
        if r["who"] not in seen:
            seen.append(r["who"])
    return [w for w in seen if w in DENSE] + [w for w in seen if w not in DENSE]


def plot(rows: list[dict], machine: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, field, title in zip(axes, ("fwd_x", "fwdbwd_x"), ("forward", "forward+backward"),
                                strict=True):  # fmt: skip
        for who in _names(rows):
            if who in DENSE:
                continue
            pts = sorted((r["T"], r[field]) for r in rows if r["who"] == who and field in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=who)
        ax.axhline(1.0, color="grey", lw=1, ls="--", label="dense (faster backend)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over dense attention")
    axes[1].legend(fontsize=8)
    fig.suptitle(machine, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", help="peer_bench.py outputs (ROW lines), one per process")
    ap.add_argument("--machine", required=True, help="GPU | torch | triton line of the call")
    ap.add_argument("--out", required=True, help="path prefix for .csv/.md/.png")
    args = ap.parse_args(argv)
    rows = with_ratios(read_rows(args.rows))
    if not rows:
        print("no ROW lines in the given files", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["who", "T", "fwd_ms", "fwdbwd_ms", "fwd_x", "fwdbwd_x", "process"]
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = markdown(rows, args.machine)
    out.with_suffix(".md").write_text(text)
    print(text)
    if not plot(rows, args.machine, out.with_suffix(".png")):
        print("matplotlib not importable: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
