"""CPU benchmark of nsa_impl: prefill forward, forward+backward, decode per token.

    python -m bench.cpu_bench                       # T in {1024, 4096, 8192}
    python -m bench.cpu_bench --T 1024 --ref-modes fwd fwdbwd decode

Paper configuration (l=32, d=16, l'=64, n=16, w=512), B=1, G=2, h=8, Dk=Dv=64, float32. Each
case runs in its own subprocess so its peak resident memory (``ru_maxrss``) is its own; the
rows compare `nsa_impl` with `nsa_ref` (only at ``--ref-T``, default 1024: the reference is
slow) and with dense causal SDPA, all measured in this run. Prints the machine line, a CSV and
a table. Never asserts on time; the acceptance lines at the end only report.

On a shared machine, wall times swing with other processes' load, and `nsa_ref` (thousands of
tiny ops, two OpenMP threads spinning) suffers far more than the few large ops of `nsa_impl`, so
the ratio against it grows under load; ``--threads 1`` gives the steadiest ratios. ``cpu_s``
(process CPU time) is printed beside the wall time.

Decode per token at context ``T``: the cache is filled with the first ``T - steps`` tokens
(``NSACache.prefill``; stepping for `nsa_ref`), then ``steps`` single-token steps are timed and
averaged. Dense decode attends one query over a preallocated ``[T, G, D]`` KV cache.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

B, G, h, D = 1, 2, 8, 64
MODES = ("fwd", "fwdbwd", "decode")
IMPLS = ("nsa_impl", "nsa_ref", "dense")


def machine_line() -> str:
    """CPU model, cores, threads, Python, torch and triton versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # optional
        triton_version = None
    return (
        f"machine: {cpu}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; "
        f"python {platform.python_version()}; torch {torch.__version__}; "
        f"triton {triton_version}; device cpu; float32"
    )


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _inputs(T: int, grad: bool):
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, G * h, D, generator=gen)
    k = torch.randn(B, T, G, D, generator=gen)
    v = torch.randn(B, T, G, D, generator=gen)
    gates = torch.rand(B, T, G * h, 3, generator=gen)
    return [t.requires_grad_(grad) for t in (q, k, v, gates)]


def _prefill_fn(impl: str):
    """``f(q, k, v, gates, cfg) -> o`` for a full-sequence forward."""
    if impl == "nsa_impl":
        import nsa_impl

        return nsa_impl.nsa_attention
    if impl == "nsa_ref":
        import nsa_ref

        return nsa_ref.nsa_attention

    def dense(q, k, v, gates, cfg):  # causal SDPA over all keys, GQA without copies
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=True,
        )
        return o.transpose(1, 2)

    return dense


def _decode_setup(impl: str, cfg, q, k, v, gates, start: int):
    """State after ``start`` tokens and ``step(p) -> o_p`` for the following positions."""
    if impl == "dense":
        kc, vc = k.transpose(1, 2), v.transpose(1, 2)  # [B, G, T, D]: a filled KV cache

        def step(p):
            return F.scaled_dot_product_attention(
                q[:, p : p + 1].transpose(1, 2),
                kc[:, :, : p + 1],
                vc[:, :, : p + 1],
                enable_gqa=True,
            )

        return step
    if impl == "nsa_impl":
        import nsa_impl

        cache = nsa_impl.NSACache(cfg)
        cache.prefill(q[:, :start], k[:, :start], v[:, :start], gates[:, :start])
    else:
        import nsa_ref

        cache = nsa_ref.NSARefCache(cfg)
        for p in range(start):
            cache.step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], gates[:, p : p + 1])

    def step(p):
        return cache.step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], gates[:, p : p + 1])

    return step


