"""What a Pallas kernel costs on a chip, from its structure
(``runtime.pallas_structure``: grid, block traffic, body work).

The grid's parallel iterations spread over the chip's processing elements
(PEs, ``pe_rows x pe_cols``), each PE running its chunk of grid steps in
order; sequential ("arbitrary") axes run in order on one PE. Per PE:

- compute per step: the body's matrix FLOPs at the PE's share of the matrix
  peak (``matmul_peak / PEs``, times ``matmul_efficiency`` and the block's
  DPE efficiency: its dot's output block padded to the Dot Product Engine's
  native 32 x 32 block, and the K stream's fill and drain,
  ``lowering.passes.tiling``), concurrently with its vector, relayout and
  special-function work at the PE's share of the vector peak;
- DMA: every block fetch and write-back (the in-bounds bytes), all PEs
  sharing the HBM bandwidth.

With double buffering a step's compute overlaps the next step's fetches, so
one kernel takes

    fill + max(steps per PE x compute per step, rest of the bytes / bandwidth) + drain

where *fill* is the first step's block fetches (no compute to hide behind)
and *drain* the last write-back. As ``KernelCost`` it is
``compute_s = steps x compute + fill + drain`` and ``hbm_s`` = all bytes /
bandwidth (fill and drain are part of the bytes), so ``max(compute_s,
hbm_s)`` is the formula above. The floor holds: compute at a PE's share of
the peak on at most all PEs is never faster than the FLOPs at peak, and the
bytes are at least those of the fewest fetches (one PE,
``runtime.accelerated.pallas``).
"""

from __future__ import annotations

import numpy as np

from lowering.ir import Op
from lowering.passes.tiling import native_block_efficiency, pipeline_efficiency
from mtia_jax.errors import PallasBlockError
from runtime.pallas_structure import KernelStructure, analyze

_CACHE: dict = {}


def structure(op: Op, parallel_units: int = 1) -> KernelStructure:
    """``analyze`` of a pallas_call op, cached per kernel and unit count."""
    params = op.params
    key = (id(params["jaxpr"]), id(params["grid_mapping"]), parallel_units)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not params["jaxpr"]:
        hit = _CACHE[key] = (params["jaxpr"], analyze(params, parallel_units=parallel_units))
    return hit[1]


def pes(chip) -> int:
    return chip.pe_rows * chip.pe_cols


def dpe_efficiency(op: Op, chip) -> float:
    """FLOP-weighted efficiency of the body's dots on one PE's Dot Product
    Engine: output blocks padded to the native block, the K stream's fill
    and drain."""
    total = weighted = 0.0
    for m, n, k, dtype in structure(op).dots:
        flops = 2.0 * m * n * k
        total += flops
        pipe = pipeline_efficiency(k, chip.matmul_peak(np.dtype(dtype)), chip)
        weighted += flops * native_block_efficiency(m, n) * pipe
    return weighted / total if total else 1.0


def times(op: Op, chip) -> dict[str, float]:
    """compute_s, hbm_s, hbm_bytes, and the per-engine seconds of one
    execution of a pallas_call op on ``chip``; see the module doc."""
    s = structure(op, pes(chip))
    units = s.units_used
    per_pe = pes(chip)
    busiest = max(range(units), key=lambda u: s.unit_steps[u])
    work = s.unit_work[busiest]
    efficiency = dpe_efficiency(op, chip) * chip.matmul_efficiency
    matrix = sum(flops / (chip.matmul_peak(np.dtype(dtype)) / per_pe * efficiency)
                 for dtype, flops in work.matrix_flops_by_dtype)
    vector_rate = chip.vector_peak(np.float32) / per_pe
    vector = (work.vector_ops + work.transcendentals + work.relayout_elements) / vector_rate
    bandwidth = chip.hbm_bandwidth * chip.hbm_efficiency
    # the first step fetches every input block on every PE at once; the last
    # write-back of every output block follows the last step
    fill = units * sum(o.block_bytes for o in s.inputs if o.buffers) / bandwidth
    drain = units * sum(o.block_bytes for o in s.outputs if o.buffers) / bandwidth
    hbm_bytes = float(s.hbm_read_bytes + s.hbm_write_bytes)
    ideal_matrix = sum(flops / chip.matmul_peak(np.dtype(dtype)) for dtype, flops in s.work_total.matrix_flops_by_dtype)
    ideal_vector = (s.work_total.vector_ops + s.work_total.transcendentals) / chip.vector_peak(np.float32)
    return dict(compute_s=max(matrix, vector) + fill + drain, hbm_s=hbm_bytes / bandwidth,
                hbm_bytes=hbm_bytes, matrix_s=matrix, vector_s=vector,
                ideal_matrix_s=ideal_matrix, ideal_vector_s=ideal_vector)


def check_block_sets(module, chip) -> None:
    """Raise ``PallasBlockError`` for a pallas_call whose double-buffered
    blocks and scratch do not fit a PE's local memory plus its share of the
    SRAM (region bodies included)."""
    capacity = chip.pe_local_bytes + chip.sram_bytes // pes(chip)
    for op in module.ops:
        for region in op.regions.values():
            check_block_sets(region, chip)
        if op.kind != "pallas_call":
            continue
        s = structure(op)
        if s.block_set_bytes > capacity:
            blocks = [(o.origin, tuple(d if d is not None else 1 for d in o.block_shape),
                       o.buffers * o.block_bytes) for o in s.operands if o.buffers]
            if s.scratch_bytes:
                blocks.append(("scratch", (), s.scratch_bytes))
            raise PallasBlockError(op.attrs.get("name", "pallas_call"), chip.name, s.block_set_bytes,
                                   capacity, blocks, op.source)
