"""Launch-shape sweep of the Triton decode step (issue 11): which warps, stages, tiles and
splits make a graph-replayed step fastest, case by case, measured in one run.

Each variant changes one thing against the defaults of `nsa_impl.kernels.decode_step`:

* ``options``: ``(num_warps, num_stages)`` of a launch (``LAUNCH_OPTIONS``: ``cmp_win`` = K1,
  ``score`` = K2, ``sel`` = K3, ``combine`` = K4);
* ``module``: a module constant (``TILE``: K1's key tile; ``SCORE_CHUNK``: blocks per K2 program;
  ``SCORE_HEADS``: heads per pass of K2's gather;
  ``PROGRAMS_PER_SM``: the split policy's occupancy target; ``COMBINE_PROGRAMS_PER_SM``: K4's);
* ``split_scale``: ``(cmp, win, sel)`` multipliers of the default splits (rounded down to a power
  of two, at least 1).

For every case and variant a fresh cache is loaded (random bf16 tokens), the step is captured
(`NSACache.capture`) and replayed (`bench/decode_bench.py`'s ``ours``: graph µs per step, plus
µs per kernel from profiled eager steps, which launch the same kernels). The module is restored
after each variant. Writes ``<out>.csv`` and ``<out>.md`` (the table, with each variant's change
against the case's default), stops starting variants after ``--budget-s``.

    python bench/decode_sweep.py --out bench/results/h200_decode_sweep [--cases 8x65536]
    python bench/decode_sweep.py --variants '[{}, {"options": {"cmp_win": [8, 3]}}]'
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

#: Cases in the order they are swept (the issue's missed goals first).
CASES = ((8, 65536), (16, 16384), (32, 65536), (1, 65536))

#: The default sweep: the baseline, then one change per variant (K1 first: most of the step).
VARIANTS = (
    {},
    {"options": {"cmp_win": [4, 3]}},
    {"options": {"cmp_win": [8, 2]}},
    {"options": {"cmp_win": [8, 3]}},
    {"split_scale": [0.5, 1, 1]},
    {"split_scale": [2, 1, 1]},
    {"module": {"TILE": 128}},
    {"options": {"score": [8, 1]}},
    {"options": {"score": [2, 1]}},
    {"module": {"SCORE_CHUNK": 128}},
    {"module": {"SCORE_CHUNK": 32}},
    {"options": {"sel": [8, 2]}},
    {"options": {"sel": [4, 3]}},
    {"split_scale": [1, 1, 0.5]},
    {"split_scale": [1, 1, 2]},
    {"options": {"combine": [2, 1]}},
    {"options": {"combine": [8, 1]}},
)

MODULE_KNOBS = ("TILE", "SCORE_CHUNK", "SCORE_HEADS", "PROGRAMS_PER_SM",
                "COMBINE_PROGRAMS_PER_SM")
POW2_KNOBS = ("TILE", "SCORE_CHUNK", "SCORE_HEADS")
VARIANT_KEYS = ("options", "module", "split_scale")
KERNELS = {"cmp_win": "_cmp_win_kernel", "score": "_score_kernel", "sel": "_sel_kernel",
           "combine": "_combine_kernel"}


def describe(variant: dict) -> str:
    """A short label: ``default`` or e.g. ``cmp_win 8w/3s``, ``TILE=128``, ``splits x0.5/1/1``."""
    parts = [f"{k} {w}w/{s}s" for k, (w, s) in variant.get("options", {}).items()]
    parts += [f"{k}={v}" for k, v in variant.get("module", {}).items()]
    if "split_scale" in variant:
        parts.append("splits x" + "/".join(f"{x:g}" for x in variant["split_scale"]))
    return ", ".join(parts) or "default"


def check_variant(variant: dict) -> dict:
    """``variant`` if every key and value is one this sweep knows, else ``ValueError``."""
    from nsa_impl.kernels import decode_step

    if not isinstance(variant, dict):
        raise ValueError(f"a variant is a dict, got {variant!r}")
    unknown = set(variant) - set(VARIANT_KEYS)
    if unknown:
        raise ValueError(f"unknown variant keys {sorted(unknown)} (known: {VARIANT_KEYS})")
    for name, pair in variant.get("options", {}).items():
        if name not in decode_step.LAUNCH_OPTIONS:
            raise ValueError(f"unknown launch {name!r} (known: {list(decode_step.LAUNCH_OPTIONS)})")
        if (len(pair) != 2 or not all(isinstance(x, int) and x >= 1 for x in pair)
                or pair[0] & (pair[0] - 1)):
            raise ValueError(f"options[{name!r}] must be [num_warps (a power of two), "
                             f"num_stages], got {pair!r}")
    for name, value in variant.get("module", {}).items():
        if name not in MODULE_KNOBS:
            raise ValueError(f"unknown module knob {name!r} (known: {MODULE_KNOBS})")
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"module[{name!r}] must be a positive int, got {value!r}")
        if name in POW2_KNOBS and value & (value - 1):
            raise ValueError(f"module[{name!r}] must be a power of two, got {value!r}")
    scale = variant.get("split_scale")
    if scale is not None and (len(scale) != 3 or not all(x > 0 for x in scale)):
        raise ValueError(f"split_scale must be three positive factors, got {scale!r}")
    return variant


@contextlib.contextmanager
def applied(variant: dict):
    """The variant's launch options and module constants set on `decode_step`, restored on
    exit (also after an error)."""
    from nsa_impl.kernels import decode_step

    saved_options = dict(decode_step.LAUNCH_OPTIONS)
    saved_module = {k: getattr(decode_step, k) for k in MODULE_KNOBS}
    try:
        for name, (warps, stages) in variant.get("options", {}).items():
            decode_step.LAUNCH_OPTIONS[name] = (int(warps), int(stages))
        for name, value in variant.get("module", {}).items():
            setattr(decode_step, name, int(value))
        yield
    finally:
        decode_step.LAUNCH_OPTIONS.clear()
        decode_step.LAUNCH_OPTIONS.update(saved_options)
        for name, value in saved_module.items():
            setattr(decode_step, name, value)


@contextlib.contextmanager
def recorded_launches(store: dict):
    """Every compiled-kernel launch of the decode step records its `CompiledKernel` in
    ``store[name]`` (registers and spills come from it), the kernels restored on exit."""
    from nsa_impl.kernels import decode_step

    module = decode_step._kernels(False)
    saved = {attr: getattr(module, attr) for attr in KERNELS.values()}

    class Recording:
        def __init__(self, name, jitted):
            self.name, self.jitted = name, jitted

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiled = self.jitted[grid](*args, **kwargs)
                store[self.name] = compiled
                return compiled
            return launch

    try:
        for name, attr in KERNELS.items():
            setattr(module, attr, Recording(name, saved[attr]))
        yield store
    finally:
        for attr, jitted in saved.items():
            setattr(module, attr, jitted)


def resources(store: dict) -> str:
    """``name regs/spills`` per recorded kernel."""
    return ", ".join(f"{name} {getattr(k, 'n_regs', '?')}/{getattr(k, 'n_spills', '?')}"
                     for name, k in store.items())


def scaled_splits(variant: dict, B: int, T: int, cfg, G: int, device):
    """The splits of case ``(B, T)`` under ``variant`` (``None``: the default policy)."""
    from nsa_impl.kernels import decode_step

    scale = variant.get("split_scale")
    if scale is None:
        return None
    base = decode_step.default_splits(B, G, cfg.num_cmp(T - 1), cfg.window, cfg.sel_top_n, device)

    def pow2_floor(x: float) -> int:
        return 1 << max(0, int(x).bit_length() - 1) if x >= 1 else 1

    return decode_step.Splits(*(pow2_floor(s * f) for s, f in
                                zip((base.cmp, base.win, base.sel), scale, strict=True)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/decode_sweep", help="path prefix (.csv/.md)")
    ap.add_argument("--cases", default=",".join(f"{b}x{t}" for b, t in CASES), help="BxT list")
    ap.add_argument("--variants", default=None, help="JSON list of variants (default: VARIANTS)")
    ap.add_argument("--reps", type=int, default=120)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="start no variant after this many seconds (the rest are listed)")
    args = ap.parse_args(argv)
    variants = [check_variant(v) for v in
                (json.loads(args.variants) if args.variants else VARIANTS)]
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",") if c]
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 1
    from bench import decode_bench
    from nsa_impl import NSAConfig

    print(decode_bench.machine_line(), flush=True)
    cfg = NSAConfig()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    rows, skipped = [], []
    try:
        from tqdm import tqdm
    except ImportError:  # progress is optional
        def tqdm(x, **_):
            return x
    grid = [(c, v) for c in cases for v in variants]
    for (B, T), variant in tqdm(grid, desc="decode sweep"):
        label = f"B={B} T={T}"
        if time.monotonic() > deadline:
            skipped.append(f"{label} {describe(variant)}")
            continue
        r = dict(case=label, B=B, T=T, variant=describe(variant))
        try:
            with applied(variant), recorded_launches({}) as launched:
                splits = scaled_splits(variant, B, T, cfg, decode_bench.G, torch.device("cuda"))
                r.update(decode_bench.ours(cfg, [T - 1] * B, args.reps, gen, splits=splits,
                                           eager=False))
                r["regs"] = resources(launched)
        except Exception as exc:  # noqa: BLE001 - report the cell, keep going
            r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        torch.cuda.empty_cache()
        rows.append(r)
        write_outputs(rows, skipped, out, final=False)  # a timeout keeps what was measured
    write_outputs(rows, skipped, out, final=True)
    return 0


def write_outputs(rows: list[dict], skipped: list[str], out: Path, *, final: bool) -> None:
    """Markdown (printed when ``final``) and CSV; ``vs default`` is each variant's graph time
    over its case's default row."""
    from bench.decode_bench import fmt, machine_line

    base = {r["case"]: r.get("graph_us") for r in rows if r["variant"] == "default"}
    lines = [machine_line(), "", "| case | variant | splits | graph µs | vs default | "
             "µs per kernel | registers/spills |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g, b = r.get("graph_us"), base.get(r["case"])
        ratio = None if g is None or not b else g / b
        per = ", ".join(f"{k} {v}" for k, v in r.get("per_kernel", {}).items())
        lines.append(f"| {r['case']} | {r['variant']} | {r.get('splits', '-')} | {fmt(g)} | "
                     f"{fmt(ratio, 3)} | {per or r.get('error', '')} | {r.get('regs', '-')} |")
    if skipped:
        lines += ["", "Skipped (time budget spent): " + "; ".join(skipped)]
    table = "\n".join(lines)
    if final:
        print("\n" + table, flush=True)
    out.with_suffix(".md").write_text(table + "\n")
    fields = ["case", "B", "T", "variant", "splits", "graph_us", "kernels", "regs", "error",
              "per_kernel"]
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})


if __name__ == "__main__":
    sys.exit(main())
