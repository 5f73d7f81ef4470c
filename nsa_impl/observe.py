"""Training-time observability of NSA layers: a collector that `nsa_attention` reports to.

`nsa_impl.nsa_attention` does nothing extra unless a `Collector` is active: it checks the
module-level `ACTIVE` (one ``is None`` test per call) and, when a collector is there, hands it the
branch outputs, gates, selected blocks, the plan's positions and its route
(`nsa_impl.dispatch.Route`) at the end of the call. Everything the collector
computes stays on the device (running sums in float32/float64 tensors); `Collector.summary` reads
it all at once. So a training loop activates a collector only on the steps it logs, and the other
steps pay nothing, not even a host sync::

    collector = observe.Collector()
    handles = collector.attach(model)         # labels each NSAAttention by its module name
    with collector:                           # on a logging step only
        loss = model(batch).loss
    loss.backward()
    stats = collector.summary()               # {"blocks.0.attn/sel/gate_mean": ..., ...}

Per layer and branch (``cmp``, ``sel``, ``win``), `summary` gives:

* ``gate_mean`` / ``gate_std``: the branch's gate over every (token, head) (pad tokens included),
  and ``gate_hist``: its distribution, counts in `GATE_BINS` equal bins over ``[0, 1]``;
* ``contrib``: mean ``|g_c * o_c|`` over every output element, the branch's share of Eq. 5;
* ``reads`` (``sel`` only): selected keys ``<= p`` per (query, KV group), averaged (spec I.9);
* ``path/<name>``: calls that ran the branch on that path, and ``fallbacks``: calls whose route
  passed over a preferred path that serves this device (`nsa_impl.dispatch.Decision.skipped`: a
  kernel declining the inputs, a length guard, a dtype it lacks); paths for another device
  (flash, triton on a CPU) do not count;
* ``time_ms`` (with ``NSA_DEBUG_TIMING=1`` or ``Collector(timing=True)``): forward time of the
  branch summed over the calls; CUDA events on a GPU (no sync until `summary`), wall time on a
  CPU. Forward only; the compressed branch's time includes compression, scoring and top-n, and a
  branch on the "reference" path carries the one `nsa_ref` evaluation it triggered.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

BRANCHES = ("cmp", "sel", "win")
#: Bins of the gate histograms over [0, 1].
GATE_BINS = 20

#: The collector `nsa_attention` reports to, or ``None`` (the default: nothing is recorded).
ACTIVE: Collector | None = None


def mark(name: str, like: torch.Tensor) -> None:
    """Timing mark between two stages of an `nsa_attention` call on ``like``'s device.

    A no-op unless a collector with timing is active. ``"begin"`` starts a call's marks; then
    one mark after each branch, in the order ``cmp``, ``sel``, ``win``.
    """
    if ACTIVE is not None and ACTIVE.timing:
        ACTIVE._mark(name, like.device)


class _LayerStats:
    """Device-side running sums of one layer (see `Collector.summary` for what they become)."""

    def __init__(self, device: torch.device):
        # [3 branches]: sum g, sum g^2, sum |g * o|; float64 so long sums do not lose digits.
        self.sums = torch.zeros(3, 3, dtype=torch.float64, device=device)
        self.hist = torch.zeros(3, GATE_BINS, dtype=torch.float64, device=device)
        self.gate_count = 0  # (token, head) pairs per branch, known on the host from shapes
        self.out_count = 0  # output elements per branch
        self.reads = torch.zeros((), dtype=torch.float64, device=device)
        self.read_rows = 0
        self.paths: dict[str, dict[str, int]] = {b: defaultdict(int) for b in BRANCHES}
        self.fallbacks = dict.fromkeys(BRANCHES, 0)
        self.times: dict[str, list] = {b: [] for b in BRANCHES}  # (start, end) marks


class Collector:
    """Per-layer, per-branch statistics of the `nsa_attention` calls made while it is active.

    Args:
        timing: time each branch's forward; default: the ``NSA_DEBUG_TIMING`` flag
            (`nsa_impl.routing.settings`).

    Use as a context manager (re-entrant contexts nest: the innermost collector records). Call
    `attach` once to label calls by the `NSAAttention` module that made them; calls outside any
    attached module are labelled ``"nsa_attention"``. `summary` returns the statistics and
    `reset` clears them.
    """

    def __init__(self, *, timing: bool | None = None):
        if timing is None:
            from .routing import settings

            timing = settings().debug_timing
        self.timing = bool(timing)
        self.layer = "nsa_attention"
        self._layers: dict[str, _LayerStats] = {}
        self._marks: list[tuple[str, object]] = []
        self._previous: list[Collector | None] = []

    # ------------------------------------------------------------------ activation

    def __enter__(self) -> Collector:
        global ACTIVE
        self._previous.append(ACTIVE)
        ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global ACTIVE
        ACTIVE = self._previous.pop()

    def attach(self, model: nn.Module) -> list:
        """Label calls by module name: a forward pre-hook on every `NSAAttention` in ``model``.

        Returns the hook handles (``handle.remove()`` detaches). The hooks only set a label; they
        cost nothing measurable when the collector is not active.
        """
        handles = []
        for name, module in model.named_modules():
            # NSAAttention says so by a class attribute (observe must not import the layer:
            # the layer imports the api, which imports observe)
            if getattr(module, "nsa_observed", False):
                handles.append(module.register_forward_pre_hook(self._labeller(name or "attn")))
        return handles

    def _labeller(self, name: str):
        def hook(module, args):
            self.layer = name

        return hook

    # ------------------------------------------------------------------ recording

    def _mark(self, name: str, device: torch.device) -> None:
        if name == "begin":  # marks left by a call that raised are dropped
            self._marks = []
        if device.type == "cuda":  # recorded on the stream, read in summary(): no sync here
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
            self._marks.append((name, event))
        else:
            self._marks.append((name, time.perf_counter()))

    def record(
        self,
        *,
        o_cmp: torch.Tensor,
        o_sel: torch.Tensor,
        o_win: torch.Tensor,
        gates: torch.Tensor,
        block_indices: torch.Tensor,
        sel_block: int,
        positions: torch.Tensor,
        route,
    ) -> None:
        """Accumulate one call (`nsa_attention` calls this at its end; no host sync).

        ``gates [B, T, H, 3]``, branch outputs ``[B, T, H, Dv]``, ``block_indices [B, T, G, n]``
        (``-1`` padded), ``positions [T]`` the tokens' positions in their sequences (the plan's
        device copy), ``route`` the `nsa_impl.dispatch.Route` of the call's plan.
        """
        with torch.no_grad():
            stats = self._layers.get(self.layer)
            if stats is None:
                stats = self._layers[self.layer] = _LayerStats(gates.device)
            g = gates.detach().float()
            outs = torch.stack([o.detach().float() for o in (o_cmp, o_sel, o_win)], dim=-1)
            per_branch = torch.stack(
                [
                    g.sum(dim=(0, 1, 2)),
                    g.square().sum(dim=(0, 1, 2)),
                    (g[..., None, :] * outs).abs().sum(dim=(0, 1, 2, 3)),
                ]
            )
            stats.sums += per_branch.double()
            hist = [torch.histc(g[..., c], bins=GATE_BINS, min=0.0, max=1.0) for c in range(3)]
            stats.hist += torch.stack(hist).double()
            stats.gate_count += g[..., 0].numel()
            stats.out_count += o_cmp.numel()

            # Selected keys <= p per (query, group): block j holds keys [j*l', (j+1)*l').
            idx = block_indices.detach()
            p = positions.to(idx.device, non_blocking=True).view(1, -1, 1, 1)
            per_block = (p + 1 - idx * sel_block).clamp(0, sel_block).masked_fill(idx < 0, 0)
            stats.reads += per_block.sum(dtype=torch.float64)
            stats.read_rows += idx[..., 0].numel()

        device = gates.device.type
        for branch, decision in route.items():
            stats.paths[branch][decision.path] += 1
            if _fell_back(decision, device):
                stats.fallbacks[branch] += 1
        if self._marks:
            names = [name for name, _ in self._marks]
            if names == ["begin", *BRANCHES]:
                for i, branch in enumerate(BRANCHES):
                    stats.times[branch].append((self._marks[i][1], self._marks[i + 1][1]))
            self._marks = []

    # ------------------------------------------------------------------ reading

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._layers.clear()
        self._marks = []

    def summary(self) -> dict[str, float | list[float]]:
        """Flat ``{"<layer>/<branch>/<metric>": value}`` of everything recorded (see module doc);
        values are floats, ``gate_hist`` a list of `GATE_BINS` counts.

        Reads the device once (one stacked copy) plus the timing events; call it on logging steps.
        """
        if not self._layers:
            return {}
        names = list(self._layers)
        sums = torch.stack([self._layers[n].sums for n in names]).cpu()
        hists = torch.stack([self._layers[n].hist for n in names]).cpu()
        reads = torch.stack([self._layers[n].reads for n in names]).cpu()
        events = [end for n in names for t in self._layers[n].times.values() for _, end in t]
        for event in events:
            if not isinstance(event, float):
                event.synchronize()
        out: dict[str, float] = {}
        for i, name in enumerate(names):
            st = self._layers[name]
            for b, branch in enumerate(BRANCHES):
                key = f"{name}/{branch}"
                s, sq, contrib = (float(x) for x in sums[i, :, b])
                if st.gate_count:
                    mean = s / st.gate_count
                    out[f"{key}/gate_mean"] = mean
                    out[f"{key}/gate_std"] = math.sqrt(max(sq / st.gate_count - mean * mean, 0.0))
                    out[f"{key}/gate_hist"] = hists[i, b].tolist()
                if st.out_count:
                    out[f"{key}/contrib"] = contrib / st.out_count
                for path, calls in st.paths[branch].items():
                    out[f"{key}/path/{path}"] = float(calls)
                out[f"{key}/fallbacks"] = float(st.fallbacks[branch])
                if st.times[branch]:
                    out[f"{key}/time_ms"] = sum(_elapsed_ms(a, b_) for a, b_ in st.times[branch])
            if st.read_rows:
                out[f"{name}/sel/reads"] = float(reads[i]) / st.read_rows
        return out

    @property
    def layers(self) -> Iterable[str]:
        """Labels of the layers recorded so far, in first-call order."""
        return list(self._layers)


def _fell_back(decision, device: str) -> bool:
    """Whether the route passed over a preferred path declared for ``device``."""
    from .dispatch import PATHS

    return any(device in PATHS[name].devices for name, _ in decision.skipped)


def _elapsed_ms(start, end) -> float:
    if isinstance(start, float):
        return (end - start) * 1e3
    return float(start.elapsed_time(end))
