"""Recording compiled-program calls and exporting them as a trace.

While a recorder is active (``mtia_jax.profiler.trace``), every call of a
compiled program is recorded with its device and (for programs with while
loops) its trip counts. On export each call's modeled kernels become Chrome
trace events (the JSON "trace event format" that Perfetto and
chrome://tracing open): one process per device, one thread per stream
(compute, dma, network, host), one complete ("X") event per kernel. Times are
on the device's *modeled* clock: calls run back to back, starting at the
device's modeled busy time when the recorder first saw it.

Recording is a tuple append; costs of programs with while loops are resolved
(which waits for their trip counts) only at export.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import threading
from typing import Any, Callable, Mapping, NamedTuple

from runtime.cost_model import KernelCost, ProgramCost
from runtime.device import Device

STREAMS = ("compute", "dma", "network", "host")

# The active recorders. Replaced, never mutated, so the call path can read
# it without a lock; an empty tuple means "not tracing".
ACTIVE: tuple["Recorder", ...] = ()
_ACTIVE_LOCK = threading.Lock()


class _Call(NamedTuple):
    device: Device
    program: str
    cost_for: Callable[[Mapping[str, Any] | None], ProgramCost]
    trip_counts: Mapping[str, Any] | None


class Recorder:
    """The calls made while it is active."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.clock0: dict[Device, float] = {}  # device busy time before its first call

    def start(self) -> "Recorder":
        global ACTIVE
        with _ACTIVE_LOCK:
            ACTIVE = (*ACTIVE, self)
        return self

    def stop(self) -> "Recorder":
        global ACTIVE
        with _ACTIVE_LOCK:
            ACTIVE = tuple(r for r in ACTIVE if r is not self)
        return self

    def add(self, call: _Call) -> None:
        if call.device not in self.clock0:
            self.clock0[call.device] = call.device.stats.busy_s
        self.calls.append(call)


def record_call(device: Device, program: str,
                cost_for: Callable[[Mapping[str, Any] | None], ProgramCost],
                trip_counts: Mapping[str, Any] | None) -> None:
    """Record one call on every active recorder. Call it before the call's
    cost is added to ``device.stats``."""
    call = _Call(device, program, cost_for, trip_counts or None)
    for recorder in ACTIVE:
        recorder.add(call)


# ------------------------------------------------------------ export

def event_name(k: KernelCost) -> str:
    """"<kind> @ <file>:<line>" (the file's base name), or the kind alone."""
    if not k.source:
        return k.kind
    location = k.source.rsplit(" (", 1)[0]  # "file:line (function)" -> "file:line"
    file, _, line = location.rpartition(":")
    return f"{k.kind} @ {os.path.basename(file)}:{line}" if file else f"{k.kind} @ {location}"


def kernel_bound(k: KernelCost) -> str:
    """compute, memory, launch, or host (no MTIA kernel: runs on the host)."""
    return "host" if k.stream == "host" else k.bound


def chrome_trace(recorder: Recorder) -> dict[str, Any]:
    """The recorded calls as a Chrome/Perfetto trace-event JSON object."""
    events: list[dict[str, Any]] = []
    pids: dict[Device, int] = {}
    tids: dict[Device, dict[str, int]] = {}
    clock = dict(recorder.clock0)

    def thread(device: Device, stream: str) -> int:
        streams = tids[device]
        if stream not in streams:
            streams[stream] = len(streams) + 1
            for name, value in (("thread_name", {"name": stream}),
                                ("thread_sort_index", {"sort_index": streams[stream]})):
                events.append({"ph": "M", "name": name, "pid": pids[device],
                               "tid": streams[stream], "ts": 0, "args": value})
        return streams[stream]

    for number, call in enumerate(recorder.calls):
        device = call.device
        if device not in pids:
            pids[device] = len(pids) + 1
            tids[device] = {}
            for name, value in (("process_name", {"name": f"{device} (modeled)"}),
                                ("process_sort_index", {"sort_index": pids[device]})):
                events.append({"ph": "M", "name": name, "pid": pids[device], "tid": 0,
                               "ts": 0, "args": value})
            for stream in STREAMS:
                thread(device, stream)
        cost = call.cost_for(call.trip_counts)
        start = clock[device]
        for k in cost.kernels:
            events.append({
                "ph": "X", "name": event_name(k), "cat": k.stream,
                "ts": (start + k.start_s) * 1e6, "dur": k.time_s * 1e6,
                "pid": pids[device], "tid": thread(device, k.stream),
                "args": {"flops": k.flops, "hbm_bytes": k.hbm_bytes, "bound": kernel_bound(k),
                         "count": k.count, "path": k.path, "source": k.source,
                         "program": call.program, "call": number,
                         **({"algorithm": k.algorithm} if k.algorithm else {})},
            })
        clock[device] = start + cost.time_s
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"generator": "mtia-jax",
                          "timeline": "modeled on the chip by the mtia-jax performance "
                                      "model, not measured"}}


def write(data: dict[str, Any], path: str | os.PathLike) -> pathlib.Path:
    """Write ``data`` as JSON to ``path`` (gzip-compressed if it ends in .gz).
    An existing directory gets a file ``mtia_jax.trace.json`` inside it."""
    target = pathlib.Path(path)
    if target.is_dir():
        target = target / "mtia_jax.trace.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data)
    if target.suffix == ".gz":
        with gzip.open(target, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        target.write_text(text, encoding="utf-8")
    return target
