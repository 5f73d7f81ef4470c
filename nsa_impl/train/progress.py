"""Progress display: tqdm when it is installed and stderr is a terminal, else one plain line per
logging step (readable in a log file).

Neither path reads the device: the caller passes numbers it already read on a logging step.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar over ``total`` steps starting at ``initial``.

    Args:
        total: the last step.
        initial: steps already done (resume).
        enabled: ``False`` shows nothing.
        desc: label in front of the bar.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = ""):
        self.total, self.step, self.enabled, self.desc = total, initial, enabled, desc
        self._bar = None
        self._t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        """``n`` more steps done (no output without tqdm)."""
        self.step += n
        if self._bar is not None:
            self._bar.update(n)

    def show(self, **values: float) -> None:
        """Show the latest metrics (a logging step): tqdm's postfix or one line on stderr."""
        if not self.enabled:
            return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=True)
            return
        elapsed = time.perf_counter() - self._t0
        fields = " ".join(f"{k} {v}" for k, v in text.items())
        print(f"{self.desc} step {self.step}/{self.total} {fields} ({elapsed:.0f}s)",
              file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
