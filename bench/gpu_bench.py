"""GPU benchmark of NSA against dense causal attention, measured in one run (issue 4, item 5).

Setting (paper-scale): bf16, B = 1, 64 query heads in 4 KV groups (h = 16), Dk = Dv = 128 and
Dk/Dv = 192/128, the paper's l=32, d=16, l'=64, n=16, w=512, T in {8k, 16k, 32k, 64k}. Rows:

* ``sel fwd`` / ``sel bwd``: the Triton selection kernels alone on given (random, paper-shaped)
  block indices; ``bwd`` is (forward+backward) minus forward.
* ``nsa fwd`` / ``nsa fwd+bwd``: `nsa_impl.nsa_attention` end to end (the router's choice of
  paths, printed with the table).
* ``decode``: one `nsa_impl.NSACache.step` after a prompt of ``T`` tokens, vs one dense
  query over ``T`` cached keys.
* ``h=4``: 16 query heads in 4 groups, selection forward time per query head, against h=16.
* ``nsa_h4``: full NSA (planned) with 16 query heads in 4 groups against dense with the same
  heads.

Dense baseline: ``torch.nn.functional.scaled_dot_product_attention`` (causal) with the flash and
cuDNN backends each timed; the faster one is the denominator. Ratios are dense / ours (higher is
better). Times are medians of CUDA-event measurements after warm-up. Nothing asserts on time.

Usage::

    python bench/gpu_bench.py --out bench/results/h100 [--T 8192,65536] \
        [--parts sel,nsa,decode,h4,nsa_h4]
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

PAPER = dict(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=16, sel_init_blocks=1,
             sel_local_blocks=2, window=512)


def machine_line() -> str:
    """GPU, torch, triton, CUDA, Python: printed above every table."""
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


def timeit(fn, *, warmup: int = 2, reps: int = 10, max_ms: float = 3000.0) -> float:
    """Median milliseconds of ``fn()`` over up to ``reps`` runs (stops early past ``max_ms``)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, spent = [], 0.0
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        spent += times[-1]
        if spent > max_ms and len(times) >= 3:
            break
    return statistics.median(times)


class Bench:
    """Collects rows and enforces a wall-clock budget (measurements after it are skipped)."""

    def __init__(self, budget_s: float):
        self.rows: list[dict] = []
        self.deadline = time.monotonic() + budget_s
        self.notes: list[str] = []

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def add(self, **row):
        self.rows.append(row)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
        print("  ", shown, flush=True)

    def run(self, label: str, fn):
        """``fn()`` -> value, or ``None`` with a note when it fails or the budget is spent."""
        if self.out_of_time():
            self.notes.append(f"{label}: skipped (time budget spent)")
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failed cell is reported, not fatal
            msg = f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print("   ERROR", msg, flush=True)
            traceback.print_exc(limit=3)
            self.notes.append(msg)
            return None
        finally:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# Dense baseline
# ------------------------------------------------------------------------------------------


def _sdpa(q, k, v, backend, causal=True):
    """SDPA on ``[B, heads, T, D]``: GQA via enable_gqa, else K/V expanded; V padded if needed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    H, G = q.shape[1], k.shape[1]
    Dv = v.shape[-1]
    with sdpa_kernel([be]):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=G != H)
        except RuntimeError:
            kk = k.repeat_interleave(H // G, 1)
            vv = v.repeat_interleave(H // G, 1)
            if vv.shape[-1] != q.shape[-1]:  # backend needs Dv == Dk: zero-pad V, slice O
                vv = F.pad(vv, (0, q.shape[-1] - Dv))
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)[..., :Dv]


def dense_times(T, H, G, Dk, Dv, bench: Bench, dtype=torch.bfloat16):
    """Best-of-(flash, cuDNN) causal dense fwd and fwd+bwd, plus each backend's numbers."""
    out = {}
    q = torch.randn(1, H, T, Dk, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, G, T, Dk, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, G, T, Dv, device="cuda", dtype=dtype, requires_grad=True)
    do = torch.randn(1, H, T, Dv, device="cuda", dtype=dtype)
    for be in ("flash", "cudnn"):
        def fwd(be=be):
            with torch.no_grad():
                _sdpa(q, k, v, be)

        def fwdbwd(be=be):
            torch.autograd.grad(_sdpa(q, k, v, be), (q, k, v), do)

        f = bench.run(f"dense {be} fwd T={T}", lambda: timeit(fwd))
        fb = bench.run(f"dense {be} fwd+bwd T={T}", lambda: timeit(fwdbwd))
        out[be] = (f, fb)
    best = {}
    for i, name in enumerate(("fwd", "fwdbwd")):
        cands = [(v[i], be) for be, v in out.items() if v[i] is not None]
        best[name] = min(cands) if cands else (None, None)
    return best, out