def _impl_stages(q, k, v, cfg) -> dict:
    """Best-of-3 forward time of each nsa_impl stage on its routed path (ms), from one plan."""
    import nsa_impl
    from nsa_impl import dispatch, scoring

    scale = D**-0.5
    plan = nsa_impl.plan(q.shape, cfg, kv_heads=k.shape[2], v_head_dim=v.shape[-1],
                         device=q.device, dtype=q.dtype, backward=False)
    paths = plan.route.paths()
    state = {}

    def cmp_and_score():
        kc, vc = scoring.compress(k, cfg, plan.cmp), scoring.compress(v, cfg, plan.cmp)
        state["s"] = dispatch.compressed(q, kc, vc, plan, scale, want_aux=False,
                                         validate=False, reference=None)

    stages = {
        f"compress+cmp+score ({paths['cmp']})": cmp_and_score,
        f"selection ({paths['sel']})": lambda: dispatch.selection(
            q, k, v, state["s"].block_indices, plan, scale, reference=None
        ),
        f"window ({paths['win']})": lambda: dispatch.window(
            q, k, v, plan, scale, validate=False, reference=None
        ),
        "plan (host work, once per forward)": lambda: nsa_impl.plan(
            q.shape, cfg, kv_heads=k.shape[2], v_head_dim=v.shape[-1], backward=False
        ),
    }
    out = {}
    for name, fn in stages.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = best * 1e3
    return out


def run_case(impl: str, mode: str, T: int, reps: int, steps: int) -> dict:
    """One measurement in this process: ``{"time_s", "peak_rss_mib", "setup_rss_mib", ...}``."""
    from nsa_ref import NSAConfig

    cfg = NSAConfig()  # paper defaults
    grad = mode == "fwdbwd"
    q, k, v, gates = _inputs(T, grad)
    times, cpu = [], []
    stages = None
    with torch.inference_mode(mode == "decode" or mode == "fwd"):
        if mode == "decode":
            step = _decode_setup(impl, cfg, q, k, v, gates, T - steps)
            setup = _maxrss_mib()
            t0, c0 = time.perf_counter(), time.process_time()
            for p in range(T - steps, T):
                step(p)
            times.append((time.perf_counter() - t0) / steps)
            cpu.append((time.process_time() - c0) / steps)
        else:
            fn = _prefill_fn(impl)
            grad_out = torch.randn(B, T, G * h, D, generator=torch.Generator().manual_seed(1))
            setup = _maxrss_mib()
            warmup = 0 if impl == "nsa_ref" else 1  # first calls pay one-off allocator costs
            for i in range(warmup + reps):
                t0, c0 = time.perf_counter(), time.process_time()
                o = fn(q, k, v, gates, cfg)
                if grad:
                    o.backward(grad_out)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                del o
            if impl == "nsa_impl" and mode == "fwd":
                stages = _impl_stages(q, k, v, cfg)
    return {
        "impl": impl,
        "mode": mode,
        "T": T,
        "reps": len(times),
        "time_s": min(times),
        "median_s": statistics.median(times),
        "cpu_s": min(cpu),
        "stages_ms": stages,
        "peak_rss_mib": _maxrss_mib(),
        "setup_rss_mib": setup,
    }


def _subprocess_case(impl, mode, T, reps, steps, threads) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.cpu_bench",
        "--case",
        impl,
        mode,
        str(T),
        "--reps",
        str(reps),
        "--decode-steps",
        str(steps),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or ["no stderr"]
        return {"impl": impl, "mode": mode, "T": T, "error": tail[0]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _cases(args):
    """``(impl, mode, T)`` to run, and ``(impl, mode, T, reason)`` skipped."""
    run, skipped = [], []
    have_cache = _has_nsa_cache()
    for T in args.T:
        for mode in MODES:
            for impl in IMPLS:
                if impl == "nsa_ref" and (T not in args.ref_T or mode not in args.ref_modes):
                    skipped.append(
                        (impl, mode, T, "nsa_ref is slow: not asked (--ref-T/--ref-modes)")
                    )
                elif mode == "decode" and impl == "nsa_impl" and not have_cache:
                    skipped.append((impl, mode, T, "nsa_impl.NSACache has no prefill/step yet"))
                else:
                    run.append((impl, mode, T))
    return run, skipped


def _has_nsa_cache() -> bool:
    import nsa_impl

    cache = getattr(nsa_impl, "NSACache", None)
    return cache is not None and all(hasattr(cache, m) for m in ("prefill", "step"))


def _ms(row: dict | None) -> str:
    return f"{row['time_s'] * 1e3:.1f} ms" if row else "-"


def _table(rows: list[dict]) -> str:
    by = {(r["impl"], r["mode"], r["T"]): r for r in rows if "time_s" in r}
    header = (
        "T",
        "mode",
        "nsa_impl",
        "dense",
        "impl/dense",
        "nsa_ref",
        "ref/impl",
        "impl peak MiB",
    )
    lines = []
    for T in sorted({r["T"] for r in rows}):
        for mode in MODES:
            ours = by.get(("nsa_impl", mode, T))
            if ours is None:
                continue
            dense, ref = by.get(("dense", mode, T)), by.get(("nsa_ref", mode, T))
            lines.append(
                (
                    str(T),
                    mode,
                    _ms(ours),
                    _ms(dense),
                    f"{ours['time_s'] / dense['time_s']:.2f}x" if dense else "-",
                    _ms(ref),
                    f"{ref['time_s'] / ours['time_s']:.1f}x" if ref else "-",
                    f"{ours['peak_rss_mib']:.0f}",
                )
            )
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) for c, w in zip(header, widths, strict=False))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=False)) for line in lines]
    return "\n".join(out)


