"""Is a path's forward+backward bit-reproducible on this GPU, and which op is not?

    python bench/determinism_probe.py [--paths masked,packed,varlen,triton] \
        [--dtypes float64,bfloat16]

For each forced path and dtype: runs one small NSA forward+backward twice on identical inputs and
reports whether the output and the gradients are bit-identical; then once more under
``torch.use_deterministic_algorithms(True)``, which raises at the first op without a
deterministic CUDA implementation and so names it. The NaN-containment clauses (NSA-NAN-ROWS,
NSA-NAN-VARLEN-ISOLATION) compare a clean and a dirty run bit for bit: a path that is not
reproducible run to run fails them whatever its containment. Prints one line per case; never
asserts (a diagnostic, run by hand or by bench/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _run(path: str, dtype: torch.dtype, seed: int = 0):
    import nsa_impl
    from nsa_impl import dispatch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, T, G, h, D = 2, 300, 2, 16, 64
    q = torch.randn(B, T, G * h, D, device="cuda", generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(B, T, G, D, device="cuda", generator=gen).to(dtype).requires_grad_()
            for _ in range(2))  # fmt: skip
    gates = torch.rand(B, T, G * h, 3, device="cuda", generator=gen).to(dtype).requires_grad_()
    cfg = nsa_impl.NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_top_n=4, window=64)
    forced = {"triton": {"cmp": "triton", "sel": "triton", "win": "triton"}}.get(
        path,
        {"sel": path} if path in ("packed", "varlen") else {b: path for b in ("cmp", "sel", "win")},
    )
    with dispatch.force_path(**forced):
        p = nsa_impl.plan(q.shape, cfg, kv_heads=G, device="cuda", dtype=dtype, backward=True)
    o = nsa_impl.nsa_attention(q, k, v, gates, cfg, plan=p, validate=False)
    grads = torch.autograd.grad(o.float().square().sum(), (q, k, v, gates))
    return p.route.paths(), [o.detach(), *grads]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="masked,packed,varlen,triton")
    ap.add_argument("--dtypes", default="float64,bfloat16")
    args = ap.parse_args(argv)
    # cuBLAS is deterministic with a fixed workspace; without this the deterministic mode's
    # first complaint would be every matmul, hiding the op we look for
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to probe")
        return 2
    names = ["o", "dq", "dk", "dv", "dgates"]
    for path in args.paths.split(","):
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            try:
                route, a = _run(path, dtype)
                _, b = _run(path, dtype)
            except Exception as exc:  # a path that cannot serve the case says why
                print(f"{path:7s} {dname:9s} cannot run: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            diff = [n for n, x, y in zip(names, a, b, strict=True) if not torch.equal(x, y)]
            culprit = "-"
            if diff:
                torch.use_deterministic_algorithms(True)
                try:
                    _run(path, dtype)
                    culprit = "none raised"
                except RuntimeError as exc:
                    culprit = str(exc).splitlines()[0][:200]
                finally:
                    torch.use_deterministic_algorithms(False)
            print(f"{path:7s} {dname:9s} route {route}: "
                  f"{'bit-identical' if not diff else 'DIFFERS in ' + ','.join(diff)}; "
                  f"nondeterministic op: {culprit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