def dense_decode(T, H, G, Dk, Dv, bench: Bench, dtype=torch.bfloat16):
    """One query over ``T`` cached keys (non-causal), best of flash/cuDNN."""
    q = torch.randn(1, H, 1, Dk, device="cuda", dtype=dtype)
    k = torch.randn(1, G, T, Dk, device="cuda", dtype=dtype)
    v = torch.randn(1, G, T, Dv, device="cuda", dtype=dtype)
    cands = []
    for be in ("flash", "cudnn"):
        def step(be=be):
            with torch.no_grad():
                _sdpa(q, k, v, be, causal=False)

        t = bench.run(f"dense decode {be} T={T}", lambda: timeit(step, warmup=5, reps=50))
        if t is not None:
            cands.append((t, be))
    return min(cands) if cands else (None, None)


# ------------------------------------------------------------------------------------------
# NSA
# ------------------------------------------------------------------------------------------


def nsa_inputs(T, H, G, Dk, Dv, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, H, Dk, device="cuda", generator=gen).to(dtype)
    k = torch.randn(1, T, G, Dk, device="cuda", generator=gen).to(dtype)
    v = torch.randn(1, T, G, Dv, device="cuda", generator=gen).to(dtype)
    gates = torch.rand(1, T, H, 3, device="cuda", generator=gen).to(dtype)
    return q, k, v, gates, gen


def selection_times(T, H, G, Dk, Dv, bench: Bench, coherent=False, dtype=torch.bfloat16,
                    backward=True, label="", reps=10):
    from bench.workloads import random_block_indices
    from nsa_impl.kernels import triton_sel

    q, k, v, _, gen = nsa_inputs(T, H, G, Dk, Dv, dtype)
    idx = random_block_indices(1, T, G, PAPER["sel_top_n"], PAPER["sel_block"], generator=gen,
                               device="cuda", coherent=coherent)
    scale = 1.0 / math.sqrt(Dk)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn(1, T, H, Dv, device="cuda", dtype=dtype)

    def fwd():
        with torch.no_grad():
            triton_sel.selection_attention(q, k, v, idx, PAPER["sel_block"], scale)

    def fwdbwd():
        o = triton_sel.selection_attention(qg, kg, vg, idx, PAPER["sel_block"], scale)
        torch.autograd.grad(o, (qg, kg, vg), do)

    f = bench.run(f"sel fwd T={T} H={H} {label}", lambda: timeit(fwd, reps=reps))
    fb = (bench.run(f"sel fwd+bwd T={T} H={H} {label}", lambda: timeit(fwdbwd, reps=reps))
          if backward else None)
    return f, fb


#: Launch variants timed by ``--sweep`` (H -> list of `LaunchShape` overrides; "coherent" picks the
#: index generator). Results per version are in docs/gpu_notes.md.
SWEEP = {
    64: [{}, {"BKEY": 32}, {"BKEY": 32, "stages_kv": 3}, {"BKEY": 32, "warps_bwd": 8},
         {"stages_kv": 1}, {"stages_kv": 3}, {"warps_bwd": 8, "stages_kv": 1},
         {"warps_bwd": 8, "stages_kv": 3}, {"QB": 2}, {"warps_fwd": 2, "stages_dq": 3}],
    16: [{}, {"BKEY": 32}, {"stages_kv": 3}, {"stages_kv": 1}, {"QB": 8}],
}


