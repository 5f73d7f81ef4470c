"""Training command: ``python -m nsa_impl.train`` (NSA or dense attention, byte-level LM).

* `loop`: `TrainConfig`, `train` (AdamW, warmup + cosine, clipping, autocast/GradScaler,
  checkpoints that resume bit for bit on the CPU, metrics every ``log_every`` steps);
* `corpus`: the default corpus (the standard library's ``.py`` sources) or ``--data`` files,
  with a deterministic held-out split;
* `metrics`: ``DIR/metrics.jsonl`` (+ TensorBoard when installed);
* `report`: ``python -m nsa_impl.train.report DIR [DIR ...]``, PNG plots and CSV of runs.

Run ``python -m nsa_impl.train --help`` for the flags.
"""

from .loop import NSA_CONFIGS, TrainConfig, TrainResult, build_model, train

__all__ = ["NSA_CONFIGS", "TrainConfig", "TrainResult", "build_model", "train"]
