"""A few eager decode steps of one case, for a profiler to attach to (``ncu``, nsys).

Loads a Triton-path cache (bf16, 64 heads in 4 groups, D = 128, the paper's config) with
``B`` sequences of ``T - 1`` random tokens (`bench/decode_bench.py`'s ``load_cache``), then runs
``--steps`` eager `NSACache.step` calls (four kernel launches each; the first also compiles).

    ncu --clock-control none -k regex:"_(cmp_win|score|sel|combine)_kernel" --launch-skip 4 \\
        --launch-count 4 --section SpeedOfLight python3 bench/decode_once.py --B 32 --T 65536
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to run")
        return 1
    from bench import decode_bench
    from nsa_impl import NSAConfig

    cfg = NSAConfig()
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = decode_bench.load_cache(cfg, [args.T - args.steps] * args.B, args.T, gen)
    with torch.no_grad():
        for _ in range(args.steps):
            q, k, v, gates = decode_bench.step_inputs(args.B, gen)
            cache.step(q, k, v, gates, validate=False)
    torch.cuda.synchronize()
    print(f"B={args.B} T={args.T}: {args.steps} steps, splits {cache.splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
