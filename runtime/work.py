"""What an op asks of the hardware, as the work rules state it
(``runtime.op_work`` for XLA's ops, ``runtime.accelerated`` for mtia-jax's
own primitives): ``OpWork``, and the byte accounting of scattered accesses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lowering.ir import TensorType


@dataclasses.dataclass(frozen=True)
class OpWork:
    """What an op asks of the hardware, independent of any chip."""

    flops: float = 0.0            # on ``engine``
    transcendentals: float = 0.0  # on the special-function unit (vector rate)
    engine: str = "vector"  # "matrix", "vector", or "host" (runs on the host CPU)
    dtype: Any = None       # compute dtype or MX format name, for the engine's peak
    # Bytes by touch. ``reads``: the HBM bytes read from each operand, in
    # operand order (None: every operand whole; a scalar operand is an
    # immediate and reads nothing). ``writes``: the bytes written (None:
    # every result whole). They differ from the operand and result sizes
    # for windows (a slice reads its window), gathered rows, in-place
    # updates (only the rows written), packed MX data and the experts that
    # receive tokens.
    reads: tuple[float, ...] | None = None
    writes: float | None = None
    # a dedicated unit (``ChipSpec.units``) that runs this op: on a chip that
    # has it, the op's special-function work runs inside the unit alongside the
    # matrix engine and ``bytes_saved_by_unit`` are not moved
    unit: str | None = None
    bytes_saved_by_unit: float = 0.0
    # scattered row accesses among the reads and writes (gathers, embedding
    # lookups, scatters): each pays one DRAM access overhead on top of its
    # bytes (``ChipSpec.hbm_random_access_efficiency``)
    random_accesses: float = 0.0


# assumption: the DRAM access granule of a random read. HBM3 and LPDDR5 move
# 32-byte bursts (a pseudo-channel / x16 channel with burst length 8 / 16);
# memory controllers and on-chip caches commonly fetch 64-byte lines, so a
# scattered run of bytes costs whole 64-byte granules. Not published for MTIA.
ACCESS_GRANULE_BYTES = 64


def granules(nbytes: float) -> float:
    """Bytes a random access of ``nbytes`` contiguous bytes moves: whole granules."""
    return math.ceil(nbytes / ACCESS_GRANULE_BYTES) * ACCESS_GRANULE_BYTES


def _runs(shape: tuple[int, ...], window: tuple[int, ...]) -> tuple[int, int]:
    """(contiguous runs, elements per run) of a ``window`` of a row-major
    array of ``shape``: the innermost dimensions taken whole, with the first
    dimension the window cuts, form one run."""
    cut = max((d for d, w in enumerate(window) if w != shape[d]), default=-1)
    if cut < 0:
        return 1, math.prod(shape)
    return math.prod(window[:cut]), math.prod(window[cut:])


def scattered_bytes(operand: TensorType, windows: int, window: tuple[int, ...]) -> tuple[float, float]:
    """(HBM bytes, random accesses) of reading or writing ``windows`` windows
    of ``operand`` at data-dependent places: each contiguous run of a window
    costs whole access granules and one random access; a gather that would
    move more than the whole operand streams the operand instead."""
    runs, run_elements = _runs(operand.shape, window)
    itemsize = operand.nbytes / max(operand.size, 1)
    moved = windows * runs * granules(run_elements * itemsize)
    if moved >= operand.nbytes:
        return float(operand.nbytes), 0.0
    return float(moved), float(windows * runs)
