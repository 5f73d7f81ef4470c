"""``python -m nsa_impl.train.report DIR [DIR ...]``: CSV tables and PNG plots of training runs.

For the run directories given (written by ``python -m nsa_impl.train``), in ``--out``:

* ``loss.csv``: one row per logged step and run (train loss, eval loss, lr, grad norm, tokens/s);
* ``summary.csv``: one row per run (attention, parameters, steps, final and best eval loss, the
  eval loss relative to the first run at their last common eval step, steady tokens/s);
* ``loss.png``: train loss, eval loss and tokens/s against the step, the runs side by side;
* ``gates.png`` (runs with NSA statistics): per branch, the gate mean +- std of every layer
  against the step, and the gate distribution (histogram) of the last logged step.

The CSV files need nothing beyond the standard library; the plots need matplotlib, and without
it the command writes the CSV files and exits with status 2 and a message saying so.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .metrics import read_metrics

BRANCHES = ("cmp", "sel", "win")


class Run:
    """One run directory: its metrics records and ``summary.json``."""

    def __init__(self, path: Path, label: str | None = None):
        self.path = Path(path)
        if not (self.path / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{self.path}: no metrics.jsonl (not a training run directory)")
        self.records = read_metrics(self.path)
        summary = self.path / "summary.json"
        self.summary = json.loads(summary.read_text()) if summary.exists() else {}
        config = self.summary.get("config", {})
        self.attention = config.get("attention", "?")
        self.label = label or f"{self.path.name} ({self.attention})"

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` in the records of ``kind`` that have a number there."""
        steps, values = [], []
        for r in self.records:
            if r.get("kind") == kind and isinstance(r.get(key), int | float):
                steps.append(r["step"])
                values.append(float(r[key]))
        return steps, values

    @property
    def eval(self) -> dict[int, float]:
        """Eval loss by step."""
        return dict(zip(*self.series("eval", "eval_loss"), strict=True))

    def layers(self) -> list[str]:
        """NSA layer labels found in the records (``nsa/<layer>/<branch>/...`` keys)."""
        found = []
        for r in self.records:
            for key in r:
                parts = key.split("/")
                if parts[0] == "nsa" and len(parts) >= 4 and parts[1] not in found:
                    found.append(parts[1])
        return found

    def steady_tokens_per_s(self) -> float:
        """Median tokens/s over the logged windows, the first (warm-up) left out."""
        _, rates = self.series("train", "tokens_per_s")
        rates = sorted(rates[1:] or rates)
        return rates[len(rates) // 2] if rates else float("nan")


def write_csv(runs: list[Run], out: Path) -> None:
    """``loss.csv`` and ``summary.csv`` (module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["loss", "eval_loss", "lr", "grad_norm", "clip_frac", "tokens_per_s"]
    with (out / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "attention", "kind", "step", *keys])
        for run in runs:
            for r in run.records:
                w.writerow([run.label, run.attention, r.get("kind"), r.get("step")]
                           + [r.get(k, "") for k in keys])  # fmt: skip
    first = runs[0].eval
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "attention", "parameters", "steps", "final_eval_loss",
                    "best_eval_loss", "eval_vs_first_run", "at_step", "tokens_per_s"])  # fmt: skip
        for run in runs:
            ev = run.eval
            common = sorted(set(ev) & set(first))
            last = common[-1] if common else None
            ratio = ev[last] / first[last] - 1 if last is not None and first[last] else ""
            final = ev[max(ev)] if ev else ""
            steps = run.summary.get("result", {}).get("step", max(ev) if ev else "")
            row = [run.label, run.attention, run.summary.get("parameters", ""), steps, final]
            row += [min(ev.values()) if ev else "", ratio, "" if last is None else last]
            w.writerow(row + [run.steady_tokens_per_s()])


def plot(runs: list[Run], out: Path) -> list[Path]:
    """``loss.png`` and, when any run has NSA statistics, ``gates.png``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in runs:
        axes[0].plot(*run.series("train", "loss"), label=run.label)
        axes[1].plot(*run.series("eval", "eval_loss"), marker="o", label=run.label)
        axes[2].plot(*run.series("train", "tokens_per_s"), label=run.label)
    for ax, title in zip(axes, ("train loss (nats/byte)", "eval loss (nats/byte)", "tokens/s"),
                         strict=True):  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    nsa_runs = [r for r in runs if r.layers()]
    if nsa_runs:
        fig, axes = plt.subplots(len(nsa_runs), 4, figsize=(18, 4 * len(nsa_runs)), squeeze=False)
        for row, run in zip(axes, nsa_runs, strict=True):
            for ax, branch in zip(row[:3], BRANCHES, strict=True):
                for layer in run.layers():
                    key = f"nsa/{layer}/{branch}/gate"
                    steps, mean = run.series("train", key + "_mean")
                    _, std = run.series("train", key + "_std")
                    (line,) = ax.plot(steps, mean, label=layer)
                    lo = [m - s for m, s in zip(mean, std, strict=True)]
                    hi = [m + s for m, s in zip(mean, std, strict=True)]
                    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
                ax.set_title(f"{run.label}: {branch} gate mean +- std")
                ax.set_xlabel("step")
                ax.set_ylim(0, 1)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            _gate_histogram(row[3], run)
        fig.tight_layout()
        written.append(out / "gates.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _gate_histogram(ax, run: Run) -> None:
    """Gate distribution per branch (all layers) at the last logged step."""
    last = [r for r in run.records if r.get("kind") == "train" and any("gate_hist" in k for k in r)]
    if not last:
        ax.set_visible(False)
        return
    record = last[-1]
    for branch in BRANCHES:
        hists = [v for k, v in record.items() if k.endswith(f"/{branch}/gate_hist")]
        counts = [sum(bins) for bins in zip(*hists, strict=True)] if hists else None
        if counts:
            total = sum(counts) or 1
            width = 1 / len(counts)
            centers = [(i + 0.5) * width for i in range(len(counts))]
            ax.plot(centers, [c / total for c in counts], marker=".", label=branch)
    ax.set_title(f"{run.label}: gate distribution at step {record['step']}")
    ax.set_xlabel("gate value")
    ax.set_ylabel("fraction")
    ax.grid(alpha=0.3)
    ax.legend()


def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m nsa_impl.train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="run directories")
    p.add_argument("--out", type=Path, help="output directory (default: the first DIR)")
    p.add_argument("--labels", nargs="+", help="one label per DIR (default: name (attention))")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or [None] * len(args.runs)
    try:
        runs = [Run(d, label) for d, label in zip(args.runs, labels, strict=True)]
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    out = args.out or args.runs[0]
    write_csv(runs, out)
    print(f"wrote {out / 'loss.csv'} and {out / 'summary.csv'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("the plots need matplotlib (pip install matplotlib); only the CSV files were "
              "written", file=sys.stderr)  # fmt: skip
        return 2
    for path in plot(runs, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