def sweep(T: int, Dk: int, Dv: int, bench: Bench) -> None:
    """Selection timings under launch variants (``nsa_impl.kernels.ops.tuning(sel=...)``), with
    the compiled kernels' register and spill counts (``tuning(launches={})``)."""
    from nsa_impl.kernels.ops import tuning

    for H, variants in SWEEP.items():
        for var in variants:
            var = dict(var)
            coherent = var.pop("coherent", False)
            with tuning(sel=var, launches={}) as t:
                f, fb = selection_times(T, H, 4, Dk, Dv, bench, coherent=coherent,
                                        label=str(var), reps=5)
                regs = {name: (getattr(k, "n_regs", None), getattr(k, "n_spills", None))
                        for name, k in t.launches.items()}
            print(f"   {var} coherent={coherent} H={H}: (regs, spills) {regs}", flush=True)
            bench.add(T=T, dims=f"{Dk}/{Dv}", H=H, G=4,
                      metric=f"sweep {var}{' coherent' if coherent else ''}", ours_ms=f,
                      dense_ms=fb, dense_backend="(fwd+bwd ms)", ratio=None)


#: Launch shapes of the compressed branch's scoring kernel timed by ``--cmp-sweep``.
CMP_SWEEP = [{}, {"stages": 2}, {"block_m": 128, "block_n": 64}, {"block_n": 32},
             {"block_m": 32}, {"warps": 8}, {"block_m": 128, "block_n": 128, "warps": 8}]


def cmp_sweep(T: int, Dk: int, Dv: int, bench: Bench) -> None:
    """The compressed branch's flash path in parts (H=64, G=4): FA-2 over query groups, the
    scoring kernel under `CMP_SWEEP` launch shapes, and top-n (Triton kernel vs torch)."""
    import nsa_impl
    from nsa_impl import scoring
    from nsa_impl.kernels import flash_cmp
    from nsa_impl.kernels.ops import tuning

    cfg = nsa_impl.NSAConfig(**PAPER)
    q, k, v, _, _ = nsa_inputs(T, 64, 4, Dk, Dv)
    base = dict(T=T, dims=f"{Dk}/{Dv}", H=64, G=4, dense_ms=None, dense_backend="", ratio=None)

    def layout_with(var):  # the plan holds the score tiles: one plan per launch shape
        with tuning(score=var), nsa_impl.dispatch.force_path(cmp="flash"):
            return nsa_impl.plan(q.shape, cfg, kv_heads=4, v_head_dim=Dv, device="cuda",
                                 dtype=q.dtype, backward=False)

    plan = layout_with({})
    k_cmp, v_cmp = scoring.compress(k, cfg, plan.cmp), scoring.compress(v, cfg, plan.cmp)
    scale = 1.0 / math.sqrt(Dk)
    lay = plan.cmp_flash
    with torch.no_grad():
        t = bench.run("cmp attention", lambda: timeit(
            lambda: flash_cmp.cmp_attention(q, k_cmp, v_cmp, cfg, lay, scale)))
        bench.add(**base, metric="cmp: FA-2 over query groups", ours_ms=t)
        _, lse = flash_cmp.cmp_attention(q, k_cmp, v_cmp, cfg, lay, scale)

        def scores(layout, c):
            sizes = [cfg.sel_block, cfg.cmp_block, cfg.cmp_stride, layout.block_m,
                     layout.block_n]
            return flash_cmp.cmp_scores(q, k_cmp, lse, c.start, c.rows, c.cmp0, layout.count,
                                        c.r0, c.r1, c.S, sizes, scale)

        for var in CMP_SWEEP:
            lv = layout_with(var).cmp_flash
            with tuning(score=var):
                t = bench.run(f"cmp scores {var}", lambda lv=lv: timeit(
                    lambda: [scores(lv, c) for c in lv.chunks]))
            bench.add(**base, metric=f"cmp: scores {var or 'default'}", ours_ms=t)
        c = lay.chunks[-1]  # one default-budget chunk
        sc = scores(lay, c)
        block = lay.block[c.r0:c.r1]
        n, init, local = cfg.sel_top_n, cfg.sel_init_blocks, cfg.sel_local_blocks
        t_tr = bench.run("top-n triton", lambda: timeit(
            lambda: flash_cmp.top_n(sc, block, n, init, local)))
        t_pt = bench.run("top-n torch", lambda: timeit(lambda: scoring.top_n(sc, block, cfg)))
        out = flash_cmp.top_n(sc, block, n, init, local)
        rows = c.r1 - c.r0
        same = torch.equal(out, scoring.top_n(sc, block, cfg).permute(0, 2, 1, 3))
        bench.add(**base, metric=f"cmp: top-n of {rows} rows, triton (equal to torch: {same})",
                  ours_ms=t_tr)
        bench.add(**base, metric=f"cmp: top-n of {rows} rows, torch", ours_ms=t_pt)


