"""Logical MTIA devices and their modeled busy time.

There is no MTIA silicon here: a ``Device`` is the modeled chip a compiled
program runs on. Every call of a compiled program adds its modeled cost to
the ``stats`` of the device of its chip, so a serving loop can read how long
the chip would have been busy::

    dev = mtia_jax.devices("mtia450")[0]
    dev.stats.reset()
    for batch in batches:
        step(batch)
    print(dev.stats.busy_s, dev.stats.calls)

There is one device per chip spec (id 0), created on first use: a what-if
variant made with ``ChipSpec.replace`` gets a device of its own, so its
stats never mix with the catalogue chip's.

Recording a call must cost next to nothing (a compiled call must stay about
as cheap as ``jax.jit``'s), so a call only appends its precomputed totals to
a queue; ``stats`` folds the queue when read. Programs with while loops
append their trip counts, which are device arrays: converting them to numbers
waits for the computation, so that happens only when the stats are read (or
when many calls are queued).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Mapping

from mtia_jax import chips as chip_catalogue
from mtia_jax.chips import ChipSpec

# (modeled seconds, HBM bytes, FLOPs) of one call
CallTotals = tuple[float, float, float]

# queued calls beyond which recording folds the queue (bounds its memory)
_FOLD_AT = 4096


class _Deferred:
    """A call of a program with while loops: its totals depend on the trip
    counts (device arrays) the call returned."""

    __slots__ = ("totals_for", "trip_counts")

    def __init__(self, totals_for: Callable[[Mapping[str, Any]], CallTotals],
                 trip_counts: Mapping[str, Any]):
        self.totals_for = totals_for
        self.trip_counts = trip_counts


class DeviceStats:
    """Modeled work done by one device since it was created or ``reset()``.

    ``busy_s`` is the sum of the modeled times of the calls (calls run back to
    back on the device); ``hbm_bytes`` and ``flops`` are summed over kernels.
    """

    def __init__(self) -> None:
        self._queue: collections.deque = collections.deque()  # append/popleft are thread-safe
        self._fold_lock = threading.Lock()
        self._busy_s = 0.0
        self._calls = 0
        self._hbm_bytes = 0.0
        self._flops = 0.0

    # -------------------------------------------------------- recording

    def record(self, totals: CallTotals) -> None:
        """One call whose cost is known up front."""
        self._queue.append(totals)
        if len(self._queue) > _FOLD_AT:
            self._fold()

    def record_deferred(self, totals_for: Callable[[Mapping[str, Any]], CallTotals],
                        trip_counts: Mapping[str, Any]) -> None:
        """One call of a program with while loops; ``totals_for(trip_counts)``
        gives its cost and is evaluated when the stats are next read."""
        self._queue.append(_Deferred(totals_for, trip_counts))
        if len(self._queue) > _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        queue = self._queue
        with self._fold_lock:
            while True:
                try:
                    entry = queue.popleft()
                except IndexError:
                    return
                if type(entry) is _Deferred:
                    entry = entry.totals_for(entry.trip_counts)
                time_s, hbm_bytes, flops = entry
                self._busy_s += time_s
                self._hbm_bytes += hbm_bytes
                self._flops += flops
                self._calls += 1

    # ---------------------------------------------------------- reading

    @property
    def busy_s(self) -> float:
        """Modeled seconds the device has been busy (calls back to back)."""
        self._fold()
        return self._busy_s

    @property
    def calls(self) -> int:
        self._fold()
        return self._calls

    @property
    def hbm_bytes(self) -> float:
        self._fold()
        return self._hbm_bytes

    @property
    def flops(self) -> float:
        self._fold()
        return self._flops

    def as_dict(self) -> dict[str, float]:
        self._fold()
        return {"busy_s": self._busy_s, "calls": self._calls,
                "hbm_bytes": self._hbm_bytes, "flops": self._flops}

    def reset(self) -> None:
        """Forget every call so far (queued calls included)."""
        with self._fold_lock:
            self._queue.clear()
            self._busy_s = self._hbm_bytes = self._flops = 0.0
            self._calls = 0

    def __repr__(self) -> str:
        d = self.as_dict()
        return (f"DeviceStats(busy_s={d['busy_s']:.6g}, calls={d['calls']}, "
                f"hbm_bytes={d['hbm_bytes']:.6g}, flops={d['flops']:.6g})")


class Device:
    """One logical MTIA device: the modeled chip compiled programs run on.

    Attributes mirror ``jax.Device`` where they apply: ``id``, ``platform``
    (``"mtia"``), ``device_kind`` (the chip name), ``process_index``.
    """

    platform = "mtia"
    process_index = 0

    def __init__(self, chip: ChipSpec, id: int = 0):
        self.chip = chip
        self.id = id
        self.stats = DeviceStats()

    @property
    def device_kind(self) -> str:
        return self.chip.name

    def __str__(self) -> str:
        return f"{self.chip.name}:{self.id}"

    def __repr__(self) -> str:
        return f"MtiaDevice(id={self.id}, chip={self.chip.name!r})"


_DEVICES: dict[ChipSpec, Device] = {}
_DEVICES_LOCK = threading.Lock()


def device_for(chip: ChipSpec | str) -> Device:
    """The device of ``chip`` (one per chip spec, created on first use)."""
    spec = chip_catalogue.get(chip)
    device = _DEVICES.get(spec)
    if device is None:
        with _DEVICES_LOCK:
            device = _DEVICES.setdefault(spec, Device(spec))
    return device


def devices(chip: ChipSpec | str | None = None) -> list[Device]:
    """The MTIA devices of ``chip`` (default ``mtia_jax.chips.default_name()``).

    A list, like ``jax.devices()``; today one logical device per chip.
    """
    return [device_for(chip if chip is not None else chip_catalogue.default_name())]
