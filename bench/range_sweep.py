"""Launch shapes of the row-range kernels (compressed branch and window) on one GPU, timed alone.

    python bench/range_sweep.py --T 65536 --dims 192/128 [--heads 64/4] [--out DIR]
        [--variants '[{}, {"dkdv": {"rows": 32}}]'] [--budget-s 200]

bf16, B=1, the paper's l=32, d=16, w=512. Each variant replaces launch fields of the device
profile's `nsa_impl.kernels.tuning.AttnTuning` (``{"dkdv": {"rows": 32, "warps": 4}}``: those
fields of the dK/dV launch; ``fwd`` and ``dq`` likewise) for both branches, and both branches
are timed by ``triton.testing.do_bench`` (median, L2 flushed between runs): the window forward
and backward, the compressed forward and backward (`triton_attn.window_attention`,
`triton_attn.cmp_attention`). A variant that fails to compile or run is reported and skipped.
Prints a table and writes range_sweep.csv under ``--out``. Never asserts on time.

Why: at Dk/Dv = 192/128 the dK/dV kernels take 3.8x (row-range) their 128/128 time on an H200
for 1.25x the matrix work (docs/gpu_notes.md, session 5); this finds the shape that fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.workloads import parse_pair, write_rows_csv  # noqa: E402

#: Default variants: smaller dK/dV tiles and fewer warps/stages (the candidates for wide heads).
VARIANTS: list[dict] = [
    {},
    {"dkdv": {"rows": 32}}, {"dkdv": {"block_n": 16}}, {"dkdv": {"warps": 4}},
    {"dkdv": {"stages": 1}}, {"dkdv": {"rows": 32, "warps": 4}},
    {"dkdv": {"rows": 32, "stages": 1}}, {"dkdv": {"block_n": 16, "warps": 4}},
    {"dkdv": {"rows": 16}}, {"dkdv": {"rows": 32, "block_n": 16}},
    {"dq": {"rows": 32}}, {"dq": {"warps": 8}}, {"fwd": {"rows": 64}},
]


def _tuning(base, override: dict):
    """``base`` (an AttnTuning) with the launch fields of ``override`` replaced."""
    unknown = set(override) - {"fwd", "dq", "dkdv"}
    if unknown:
        raise ValueError(f"unknown launches {sorted(unknown)}: use fwd, dq, dkdv")
    return dataclasses.replace(base, **{name: dataclasses.replace(getattr(base, name), **fields)
                                        for name, fields in override.items()})


def _time(fn, rep_ms: float) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"))


def time_variant(override: dict, inputs: dict, rep_ms: float) -> dict:
    """ms of the window and compressed forward and backward under ``override``."""
    from nsa_impl.kernels import triton_attn, tuning

    cfg, q, k, v, kc, vc = (inputs[n] for n in ("cfg", "q", "k", "v", "kc", "vc"))
    prof = tuning.profile_for(q.device)
    T, H, Dk = q.shape[1:]
    scale = 1.0 / math.sqrt(Dk)
    out = {}
    win_tn, cmp_tn = _tuning(prof.win, override), _tuning(prof.cmp, override)
    qstart = torch.tensor([0, T], device=q.device)
    kstart = torch.tensor([0, kc.shape[0]], device=q.device)

    def win(*xs):
        return triton_attn.window_attention(*xs, cfg.window, scale, tuning=win_tn)

    def cmp(q_, kc_, vc_):
        o, _ = triton_attn.cmp_attention(q_.reshape(T, H, Dk), kc_, vc_, qstart, kstart, T,
                                         cfg.cmp_block, cfg.cmp_stride, scale, tuning=cmp_tn)
        return o

    for name, fn, args in (("win", win, (q, k, v)), ("cmp", cmp, (q, kc, vc))):
        leaves = [t.detach().requires_grad_() for t in args]
        with torch.no_grad():
            out[f"{name}_fwd_ms"] = _time(lambda fn=fn, args=args: fn(*args), rep_ms)
        o = fn(*leaves)
        do = torch.randn_like(o)
        out[f"{name}_bwd_ms"] = _time(
            lambda o=o, leaves=leaves, do=do: torch.autograd.grad(o, leaves, do,
                                                                  retain_graph=True), rep_ms)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--dims", default="192/128", help="Dk/Dv")
    ap.add_argument("--heads", default="64/4", help="query heads / KV groups")
    ap.add_argument("--variants", default=None, help="a JSON list of overrides instead")
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--rep-ms", type=float, default=60.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    (dk, dv), (heads, groups) = parse_pair(args.dims, "--dims"), parse_pair(args.heads, "--heads")
    if heads % groups:
        ap.error(f"--heads: H must be a multiple of G, got {args.heads!r}")
    variants = json.loads(args.variants) if args.variants else VARIANTS
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to sweep")
        return 2
    import nsa_impl
    from nsa_impl.kernels import triton_attn

    cfg = nsa_impl.NSAConfig()
    T = args.T
    gen = torch.Generator(device="cuda").manual_seed(T)
    bf = torch.bfloat16
    q = torch.randn(1, T, heads, dk, device="cuda", generator=gen).to(bf)
    k = torch.randn(1, T, groups, dk, device="cuda", generator=gen).to(bf)
    v = torch.randn(1, T, groups, dv, device="cuda", generator=gen).to(bf)
    nk = triton_attn.num_cmp(T, cfg.cmp_block, cfg.cmp_stride)
    kc = torch.randn(nk, groups, dk, device="cuda", generator=gen).to(bf)
    vc = torch.randn(nk, groups, dv, device="cuda", generator=gen).to(bf)
    inputs = dict(cfg=cfg, q=q, k=k, v=v, kc=kc, vc=vc)
    print(f"T={T} H={heads} G={groups} Dk/Dv={dk}/{dv} bf16, {torch.cuda.get_device_name()}",
          flush=True)
    deadline = time.monotonic() + args.budget_s
    rows = []
    for override in variants:
        label = json.dumps(override) if override else "default"
        if time.monotonic() > deadline:
            print(f"  {label}: skipped (budget spent)", flush=True)
            continue
        try:
            r = time_variant(override, inputs, args.rep_ms)
        except Exception as exc:  # noqa: BLE001 - a failing shape is reported, not fatal
            print(f"  {label}: ERROR {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        r = dict(variant=label, **r, total_ms=sum(r.values()))
        rows.append(r)
        print(f"  {label:44s} win {r['win_fwd_ms']:7.2f} / {r['win_bwd_ms']:7.2f}  cmp "
              f"{r['cmp_fwd_ms']:7.2f} / {r['cmp_bwd_ms']:7.2f}  sum {r['total_ms']:7.2f} ms",
              flush=True)
        torch.cuda.empty_cache()
    for key in ("win_bwd_ms", "cmp_bwd_ms", "total_ms"):
        best = min(rows, key=lambda r: r[key], default=None)
        if best is not None:
            print(f"  best {key[:-3]}: {best['variant']} {best[key]:.2f} ms", flush=True)
    if args.out and rows:
        write_rows_csv(args.out, "range_sweep.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
