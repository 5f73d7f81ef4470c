"""Context-parallel NSA benchmark: forward and forward+backward time and peak memory per rank
of `nsa_impl.parallel.cp_nsa_attention` at long T on R GPUs, against one GPU (issue 14, item 4).

Launch one run per world size (``bench/gpu_cp.sh`` runs 1, 2 and 4), every run appending rows
to one CSV; ``--summarize`` then writes the markdown table with the machine line, the speed-up
over one GPU and the scaling efficiency ``t_1 / (R * t_R)``::

    torchrun --nproc-per-node=2 bench/cp_bench.py --T 131072 262144 --csv DIR/cp.csv
    python bench/cp_bench.py --summarize --csv DIR/cp.csv --md DIR/cp.md

Setting: bf16, B = 1, H = 64 query heads in G = 4 KV groups, Dk = Dv = 128, the paper's
configuration (l=32, d=16, l'=64, n=16, w=512), one sequence of T tokens. Every rank draws its
own rows (random; timing only), so nothing of size T lives on a rank but the gathered K/V.
Rows per (world, T):

* ``cp fwd`` / ``cp fwd+bwd``: the context-parallel attention, the all-gather and its
  reduce-scatter included (CUDA events on rank 0 after a barrier; the slowest rank's time is
  what a step waits for, so the max over ranks is reported);
* ``all-gather`` / ``reduce-scatter``: the collectives alone on the K/V bytes of one layer;
* ``nsa fwd+bwd`` (world 1 only): `nsa_impl.nsa_attention` with the router's fast paths (flash
  and Triton), for reference: CP runs the torch paths (row subsets; docs/parallel.md), so the
  scaling efficiency compares CP with CP at world 1 (same paths), and this row says what the
  fast kernels would give on one GPU.

Peak memory is ``torch.cuda.max_memory_allocated`` (max over ranks). A case that does not fit is
an ``OOM`` row. Nothing asserts on time. On the CPU (gloo, tiny T) it runs as a smoke test.

``--check`` first compares the context-parallel output and gradients with one device's
`nsa_impl.nsa_attention` on the same paths (float32, T = 4096 + 3 (padding), GQA, documents
crossing ranks) and prints the worst errors against the fp32 class (``check`` rows; a failure
exits non-zero): the gloo tests' property, on NCCL.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from nsa_impl import nsa_attention  # noqa: E402
from nsa_impl.dispatch import force_path  # noqa: E402
from nsa_impl.parallel import all_gather, context_parallel, cp_nsa_attention  # noqa: E402
from nsa_impl.tolerances import fp_class_atol  # noqa: E402
from nsa_ref import NSAConfig  # noqa: E402

PAPER = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=16, sel_init_blocks=1,
                  sel_local_blocks=2, window=512)  # fmt: skip
FIELDS = ["world", "T", "metric", "ms", "peak_gib", "bytes", "note"]


def machine_line() -> str:
    """GPU (or CPU), world size, torch, triton, CUDA, NCCL."""
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001 - report, never fail
        tv = "none"
    if torch.cuda.is_available():
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
        dev = f"GPU {torch.cuda.get_device_name()} (sm {cc}) x{dist.get_world_size()}"
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        dev, nccl = f"CPU ({os.cpu_count()} cores) x{dist.get_world_size()}", "-"
    return (f"{dev} | torch {torch.__version__} | triton {tv} | CUDA {torch.version.cuda} | "
            f"NCCL {nccl} | backend {dist.get_backend()}")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _time(fn, device, reps: int, budget_s: float) -> float:
    """Median milliseconds of ``fn()`` (the slowest rank's), after one warm-up run."""
    fn()
    times, start = [], time.perf_counter()
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    worst = torch.tensor(statistics.median(times), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _peak(device) -> float:
    """Peak allocated GiB since the last reset, max over ranks (0 on the CPU)."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    t = torch.tensor(float(peak), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t) / 2**30


def _reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(T: int, *, cfg: NSAConfig = PAPER, H: int = 64, G: int = 4, Dk: int = 128,
            Dv: int = 128, dtype=torch.bfloat16, device=None, reps: int = 3,
            budget_s: float = 60.0, baseline: bool = True) -> list[dict]:  # fmt: skip
    """The rows of one T on the current process group (module docstring)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []

    def row(metric, ms=math.nan, peak=math.nan, nbytes=0, note=""):
        rows.append(dict(world=world, T=T, metric=metric, ms=round(ms, 3), peak_gib=round(peak, 3),
                         bytes=nbytes, note=note))  # fmt: skip

    cp = context_parallel(None, T, cfg, heads=H, kv_heads=G, head_dim=Dk, v_head_dim=Dv,
                          device=device, dtype=dtype)  # fmt: skip
    n = cp.layout.local_len
    gen = torch.Generator(device=device).manual_seed(1000 + rank)

    def draw(*shape, uniform=False):
        fn = torch.rand if uniform else torch.randn
        return fn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_()

    kv_bytes = T * G * (Dk + Dv) * torch.finfo(dtype).bits // 8  # one layer's whole K and V
    try:
        q, k, v = draw(1, n, H, Dk), draw(1, n, G, Dk), draw(1, n, G, Dv)
        gates = draw(1, n, H, 3, uniform=True)
        do = torch.randn(1, n, H, Dv, generator=gen, device=device, dtype=dtype)

        def fwd():
            with torch.no_grad():
                cp_nsa_attention(q, k, v, gates, cfg, cp, validate=False)

        def fwd_bwd():
            o = cp_nsa_attention(q, k, v, gates, cfg, cp, validate=False)
            torch.autograd.grad(o, (q, k, v, gates), do)

        for metric, fn in (("cp fwd", fwd), ("cp fwd+bwd", fwd_bwd)):
            _reset(device)
            ms = _time(fn, device, reps, budget_s)
            row(metric, ms, _peak(device), kv_bytes, str(cp.plan.route.paths()))
        packed = torch.cat([k, v], -1).detach()
        x = packed.unsqueeze(0).requires_grad_()
        gathered = all_gather(x)
        row("all-gather", _time(lambda: all_gather(x.detach()), device, reps, budget_s),
            nbytes=kv_bytes, note="K and V of one layer")  # fmt: skip
        grad = torch.ones_like(gathered)
        row("reduce-scatter", _time(lambda: torch.autograd.grad(gathered, x, grad,
                                                                retain_graph=True),
                                    device, reps, budget_s), nbytes=kv_bytes,
            note="dK and dV (float32 for bf16)")  # fmt: skip
    except torch.cuda.OutOfMemoryError as exc:
        row("cp fwd+bwd", note=f"OOM: {str(exc).splitlines()[0][:80]}")
    if baseline and world == 1:
        try:
            Tq = cp.layout.T_pad
            qf, kf, vf = draw(1, Tq, H, Dk), draw(1, Tq, G, Dk), draw(1, Tq, G, Dv)
            gf = draw(1, Tq, H, 3, uniform=True)
            dof = torch.randn(1, Tq, H, Dv, generator=gen, device=device, dtype=dtype)

            def nsa_fwd_bwd():
                o = nsa_attention(qf, kf, vf, gf, cfg, validate=False)
                torch.autograd.grad(o, (qf, kf, vf, gf), dof)

            _reset(device)
            row("nsa fwd+bwd", _time(nsa_fwd_bwd, device, reps, budget_s), _peak(device),
                note="router's fast paths, one GPU")  # fmt: skip
        except torch.cuda.OutOfMemoryError as exc:
            row("nsa fwd+bwd", note=f"OOM: {str(exc).splitlines()[0][:80]}")
    return rows


def check(device, T: int = 4099, H: int = 8, G: int = 2, D: int = 64) -> list[dict]:
    """CP against one device (the same torch paths), float32: ``check`` rows of the worst
    output and gradient errors and their tolerances."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=8, window=256)
    cu = torch.tensor([0, 1000, 3000, T], dtype=torch.int32)
    with force_path(sel="packed"):
        cp = context_parallel(None, T, cfg, heads=H, kv_heads=G, head_dim=D, cu_seqlens=cu,
                              device=device, dtype=torch.float32)  # fmt: skip
    lay = cp.layout
    gen = torch.Generator().manual_seed(7)  # the same whole row on every rank
    shapes = dict(q=(1, lay.T_pad, H, D), k=(1, lay.T_pad, G, D), v=(1, lay.T_pad, G, D))
    whole = {n: torch.randn(*s, generator=gen).to(device) for n, s in shapes.items()}
    whole["gates"] = torch.rand(1, lay.T_pad, H, 3, generator=gen).to(device)
    do = torch.randn(1, lay.T_pad, H, D, generator=gen).to(device)
    do[:, T:] = 0  # pad rows do not enter the loss
    local = {n: lay.shard(x, rank).requires_grad_() for n, x in whole.items()}
    o = cp_nsa_attention(*local.values(), cfg, cp, validate=False)
    grads = torch.autograd.grad(o, list(local.values()), lay.shard(do, rank))
    parts = [o.detach(), *grads]
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in parts]
    for out, t in zip(gathered, parts, strict=True):
        dist.all_gather(out, t.contiguous())
    rows = []
    if rank == 0:
        ref_in = {n: x[:, :T].clone().requires_grad_() for n, x in whole.items()}
        with force_path(sel="packed"):
            ref = nsa_attention(*ref_in.values(), cfg, cu_seqlens=cu.to(device), validate=False)
        ref_grads = torch.autograd.grad(ref, list(ref_in.values()), do[:, :T])
        for name, got, want in zip(["o", *local], gathered, [ref, *ref_grads], strict=True):
            got = lay.unshard(got)
            err = float((got - want).abs().max())
            tol = fp_class_atol("float32", "out" if name == "o" else "grad")
            rows.append(dict(world=world, T=T, metric=f"check {name}", ms=math.nan,
                             peak_gib=math.nan, bytes=0,
                             note=f"max err {err:.3g} (tolerance {tol:g})"))  # fmt: skip
            if not err <= tol:
                rows[-1]["note"] += " FAIL"
    return rows


def summarize(csv_path: Path, md_path: Path) -> str:
    """Markdown table of the CSV: times, speed-up over world 1 and efficiency t_1/(R t_R)."""
    with open(csv_path) as f:
        lines = [r for r in csv.DictReader(f)]
    machine = [r["note"] for r in lines if r["metric"] == "machine"]
    data = [r for r in lines if r["metric"] != "machine"]
    one = {(r["T"], r["metric"]): float(r["ms"]) for r in data if r["world"] == "1"}
    out = [f"Machine: {m}" for m in dict.fromkeys(machine)] + [""]
    out += ["| world | T | metric | ms | peak GiB/rank | speed-up vs 1 GPU | efficiency | note |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data:
        base = one.get((r["T"], r["metric"]))
        ms, R = float(r["ms"]), int(r["world"])
        ok = base is not None and ms == ms and ms > 0 and r["metric"].startswith("cp")
        speed = f"{base / ms:.2f}" if ok else "-"
        eff = f"{base / (R * ms):.2f}" if ok else "-"
        out.append(f"| {R} | {r['T']} | {r['metric']} | {r['ms']} | {r['peak_gib']} | {speed} | "
                   f"{eff} | {r['note']} |")  # fmt: skip
    text = "\n".join(out) + "\n"
    md_path.write_text(text)
    return text


def main(argv=None) -> None:
    """Parse the flags, run (under torchrun) or summarize."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--T", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--csv", type=Path, default=Path("bench/results/cp.csv"))
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timing per row")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-GPU fast-path row")
    p.add_argument("--check", action="store_true", help="CP against one device first")
    p.add_argument("--summarize", action="store_true")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.csv, args.md or args.csv.with_suffix(".md")))
        return
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rank = dist.get_rank()
    if rank == 0:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        new = not args.csv.exists()
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            w.writerow(dict(world=dist.get_world_size(), T=0, metric="machine", ms="", peak_gib="",
                            bytes=0, note=machine_line()))  # fmt: skip
        print(machine_line(), flush=True)
    failed = False
    if args.check:
        rows = check(device or torch.device("cpu"))
        if rank == 0:
            with open(args.csv, "a", newline="") as f:
                csv.DictWriter(f, FIELDS).writerows(rows)
            for r in rows:
                print(r, flush=True)
            failed = any(r["note"].endswith("FAIL") for r in rows)
    for T in args.T:
        rows = measure(T, H=args.heads, G=args.kv_heads, Dk=args.head_dim, Dv=args.head_dim,
                       dtype=dtype, device=device, reps=args.reps, budget_s=args.budget,
                       baseline=not args.no_baseline)  # fmt: skip
        if rank == 0:  # written after every T: a timeout keeps what was measured
            with open(args.csv, "a", newline="") as f:
                csv.DictWriter(f, FIELDS).writerows(rows)
            for r in rows:
                print(r, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if failed:
        raise SystemExit("cp_bench --check: context-parallel results differ from one device")


if __name__ == "__main__":
    main()
