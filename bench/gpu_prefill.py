"""Issue 10 (v4) on one GPU call: sweep the new kernels, profile, and time full NSA vs dense.

Setting: bf16, B = 1, H = 64 query heads in G = 4 KV groups (h = 16), Dk = Dv = 128, the paper's
l=32, d=16, l'=64, n=16, w=512. Sections, each under the wall-clock budget (`Bench`):

1. ``sweep``: at ``--sweep-T`` (65536), several launch shapes (rows/positions, keys, warps,
   stages, dK/dV chunk) of each v4 kernel, each timed in one process by
   ``triton.testing.do_bench`` (median; it flushes L2 between runs) over two rotated input sets;
   a shape that fails to compile or run is recorded as an error and skipped. The fastest shape of
   each kernel becomes the measured profile ``profile_sm90.json`` (same schema as
   ``nsa_impl/kernels/profiles/sm90.json``), used by everything after it via
   `nsa_impl.kernels.tuning.use_profile` (an explicit object; nothing is edited).
2. ``parts``: where the time goes at each ``--parts-T`` (64k and 8k): each kernel of the v4
   forward and backward alone (compress, cmp attention, fused top-n, selection, window, gate;
   their backwards).
3. ``table``: full `nsa_impl.nsa_attention` forward and forward+backward at each ``--T``: v4
   (the router on the measured profile: cmp/win/gate on "triton"), v3 (``force_path("flash")``:
   FlashAttention-2 cmp + window, the previous default), dense SDPA (flash and cuDNN), peak
   memory of forward+backward; rows of peers (flash_nsa, fla-core) from ``--peers`` when given
   (the JSON lines of the peers' side-by-side tool ``.peers/peer_bench.py``, a local copy
   carried to the GPU machine and not part of the repository, measured in the same call).

Writes under ``--out``: sweep.csv, parts.csv, table.csv, table.md, profile_sm90.json.
Nothing asserts on time. Usage: ``python bench/gpu_prefill.py --out $OUT [--T 8192,65536]``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import itertools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.gpu_bench import PAPER, Bench, dense_times, machine_line, timeit  # noqa: E402

H, G, D = 64, 4, 128
DT = torch.bfloat16
DEV = "cuda"
#: ``--smoke``: CPU tensors, Triton's interpreter, tiny shapes, one launch shape per kernel and
#: one untimed-quality run per measurement: checks this script's plumbing without a GPU.
SMOKE = False
#: ``--sweep-kernels``: the kernels the sweep times (empty: all).
SWEEP_ONLY: frozenset[str] = frozenset()


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, rep_ms: float = 150.0) -> float:
    """``triton.testing.do_bench`` median (ms), after one untimed call (compilation)."""
    fn()
    _sync()
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def wall_ms(fn, warmup: int = 2, reps: int = 10) -> float:
    """`bench.gpu_bench.timeit` (CUDA events, median) or, in ``--smoke``, one host-timed run."""
    if not SMOKE:
        return timeit(fn, warmup=warmup, reps=reps)
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def rotated(*sets):
    """A callable source cycling through input sets (each call: the next set)."""
    it = itertools.cycle(sets)
    return lambda: next(it)


# ------------------------------------------------------------------------------------------
# Inputs at one length
# ------------------------------------------------------------------------------------------


class Shapes:
    """Flattened v4 inputs and intermediates at length ``T`` (two rotated sets)."""

    def __init__(self, T: int, seed: int = 0):
        from nsa_impl.kernels import triton_attn

        self.T = T
        self.scale = 1.0 / math.sqrt(D)
        gen = torch.Generator(device=DEV).manual_seed(seed)
        self.N = triton_attn.num_cmp(T, PAPER["cmp_block"], PAPER["cmp_stride"])
        self.qstart = torch.tensor([0, T], device=DEV, dtype=torch.int64)
        self.kstart = torch.tensor([0, self.N], device=DEV, dtype=torch.int64)
        self.sets = []
        for _ in range(2):
            q = torch.randn(T, H, D, device=DEV, generator=gen).to(DT)
            k = torch.randn(T, G, D, device=DEV, generator=gen).to(DT)
            v = torch.randn(T, G, D, device=DEV, generator=gen).to(DT)
            do = torch.randn(T, H, D, device=DEV, generator=gen).to(DT)
            kc = k.unfold(0, PAPER["cmp_block"], PAPER["cmp_stride"]).mean(-1).contiguous()
            vc = v.unfold(0, PAPER["cmp_block"], PAPER["cmp_stride"]).mean(-1).contiguous()
            self.sets.append(dict(q=q, k=k, v=v, do=do, kc=kc, vc=vc))
        self.next = rotated(*self.sets)

    def attn_args(self, mode: str, s: dict):
        from nsa_impl.kernels import triton_attn

        if mode == "cmp":
            return (s["q"], s["kc"], s["vc"], self.qstart, self.kstart, self.T,
                    triton_attn.MODE_CMP, PAPER["cmp_block"], PAPER["cmp_stride"], 1)
        return (s["q"], s["k"], s["v"], self.qstart, self.qstart, self.T, triton_attn.MODE_WIN,
                1, 1, PAPER["window"])

    def prepare(self, tn_cmp, tn_win):
        """Forward outputs (o, lse) and delta of both branches for the backward kernels."""
        from nsa_impl.kernels import triton_attn

        for s in self.sets:
            for mode, tn in (("cmp", tn_cmp), ("win", tn_win)):
                a = self.attn_args(mode, s)
                o, lse = triton_attn._forward(*a, self.scale, tn)
                _, delta = triton_attn._dq(s["do"], a[0], a[1], a[2], o, lse, *a[3:6], *a[6:],
                                           self.scale, tn)
                s[f"{mode}_o"], s[f"{mode}_lse"], s[f"{mode}_delta"] = o, lse, delta


# ------------------------------------------------------------------------------------------
# 1. Launch-shape sweep
# ------------------------------------------------------------------------------------------

def candidates():
    """Launch shapes per kernel, the profile's default first (most promising next)."""
    from nsa_impl.kernels import tuning

    Lc = tuning.Launch
    # Register/spill/shared-memory of each shape: bench/aot_compile.py (no GPU needed); shapes
    # that spill heavily there (e.g. fwd 256x64, dK/dV 128x64 or one stage) are left out.
    fwd = [Lc(128, 64, 8, 2), Lc(128, 64, 8, 3), Lc(64, 64, 4, 2), Lc(128, 128, 8, 2),
           Lc(64, 64, 4, 3), Lc(64, 32, 4, 2), Lc(128, 32, 8, 2)]
    dq = [Lc(128, 32, 8, 2), Lc(128, 64, 8, 2), Lc(64, 64, 4, 2), Lc(64, 32, 8, 2),
          Lc(128, 32, 8, 3), Lc(128, 16, 8, 2)]
    dkdv = [Lc(64, 64, 8, 2, 2048), Lc(32, 64, 8, 2, 2048), Lc(16, 64, 8, 2, 2048),
            Lc(64, 64, 8, 3, 2048), Lc(64, 128, 8, 2, 2048), Lc(32, 32, 8, 2, 2048),
            Lc(64, 64, 8, 2, 1024), Lc(64, 64, 8, 2, 4096)]
    topn = [tuning.TopNTuning(16, 64, 8, 1), tuning.TopNTuning(16, 128, 8, 1),
            tuning.TopNTuning(16, 32, 4, 1), tuning.TopNTuning(16, 64, 4, 1),
            tuning.TopNTuning(32, 64, 8, 1), tuning.TopNTuning(16, 64, 8, 2),
            tuning.TopNTuning(16, 128, 8, 2), tuning.TopNTuning(32, 128, 8, 1),
            tuning.TopNTuning(16, 64, 4, 2), tuning.TopNTuning(16, 128, 4, 1)]
    gate = [tuning.GateTuning(32, 4), tuning.GateTuning(16, 4), tuning.GateTuning(64, 4),
            tuning.GateTuning(64, 8), tuning.GateTuning(128, 8)]
    if SMOKE:
        fwd, dq, dkdv, topn, gate = ([c[0]] for c in (fwd, dq, dkdv, topn, gate))
    return dict(cmp_fwd=fwd, cmp_dq=dq, cmp_dkdv=dkdv, topn=topn, win_fwd=fwd[:5],
                win_dq=dq[:4], win_dkdv=dkdv[:6], gate=gate)


