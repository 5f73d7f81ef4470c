"""Metrics output of a training run: ``DIR/metrics.jsonl`` (always) and TensorBoard (optional).

Each line of ``metrics.jsonl`` is one JSON object with a ``"kind"`` (``"train"``: a logging
step, ``"eval"``: an evaluation) and a ``"step"``; the other keys are the metrics (numbers, or a
list for a histogram). TensorBoard event files go to ``DIR/tb`` when
``torch.utils.tensorboard`` can be imported (the ``tensorboard`` package), scalars only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    """JSON-safe: non-finite floats become strings ("nan", "inf") instead of invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends records to ``DIR/metrics.jsonl`` (and TensorBoard scalars when available).

    Args:
        out_dir: the run directory (created).
        tensorboard: ``True`` requires TensorBoard, ``False`` never uses it, ``None`` uses it
            when it can be imported.
        resume_step: when resuming from a checkpoint at this step, records of later steps (written
            after the checkpoint by the interrupted run) are dropped first, so the file reads as
            one continuous run.
    """

    def __init__(self, out_dir: Path, *, tensorboard: bool | None = None, resume_step=None):
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                if tensorboard:
                    raise RuntimeError(
                        f"--tensorboard needs the tensorboard package: {exc}"
                    ) from exc
            else:
                self._tb = SummaryWriter(str(Path(out_dir) / "tb"))

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are written."""
        return self._tb is not None

    def write(self, record: dict) -> None:
        """Append one record (flushed at once, so a crash loses nothing already logged)."""
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()
        if self._tb is not None:
            step, kind = record["step"], record.get("kind", "train")
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Close the files."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a directory is taken to hold one)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON record ({exc})") from None
    return records
