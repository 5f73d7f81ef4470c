"""``python -m nsa_impl.train``: train a byte-level LM with NSA (or dense) attention.

Examples::

    python -m nsa_impl.train --out runs/nsa --steps 200                  # tiny CPU run
    python -m nsa_impl.train --out runs/dense --attention dense --steps 200
    python -m nsa_impl.train --out runs/nsa --resume --steps 400          # continue
    python -m nsa_impl.train.report runs/nsa runs/dense --out runs/report

Flags left out take `TrainConfig`'s defaults; with ``--resume`` they take the checkpoint's, and
only run-control flags (steps, logging, device, time limit...) may differ from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .loop import CHECKPOINT, DTYPES, NSA_CONFIGS, TrainConfig, load_checkpoint, train


def _bool_flag(group, name: str, help: str) -> None:
    group.add_argument(f"--{name}", dest=name.replace("-", "_"), action="store_true", help=help)
    group.add_argument(f"--no-{name}", dest=name.replace("-", "_"), action="store_false")


def build_parser() -> argparse.ArgumentParser:
    """The command line (every default is `TrainConfig`'s; shown in ``--help``)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m nsa_impl.train",
        description="Train a byte-level language model with NSA or dense attention.",
        argument_default=argparse.SUPPRESS,  # only flags given explicitly reach the config
    )
    m = p.add_argument_group("model")
    m.add_argument("--attention", choices=["nsa", "dense"], help=f"default {d.attention}")
    for name, help_ in [
        ("layers", "decoder blocks"),
        ("hidden", "model width"),
        ("heads", "query heads"),
        ("kv-heads", "KV groups (GQA)"),
        ("head-dim", "head size"),
        ("intermediate", "MLP width (default 4*hidden)"),
        ("gate-hidden", "NSA gate MLP width (default: one linear layer)"),
    ]:
        default = getattr(d, name.replace("-", "_"))
        shown = "" if default is None else f"; default {default}"
        m.add_argument(f"--{name}", type=int, help=help_ + shown)
    _bool_flag(m, "rope", f"rotary position embedding (default {'on' if d.rope else 'off'})")
    m.add_argument("--phi", choices=["mean", "mlp"], help=f"NSA compression; default {d.phi}")
    m.add_argument("--nsa-config", choices=sorted(NSA_CONFIGS), help=f"default {d.nsa_config}")
    for name in ("cmp-block", "cmp-stride", "sel-block", "sel-top-n", "sel-init-blocks",
                 "sel-local-blocks", "window"):  # fmt: skip
        m.add_argument(f"--{name}", type=int, help="override the named NSA config's field")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text files/directories (default: the standard library's .py sources)",
    )
    g.add_argument("--seq-len", type=int, help=f"longest document piece; default {d.seq_len}")
    g.add_argument(
        "--batch-tokens",
        type=int,
        help=f"tokens per packed batch (padding included); default {d.batch_tokens}",
    )
    g.add_argument("--batch-size", type=int, help="sets --batch-tokens to BATCH_SIZE * seq-len")
    g.add_argument("--eval-fraction", type=float, help=f"default {d.eval_fraction}")
    g.add_argument("--eval-batches", type=int, help=f"default {d.eval_batches}")
    g.add_argument("--train-bytes", type=int, help="use only this many training bytes")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help=f"default {d.steps}")
    for name in ("lr", "min-lr-ratio", "weight-decay", "beta1", "beta2", "grad-clip"):
        default = getattr(d, name.replace("-", "_"))
        o.add_argument(f"--{name}", type=float, help=f"default {default}")
    o.add_argument("--warmup", type=int, help=f"warmup steps; default {d.warmup}")

    r = p.add_argument_group("run")
    r.add_argument("--device", help=f"default {d.device}")
    r.add_argument("--dtype", choices=sorted(DTYPES), help=f"autocast dtype; default {d.dtype}")
    r.add_argument("--seed", type=int, help=f"default {d.seed}")
    r.add_argument("--out", help=f"run directory; default {d.out}")
    r.add_argument("--resume", action="store_true", default=False,
                   help="continue from OUT/checkpoint.pt")  # fmt: skip
    for name, help_ in [
        ("log-every", f"steps per logged record; default {d.log_every}"),
        ("eval-every", f"steps between evaluations; default {d.eval_every}"),
        ("ckpt-every", "steps between checkpoints; default: --eval-every"),
        ("threads", "CPU threads (torch.set_num_threads); default: torch's"),
    ]:
        r.add_argument(f"--{name}", type=int, help=help_)
    r.add_argument(
        "--stop-at", type=int, help="stop after this step (checkpointed); --resume goes on"
    )
    r.add_argument("--time-limit", type=float, help="seconds of training, then stop cleanly")
    _bool_flag(r, "progress", "progress bar (tqdm if installed)")
    _bool_flag(r, "tensorboard", "TensorBoard events in OUT/tb (default: when installed)")
    r.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms where PyTorch has them (docs/determinism.md)",
    )
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """``(config, resume)`` from the command line (see the module docstring)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    batch_size = args.pop("batch_size", None)
    if batch_size is not None:
        if "batch_tokens" in args:
            parser.error("give --batch-tokens or --batch-size, not both")
        if batch_size <= 0:
            parser.error(f"--batch-size must be positive, got {batch_size}")
    if resume:
        out = Path(args.get("out", TrainConfig.out))
        saved = load_checkpoint(out / CHECKPOINT)["config"]
        base = dataclasses.replace(TrainConfig(**saved), stop_at=None)  # the stop was that run's
    else:
        base = TrainConfig()
    cfg = dataclasses.replace(base, **args)
    if batch_size is not None:
        cfg.batch_tokens = batch_size * cfg.seq_len
    try:
        cfg.validate()
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return cfg, resume


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the result summary as JSON."""
    cfg, resume = config_from_args(argv)
    result = train(cfg, resume=resume)
    print(json.dumps(dataclasses.asdict(result)), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