def kernel_call(name: str, cfg, sh: Shapes, base):
    """A zero-argument call of kernel ``name`` with launch shape ``cfg`` on rotated inputs."""
    from nsa_impl.kernels import triton_attn, triton_gate, triton_topn

    mode = name.split("_")[0]
    if name == "topn":
        def run():
            s = sh.next()
            triton_topn.select_blocks(
                s["q"], s["kc"], s["cmp_lse"], sh.qstart, sh.kstart, sh.T,
                cmp_block=PAPER["cmp_block"], cmp_stride=PAPER["cmp_stride"],
                sel_block=PAPER["sel_block"], top_n=PAPER["sel_top_n"],
                init_blocks=1, local_blocks=2, scale=sh.scale, tuning=cfg)
        return run
    if name == "gate":
        def run():
            s = sh.next()
            o = triton_gate.gate_forward(s["cmp_o"], s["win_o"], s["q"], s["g"], cfg.as_list())
            triton_gate.gate_backward(s["do"], s["cmp_o"], s["win_o"], s["q"], s["g"],
                                      cfg.as_list())
            return o
        return run
    tn = dataclasses.replace(base[mode], **{name.split("_")[1]: cfg})
    if name.endswith("fwd"):
        def run():
            triton_attn._forward(*sh.attn_args(mode, sh.next()), sh.scale, tn)
    elif name.endswith("dq"):
        def run():
            s = sh.next()
            a = sh.attn_args(mode, s)
            triton_attn._dq(s["do"], *a[:3], s[f"{mode}_o"], s[f"{mode}_lse"], *a[3:6], *a[6:],
                            sh.scale, tn)
    else:
        def run():
            s = sh.next()
            a = sh.attn_args(mode, s)
            nk = sh.N if mode == "cmp" else sh.T
            triton_attn._dkdv(s["do"], *a[:3], s[f"{mode}_lse"], s[f"{mode}_delta"], *a[3:6],
                              nk, *a[6:], sh.scale, tn)
    return run


