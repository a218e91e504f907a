"""Tiling and autotuning: choose a tile for every matmul, convolution and
reduction kernel, and record what it costs in HBM re-reads and PE utilisation.

Matmul-like kernels (``dot_general``, ``conv_general_dilated`` as an implicit
GEMM, and fused kernels built around one) are viewed as a batch of
``M x N x K`` products. A tile ``(Tm, Tn, Tk)`` is computed output-stationary:
an ``Tm x Tn`` block of outputs accumulates over K on chip, spread over the PE
grid as ``gr x gc`` per-PE blocks. Then

- HBM traffic = lhs bytes x ceil(N / Tn) + rhs bytes x ceil(M / Tm) + output
  bytes: each operand is re-read once per tile of the other's free dimension;
- PE efficiency = useful outputs / computed outputs, counting the padding of
  the last tile in M and N and of each per-PE block to the Dot Product
  Engine's native output block (``DPE_NATIVE_TILE``), times the pipeline
  efficiency of the K loop: each native block streams K through the DPE in
  ``2 x 32 x 32 x K / (FLOP per PE per cycle)`` cycles and then pays
  ``DPE_FILL_DRAIN_CYCLES`` to fill and drain the array (accumulation stays
  in the DPE across K chunks, so this is paid once per block). Short-K
  products and faster compute classes (MX4 streams K six times faster than
  BF16 on MTIA 450) lose the most;
- the tile must fit: double-buffered operand tiles plus the fp32 accumulator
  in on-chip SRAM, and each PE's share in its local memory.

Candidates (powers of two) are scored with the same roofline the cost model
uses, ``max(FLOPs / (peak x efficiency), HBM bytes / bandwidth)``, and the best
is kept (ties go to the tile that moves fewer bytes); decisions are cached per (shape, dtypes, chip). Reductions get a tile
of rows; a reduced axis longer than fits in SRAM is reduced in chunks whose
partial results make an extra round trip through HBM.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from lowering.gemm_shapes import GEMM_SHAPES, GemmShape
from lowering.ir import Module, Op
from lowering.op_kinds import KIND_CATEGORY
from lowering.regions import REGION_KINDS

# Assumption (not published for any MTIA generation): the Dot Product Engine
# produces a 32 x 32 block of outputs per pass; a per-PE block is padded to it.
DPE_NATIVE_TILE = 32
# Assumption (not published): filling a 32-deep systolic array and draining
# its 32 rows of accumulators takes 2 x 32 cycles per native output block,
# not overlapped with the next block's K stream.
DPE_FILL_DRAIN_CYCLES = 2 * DPE_NATIVE_TILE
ACCUMULATOR_BYTES = 4  # fp32 accumulation [MXS §6.2: MX dot products accumulate in FP32]


@dataclasses.dataclass(frozen=True)
class Tile:
    """A chosen tile and what it implies."""

    m: int
    n: int
    k: int
    grid: tuple[int, int]    # PE rows x cols the tile is spread over
    efficiency: float        # fraction of the DPE's work that is useful
    extra_hbm_bytes: float   # re-reads beyond reading each operand once

    def __str__(self) -> str:
        return (f"{self.m}x{self.n}x{self.k} on {self.grid[0]}x{self.grid[1]} PEs, "
                f"eff {self.efficiency:.2f}, +{self.extra_hbm_bytes / 1e6:.3g} MB")


def _pow2_upto(n: int) -> list[int]:
    return [1 << i for i in range(max(1, math.ceil(math.log2(max(n, 1)))) + 1)]


def _pad(x: int, q: int) -> int:
    return -(-x // q) * q


def native_block_efficiency(rows: int, cols: int) -> float:
    """Useful fraction of a (rows x cols) output block padded to the DPE's
    native block (``DPE_NATIVE_TILE`` square)."""
    return (rows * cols) / (_pad(rows, DPE_NATIVE_TILE) * _pad(cols, DPE_NATIVE_TILE))


def _best_grid(tm: int, tn: int, rows: int, cols: int) -> tuple[tuple[int, int], float]:
    """Spread a (tm x tn) tile over the PE grid to waste the least DPE work."""
    n_pe = rows * cols
    best, best_eff = (1, n_pe), 0.0
    for gr in _pow2_upto(n_pe):
        if n_pe % gr:
            continue
        gc = n_pe // gr
        pm, pn = -(-tm // gr), -(-tn // gc)
        eff = (tm * tn) / (gr * gc * _pad(pm, DPE_NATIVE_TILE) * _pad(pn, DPE_NATIVE_TILE))
        if eff > best_eff:
            best, best_eff = (gr, gc), eff
    return best, best_eff


def pipeline_efficiency(k: int, peak: float, chip) -> float:
    """Fraction of a native block's DPE time spent streaming K, the rest
    filling and draining the array (``DPE_FILL_DRAIN_CYCLES``)."""
    flops_per_pe_cycle = peak / (chip.pe_rows * chip.pe_cols * chip.clock_hz)
    k_cycles = 2.0 * DPE_NATIVE_TILE * DPE_NATIVE_TILE * k / flops_per_pe_cycle
    return k_cycles / (k_cycles + DPE_FILL_DRAIN_CYCLES) if k_cycles > 0 else 1.0


@functools.lru_cache(maxsize=4096)
def choose_gemm_tile(shape: GemmShape, chip) -> Tile:
    """The best-scoring tile of ``shape`` on ``chip``."""
    peak = chip.matmul_peak(shape.dtype)
    pipe = pipeline_efficiency(shape.k, peak, chip)
    in_bytes = max(np.dtype(shape.dtype).itemsize, 1)
    sram_budget = chip.sram_bytes
    pe_budget = chip.pe_local_bytes
    n_pe = chip.pe_rows * chip.pe_cols
    best, best_score = None, (math.inf, math.inf)
    for tm in _pow2_upto(shape.m):
        for tn in _pow2_upto(shape.n):
            (gr, gc), grid_eff = _best_grid(min(tm, shape.m), min(tn, shape.n), chip.pe_rows, chip.pe_cols)
            pm, pn = -(-min(tm, shape.m) // gr), -(-min(tn, shape.n) // gc)
            # largest K step whose double-buffered operand tiles fit SRAM and the PE
            acc = tm * tn * ACCUMULATOR_BYTES
            tk_sram = (sram_budget - acc) // (2 * in_bytes * (tm + tn))
            tk_pe = (pe_budget - pm * pn * ACCUMULATOR_BYTES) // (2 * in_bytes * (pm + pn))
            tk = min(tk_sram, tk_pe, shape.k)
            if tk < min(shape.k, DPE_NATIVE_TILE):  # the DPE needs a full K step
                continue
            m_tiles, n_tiles = -(-shape.m // tm), -(-shape.n // tn)
            pad_eff = (shape.m * shape.n) / (m_tiles * min(tm, shape.m) * n_tiles * min(tn, shape.n))
            efficiency = grid_eff * pad_eff * pipe
            extra = shape.lhs_bytes * (n_tiles - 1) + shape.rhs_bytes * (m_tiles - 1)
            traffic = shape.lhs_bytes + shape.rhs_bytes + shape.out_bytes + extra
            time = max(shape.flops / (peak * efficiency), traffic / chip.hbm_bandwidth)
            score = (time, traffic)  # among equally fast tiles, the one moving fewer bytes
            if score < best_score:
                best_score = score
                best = Tile(min(tm, shape.m), min(tn, shape.n), int(tk), (gr, gc), efficiency, float(extra))
    if best is None:  # nothing fits even one row/col per step: stream at minimal size
        best = Tile(1, 1, 1, (1, n_pe), pipe / (DPE_NATIVE_TILE ** 2),
                    float(shape.lhs_bytes * (shape.n - 1) + shape.rhs_bytes * (shape.m - 1)))
    return best


def reduction_tile(op: Op, chip) -> Tile:
    """Rows per tile and the chunk of the reduced axis that fits in SRAM."""
    operand, result = op.operands[0], op.results[0]
    length = max(operand.type.size // max(result.type.size, 1), 1)
    itemsize = operand.type.nbytes // max(operand.type.size, 1) or 1
    chunk = min(length, max(chip.sram_bytes // (2 * itemsize), 1))
    rows = max(min(result.type.size, chip.sram_bytes // (2 * itemsize * chunk)), 1)
    chunks = -(-length // chunk)
    # partial results of all chunks but the last go out to HBM and come back
    extra = 2.0 * result.type.nbytes * (chunks - 1)
    return Tile(rows, 1, chunk, (chip.pe_rows, chip.pe_cols), 1.0, extra)


def _tiled_op(op: Op) -> Op | None:
    """The op whose shape decides the tile: the op itself or the core of a fused kernel."""
    if op.kind in GEMM_SHAPES or KIND_CATEGORY.get(op.kind) == "reduction":
        return op
    if op.kind == "fused_kernel":
        inner = [o for o in op.regions["body"].ops if o.kind in GEMM_SHAPES]
        if len(inner) == 1:
            return inner[0]
        reductions = [o for o in op.regions["body"].ops if KIND_CATEGORY.get(o.kind) == "reduction"]
        if reductions:
            return max(reductions, key=lambda o: o.operands[0].type.size)
    return None


def tile_for(op: Op, chip) -> Tile | None:
    core = _tiled_op(op)
    if core is None:
        return None
    if core.kind in GEMM_SHAPES:
        return choose_gemm_tile(GEMM_SHAPES[core.kind](core), chip)
    return reduction_tile(core, chip)


def run(module: Module, ctx) -> Module:
    ops = []
    for op in module.ops:
        if op.kind in REGION_KINDS:
            op = dataclasses.replace(op, regions={k: run(r, ctx) for k, r in op.regions.items()})
        else:
            tile = tile_for(op, ctx.chip)
            if tile is not None:
                op = dataclasses.replace(op, attrs={**op.attrs, "tile": tile})
        ops.append(op)
    return dataclasses.replace(module, ops=ops)
