"""Greedy generation throughput of the toy NSA LM against the same model with dense attention.

Model: `nsa_impl.model.NSAToyLM` with the paper's NSA config, hidden 1024, 16 query heads in 4
KV groups, head_dim 128, RoPE, 4 layers, SwiGLU 2048, vocab 8192, bf16, batch ``--batch``.
For each context (8k, 32k, 64k tokens at the end of generation) the prompt is prefilled and
tokens are generated greedily; tokens/s is measured on the decode steps only, as the
difference of two runs with ``N1`` and ``N2`` new tokens (prefill and capture cancel out).

Variants (same weights):

* ``nsa-graph``: `NSAToyLM.generate(cuda_graph=True)`, one captured model step replayed;
* ``nsa-eager``: `NSAToyLM.generate()`, every step from Python (launch-bound);
* ``dense-graph``: attention = one query over a static K/V buffer (``q @ K^T``, a length mask,
  softmax, ``@ V``: the full cache is read), captured like ``nsa-graph``;
* ``dense-eager``: attention = PyTorch SDPA (flash/cuDNN) over exactly the cached keys.

Prints the machine line and a table; writes ``<out>.csv``, ``<out>.md`` and ``<out>.png``
(matplotlib). Never asserts on time. ``--smoke`` runs the eager variants of a tiny float32
model on the CPU (contexts 48 and 96): the script's own check, in the CPU suite; its numbers
mean nothing.

    python bench/generate_bench.py --out bench/results/h200_generate [--contexts 8192,32768]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.decode_bench import machine_line  # noqa: E402
from nsa_impl import NSAConfig  # noqa: E402
from nsa_impl.model import NSAToyLM  # noqa: E402
from nsa_impl.module import apply_rope, rope_cos_sin  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=128,
             num_layers=4, intermediate_size=2048, rope=True)
#: ``--smoke``: a model and a config small enough for the CPU (float32, eager variants only).
SMOKE_MODEL = dict(vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                   num_layers=2, intermediate_size=64, rope=True)
SMOKE_CONFIG = dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=16)
VARIANTS = ("nsa-graph", "nsa-eager", "dense-graph", "dense-eager")


class DenseCache:
    """Static K/V buffers ``[B, G, max_len, D]`` of one layer and the sequences' length."""

    def __init__(self, B, G, D, max_len, like: torch.Tensor):
        self.k = like.new_zeros(B, G, max_len, D)
        self.v = like.new_zeros(B, G, max_len, D)
        self.length = 0  # host copy: the eager path slices the cache with it
        self.dev_len = torch.zeros(1, dtype=torch.long, device=like.device)  # graph-safe copy