def backward_call(mode: str, tn, sh: Shapes):
    """The whole backward of one branch (dQ and dK/dV kernels) on rotated inputs."""
    from nsa_impl.kernels import triton_attn

    def run():
        s = sh.next()
        a = sh.attn_args(mode, s)
        nk = sh.N if mode == "cmp" else sh.T
        triton_attn._backward(s["do"], *a[:3], s[f"{mode}_o"], s[f"{mode}_lse"], *a[3:6], nk,
                              *a[6:], sh.scale, tn)
    return run


def sweep(sh: Shapes, bench: Bench, base_profile, rows: list):
    """Time every candidate; return the profile of the winners (the default where none ran)."""
    from nsa_impl.kernels import tuning

    base = dict(cmp=base_profile.cmp, win=base_profile.win)
    sh.prepare(base["cmp"], base["win"])
    for s in sh.sets:
        s["g"] = torch.rand(sh.T, H, 3, device=DEV).to(DT)
    best = {}
    cands = candidates()
    if SWEEP_ONLY:
        cands = {name: c for name, c in cands.items() if name in SWEEP_ONLY}
    # Round robin over the kernels (defaults first): a short budget still tries every kernel.
    order = [(name, c[i]) for i in range(max(map(len, cands.values())))
             for name, c in cands.items() if i < len(c)]
    for name, cfg in order:
        label = f"sweep {name} {cfg}"
        ms = bench.run(label, lambda name=name, cfg=cfg: median_ms(kernel_call(name, cfg, sh,
                                                                                base)))
        error = "" if ms is not None else (bench.notes[-1] if bench.notes else "")
        rows.append(dict(kernel=name, T=sh.T, config=json.dumps(dataclasses.asdict(cfg)),
                         ms=ms, error=error))
        if ms is not None:
            print(f"  {name:9s} {ms:8.3f} ms  {dataclasses.asdict(cfg)}", flush=True)
            if name not in best or ms < best[name][0]:
                best[name] = (ms, cfg)

    def pick(name, default):
        return best[name][1] if name in best else default

    chosen = {}
    for mode in ("cmp", "win"):
        b = base[mode]
        tn = tuning.AttnTuning(pick(f"{mode}_fwd", b.fwd), pick(f"{mode}_dq", b.dq),
                               pick(f"{mode}_dkdv", b.dkdv))
        # The whole backward with a separate dQ kernel (deterministic) vs dQ by atomics.
        times = {}
        for atomic in (False, True):
            t = dataclasses.replace(tn, dq_atomic=atomic)
            ms = bench.run(f"sweep {mode}_bwd dq_atomic={atomic}",
                           lambda t=t, mode=mode: median_ms(backward_call(mode, t, sh)))
            rows.append(dict(kernel=f"{mode}_bwd", T=sh.T,
                             config=json.dumps({"dq_atomic": atomic}), ms=ms, error=""))
            if ms is not None:
                times[atomic] = ms
                print(f"  {mode}_bwd  {ms:8.3f} ms  dq_atomic={atomic}", flush=True)
        # Atomics only for a clear gain (>= 5 %): they cost bit-identical dQ.
        atomic = True in times and False in times and times[True] < 0.95 * times[False]
        chosen[mode] = dataclasses.replace(tn, dq_atomic=atomic)
    cmp, win = chosen["cmp"], chosen["win"]
    stamp = datetime.date.today().isoformat()
    measured = dataclasses.replace(
        base_profile, measured=bool(best),
        note=f"measured by bench/gpu_prefill.py at T={sh.T}, H={H}, G={G}, D={D}, bf16 on "
             f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'} ({stamp}); fastest "
             "launch shape of each kernel",
        cmp=cmp, win=win, topn=pick("topn", base_profile.topn), gate=pick("gate",
                                                                          base_profile.gate))
    return measured, best


