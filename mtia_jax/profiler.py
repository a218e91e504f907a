"""Profiling compiled programs on the modeled chip.

Every time here is *modeled* by mtia-jax's performance model, not measured.

A trace of every compiled-program call in a block, for Perfetto
(https://ui.perfetto.dev) or chrome://tracing::

    with mtia_jax.profiler.trace("/tmp/serve.trace.json"):
        for batch in batches:
            step(batch)

or ``start_trace(path)`` ... ``stop_trace()``. One process per device, one
thread per stream (compute, dma, network, host), one event per kernel named
``"<kind> @ <file>:<line>"``; calls run back to back on the device's modeled
clock. Traces may nest; each writes the calls made while it was active.

The per-kernel table of one compiled program::

    print(compiled.profile())        # sorted by modeled time, with a total row
    compiled.profile().rows          # the same as ProfileRow records
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from typing import Any, Iterator, Sequence

from runtime import trace as _trace
from runtime.cost_model import ProgramCost

# ------------------------------------------------------------------ traces


class Trace:
    """One recording. ``path`` is where it is (or will be) written."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._recorder = _trace.Recorder()

    @property
    def num_calls(self) -> int:
        """Compiled-program calls recorded so far."""
        return len(self._recorder.calls)

    def trace_events(self) -> dict[str, Any]:
        """The recording as a trace-event JSON object (what ``stop`` writes)."""
        return _trace.chrome_trace(self._recorder)

    def start(self) -> "Trace":
        self._recorder.start()
        return self

    def stop(self) -> pathlib.Path:
        """Stop recording and write the trace; returns the file written."""
        self._recorder.stop()
        self.path = _trace.write(self.trace_events(), self.path)
        return self.path


@contextlib.contextmanager
def trace(path: str | os.PathLike) -> Iterator[Trace]:
    """Record every compiled-program call in the block; write the trace-event
    JSON to ``path`` on exit (also when the block raises)."""
    recording = Trace(path).start()
    try:
        yield recording
    finally:
        recording.stop()


_session: Trace | None = None


def start_trace(path: str | os.PathLike) -> Trace:
    """Start recording until :func:`stop_trace` (one such recording at a time;
    ``trace`` blocks may still nest inside it)."""
    global _session
    if _session is not None:
        raise RuntimeError(f"mtia_jax.profiler: a trace to {_session.path} is already started; "
                           f"call mtia_jax.profiler.stop_trace() first")
    _session = Trace(path).start()
    return _session


def stop_trace() -> pathlib.Path:
    """Stop the recording begun by :func:`start_trace`; returns the file written."""
    global _session
    if _session is None:
        raise RuntimeError("mtia_jax.profiler.stop_trace(): no trace started; "
                           "call mtia_jax.profiler.start_trace(path) first")
    session, _session = _session, None
    return session.stop()


# ---------------------------------------------------------------- profiles


@dataclasses.dataclass(frozen=True)
class ProfileRow:
    """One kernel of a program: totals over its ``count`` executions per call."""

    name: str        # "<kind> @ <file>:<line>"
    kind: str
    path: str        # op path in the final IR, e.g. "3" or "2/body/5"
    source: str      # the user's source line, "file:line (function)"
    count: float
    flops: float
    hbm_bytes: float
    time_s: float    # modeled
    share: float     # of the program's modeled time, 0..1
    bound: str       # "compute", "memory", "launch", "network" or "host"
    stream: str
    algorithm: str = ""  # a collective's algorithm (``lowering.network.describe``)


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


class Profile:
    """The modeled per-kernel profile of one compiled program on one chip.

    ``rows`` are sorted by modeled time, longest first; ``str(profile)`` is
    an aligned table of them with a total row.
    """

    COLUMNS = ("kernel", "path", "count", "FLOPs", "HBM bytes", "modeled us", "share",
               "bound", "source")
    _LEFT = {"kernel", "path", "bound", "source"}

    def __init__(self, chip: str, rows: Sequence[ProfileRow], time_s: float,
                 roofline_time_s: float, unmeasured_loops: Sequence[str] = ()):
        self.chip = chip
        self.rows = tuple(rows)
        self.time_s = time_s
        self.roofline_time_s = roofline_time_s
        self.unmeasured_loops = tuple(unmeasured_loops)

    @classmethod
    def from_cost(cls, cost: ProgramCost) -> "Profile":
        total = cost.time_s
        rows = [ProfileRow(name=_trace.event_name(k), kind=k.kind, path=k.path, source=k.source,
                           count=k.count, flops=k.flops, hbm_bytes=k.hbm_bytes, time_s=k.time_s,
                           share=k.time_s / total if total > 0 else 0.0, bound=_trace.kernel_bound(k),
                           stream=k.stream, algorithm=k.algorithm)
                for k in cost.kernels]
        rows.sort(key=lambda r: -r.time_s)  # stable: ties keep program order
        return cls(cost.chip, rows, total, cost.roofline_time_s, cost.assumed_loops)

    @property
    def flops(self) -> float:
        return float(sum(r.flops for r in self.rows))

    @property
    def hbm_bytes(self) -> float:
        return float(sum(r.hbm_bytes for r in self.rows))

    def __iter__(self) -> Iterator[ProfileRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _cells(self, row: ProfileRow) -> tuple[str, ...]:
        kind = f"{row.kind} ({row.algorithm})" if row.algorithm else row.kind
        return (kind, row.path, _count(row.count), _si(row.flops, "FLOP"),
                _si(row.hbm_bytes, "B"), f"{row.time_s * 1e6:.3f}", f"{row.share:.1%}",
                row.bound, row.source)

    def table(self) -> str:
        kernels = f"{len(self.rows)} kernel{'' if len(self.rows) == 1 else 's'}"
        header = (f"Times modeled on {self.chip} (a performance model, not a measurement): "
                  f"{kernels}, {self.time_s * 1e6:.3f} us, roofline "
                  f"{self.roofline_time_s * 1e6:.3f} us")
        total = ("total", "", _count(sum(r.count for r in self.rows)), _si(self.flops, "FLOP"),
                 _si(self.hbm_bytes, "B"), f"{self.time_s * 1e6:.3f}",
                 f"{1.0 if self.rows else 0.0:.1%}", "", "")
        body = [self._cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in (self.COLUMNS, total, *body))
                  for i in range(len(self.COLUMNS))]

        def line(cells: Sequence[str]) -> str:
            text = "  ".join(c.ljust(w) if name in self._LEFT else c.rjust(w)
                             for c, w, name in zip(cells, widths, self.COLUMNS))
            return text.rstrip()

        rule = "-" * len(line(["-" * w for w in widths]))
        loops = [f"unmeasured loop (charged 1 trip per execution: run the program, or pass "
                 f"estimate(..., loop_trips=...)): {loop}" for loop in self.unmeasured_loops]
        return "\n".join([header, line(self.COLUMNS), rule, *map(line, body), rule, line(total),
                          *loops])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"<Profile on {self.chip}: {len(self.rows)} kernels, "
                f"{self.time_s * 1e6:.3f} us modeled>")


__all__ = ["trace", "start_trace", "stop_trace", "Trace", "Profile", "ProfileRow"]