def dense_attention(layer, x, cache: DenseCache, graph: bool) -> torch.Tensor:
    """The NSA layer's projections and RoPE with dense attention over ``cache`` (no gates)."""
    B, T, _ = x.shape
    H, G, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    if cache.length == 0:
        pos = torch.arange(T, device=x.device)
    else:
        pos = cache.dev_len + torch.arange(T, device=x.device)
    q = layer.q_proj(x).view(B, T, H, D)
    k = layer.k_proj(x).view(B, T, G, D)
    v = layer.v_proj(x).view(B, T, G, D)
    cos, sin = rope_cos_sin(pos, D, layer.rope_theta, x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
    if cache.length == 0:  # prompt: causal SDPA, then store
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        cache.k[:, :, :T], cache.v[:, :, :T] = k, v
    elif graph:  # static shapes: write at the device length, attend over the whole buffer
        cache.k.index_copy_(2, cache.dev_len, k)
        cache.v.index_copy_(2, cache.dev_len, v)
        qg = q.reshape(B, G, H // G, D)
        scores = (qg @ cache.k.transpose(-1, -2)).float() * layer.scale
        keys = torch.arange(cache.k.shape[2], device=x.device)
        scores = scores.masked_fill(keys > cache.dev_len, -math.inf)
        o = (torch.softmax(scores, -1).to(v.dtype) @ cache.v).reshape(B, H, 1, D)
    else:
        L = cache.length
        cache.k[:, :, L : L + 1], cache.v[:, :, L : L + 1] = k, v
        o = F.scaled_dot_product_attention(q, cache.k[:, :, : L + 1], cache.v[:, :, : L + 1],
                                           enable_gqa=True)
    cache.dev_len += T  # device positions (RoPE, the graph's write index) in every mode
    if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        cache.length += T
    return layer.o_proj(o.transpose(1, 2).reshape(B, T, H * D))


def dense_forward(model: NSAToyLM, tokens, caches, graph: bool) -> torch.Tensor:
    """`NSAToyLM.forward` with every block's attention replaced by `dense_attention`."""
    x = model.embed(tokens)
    for block, cache in zip(model.blocks, caches, strict=True):
        x = x + dense_attention(block.attn, block.attn_norm(x), cache, graph)
        x = x + block.mlp(block.mlp_norm(x))
    return model.head(model.norm(x))


@torch.no_grad()
def dense_generate(model, prompt, new_tokens: int, graph: bool) -> torch.Tensor:
    """Greedy decoding with `dense_forward` (the structure of `NSAToyLM.generate`)."""
    B, T0 = prompt.shape
    blk = model.blocks[0].attn
    caches = [DenseCache(B, blk.num_kv_heads, blk.head_dim, T0 + new_tokens, model.head.weight)
              for _ in model.blocks]
    out = [prompt, dense_forward(model, prompt, caches, graph)[:, -1:].argmax(-1)]
    if not graph:
        for _ in range(new_tokens - 1):
            out.append(dense_forward(model, out[-1], caches, False)[:, -1:].argmax(-1))
        return torch.cat(out, 1)
    out.append(dense_forward(model, out[-1], caches, True)[:, -1:].argmax(-1))  # warm
    static = out[-1].clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static.copy_(dense_forward(model, static, caches, True)[:, -1:].argmax(-1))
    for _ in range(new_tokens - 2):
        g.replay()
        out.append(static.clone())
    return torch.cat(out, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(model, variant, prompt, new_tokens) -> float:
    """Seconds for one generation of ``new_tokens`` tokens (prefill included)."""
    _sync(prompt.device)
    t = time.perf_counter()
    if variant.startswith("nsa"):
        model.generate(prompt, new_tokens, cuda_graph=variant == "nsa-graph")
    else:
        dense_generate(model, prompt, new_tokens, graph=variant == "dense-graph")
    _sync(prompt.device)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/generate")
    ap.add_argument("--contexts", default="8192,32768,65536")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n1", type=int, default=16)
    ap.add_argument("--n2", type=int, default=144)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget-s", type=float, default=85.0,
                    help="start no cell after this many seconds (the rest are listed as skipped)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny float32 model, eager variants, on the CPU (a check of the script)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.smoke:
        spec, cfg = SMOKE_MODEL, NSAConfig(**SMOKE_CONFIG)
        device, dtype = torch.device("cpu"), torch.float32
        if args.contexts == ap.get_default("contexts"):
            args.contexts = "48,96"
        if args.variants == ap.get_default("variants"):
            args.variants = "nsa-eager,dense-eager"
        if (args.n1, args.n2) == (ap.get_default("n1"), ap.get_default("n2")):
            args.n1, args.n2 = 2, 6
        graphed = [v for v in args.variants.split(",") if v.endswith("graph")]
        if graphed:
            ap.error(f"--smoke runs on the CPU: no CUDA graphs ({', '.join(graphed)})")
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (--smoke runs a tiny model on the CPU)")
        return 1
    else:
        spec, cfg = MODEL, NSAConfig()
        device, dtype = torch.device("cuda"), torch.bfloat16
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    if not 1 <= args.n1 < args.n2:
        ap.error(f"need 1 <= --n1 < --n2, got {args.n1}, {args.n2}")
    contexts = [int(c) for c in args.contexts.split(",")]
    if any(c <= args.n2 for c in contexts):
        ap.error(f"every context must exceed --n2={args.n2} (the prompt is context - n2 tokens)")
    print(machine_line(), flush=True)
    model = NSAToyLM(config=cfg, **spec).to(device, dtype).eval()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    rows = []
    for ctx in contexts:
        prompt = torch.randint(0, spec["vocab_size"], (args.batch, ctx - args.n2),
                               device=device)
        for variant in args.variants.split(","):
            row = dict(context=ctx, variant=variant, batch=args.batch)
            if time.monotonic() > deadline:
                row["error"] = f"skipped (time budget of {args.budget_s:.0f} s spent)"
            else:
                try:
                    run_once(model, variant, prompt, args.n1)  # compile / warm-up
                    t1 = run_once(model, variant, prompt, args.n1)
                    t2 = run_once(model, variant, prompt, args.n2)
                    per_token = (t2 - t1) / (args.n2 - args.n1)
                    if per_token > 0:
                        row.update(ms_per_token=per_token * 1e3,
                                   tokens_per_s=args.batch / per_token)
                    else:  # the difference drowned in noise: no number rather than a wrong one
                        row["error"] = (f"noise: {args.n2} tokens took no longer than {args.n1} "
                                        f"({t2:.4f} s vs {t1:.4f} s); raise --n2")
                except Exception as exc:  # noqa: BLE001 - report the cell, keep going
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            print("  ", row, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_outputs(rows, args.batch, out, spec, final=False)  # a timeout keeps the rows
    write_outputs(rows, args.batch, out, spec, final=True)
    return 0


def write_outputs(rows, batch: int, out: Path, spec: dict, *, final: bool) -> None:
    """Markdown table (printed when ``final``), CSV and the tokens/s plot."""
    lines = [machine_line(), "", f"toy LM {spec}, batch {batch}", "",
             "| context | " + " | ".join(f"{v} tok/s" for v in VARIANTS) + " | nsa-graph / "
             "dense-graph |", "|" + "---|" * (len(VARIANTS) + 2)]
    for ctx in sorted({r["context"] for r in rows}):
        got = {r["variant"]: r.get("tokens_per_s") for r in rows if r["context"] == ctx}
        ratio = (got.get("nsa-graph") or math.nan) / (got.get("dense-graph") or math.nan)
        cells = " | ".join("-" if got.get(v) is None else f"{got[v]:.0f}" for v in VARIANTS)
        lines.append(f"| {ctx} | {cells} | {ratio:.2f} |")
    errors = [f"{r['context']} {r['variant']}: {r['error']}" for r in rows if r.get("error")]
    table = "\n".join(lines + ([""] + errors if errors else []))
    if final:
        print("\n" + table, flush=True)
    out.with_suffix(".md").write_text(table + "\n")
    fields = ["context", "variant", "batch", "tokens_per_s", "ms_per_token", "error"]
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})
    if not final:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in VARIANTS:
        pts = [(r["context"], r["tokens_per_s"]) for r in rows
               if r["variant"] == v and r.get("tokens_per_s")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"tokens / s (greedy, batch {batch})")
    ax.set_title("Toy LM generation: NSA vs dense attention (bf16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