# ------------------------------------------------------------------------------------------
# 2. Where the time goes (each kernel alone)
# ------------------------------------------------------------------------------------------


def parts(T: int, bench: Bench, prof, rows: list):
    """Each piece of the v4 forward and backward at length ``T``, on the measured profile."""
    import nsa_impl
    from bench.workloads import random_block_indices
    from nsa_impl import scoring
    from nsa_impl.branches.compressed import CmpLayout
    from nsa_impl.kernels import triton_attn, triton_gate, triton_sel, triton_topn
    from nsa_impl.varlen import PackedLayout

    cfg = nsa_impl.NSAConfig(**PAPER)
    sh = Shapes(T, seed=1)
    sh.prepare(prof.cmp, prof.win)
    s = sh.sets[0]
    layout = PackedLayout.build(T)
    cl = CmpLayout.build(cfg, layout)
    k4 = s["k"].view(1, T, G, D)
    gen = torch.Generator(device=DEV).manual_seed(2)
    idx = random_block_indices(1, T, G, cfg.sel_top_n, cfg.sel_block, generator=gen,
                               device=DEV)
    q4, v4, do4 = (s[n].view(1, T, -1, D) for n in ("q", "v", "do"))
    g = torch.rand(T, H, 3, device=DEV).to(DT)
    a_cmp, a_win = sh.attn_args("cmp", s), sh.attn_args("win", s)
    leaves = [t.detach().requires_grad_() for t in (q4, k4, v4)]
    o_sel = triton_sel.selection_attention(*leaves, idx, cfg.sel_block, sh.scale)

    items = [
        ("fwd compress (mean, k and v)", lambda: (scoring.compress(k4, cfg, cl),
                                                  scoring.compress(v4, cfg, cl))),
        ("fwd cmp attention", lambda: triton_attn._forward(*a_cmp, sh.scale, prof.cmp)),
        ("fwd scores+top-n", lambda: triton_topn.select_blocks(
            s["q"], s["kc"], s["cmp_lse"], sh.qstart, sh.kstart, T, cmp_block=32, cmp_stride=16,
            sel_block=64, top_n=16, init_blocks=1, local_blocks=2, scale=sh.scale,
            tuning=prof.topn)),
        ("fwd selection (random paper indices)", lambda: triton_sel.selection_attention(
            q4, k4, v4, idx, cfg.sel_block, sh.scale)),
        ("fwd window", lambda: triton_attn._forward(*a_win, sh.scale, prof.win)),
        ("fwd gate", lambda: triton_gate.gate_forward(s["cmp_o"], s["win_o"], s["q"], g,
                                                      prof.gate.as_list())),
        ("bwd gate", lambda: triton_gate.gate_backward(s["do"], s["cmp_o"], s["win_o"], s["q"], g,
                                                       prof.gate.as_list())),
        ("bwd cmp dq", lambda: triton_attn._dq(s["do"], *a_cmp[:3], s["cmp_o"], s["cmp_lse"],
                                               *a_cmp[3:6], *a_cmp[6:], sh.scale, prof.cmp)),
        ("bwd cmp dk/dv", lambda: triton_attn._dkdv(
            s["do"], *a_cmp[:3], s["cmp_lse"], s["cmp_delta"], *a_cmp[3:6], sh.N, *a_cmp[6:],
            sh.scale, prof.cmp)),
        ("bwd selection", lambda: torch.autograd.grad(o_sel, leaves, do4, retain_graph=True)),
        ("bwd window dq", lambda: triton_attn._dq(s["do"], *a_win[:3], s["win_o"], s["win_lse"],
                                                  *a_win[3:6], *a_win[6:], sh.scale, prof.win)),
        ("bwd window dk/dv", lambda: triton_attn._dkdv(
            s["do"], *a_win[:3], s["win_lse"], s["win_delta"], *a_win[3:6], T, *a_win[6:],
            sh.scale, prof.win)),
    ]
    for name, fn in items:
        ms = bench.run(f"part {name}", lambda fn=fn: median_ms(fn, rep_ms=100))
        rows.append(dict(T=T, part=name, ms=ms))
        if ms is not None:
            print(f"  {name:38s} {ms:8.3f} ms", flush=True)
    # the inputs go when this returns; `Bench.run` then empties the CUDA cache