def _acceptance(rows: list[dict]) -> list[str]:
    by = {(r["impl"], r["mode"], r["T"]): r for r in rows if "time_s" in r}
    out = []
    ours, ref = by.get(("nsa_impl", "fwd", 1024)), by.get(("nsa_ref", "fwd", 1024))
    if ours and ref:
        ratio = ref["time_s"] / ours["time_s"]
        out.append(f"forward T=1024: nsa_impl is {ratio:.1f}x faster than nsa_ref (target >= 20x)")
    big = by.get(("nsa_impl", "fwdbwd", 8192))
    if big:
        gib = big["peak_rss_mib"] / 1024
        out.append(f"forward+backward T=8192: peak RSS {gib:.2f} GiB (target < 8 GiB)")
    return out


def main(argv=None) -> None:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument(
        "--ref-T",
        type=int,
        nargs="*",
        default=[1024],
        help="sequence lengths at which nsa_ref is also run (slow)",
    )
    ap.add_argument(
        "--ref-modes",
        nargs="*",
        default=["fwd"],
        choices=MODES,
        help="modes in which nsa_ref is run (fwdbwd/decode take minutes)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=3,
        help="timed repetitions per case after one warm-up (best is kept); nsa_ref: 1",
    )
    ap.add_argument("--decode-steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--csv", help="also write the CSV here")
    ap.add_argument("--case", nargs=3, metavar=("IMPL", "MODE", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        impl, mode, T = args.case
        reps = 1 if impl == "nsa_ref" else args.reps
        print(json.dumps(run_case(impl, mode, int(T), reps, args.decode_steps)))
        return

    print(machine_line())
    print(f"config: paper l=32 d=16 l'=64 n=16 w=512; B={B} G={G} h={h} Dk=Dv={D}; float32")
    todo, skipped = _cases(args)
    for impl, mode, T, why in skipped:
        if impl != "nsa_ref" or T in args.ref_T:
            print(f"skip {impl} {mode} T={T}: {why}")
    rows = []
    for impl, mode, T in todo:
        row = _subprocess_case(impl, mode, T, args.reps, args.decode_steps, args.threads)
        rows.append(row)
        status = (
            row.get("error") or f"{row['time_s'] * 1e3:.1f} ms, peak {row['peak_rss_mib']:.0f} MiB"
        )
        print(f"  {impl:8s} {mode:6s} T={T:<5d} {status}", flush=True)

    fields = [
        "impl",
        "mode",
        "T",
        "reps",
        "time_s",
        "median_s",
        "cpu_s",
        "peak_rss_mib",
        "setup_rss_mib",
        "error",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    print("\nCSV\n" + buf.getvalue())
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            f.write(buf.getvalue())
    print(_table(rows))
    print(
        "\ntime_s: best wall time (decode: per token); cpu_s: process CPU time of the same run."
        "\nimpl/dense: time relative to dense causal SDPA (<1 is faster); ref/impl: speed-up"
        " over nsa_ref; peak: ru_maxrss of the case's own process (includes torch itself)."
    )
    for row in rows:
        if row.get("stages_ms"):
            parts = ", ".join(f"{k} {v:.1f} ms" for k, v in row["stages_ms"].items())
            print(f"nsa_impl forward stages at T={row['T']}: {parts}")
    for line in _acceptance(rows):
        print(line)


if __name__ == "__main__":
    main()