def profile(T: int, Dk: int, Dv: int, bench: Bench) -> None:
    """Top CUDA kernels of one selection fwd+bwd (H=64), one full NSA fwd and one fwd+bwd."""
    import nsa_impl
    from bench.workloads import random_block_indices
    from nsa_impl.kernels import triton_sel

    def table(fn):
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        avg = prof.key_averages()
        for key in ("cuda_time_total", "device_time_total"):
            try:
                return avg.table(sort_by=key, row_limit=14, max_name_column_width=60)
            except Exception:  # noqa: BLE001 - column renamed across torch versions
                continue
        return "(no profiler table)"

    q, k, v, gates, gen = nsa_inputs(T, 64, 4, Dk, Dv)
    idx = random_block_indices(1, T, 4, 16, 64, generator=gen, device="cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn(1, T, 64, Dv, device="cuda", dtype=q.dtype)

    def sel():
        o = triton_sel.selection_attention(*leaves[:3], idx, 64, 1.0 / math.sqrt(Dk))
        torch.autograd.grad(o, leaves[:3], do)

    def full():
        o = nsa_impl.nsa_attention(*leaves, nsa_impl.NSAConfig(**PAPER), validate=False)
        torch.autograd.grad(o, leaves, do)

    def full_fwd():
        with torch.no_grad():
            nsa_impl.nsa_attention(q, k, v, gates, nsa_impl.NSAConfig(**PAPER), validate=False)

    runs = (("selection fwd+bwd", sel), ("full NSA fwd", full_fwd), ("full NSA fwd+bwd", full))
    for name, fn in runs:
        text = bench.run(f"profile {name} T={T}", lambda fn=fn: table(fn))
        print(f"== profile: {name}, T={T}\n{text}", flush=True)


def nsa_times(T, H, G, Dk, Dv, bench: Bench, dtype=torch.bfloat16, planned=False):
    """Full NSA forward and forward+backward; ``planned``: with a plan built once and reused
    (what a model does), else a plan per call (the plain functional call)."""
    import nsa_impl

    cfg = nsa_impl.NSAConfig(**PAPER)
    q, k, v, gates, _ = nsa_inputs(T, H, G, Dk, Dv, dtype)
    print(nsa_impl.explain(q, cfg, k=k, v=v, backward=True), flush=True)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn(1, T, H, Dv, device="cuda", dtype=dtype)
    plan = nsa_impl.plan(q.shape, cfg, kv_heads=G, v_head_dim=Dv, device=q.device,
                         dtype=dtype) if planned else None
    label = " (plan reused)" if planned else ""

    def fwd():
        with torch.no_grad():
            nsa_impl.nsa_attention(q, k, v, gates, cfg, validate=False, plan=plan)

    def fwdbwd():
        o = nsa_impl.nsa_attention(*leaves, cfg, validate=False, plan=plan)
        torch.autograd.grad(o, leaves, do)

    f = bench.run(f"nsa fwd T={T}{label}", lambda: timeit(fwd, warmup=1, reps=5))
    fb = bench.run(f"nsa fwd+bwd T={T}{label}", lambda: timeit(fwdbwd, warmup=1, reps=3))
    return f, fb


def decode_time(T, H, G, Dk, Dv, bench: Bench, dtype=torch.bfloat16, steps=20):
    import nsa_impl

    cfg = nsa_impl.NSAConfig(**PAPER)
    q, k, v, gates, gen = nsa_inputs(T + steps + 3, H, G, Dk, Dv, dtype)

    def measure():
        cache = nsa_impl.NSACache(cfg)
        with torch.no_grad():
            cache.prefill(q[:, :T], k[:, :T], v[:, :T], gates[:, :T], validate=False)
            times = []
            for i in range(T, T + steps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                cache.step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], gates[:, i:i + 1],
                           validate=False)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        return statistics.median(times[3:])

    return bench.run(f"nsa decode T={T}", measure)


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu_bench", help="path prefix for .csv/.md")
    ap.add_argument("--T", default="8192,16384,32768,65536")
    ap.add_argument("--dims", default="128/128,192/128", help="Dk/Dv pairs")
    ap.add_argument("--parts", default="sel,nsa,decode,h4")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting cells after this")
    ap.add_argument("--sweep", type=int, default=0, help="T of a launch-variant sweep (0: none)")
    ap.add_argument("--profile", type=int, default=0, help="T of a profiler breakdown (0: none)")
    ap.add_argument("--cmp-sweep", type=int, default=0,
                    help="T of the compressed branch's breakdown and scoring sweep (0: none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    Ts = [int(t) for t in args.T.split(",")]
    dims = [tuple(int(x) for x in d.split("/")) for d in args.dims.split(",")]
    parts = set(args.parts.split(","))
    bench = Bench(args.budget_s)
    machine = machine_line()
    print(machine, flush=True)
    H, G = 64, 4
    if args.sweep:
        sweep(args.sweep, *dims[0], bench)
    if args.cmp_sweep:
        cmp_sweep(args.cmp_sweep, *dims[0], bench)
    if args.profile:
        profile(args.profile, *dims[0], bench)
    for Dk, Dv in dims if parts - {"none"} else []:
        for T in Ts:
            print(f"== T={T} Dk/Dv={Dk}/{Dv} H={H} G={G}", flush=True)
            best, _ = dense_times(T, H, G, Dk, Dv, bench)
            base = dict(T=T, dims=f"{Dk}/{Dv}", H=H, G=G)

            def add(metric, ours, dense, base=base):
                d_ms, d_be = dense
                bench.add(**base, metric=metric, ours_ms=ours, dense_ms=d_ms, dense_backend=d_be,
                          ratio=(d_ms / ours) if (ours and d_ms) else None)

            if "sel" in parts:
                f, fb = selection_times(T, H, G, Dk, Dv, bench)
                add("sel fwd", f, best["fwd"])
                if f is not None and fb is not None and best["fwdbwd"][0] and best["fwd"][0]:
                    add("sel bwd", fb - f, (best["fwdbwd"][0] - best["fwd"][0], best["fwdbwd"][1]))
                add("sel fwd+bwd", fb, best["fwdbwd"])
            if "nsa" in parts:
                f, fb = nsa_times(T, H, G, Dk, Dv, bench)
                add("nsa fwd", f, best["fwd"])
                add("nsa fwd+bwd", fb, best["fwdbwd"])
                f, fb = nsa_times(T, H, G, Dk, Dv, bench, planned=True)
                add("nsa fwd (plan reused)", f, best["fwd"])
                add("nsa fwd+bwd (plan reused)", fb, best["fwdbwd"])
            if "nsa_h4" in parts:  # full NSA with small groups: 16 query heads in 4 groups
                best4, _ = dense_times(T, 16, 4, Dk, Dv, bench)
                f, fb = nsa_times(T, 16, 4, Dk, Dv, bench, planned=True)
                base4 = dict(base, H=16)
                add("nsa fwd h=4 (plan reused)", f, best4["fwd"], base=base4)
                add("nsa fwd+bwd h=4 (plan reused)", fb, best4["fwdbwd"], base=base4)
            if "decode" in parts:
                add("decode step", decode_time(T, H, G, Dk, Dv, bench),
                    dense_decode(T, H, G, Dk, Dv, bench))
            if "h4" in parts and (Dk, Dv) == dims[0]:
                for coherent in (False, True):
                    f16, _ = selection_times(T, 64, 4, Dk, Dv, bench, coherent=coherent,
                                             backward=False)
                    f4, _ = selection_times(T, 16, 4, Dk, Dv, bench, coherent=coherent,
                                            backward=False)
                    if f16 and f4:
                        per16, per4 = f16 / 64, f4 / 16
                        bench.add(**dict(base, H=16), metric=f"sel fwd per head h=4 vs h=16"
                                  f" ({'coherent' if coherent else 'random'} idx)",
                                  ours_ms=per4, dense_ms=per16, dense_backend="h=16 per head",
                                  ratio=per4 / per16)
    write(args.out, machine, bench)
    return 0


def write(prefix: str, machine: str, bench: Bench) -> None:
    """CSV with every field, and a markdown table with the machine line and notes."""
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["T", "dims", "H", "G", "metric", "ours_ms", "dense_ms", "dense_backend", "ratio"]
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in bench.rows:
            w.writerow({k: r.get(k) for k in fields})
    fmt = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = [f"Machine: {machine}", "",
             "ratio = dense / ours (speed-up), except the h=4 rows: per-head time h=4 / h=16.", "",
             "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in fields) + " |" for r in bench.rows]
    if bench.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in bench.notes]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