# ------------------------------------------------------------------------------------------
# 3. Full NSA against dense
# ------------------------------------------------------------------------------------------


def nsa_times(T: int, bench: Bench, prof, rows: list):
    """v4 and v3 full-NSA forward / forward+backward and peak memory at length ``T``, then
    dense SDPA at the same length (after NSA's inputs are freed)."""
    _nsa_rows(T, bench, prof, rows)
    _dense_rows(T, bench, rows)


def _nsa_rows(T: int, bench: Bench, prof, rows: list):
    """The NSA rows of `nsa_times`; its inputs are freed when it returns."""
    import contextlib

    import nsa_impl
    from nsa_impl import dispatch
    from nsa_impl.kernels import tuning

    cfg = nsa_impl.NSAConfig(**PAPER)
    gen = torch.Generator(device=DEV).manual_seed(T)
    q, k, v = (torch.randn(1, T, n, D, device=DEV, generator=gen).to(DT) for n in (H, G, G))
    gates = torch.rand(1, T, H, 3, device=DEV, generator=gen).to(DT)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn(1, T, H, D, device=DEV, dtype=DT)

    @contextlib.contextmanager
    def v4():
        with tuning.use_profile(prof), (dispatch.force_path("triton") if SMOKE
                                        else contextlib.nullcontext()):
            yield

    for who, ctx in (("nsa v4", v4),
                     ("nsa v3 (flash cmp/win)", lambda: dispatch.force_path("flash"))):
        def fwd(ctx=ctx):
            with ctx(), torch.no_grad():
                nsa_impl.nsa_attention(q, k, v, gates, cfg, validate=False)

        def fwdbwd(ctx=ctx):
            with ctx():
                o = nsa_impl.nsa_attention(*leaves, cfg, validate=False)
            torch.autograd.grad(o, leaves, do)

        with ctx():
            plan = nsa_impl.explain(q, cfg, k=k, v=v, backward=True)
        f = bench.run(f"{who} fwd T={T}", lambda: wall_ms(fwd, reps=10))
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if DEV == "cuda" else 0
        fb = bench.run(f"{who} fwd+bwd T={T}", lambda: wall_ms(fwdbwd, warmup=1, reps=5))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if DEV == "cuda" else 0.0
        rows.append(dict(who=who, T=T, fwd_ms=f, fwdbwd_ms=fb, peak_gib=peak,
                         route=" ".join(f"{b}={p}" for b, p in plan.paths().items())))
        print(f"  {who:24s} T={T:6d} fwd {f} fwd+bwd {fb} peak {peak:.2f} GiB "
              f"[{rows[-1]['route']}]", flush=True)


