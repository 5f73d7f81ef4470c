"""Decode benchmark (issue 11): one NSA decode step against one-query dense attention.

Setting: bf16, 64 query heads in 4 KV groups (h = 16), Dk = Dv = 128, the paper's config
(l=32, d=16, l'=64, n=16, w=512). Cases (B, T): (1, 65536), (8, 65536), (32, 65536),
(16, 16384), plus a ragged batch (B=8, lengths 8k, 16k, ..., 64k). The cache (``max_len = T``)
is loaded with random tokens (`NSACache.append`) up to ``T - STEPS`` and the timed steps decode
positions ``T - STEPS .. T - 1``, i.e. the last 0.4 % of the context.

Columns, all measured in this run:

* ``ours graph``: µs per step of the captured step (`NSACache.capture`, four Triton launches)
  replayed back to back; ``ours eager``: `NSACache.step` called from Python (host overhead
  included).
* ``dense cudnn`` / ``dense flash``: one query over the ``T`` cached keys with PyTorch's SDPA
  (GQA, ``enable_gqa=True``), eager as in the issue's table, and ``(graph)`` captured in a CUDA
  graph (the launch overhead removed, as for ours).
* ``kernels``: CUDA kernels per replayed step and ``µs per kernel`` (torch.profiler over the
  replays); ``floor``: the step's compulsory bytes (compressed, selected and window K/V) at
  4.3 TB/s; ``goal``: the issue's target.
* ``splits``: programs per (row, group) of the compressed / window / selection branches
  (`nsa_impl.kernels.decode_step.default_splits`); `bench/decode_sweep.py` times other splits
  and launch shapes.

Prints the machine line (GPU, torch, triton) and a markdown table; writes ``<out>.csv`` and
``<out>.md`` (and ``<out>.png`` when matplotlib is importable). Never asserts on time.

    python bench/decode_bench.py --out bench/results/h200_decode [--cases 1x65536,8x65536]
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from nsa_impl import NSACache, NSAConfig  # noqa: E402

H, G, D = 64, 4, 128
CASES = ((1, 65536), (8, 65536), (32, 65536), (16, 16384))
GOAL_US = {(1, 65536): 35.0, (8, 65536): 50.0, (32, 65536): 150.0, (16, 16384): 40.0}
HBM_BYTES_PER_S = 4.3e12
#: Decode steps one case runs (warm-up, graph timing, eager timing, profiles).
STEPS = 256


def machine_line() -> str:
    """GPU, torch, triton, CUDA, Python."""
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001 - report, never fail
        tv = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cuda = torch.cuda.is_available()
    cc = ".".join(map(str, torch.cuda.get_device_capability())) if cuda else "-"
    return (f"GPU {gpu} (sm {cc}) | torch {torch.__version__} | triton {tv} | "
            f"CUDA {torch.version.cuda} | Python {platform.python_version()}")


def floor_us(cfg: NSAConfig, lengths: list[int]) -> float:
    """Compulsory bytes of one step (compressed + selected + window K/V) at 4.3 TB/s."""
    per_token = G * D * 2 * 2  # K and V, bf16
    tokens = sum(cfg.num_cmp(n) + min(cfg.sel_top_n * cfg.sel_block, n + 1)
                 + min(cfg.window, n + 1) for n in lengths)
    return tokens * per_token / HBM_BYTES_PER_S * 1e6


def events_us(fn, reps: int, inner: int = 1) -> float:
    """Median over ``reps`` CUDA-event measurements of ``fn()`` (``inner`` steps each), in µs
    per step."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / inner)
    return statistics.median(times)