def _dense_rows(T: int, bench: Bench, rows: list):
    """The dense rows of `nsa_times` (none in ``--smoke``)."""
    if SMOKE:
        return
    torch.cuda.empty_cache()
    best, each = dense_times(T, H, G, D, D, bench, DT)
    for be, (f, fb) in each.items():
        rows.append(dict(who=f"dense {be}", T=T, fwd_ms=f, fwdbwd_ms=fb, peak_gib=None, route=""))
    # dense peak memory of forward+backward (cuDNN), for the memory target
    try:
        qd = torch.randn(1, H, T, D, device=DEV, dtype=DT, requires_grad=True)
        kd = torch.randn(1, G, T, D, device=DEV, dtype=DT, requires_grad=True)
        vd = torch.randn(1, G, T, D, device=DEV, dtype=DT, requires_grad=True)
        from bench.gpu_bench import _sdpa

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(_sdpa(qd, kd, vd, "cudnn"), (qd, kd, vd),
                            torch.ones(1, H, T, D, device=DEV, dtype=DT))
        rows[-1]["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        del qd, kd, vd
    except Exception as exc:  # noqa: BLE001 - report, never fail
        print("   dense peak memory:", type(exc).__name__, str(exc)[:200])
    torch.cuda.empty_cache()


def read_peers(path: str | None) -> list[dict]:
    """``ROW {json}`` lines of peer_bench.py (flash_nsa, fla-core, their dense rows)."""
    if not path or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("ROW "):
            r = json.loads(line[4:])
            rows.append(dict(who=f"peer: {r['who']}", T=r["T"], fwd_ms=r.get("fwd_ms"),
                             fwdbwd_ms=r.get("fwdbwd_ms"), peak_gib=None, route=""))
    return rows


def table_md(rows: list[dict], machine: str) -> str:
    """Markdown: one line per (implementation, T), ratios over the best dense of that T."""
    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    dense = {}
    for r in rows:
        if r["who"].startswith("dense"):
            for key in ("fwd_ms", "fwdbwd_ms"):
                if r[key] is not None:
                    dense[(r["T"], key)] = min(dense.get((r["T"], key), math.inf), r[key])
    out = [f"{machine}", "", "| implementation | T | fwd ms | fwd+bwd ms | fwd x dense | "
           "fwd+bwd x dense | peak GiB (fwd+bwd) | route |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["T"], r["who"])):
        ratio = [("-" if r[k] is None or (r["T"], k) not in dense else
                  f"{dense[(r['T'], k)] / r[k]:.2f}x") for k in ("fwd_ms", "fwdbwd_ms")]
        out.append(f"| {r['who']} | {r['T']} | {fmt(r['fwd_ms'])} | {fmt(r['fwdbwd_ms'])} | "
                   f"{ratio[0]} | {ratio[1]} | {fmt(r.get('peak_gib'))} | {r.get('route', '')} |")
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]):
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--T", default="8192,16384,32768,65536,131072")
    ap.add_argument("--sweep-T", type=int, default=65536)
    ap.add_argument("--parts-T", default="65536,8192",
                    help="lengths of the per-kernel profile (8k shows the fixed costs)")
    ap.add_argument("--sections", default="sweep,parts,table")
    ap.add_argument("--sweep-kernels", default="",
                    help="comma-separated kernel names to sweep (default: all), e.g. topn")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--table-reserve-s", type=float, default=150.0,
                    help="seconds of the budget kept for the table (sweep/parts stop earlier)")
    ap.add_argument("--parts-reserve-s", type=float, default=35.0,
                    help="seconds kept for the parts profile (the sweep stops earlier)")
    ap.add_argument("--peers", default=None, help="peer_bench.py output (ROW lines)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU + Triton interpreter, tiny shapes: test this script without a GPU")
    args = ap.parse_args(argv)
    global SMOKE, DEV, H, G, D, SWEEP_ONLY
    SWEEP_ONLY = frozenset(filter(None, args.sweep_kernels.split(",")))
    if args.smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"
        SMOKE, DEV, H, G, D = True, "cpu", 4, 2, 16
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (use --smoke to test the script)")
        return 2
    from nsa_impl.kernels import tuning

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_line() if not SMOKE else "smoke run: CPU, Triton interpreter"
    print(machine, flush=True)
    sections = set(args.sections.split(","))
    t0 = time.monotonic()
    reserve = min(args.table_reserve_s, 0.45 * args.budget_s)
    front = Bench(max(20.0, args.budget_s - reserve - args.parts_reserve_s))
    prof = tuning.load_profile("sm90") if SMOKE else tuning.profile_for("cuda")
    print(f"profile before the sweep: {prof.name} (measured={prof.measured})", flush=True)
    sweep_rows, part_rows, table_rows = [], [], []
    if "sweep" in sections:
        print(f"\n# sweep at T={args.sweep_T}", flush=True)
        try:
            sh = Shapes(args.sweep_T)
            prof, best = sweep(sh, front, prof, sweep_rows)
            del sh
        except Exception:  # noqa: BLE001 - the table still runs on the default profile
            traceback.print_exc()
        write_csv(out / "sweep.csv", sweep_rows)
        (out / "profile_sm90.json").write_text(json.dumps(tuning.profile_dict(prof), indent=2))
        print("measured profile:", json.dumps(tuning.profile_dict(prof)), flush=True)
    if "parts" in sections:
        pb = Bench(max(15.0, args.budget_s - reserve - (time.monotonic() - t0)))
        for T in (int(x) for x in args.parts_T.split(",")):
            print(f"\n# parts at T={T}", flush=True)
            pb.run(f"parts T={T}", lambda T=T: parts(T, pb, prof, part_rows))
        front.notes += pb.notes
        write_csv(out / "parts.csv", part_rows)
    if "table" in sections:
        left = args.budget_s - (time.monotonic() - t0)
        bench = Bench(max(20.0, left))
        print(f"\n# table ({left:.0f} s left)", flush=True)
        for T in (int(x) for x in args.T.split(",")):
            bench.run(f"table T={T}", lambda T=T: nsa_times(T, bench, prof, table_rows))
            write_csv(out / "table.csv", table_rows + read_peers(args.peers))
        rows = table_rows + read_peers(args.peers)
        md = table_md(rows, machine)
        (out / "table.md").write_text(md + "\n")
        print("\n" + md, flush=True)
        front.notes += bench.notes
    if front.notes:
        print("\nnotes:\n  " + "\n  ".join(front.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