def load_cache(cfg, lengths: list[int], max_len: int, gen, splits=None) -> NSACache:
    """A Triton-path cache holding ``lengths[b]`` random bf16 tokens per sequence (``splits``:
    the kernels' splits, default `decode_step.default_splits`)."""
    B = len(lengths)
    cache = NSACache(cfg, max_len=max_len, splits=splits)
    chunk = 8192  # append in slices: the random source never exceeds one slice
    T = max(lengths)
    for t0 in range(0, T, chunk):
        C = min(chunk, T - t0)
        k = torch.randn(B, C, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        v = torch.randn(B, C, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        cache.append(k, v, lengths=[max(0, min(C, n - t0)) for n in lengths])
    return cache


def step_inputs(B, gen):
    q = torch.randn(B, 1, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, 1, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, 1, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    gates = torch.rand(B, 1, H, 3, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, k, v, gates


def profile_kernels(fn, steps: int) -> tuple[float, dict[str, float]]:
    """CUDA kernels per step and mean µs per kernel name over ``steps`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA or not ev.name:
            continue
        if "Memcpy" in ev.name or "Memset" in ev.name:
            continue
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        per_kernel.setdefault(ev.name, []).append(float(us))
    count = sum(len(v) for v in per_kernel.values()) / steps
    short = {name.split("(")[0].replace("_kernel", "").lstrip("_"): round(statistics.mean(v), 2)
             for name, v in per_kernel.items()}
    return count, short


def ours(cfg, lengths: list[int], reps: int, gen, splits=None, eager: bool = True) -> dict:
    """Graph-replayed (and, with ``eager``, eager) step times, kernels per step, µs per kernel
    (from five profiled eager steps: the same kernels as a replay)."""
    B = len(lengths)
    max_len = max(lengths) + 1
    start = [max(1, n + 1 - STEPS) for n in lengths]
    cache = load_cache(cfg, start, max_len, gen, splits)
    q, k, v, gates = step_inputs(B, gen)
    with torch.no_grad():
        graph = cache.capture(q, k, v, gates, validate=False)
        graph.replay(5)  # warm
        torch.cuda.synchronize()
        inner = 10
        t_graph = events_us(lambda: graph.replay(inner), reps=max(3, min(reps, 180) // inner),
                            inner=inner)
        t_eager = (events_us(lambda: cache.step(q, k, v, gates, validate=False), reps=20)
                   if eager else None)
        kernels, _ = profile_kernels(lambda: graph.replay(1), steps=5)
        eager_kernels, per_kernel = profile_kernels(
            lambda: cache.step(q, k, v, gates, validate=False), steps=5)
    splits = cache.splits
    return dict(graph_us=t_graph, eager_us=t_eager, kernels=kernels or eager_kernels,
                per_kernel=per_kernel, splits=f"{splits.cmp}/{splits.win}/{splits.sel}")


def dense(lengths: list[int], gen) -> dict:
    """One-query SDPA over each sequence's keys (uniform lengths only), eager and graphed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T = len(lengths), max(lengths)
    if len(set(lengths)) != 1:
        return {}
    q = torch.randn(B, H, 1, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, G, T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, G, T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    out = {}
    backends = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
    for name, backend in backends:
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            with torch.no_grad():
                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                out[f"{name}_us"] = events_us(call, reps=50)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call()
                graph.replay()
                out[f"{name}_graph_us"] = events_us(
                    lambda g=graph: [g.replay() for _ in range(10)], reps=10, inner=10)
        except Exception as exc:  # noqa: BLE001 - a backend may not support this shape
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return out


def prefill_times(cfg, T: int, chunk: int, gen) -> dict:
    """B=1 prompt of ``T`` tokens: `nsa_attention` (the full forward), `NSACache.prefill` (the
    same forward + the cache fill) and `NSACache.extend` in chunks of ``chunk`` (chunked
    prefill into the cache), in ms."""
    from nsa_impl import nsa_attention

    q = torch.randn(1, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, T, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, T, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    gates = torch.rand(1, T, H, 3, device="cuda", generator=gen, dtype=torch.bfloat16)

    def forward():
        nsa_attention(q, k, v, gates, cfg, validate=False)

    def prefill():
        NSACache(cfg, max_len=T).prefill(q, k, v, gates, validate=False)

    def chunked():
        cache = NSACache(cfg, max_len=T)
        for t0 in range(0, T, chunk):
            sl = slice(t0, t0 + chunk)
            cache.extend(q[:, sl], k[:, sl], v[:, sl], gates[:, sl], validate=False)

    out = {}
    with torch.no_grad():
        for name, fn in (("forward_ms", forward), ("prefill_ms", prefill), ("extend_ms", chunked)):
            fn()  # compile / warm
            out[name] = events_us(fn, reps=3) / 1000.0
    return out


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/decode", help="path prefix for .csv/.md/.png")
    ap.add_argument("--cases", default=",".join(f"{b}x{t}" for b, t in CASES),
                    help="BxT list; 'ragged' adds B=8 at 8k..64k")
    ap.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--prefill", type=int, default=65536, help="T of the prefill row (0: none)")
    ap.add_argument("--chunk", type=int, default=8192, help="extend chunk of the prefill row")
    ap.add_argument("--budget-s", type=float, default=125.0,
                    help="start no case after this many seconds (the rest are listed as skipped)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 1
    print(machine_line(), flush=True)
    cfg = NSAConfig()
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",") if c]
    runs = [(f"B={b} T={t}", [t - 1] * b, (b, t)) for b, t in cases]
    if args.ragged:
        runs.append(("B=8 ragged 8k..64k", [8192 * (i + 1) - 1 for i in range(8)], None))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    rows, notes = [], []
    for label, lengths, key in runs:
        if time.monotonic() > deadline:
            notes.append(f"{label}: skipped (time budget of {args.budget_s:.0f} s spent)")
            continue
        started = time.time()
        r = dict(case=label, B=len(lengths), T=max(lengths) + 1)
        try:
            r.update(ours(cfg, lengths, args.reps, gen))
        except Exception as exc:  # noqa: BLE001 - report the cell, keep going
            r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        torch.cuda.empty_cache()
        r.update(dense([n + 1 for n in lengths], gen))
        torch.cuda.empty_cache()
        r["floor_us"] = floor_us(cfg, lengths)
        r["goal_us"] = GOAL_US.get(key)
        g = r.get("graph_us")
        r["met"] = None if r["goal_us"] is None or g is None else g <= r["goal_us"]
        r["seconds"] = time.time() - started
        rows.append(r)
        print("  ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()},
              flush=True)
        write_outputs(rows, notes, out, final=False)  # a timeout keeps what was measured
    if args.prefill and time.monotonic() <= deadline:
        try:
            pre = prefill_times(cfg, args.prefill, args.chunk, gen)
            notes.append(f"Prefill of a B=1 prompt of T={args.prefill} (bf16, same shapes): "
                         f"nsa_attention {pre['forward_ms']:.1f} ms, NSACache.prefill "
                         f"{pre['prefill_ms']:.1f} ms, NSACache.extend in chunks of "
                         f"{args.chunk} {pre['extend_ms']:.1f} ms")
            rows.append(dict(case=f"prefill T={args.prefill}", **pre))
        except Exception as exc:  # noqa: BLE001 - report, keep the table
            notes.append(f"prefill row failed: {type(exc).__name__}: {str(exc)[:160]}")
    elif args.prefill:
        notes.append("prefill row: skipped (time budget spent)")
    write_outputs(rows, notes, out, final=True)
    return 0


def write_outputs(rows, notes, out: Path, *, final: bool) -> None:
    """The markdown table (printed when ``final``), the CSV and the plot, from ``rows``."""
    head = ("| case | ours graph µs | ours eager µs | dense cuDNN µs (graph) | dense flash µs "
            "(graph) | best dense / ours | kernels | µs per kernel | splits | floor µs | goal µs "
            "| met |")
    lines = [machine_line(), "", head, "|" + "---|" * 12]
    for r in rows:
        if "floor_us" not in r:  # the prefill row (in the notes)
            continue
        dense_best = min((r[k] for k in ("cudnn_graph_us", "flash_graph_us", "cudnn_us",
                                        "flash_us") if r.get(k) is not None), default=None)
        ours_us = r.get("graph_us")
        ratio = None if dense_best is None or ours_us is None else dense_best / ours_us
        per = ", ".join(f"{k} {v}" for k, v in r.get("per_kernel", {}).items())
        lines.append(
            f"| {r['case']} | {fmt(r.get('graph_us'))} | {fmt(r.get('eager_us'))} | "
            f"{fmt(r.get('cudnn_us'))} ({fmt(r.get('cudnn_graph_us'))}) | "
            f"{fmt(r.get('flash_us'))} ({fmt(r.get('flash_graph_us'))}) | {fmt(ratio, 2)} | "
            f"{fmt(r.get('kernels'), 0)} | {per or r.get('error', '')} | {r.get('splits', '-')} | "
            f"{fmt(r['floor_us'])} | {fmt(r['goal_us'], 0)} | "
            f"{'-' if r['met'] is None else ('yes' if r['met'] else 'NO')} |")
    lines += [""] + notes if notes else []
    table = "\n".join(lines)
    if final:
        print("\n" + table, flush=True)
    out.with_suffix(".md").write_text(table + "\n")
    fields = sorted({k for r in rows for k in r if k != "per_kernel"})
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + ["per_kernel"])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in fields}, "per_kernel": r.get("per_kernel")})
    if final:
        try:
            plot([r for r in rows if "graph_us" in r and "floor_us" in r],
                 out.with_suffix(".png"))
        except ImportError:
            print("matplotlib not importable: no plot")


def plot(rows, path: Path) -> None:
    """Bars: ours (graph) and the dense backends per case, µs per step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["case"] for r in rows]
    series = [("NSA (graph)", "graph_us"), ("dense cuDNN (graph)", "cudnn_graph_us"),
              ("dense flash (graph)", "flash_graph_us"), ("dense cuDNN (eager)", "cudnn_us")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        vals = [r.get(key) or math.nan for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("µs per decode step")
    ax.set_title("NSA decode step vs one-query dense attention (bf16, H=64, G=4, D=128)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
